package main

import (
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/seed0ad592b7/advisory"
)

// dsnArg is the --dsn argument for the test server.
func (e *env) dsnArg() string { return "--dsn=" + e.dsn }

func TestRunExitStatus(t *testing.T) {
	e := newEnv(t)
	for _, code := range []int{0, 1, 3, 42, 255} {
		p := e.pglock(nil, "run", e.dsnArg(), "--key", "exit-status", "--", "sh", "-c", "exit "+strconv.Itoa(code))
		e.want(p, code)
	}
	// stdin, stdout and stderr are CMD's.
	p := e.start(nil, "from stdin\n", "run", e.dsnArg(), "--id", "-42", "--", "sh", "-c", "cat; echo to stderr >&2")
	e.wait(p)
	e.want(p, 0)
	if p.stdout.String() != "from stdin\n" || p.stderr.String() != "to stderr\n" {
		t.Errorf("stdout %q, stderr %q; want CMD's own", p.stdout.String(), p.stderr.String())
	}
	// Killed by a signal: 128+N, as a shell reports it.
	e.want(e.pglock(nil, "run", e.dsnArg(), "--pair", "1,2", "--", "sh", "-c", "kill -KILL $$"), 128+9)
	// Not found, not executable.
	e.want(e.pglock(nil, "run", e.dsnArg(), "--key", "x", "--", "./no-such-command"), exitNotFound)
	touch(t, filepath.Join(e.dir, "not-executable"))
	e.want(e.pglock(nil, "run", e.dsnArg(), "--key", "x", "--", "./not-executable"), exitNoExec)
	// CMD runs with the lock held, on a session named after its program,
	// never its arguments (every database user can read
	// pg_stat_activity); --app-name names it instead.
	key := advisory.StringKey("held-while-running")
	marks := filepath.Join(e.dir, "marks")
	for _, tc := range []struct {
		args []string
		want string
	}{
		{nil, "pglock run: sh"},
		{[]string{"--app-name", "nightly backup"}, "nightly backup"},
	} {
		_ = os.Remove(marks)
		_ = os.Remove(filepath.Join(e.dir, "release"))
		args := append([]string{"run", e.dsnArg(), "--key", "held-while-running"}, tc.args...)
		p = e.start(nil, "", append(args, "--", "/bin/sh", "-c",
			`echo start >> marks; while [ ! -e release ]; do sleep 0.01; done`, "sh", "--password", "hunter2")...)
		e.awaitFile(marks, "start")
		hs := e.awaitHolders(key, 1, 0)
		var app string
		if err := e.conn().QueryRow(e.ctx, "SELECT application_name FROM pg_stat_activity WHERE pid = $1", hs[0].PID).Scan(&app); err != nil {
			t.Fatal(err)
		}
		if app != tc.want || hs[0].Mode != advisory.ModeExclusive {
			t.Errorf("holder %+v with application_name %q in pg_stat_activity: want exclusive, %q", hs[0], app, tc.want)
		}
		touch(t, filepath.Join(e.dir, "release"))
		e.wait(p)
		e.want(p, 0)
	}
}

func TestRunBusy(t *testing.T) {
	e := newEnv(t)
	holder := e.hold(advisory.StringKey("busy"), false)
	ran := filepath.Join(e.dir, "ran")
	for _, tc := range []struct {
		args []string
		code int
	}{
		{[]string{"--no-wait"}, exitConflict},
		{[]string{"--no-wait", "--shared"}, exitConflict},
		{[]string{"--timeout", "0"}, exitConflict},
		{[]string{"--no-wait", "--conflict-exit-code", "9"}, 9},
		{[]string{"--timeout=0", "--conflict-exit-code=0"}, 0},
	} {
		args := append([]string{"run", e.dsnArg(), "--key", "busy"}, tc.args...)
		p := e.pglock(nil, append(args, "--", "touch", "ran")...)
		e.want(p, tc.code)
		if fileExists(ran) {
			t.Fatalf("pglock %q ran CMD although the lock was held", tc.args)
		}
		if lines := strings.Count(p.stderr.String(), "\n"); lines != 1 || !strings.Contains(p.stderr.String(), "held by another session") {
			t.Errorf("pglock %q stderr = %q, want one line saying the lock is held", tc.args, p.stderr.String())
		}
	}
	e.unlockAll(holder)
	e.want(e.pglock(nil, "run", e.dsnArg(), "--key", "busy", "--no-wait", "--", "touch", "ran"), 0)
	if !fileExists(ran) {
		t.Error("CMD did not run once the lock was free")
	}
}

