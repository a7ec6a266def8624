package main

import (
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// Edges of pglock: every flag in a synopsis, a stall before the wait,
// numbers parsed alike, a zombie in the job's group. Each test showed a
// defect before its fix.

var flagToken = regexp.MustCompile(`--[a-z][a-z-]*`)

// synopsisFlags returns, per command, the flags the synopsis lines of text
// name: lines starting with "pglock CMD" and their indented continuations.
func synopsisFlags(text string) map[string][]string {
	out := map[string][]string{}
	cmd := ""
	for _, line := range strings.Split(text, "\n") {
		trimmed := strings.TrimSpace(line)
		switch {
		case strings.HasPrefix(trimmed, "pglock "):
			f := strings.Fields(trimmed)
			cmd = f[1]
			if strings.HasPrefix(cmd, "-") {
				cmd = ""
			}
		case cmd != "" && strings.HasPrefix(line, "   ") && !strings.HasPrefix(trimmed, "#"):
		default:
			cmd = ""
		}
		if cmd == "" {
			continue
		}
		if i := strings.Index(line, "#"); i >= 0 { // README's trailing comments
			line = line[:i]
		}
		for _, fl := range flagToken.FindAllString(line, -1) {
			if !slices.Contains(out[cmd], fl) {
				out[cmd] = append(out[cmd], fl)
			}
		}
	}
	return out
}

// helpFlags returns the flags "pglock CMD --help" lists under Options.
func (e *env) helpFlags(cmd string) []string {
	p := e.pglock(nil, cmd, "--help")
	e.want(p, 0)
	_, opts, _ := strings.Cut(p.stdout.String(), "\nOptions:\n")
	var out []string
	for _, line := range strings.Split(opts, "\n") {
		if strings.HasPrefix(line, "  --") {
			out = append(out, strings.Fields(line)[0])
		}
	}
	return out
}

// The synopsis of each command in docs/pglock.md (the README's pglock
// section moved there) and in "pglock --help" names exactly the flags the
// command's own --help lists.
func TestSynopsesListEveryFlag(t *testing.T) {
	e := newEnv(t)
	doc, err := os.ReadFile("../../docs/pglock.md")
	if err != nil {
		t.Fatal(err)
	}
	section, _, _ := strings.Cut(string(doc), "\n## pglock run: process groups")
	top := e.pglock(nil, "--help")
	e.want(top, 0)
	for _, doc := range []struct{ name, text string }{{"docs/pglock.md", section}, {`"pglock --help"`, top.stdout.String()}} {
		syn := synopsisFlags(doc.text)
		for _, cmd := range []string{"run", "status", "key", "demo"} {
			help := e.helpFlags(cmd)
			for _, fl := range help {
				if !slices.Contains(syn[cmd], fl) {
					t.Errorf("%s: the synopsis of %q does not name %s, which \"pglock %s --help\" lists", doc.name, cmd, fl, cmd)
				}
			}
			for _, fl := range syn[cmd] {
				if !slices.Contains(help, fl) {
					t.Errorf("%s: the synopsis of %q names %s, which \"pglock %s --help\" does not list", doc.name, cmd, fl, cmd)
				}
			}
		}
	}
}

// A pglock that connected but whose first query is never answered must
// notice the stall as a waiter does (exit 1 within about 2 s, README
// "Waiting"), not wait forever before it even starts waiting: run's first
// query (the ping) is bounded by neither the stall guard nor a deadline
// when no --timeout is given.
func TestStallBeforeWaitIsNoticed(t *testing.T) {
	e := newEnv(t)
	dsn := e.silentServer(true)
	for _, extra := range [][]string{nil, {"--no-wait"}} {
		args := append([]string{"run", "--dsn", dsn, "--key", "mute-after-startup"}, extra...)
		p := e.start(nil, "", append(args, "--", "touch", "ran")...)
		// A loose "did not hang" bound (the documented one is about 2 s,
		// the connect timeout 10 s), not a timing claim.
		select {
		case <-p.done:
		case <-time.After(30 * time.Second):
			_ = p.cmd.Process.Kill()
			<-p.done
			t.Errorf("pglock %q did not notice that the server stopped answering: still running after 30 s (killed)", p.cmd.Args[1:])
			continue
		}
		e.want(p, exitFailure)
		if fileExists(filepath.Join(e.dir, "ran")) {
			t.Errorf("pglock %q ran CMD", p.cmd.Args[1:])
		}
	}
}

// Issue 15 asks numbers to be parsed consistently: --id ' 5', --pair
// ' 1 , 2 ' and --conflict-exit-code ' 3' allow spaces around the number,
// so --slots and the durations must too (a usage error, exit 2, is what a
// refused value gives; "key" needs no database, and the runs end with CMD
// "true").
func TestNumbersTrimmedAlike(t *testing.T) {
	e := newEnv(t)
	for _, args := range [][]string{
		{"key", "--slots", " 2", "name"},
		{"run", e.dsnArg(), "--key", "trim", "--slots", " 2", "--", "true"},
		{"run", e.dsnArg(), "--key", "trim", "--timeout", " 1", "--", "true"},
		{"run", e.dsnArg(), "--key", "trim", "--ttl", "5 ", "--", "true"},
		{"run", e.dsnArg(), "--key", "trim", "--grace", " 1", "--", "true"},
	} {
		e.want(e.pglock(nil, args...), 0)
	}
}

// A process that leaves CMD's group leaves the job (README, process
// groups). If it leaves behind an unreaped child in the group, that zombie
// is no process of the job: it never ends by a signal, and only its parent,
// outside the job, can reap it. pglock must not keep the lock (and not run
// on) while only zombies are left in the group: job.ended counts the
// group empty only when kill(-pgid, 0) fails, which a zombie member makes
// succeed.
func TestZombieInGroupDoesNotHoldTheJob(t *testing.T) {
	e := newEnv(t)
	// perl forks a child that exits at once (a zombie in CMD's group, as
	// perl never reaps it), leaves the group, writes its pid and sleeps.
	script := `perl -e 'my $p = fork; if (!$p) { exit 0 } setpgrp(0, 0); open(F, ">left.tmp"); print F $$; close F; rename "left.tmp", "left"; sleep 120' &
while [ ! -e left ]; do sleep 0.01; done; exit 0`
	p := e.start(nil, "", "run", e.dsnArg(), "--key", "zombie", "--grace", "0.2", "--", "sh", "-c", script)
	left := filepath.Join(e.dir, "left")
	e.await("the process that left the group wrote its pid", func() (bool, error) { return len(readLines(t, left)) == 1, nil })
	pid, err := strconv.Atoi(readLines(t, left)[0])
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = syscall.Kill(pid, syscall.SIGKILL) })
	// A loose "did not hang" bound, not a timing claim: CMD has exited,
	// and nothing of the job can still run.
	select {
	case <-p.done:
		e.want(p, 0)
	case <-time.After(30 * time.Second):
		t.Errorf("pglock still holds the lock 30 s after CMD exited, with only a zombie left in CMD's group (its parent left the group)")
		ps, _ := exec.Command("ps", "-e", "-o", "pid,ppid,pgid,stat,comm").Output()
		var group []string
		for _, l := range strings.Split(string(ps), "\n") {
			if strings.Contains(l, "perl") {
				group = append(group, l)
			}
		}
		t.Logf("processes (pid ppid pgid stat comm):\n%s", strings.Join(group, "\n"))
		_ = syscall.Kill(pid, syscall.SIGKILL) // its parent ends: the zombie is reaped, pglock exits
		e.wait(p)
	}
}
