package main

import (
	"strconv"
	"strings"
	"testing"

	"github.com/seed0ad592b7/advisory"
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

// Command lines that look plausible but are mistakes are refused, and the
// messages name flags as the docs do.
func TestUsageRoughEdges(t *testing.T) {
	e := newEnv(t)
	for _, tc := range []struct {
		args []string
		want string // in stderr
	}{
		{[]string{"run", "--key", "", "--", "true"}, "--empty-key"},
		{[]string{"run", "--key=", "--", "true"}, "--empty-key"},
		{[]string{"status", "--key", ""}, "--empty-key"},
		{[]string{"key", ""}, "--empty-key"},
		{[]string{"key", "a", ""}, "--empty-key"},
		{[]string{"key", "--slots", "2", ""}, "--empty-key"},
		{[]string{"run", "--key", "k", "--no-wait", "--timeout", "5", "--", "true"}, "not both"},
		{[]string{"run", "--dsn", "", "--key", "k", "--", "true"}, "empty connection string"},
		{[]string{"status", "--dsn="}, "empty connection string"},
		{[]string{"run", "--key", "k", "--conflict-exit-code", "x", "--", "true"}, "whole number from 0 to 255"},
		{[]string{"run", "--key", "k", "--timeout", "soon", "--", "true"}, "for flag --timeout"},
		{[]string{"run", "--key", "k", "--no-such-flag", "--", "true"}, "not defined: --no-such-flag"},
		{[]string{"run", "--key", "k", "--timeout"}, "argument: --timeout"},
	} {
		p := e.pglock(nil, tc.args...)
		e.want(p, exitUsage)
		if stderr := p.stderr.String(); !strings.Contains(stderr, tc.want) || strings.Contains(stderr, " -timeout") {
			t.Errorf("pglock %q: stderr %q, want %q in it", tc.args, stderr, tc.want)
		}
	}
	// --id and --pair both allow spaces around their numbers; --empty-key
	// allows the empty name, in every command that takes a NAME.
	for _, args := range [][]string{{"--id", " 5 "}, {"--pair", " 1 , 2 "}, {"--key", "", "--empty-key"}} {
		p := e.pglock(nil, append(append([]string{"run", e.dsnArg()}, args...), "--", "true")...)
		e.want(p, 0)
	}
	for _, args := range [][]string{{"key", "--empty-key", "--slots", "2", ""}, {"status", e.dsnArg(), "--key", "", "--empty-key"}} {
		e.want(e.pglock(nil, args...), 0)
	}
	p := e.pglock(nil, "key", "--empty-key", "")
	e.want(p, 0)
	if v, _ := advisory.StringKey("").Int64(); !strings.Contains(p.stdout.String(), strconv.FormatInt(v, 10)) {
		t.Errorf("pglock key --empty-key '' printed %q, want the empty name's key %d", p.stdout.String(), v)
	}
}

func TestHelpAndVersion(t *testing.T) {
	e := newEnv(t)
	run := e.pglock(nil, "run", "--help")
	e.want(run, 0)
	help := e.pglock(nil, "help", "run")
	e.want(help, 0)
	if !strings.Contains(run.stdout.String(), "pglock run (--key") || help.stdout.String() != run.stdout.String() {
		t.Errorf("pglock help run:\n%s\nwant the help of run:\n%s", help.stdout.String(), run.stdout.String())
	}
	status := e.pglock(nil, "status", "--help")
	e.want(status, 0)
	if strings.Contains(status.stdout.String(), "lock the name") {
		t.Errorf("status --help says it locks:\n%s", status.stdout.String())
	}
	v := e.pglock(nil, "--version")
	e.want(v, 0)
	if !strings.HasPrefix(v.stdout.String(), "pglock ") || strings.Count(v.stdout.String(), "\n") != 1 {
		t.Errorf("pglock --version printed %q", v.stdout.String())
	}
}