func TestRunTimeout(t *testing.T) {
	e := newEnv(t)
	key := advisory.PairKey(7, -7)
	holder := e.hold(key, false)
	const bound = 300 * time.Millisecond
	p := e.pglock(nil, "run", e.dsnArg(), "--pair", "7,-7", "--timeout", "300ms", "--", "touch", "ran")
	e.want(p, exitConflict)
	// It must wait the whole bound; how much longer it took is logged, not
	// asserted (the CPU is shared; e.wait's testTimeout catches a hang).
	t.Logf("--timeout 300ms gave up after %v", p.elapsed)
	if p.elapsed < bound {
		t.Errorf("--timeout 300ms gave up after %v, before the bound", p.elapsed)
	}
	if !strings.Contains(p.stderr.String(), "--timeout 300ms") || fileExists(filepath.Join(e.dir, "ran")) {
		t.Errorf("stderr %q; want the --timeout named, and CMD not run", p.stderr.String())
	}

	// A lock freed during the wait is taken.
	p = e.start(nil, "", "run", e.dsnArg(), "--pair", "7,-7", "--timeout", "20", "--", "touch", "ran")
	e.awaitHolders(key, 1, 1)
	e.unlockAll(holder)
	e.wait(p)
	e.want(p, 0)
	if !fileExists(filepath.Join(e.dir, "ran")) {
		t.Error("CMD did not run after the lock was freed during the wait")
	}
}

// marksCmd is a CMD that appends "start NAME" to marks, waits until the
// file release-NAME exists, and appends "end NAME".
func marksCmd(name string) []string {
	return []string{"sh", "-c", `echo "start $1" >> marks; while [ ! -e "release-$1" ]; do sleep 0.01; done; echo "end $1" >> marks`, "sh", name}
}

func TestRunNoOverlap(t *testing.T) {
	e := newEnv(t)
	key := advisory.StringKey("overlap")
	marks := filepath.Join(e.dir, "marks")
	a := e.start(nil, "", append([]string{"run", e.dsnArg(), "--key", "overlap", "--"}, marksCmd("A")...)...)
	e.awaitFile(marks, "start A")
	b := e.start(nil, "", append([]string{"run", e.dsnArg(), "--key", "overlap", "--"}, marksCmd("B")...)...)
	e.awaitHolders(key, 1, 1) // B waits on the server while A runs
	touch(t, filepath.Join(e.dir, "release-B"))
	touch(t, filepath.Join(e.dir, "release-A"))
	e.wait(a)
	e.wait(b)
	e.want(a, 0)
	e.want(b, 0)
	if got, want := readLines(t, marks), []string{"start A", "end A", "start B", "end B"}; !slices.Equal(got, want) {
		t.Errorf("marks = %q, want %q: the runs overlapped", got, want)
	}
}

func TestRunSharedOverlap(t *testing.T) {
	e := newEnv(t)
	marks := filepath.Join(e.dir, "marks")
	a := e.start(nil, "", append([]string{"run", e.dsnArg(), "--key", "shared", "--shared", "--"}, marksCmd("A")...)...)
	e.awaitFile(marks, "start A")
	b := e.start(nil, "", append([]string{"run", e.dsnArg(), "--key", "shared", "--shared", "--"}, marksCmd("B")...)...)
	e.awaitFile(marks, "start B") // while A still runs
	hs := e.awaitHolders(advisory.StringKey("shared"), 2, 0)
	for _, h := range hs {
		if h.Mode != advisory.ModeShared {
			t.Errorf("holder %+v: want shared", h)
		}
	}
	touch(t, filepath.Join(e.dir, "release-A"))
	touch(t, filepath.Join(e.dir, "release-B"))
	e.wait(a)
	e.wait(b)
	e.want(a, 0)
	e.want(b, 0)
	if got := readLines(t, marks); len(got) != 4 || got[0] != "start A" || got[1] != "start B" {
		t.Errorf("marks = %q, want both started before either ended", got)
	}
}

// trapCmd is a CMD that appends "term" to marks on SIGTERM and exits 0,
// after appending "start". The SIGTERM reaches its sleep as well (the whole
// process group gets it), so the shell's complaints go to /dev/null.
var trapCmd = []string{"sh", "-c", `exec 2>/dev/null; trap 'echo term >> marks; kill $p; exit 0' TERM; sleep 60 & p=$!; echo start >> marks; wait $p`}

