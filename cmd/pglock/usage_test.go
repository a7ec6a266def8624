package main

import (
	"strings"
	"testing"
)

func TestUsage(t *testing.T) {
	e := newEnv(t)
	for _, args := range [][]string{
		{},
		{"frobnicate"},
		{"run"},
		{"run", "--key", "k"},
		{"run", "--", "true"},
		{"run", "--key", "k", "--id", "1", "--", "true"},
		{"run", "--id", "x", "--", "true"},
		{"run", "--id", "9223372036854775808", "--", "true"},
		{"run", "--pair", "1", "--", "true"},
		{"run", "--pair", "1,2147483648", "--", "true"},
		{"run", "--key", "k", "--timeout", "-1s", "--", "true"},
		{"run", "--key", "k", "--timeout", "soon", "--", "true"},
		{"run", "--key", "k", "--ttl", "0", "--", "true"},
		{"run", "--key", "k", "--conflict-exit-code", "256", "--", "true"},
		{"run", "--key", "k", "--no-such-flag", "--", "true"},
		{"status", "--key", "a", "--pair", "1,2"},
		{"status", "extra"},
		{"key"},
		{"key", "--bad"},
		{"demo", "extra"},
	} {
		p := e.pglock(nil, args...)
		e.want(p, exitUsage)
		if !strings.Contains(p.stderr.String(), "Usage") || p.stdout.Len() != 0 {
			t.Errorf("pglock %q: stdout %q, stderr %q; want a usage message on stderr", args, p.stdout.String(), p.stderr.String())
		}
	}
	for _, args := range [][]string{{"--help"}, {"help"}, {"run", "--help"}, {"status", "-h"}, {"key", "--help"}, {"demo", "--help"}} {
		p := e.pglock(nil, args...)
		e.want(p, 0)
		if !strings.Contains(p.stdout.String(), "Usage") || p.stderr.Len() != 0 {
			t.Errorf("pglock %q: stdout %q, stderr %q; want the help on stdout", args, p.stdout.String(), p.stderr.String())
		}
	}
	if p := e.pglock(nil, "--help"); !strings.Contains(p.stdout.String(), "76") {
		t.Errorf("pglock --help does not document exit status 76:\n%s", p.stdout.String())
	}
}
