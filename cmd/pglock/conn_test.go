package main

import (
	"regexp"
	"strings"
	"testing"
)

// With no --dsn, DATABASE_URL or PG* variable, a failed connection says
// that nothing was configured and how to configure a database, not that
// the settings came from the PG* environment.
func TestConnectNothingConfigured(t *testing.T) {
	e := newEnv(t)
	for _, args := range [][]string{{"status"}, {"run", "--key", "k", "--", "true"}} {
		p := e.pglock(nil, args...)
		e.want(p, exitFailure)
		stderr := p.stderr.String()
		if strings.Count(stderr, "\n") != 1 {
			t.Errorf("pglock %q: stderr %q, want one line", args, stderr)
		}
		for _, want := range []string{"no database is configured", "--dsn", "DATABASE_URL", "PGHOST"} {
			if !strings.Contains(stderr, want) {
				t.Errorf("pglock %q: stderr %q, want %q in it", args, stderr, want)
			}
		}
		if strings.Contains(stderr, "PG* environment") {
			t.Errorf("pglock %q: stderr %q says the settings came from the PG* environment, which set nothing", args, stderr)
		}
	}
	// A PG* variable is a configuration: then the message says so.
	p := e.pglock([]string{"PGHOST=127.0.0.1", "PGPORT=1"}, "status")
	e.want(p, exitFailure)
	if stderr := p.stderr.String(); !strings.Contains(stderr, "settings from PG* environment") {
		t.Errorf("pglock status with PGHOST set: stderr %q, want it to say the settings came from the PG* environment", stderr)
	}
}

// refused is the text of one refused attempt at ADDR:1 ("127.0.0.1:1",
// "[::1]:1").
var refused = regexp.MustCompile(`dial tcp (\S+:1): connect: connection refused`)

// A refused connection is said in one line, each attempt once: pgx tries an
// address again on its fallback (TLS, then without) and joins the errors.
func TestConnectRefusedSaidOnce(t *testing.T) {
	e := newEnv(t)
	for _, dsn := range []string{
		"postgres://postgres:" + secret + "@localhost:1/postgres",
		"postgres://postgres:" + secret + "@127.0.0.1:1/postgres",
		"host=127.0.0.1 port=1 user=postgres password=" + secret,
	} {
		for _, args := range [][]string{{"status", "--dsn", dsn}, {"run", "--dsn", dsn, "--key", "k", "--", "true"}} {
			p := e.pglock(nil, args...)
			e.want(p, exitFailure)
			noSecret(t, p)
			stderr := p.stderr.String()
			seen := map[string]int{}
			for _, m := range refused.FindAllStringSubmatch(stderr, -1) {
				seen[m[1]]++
			}
			if len(seen) == 0 || strings.Count(stderr, "\n") != 1 {
				t.Errorf("pglock %q: stderr %q, want one line saying the connection was refused", args, stderr)
			}
			for addr, n := range seen {
				if n != 1 {
					t.Errorf("pglock %q: stderr says %d times that %s refused, want once: %q", args, n, addr, stderr)
				}
			}
		}
	}
}
