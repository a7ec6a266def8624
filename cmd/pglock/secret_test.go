package main

import (
	"net/url"
	"strings"
	"testing"

	"github.com/seed0ad592b7/advisory"
)

// secret is a password no output may contain. The test server trusts
// every connection, so a DSN carrying it still connects.
const secret = "pw-S3cr3t-x9"

// withPassword returns the test server's DSN with user:secret.
func (e *env) withPassword(pw string) string {
	u, err := url.Parse(e.dsn)
	if err != nil {
		e.t.Fatal(err)
	}
	u.User = url.UserPassword(u.User.Username(), pw)
	return u.String()
}

// noSecret fails the test if p printed any form of the password.
func noSecret(t *testing.T, p *proc, forms ...string) {
	t.Helper()
	out := p.stdout.String() + p.stderr.String()
	for _, s := range append(forms, secret) {
		if strings.Contains(out, s) {
			t.Errorf("pglock %q printed the password %q:\nstdout: %s\nstderr: %s", p.cmd.Args[1:], s, p.stdout.String(), p.stderr.String())
		}
	}
}

func TestPasswordNeverShown(t *testing.T) {
	e := newEnv(t)
	dsn := e.withPassword(secret)
	odd := "p@ss:w/rd?" + secret // needs percent-encoding in a URL
	oddDSN := e.withPassword(odd)
	oddForms := []string{odd, url.QueryEscape(odd), url.PathEscape(odd)}

	// Success.
	for _, tc := range []struct {
		env  []string
		args []string
	}{
		{nil, []string{"status", "--dsn", dsn}},
		{nil, []string{"status", "--dsn", oddDSN, "--json"}},
		{[]string{"DATABASE_URL=" + dsn}, []string{"status"}},
		{nil, []string{"run", "--dsn", dsn, "--key", "pw", "--", "true"}},
		{[]string{"DATABASE_URL=" + oddDSN}, []string{"run", "--key", "pw", "--", "true"}},
		{[]string{"PGPASSWORD=" + secret, "PGHOST=127.0.0.1", "PGPORT=" + portOf(t, e.dsn), "PGUSER=postgres", "PGSSLMODE=disable"},
			[]string{"run", "--key", "pw", "--", "true"}},
	} {
		p := e.pglock(tc.env, tc.args...)
		e.want(p, 0)
		noSecret(t, p, oddForms...)
	}

	// Busy.
	holder := e.hold(advisory.StringKey("pw"), false)
	p := e.pglock(nil, "run", "--dsn", dsn, "--key", "pw", "--no-wait", "--", "true")
	e.want(p, exitConflict)
	noSecret(t, p)
	e.unlockAll(holder)

	// Failure: one line on stderr naming the host, never the password.
	for _, tc := range []struct {
		env  []string
		args []string
		host string
	}{
		{nil, []string{"status", "--dsn", "postgres://postgres:" + secret + "@127.0.0.1:1/postgres"}, "127.0.0.1:1"},
		{nil, []string{"run", "--dsn", "postgres://postgres:" + secret + "@127.0.0.1:1/postgres", "--key", "pw", "--", "true"}, "127.0.0.1:1"},
		{nil, []string{"run", "--dsn", "host=127.0.0.1 port=1 user=postgres password=" + secret, "--key", "pw", "--", "true"}, "127.0.0.1:1"},
		{nil, []string{"run", "--dsn", "host=127.0.0.1 port=1 password='" + secret + " with spaces'", "--key", "pw", "--", "true"}, "127.0.0.1:1"},
		{nil, []string{"status", "--dsn", "postgres://postgres:" + secret + "@localhost:1/postgres"}, "localhost:1"},
		{nil, []string{"status", "--dsn", "postgres://postgres:" + secret + "@127.0.0.1:notaport/postgres"}, "127.0.0.1"},
		{nil, []string{"status", "--dsn", "postgres://postgres:" + secret + "@127.0.0.1/postgres?sslmode=bogus"}, "127.0.0.1"},
		{nil, []string{"status", "--dsn", "postgres://postgres:" + secret + "%zz@127.0.0.1/postgres"}, "127.0.0.1"},
		{nil, []string{"status", "--dsn", "postgres://postgres:" + secret + "/x@127.0.0.1:1/postgres"}, "127.0.0.1"},
		{[]string{"DATABASE_URL=postgres://postgres:" + secret + "@127.0.0.1:1/postgres"}, []string{"demo"}, "127.0.0.1:1"},
		{[]string{"PGPASSWORD=" + secret, "PGHOST=127.0.0.1", "PGPORT=1"}, []string{"status"}, "127.0.0.1:1"},
		{nil, []string{"status", "--dsn", "host=127.0.0.1 port=1 password=" + secret + " sslmode=nonsense"}, "127.0.0.1"},
		// An unquoted space in the password: redacted up to the next key.
		{nil, []string{"run", "--dsn", "host=127.0.0.1 port=1 password=Sup3r " + secret + " sslmode=disable", "--key", "pw", "--", "true"}, "--dsn"},
		{nil, []string{"status", "--dsn", "host=127.0.0.1 port=1 password=Sup3r " + secret}, "--dsn"},
	} {
		p := e.pglock(tc.env, tc.args...)
		e.want(p, exitFailure)
		noSecret(t, p)
		stderr := p.stderr.String()
		if strings.Count(stderr, "\n") != 1 || !strings.Contains(stderr, tc.host) {
			t.Errorf("pglock %q: stderr %q, want one line naming %s", tc.args, stderr, tc.host)
		}
	}
}

// portOf returns the port of a URL DSN.
func portOf(t *testing.T, dsn string) string {
	t.Helper()
	u, err := url.Parse(dsn)
	if err != nil {
		t.Fatal(err)
	}
	return u.Port()
}