func TestRunLockLost(t *testing.T) {
	e := newEnv(t)
	key := advisory.Int64Key(76)
	marks := filepath.Join(e.dir, "marks")
	p := e.start(nil, "", append([]string{"run", e.dsnArg(), "--id", "76", "--"}, trapCmd...)...)
	e.awaitFile(marks, "start")
	hs := e.awaitHolders(key, 1, 0)
	c := e.conn()
	var ok bool
	if err := c.QueryRow(e.ctx, "SELECT pg_terminate_backend($1)", hs[0].PID).Scan(&ok); err != nil || !ok {
		t.Fatalf("pg_terminate_backend(%d) = %v, %v", hs[0].PID, ok, err)
	}
	terminated := time.Now()
	e.wait(p)
	e.want(p, exitLost)
	// How soon it noticed is logged below, not asserted: e.wait's
	// testTimeout is the bound, so that only a hang fails.
	if !contains(readLines(t, marks), "term") {
		t.Errorf("CMD did not get SIGTERM; marks = %q", readLines(t, marks))
	}
	stderr := p.stderr.String()
	t.Logf("pglock exited %d %v after the terminate; stderr: %s", p.code, time.Since(terminated), stderr)
	if strings.Count(stderr, "\n") != 1 || !strings.Contains(stderr, "lost the lock on int64:76") {
		t.Errorf("stderr = %q, want one line saying the lock was lost", stderr)
	}
}

func TestRunTTL(t *testing.T) {
	e := newEnv(t)
	marks := filepath.Join(e.dir, "marks")
	p := e.pglock(nil, append([]string{"run", e.dsnArg(), "--key", "ttl", "--ttl", "300ms", "--"}, trapCmd...)...)
	e.want(p, exitLost)
	if got := readLines(t, marks); !slices.Equal(got, []string{"start", "term"}) {
		t.Errorf("marks = %q, want start, term", got)
	}
	if p.elapsed < 300*time.Millisecond || !strings.Contains(p.stderr.String(), "--ttl 300ms") {
		t.Errorf("exited after %v with stderr %q; want after the TTL, naming it", p.elapsed, p.stderr.String())
	}
	// CMD ended on the SIGTERM: the message says so, not that a SIGKILL came.
	if stderr := p.stderr.String(); !strings.Contains(stderr, "SIGTERM sufficed") || strings.Contains(stderr, "SIGKILL") {
		t.Errorf("stderr %q, want it to say SIGTERM sufficed and no SIGKILL was sent", stderr)
	}
}

func TestRunGraceKill(t *testing.T) {
	e := newEnv(t)
	marks := filepath.Join(e.dir, "marks")
	// CMD ignores SIGTERM (and sleep inherits that): only SIGKILL ends it.
	p := e.pglock(nil, "run", e.dsnArg(), "--key", "grace", "--ttl", "200ms", "--grace", "300ms", "--",
		"sh", "-c", `trap '' TERM; echo start >> marks; exec sleep 60`)
	e.want(p, exitLost)
	// Not before TTL + grace; how much later is logged, not asserted.
	t.Logf("exited %v after it started (TTL + grace: 500ms)", p.elapsed)
	if p.elapsed < 500*time.Millisecond {
		t.Errorf("exited after %v, before TTL + grace (500ms)", p.elapsed)
	}
	if got := readLines(t, marks); !slices.Equal(got, []string{"start"}) {
		t.Errorf("marks = %q", got)
	}
	if stderr := p.stderr.String(); !strings.Contains(stderr, "SIGKILL after the --grace 300ms") || strings.Contains(stderr, "sufficed") {
		t.Errorf("stderr %q, want it to say SIGKILL was sent after the --grace 300ms", stderr)
	}
}

func TestRunSignals(t *testing.T) {
	e := newEnv(t)
	marks := filepath.Join(e.dir, "marks")
	// SIGTERM to pglock is passed on to CMD, whose status pglock returns.
	p := e.start(nil, "", "run", e.dsnArg(), "--key", "signals", "--",
		"sh", "-c", `trap 'echo term >> marks; kill $p; exit 7' TERM; sleep 60 & p=$!; echo start >> marks; wait $p`)
	e.awaitFile(marks, "start")
	if err := p.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	e.wait(p)
	e.want(p, 7)
	if !contains(readLines(t, marks), "term") {
		t.Errorf("CMD did not get SIGTERM; marks = %q", readLines(t, marks))
	}

	// SIGINT while waiting ends the wait: 128+2, CMD not run.
	key := advisory.StringKey("signals")
	holder := e.hold(key, false)
	p = e.start(nil, "", "run", e.dsnArg(), "--key", "signals", "--", "touch", "ran")
	var waiterPID int32
	for _, h := range e.awaitHolders(key, 1, 1) {
		if !h.Granted {
			waiterPID = h.PID // pglock's session, waiting
		}
	}
	if err := p.cmd.Process.Signal(syscall.SIGINT); err != nil {
		t.Fatal(err)
	}
	e.wait(p)
	e.want(p, 128+2)
	if fileExists(filepath.Join(e.dir, "ran")) {
		t.Error("CMD ran after SIGINT during the wait")
	}
	e.awaitSessionEnd(waiterPID) // the wait left nothing behind
	e.awaitHolders(key, 1, 0)
	e.unlockAll(holder)
	_ = os.Remove(marks)
}
