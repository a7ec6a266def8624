package main

import (
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

func TestDemoOwnServer(t *testing.T) {
	e := newEnv(t)
	tmp := demoTempDir(t)
	p := e.start([]string{"TMPDIR=" + tmp}, "", "demo")
	e.waitWithin(p, testTimeout) // it starts a server of its own: longer than notHung on a loaded machine
	e.want(p, 0)
	t.Logf("pglock demo took %v:\n%s", p.elapsed, p.stdout.String())
	out := p.stdout.String()
	for _, want := range []string{"started a throw-away PostgreSQL", "mutual exclusion held", "fail-over",
		"no advisory lock left", "stopped the throw-away server and removed its files", "all checks passed"} {
		if !strings.Contains(out, want) {
			t.Errorf("demo output lacks %q", want)
		}
	}
	// How long it took is logged above, not asserted: the CPU is shared.
	// e.pglock's testTimeout is the only bound, so that a hang fails.
	left, err := os.ReadDir(tmp)
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range left {
		t.Errorf("demo left %s behind", filepath.Join(tmp, f.Name()))
	}
	if procs := processesMentioning(t, tmp); len(procs) > 0 {
		t.Errorf("demo left processes behind: %q", procs)
	}
}

func TestDemoConfiguredDatabase(t *testing.T) {
	e := newEnv(t)
	p := e.pglock([]string{"DATABASE_URL=" + e.withPassword(secret)}, "demo")
	e.want(p, 0)
	noSecret(t, p)
	out := p.stdout.String()
	if !strings.Contains(out, "using the configured database") || strings.Contains(out, "throw-away") ||
		!strings.Contains(out, "fail-over") {
		t.Errorf("demo on the configured database:\n%s", out)
	}
	// newEnv's check: no advisory lock left on the server.
}

// demoTempDir is a TMPDIR of the test's own for the demo's throw-away
// server, reachable by the postgres user when the tests run as root.
func demoTempDir(t *testing.T) string {
	t.Helper()
	tmp, err := os.MkdirTemp("", "pglock-demo-test-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(tmp) })
	if err := os.Chmod(tmp, 0o755); err != nil {
		t.Fatal(err)
	}
	return tmp
}

// processesMentioning returns the command lines of running processes that
// contain s.
func processesMentioning(t *testing.T, s string) []string {
	t.Helper()
	dirs, err := filepath.Glob("/proc/[0-9]*/cmdline")
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, f := range dirs {
		b, err := os.ReadFile(f)
		if err != nil {
			continue // gone meanwhile
		}
		if cmdline := strings.ReplaceAll(string(b), "\x00", " "); strings.Contains(cmdline, s) {
			out = append(out, cmdline)
		}
	}
	return out
}

// A demo interrupted while it starts its server (as by Ctrl-C) says so,
// exits 130, and leaves no server and no files behind.
func TestDemoInterrupted(t *testing.T) {
	e := newEnv(t)
	tmp := demoTempDir(t)
	p := e.start([]string{"TMPDIR=" + tmp}, "", "demo")
	e.await("the demo's initdb running", func() (bool, error) {
		for _, cmdline := range processesMentioning(t, tmp) {
			if strings.Contains(cmdline, "initdb") {
				return true, nil
			}
		}
		return false, nil
	})
	e.signal(p, syscall.SIGINT)
	e.wait(p)
	e.want(p, 128+2)
	stderr := p.stderr.String()
	if !strings.Contains(stderr, "interrupted") || strings.Count(stderr, "\n") != 1 || strings.Contains(stderr, "initdb") {
		t.Errorf("stderr = %q, want one line saying the demo was interrupted", stderr)
	}
	e.await("the interrupted demo's files and processes gone", func() (bool, error) {
		left, err := os.ReadDir(tmp)
		return len(left) == 0 && len(processesMentioning(t, tmp)) == 0, err
	})
}
