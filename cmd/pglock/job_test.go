package main

import (
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"unsafe"

	"github.com/seed0ad592b7/advisory"
)

// childEnv makes the test binary act as a CMD for pglock instead of running
// the tests (see sigCount).
const childEnv = "PGLOCK_TEST_CHILD"

// sigCount is a CMD that appends to the file "marks" in its working
// directory a line "start", then one line per signal it gets: "int" for
// SIGINT, "quit" for SIGQUIT, "hup" for SIGHUP, and "term" for SIGTERM,
// after which it exits 0.
// Unlike a shell trap, it counts two signals that come close together.
func sigCount() int {
	sigs := make(chan os.Signal, 16)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGQUIT, syscall.SIGHUP, syscall.SIGTERM)
	mark := func(line string) {
		f, err := os.OpenFile("marks", os.O_APPEND|os.O_CREATE|os.O_WRONLY, 0o644)
		if err == nil {
			fmt.Fprintln(f, line)
			f.Close()
		}
	}
	mark("start")
	for s := range sigs {
		switch s {
		case syscall.SIGINT:
			mark("int")
		case syscall.SIGQUIT:
			mark("quit")
		case syscall.SIGHUP:
			mark("hup")
		default:
			mark("term")
			return 0
		}
	}
	return 0
}

// sigCountCmd runs sigCount as pglock's CMD.
func sigCountCmd(t *testing.T) (env []string, argv []string) {
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	return []string{childEnv + "=sigcount"}, []string{self}
}

// childScript is a process of the job that ignores SIGTERM (so only the
// SIGKILL after --grace ends it) and runs until killed. It creates the file
// child-ready once it ignores SIGTERM.
const childScript = `trap '' TERM; : > child-ready; while :; do sleep 0.05; done`

// writeChild writes childScript to child.sh in the scratch directory.
func (e *env) writeChild() {
	e.t.Helper()
	if err := os.WriteFile(filepath.Join(e.dir, "child.sh"), []byte(childScript), 0o644); err != nil {
		e.t.Fatal(err)
	}
}

// awaitPIDs awaits n pids in the file pids (one or more per line), and
// kills them with SIGKILL when the test ends, in case they survived.
func (e *env) awaitPIDs(n int) []int {
	e.t.Helper()
	path := filepath.Join(e.dir, "pids")
	var pids []int
	e.await(fmt.Sprintf("%d pids in %s", n, path), func() (bool, error) {
		pids = pids[:0]
		for _, l := range readLines(e.t, path) {
			for _, f := range strings.Fields(l) {
				pid, err := strconv.Atoi(f)
				if err != nil {
					return false, err
				}
				pids = append(pids, pid)
			}
		}
		return len(pids) >= n, nil
	})
	e.t.Cleanup(func() {
		for _, pid := range pids {
			if alive(pid) {
				_ = syscall.Kill(pid, syscall.SIGKILL)
			}
		}
	})
	return pids
}

// signal sends s to pglock.
func (e *env) signal(p *proc, s syscall.Signal) {
	e.t.Helper()
	if err := p.cmd.Process.Signal(s); err != nil {
		e.t.Fatalf("signal %v to pglock: %v", s, err)
	}
}

// alive reports whether process pid runs: it exists and is not a zombie.
func alive(pid int) bool {
	s := procState(pid)
	return s != 0 && s != 'Z' && s != 'X'
}

// procState is the state letter of process pid in /proc (R, S, T, Z, ...),
// 0 if there is no such process.
func procState(pid int) byte {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0
	}
	_, rest, _ := strings.Cut(string(b), ") ")
	if rest == "" {
		return 0
	}
	return rest[0]
}

// pending reports whether sig is pending for process pid as a whole.
func pending(t *testing.T, pid int, sig syscall.Signal) bool {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(b), "\n") {
		if hex, ok := strings.CutPrefix(l, "ShdPnd:"); ok {
			mask, err := strconv.ParseUint(strings.TrimSpace(hex), 16, 64)
			if err != nil {
				t.Fatal(err)
			}
			return mask&(1<<(sig-1)) != 0
		}
	}
	t.Fatalf("no ShdPnd in /proc/%d/status", pid)
	return false
}

// noneAlive fails the test for every pid that still runs.
func noneAlive(t *testing.T, what string, pids []int) {
	t.Helper()
	for _, pid := range pids {
		if alive(pid) {
			t.Errorf("%s: process %d of the job still runs", what, pid)
		}
	}
}

// A lost lock stops the whole job, not only CMD: a child that ignores
// SIGTERM gets the SIGKILL after --grace, and pglock exits only once it is
// gone, so no second holder can start beside it.
func TestRunLostLockStopsProcessTree(t *testing.T) {
	e := newEnv(t)
	e.writeChild()
	p := e.start(nil, "", "run", e.dsnArg(), "--id", "761", "--grace", "300ms", "--",
		"sh", "-c", `sh child.sh & echo $! >> pids; wait`)
	pids := e.awaitPIDs(1)
	hs := e.awaitHolders(advisory.Int64Key(761), 1, 0)
	var ok bool
	if err := e.conn().QueryRow(e.ctx, "SELECT pg_terminate_backend($1)", hs[0].PID).Scan(&ok); err != nil || !ok {
		t.Fatalf("pg_terminate_backend(%d) = %v, %v", hs[0].PID, ok, err)
	}
	e.wait(p)
	e.want(p, exitLost)
	noneAlive(t, "after pglock exited 76 for a lost lock", pids)
	if !strings.Contains(p.stderr.String(), "lost the lock on int64:761") || strings.Count(p.stderr.String(), "\n") != 1 {
		t.Errorf("stderr = %q, want one line saying the lock was lost", p.stderr.String())
	}
}

// The TTL stops the whole job, children included.
func TestRunTTLStopsProcessTree(t *testing.T) {
	e := newEnv(t)
	// The children respect SIGTERM here; the TTL is long enough for the
	// shell to start its child first (a hang guard, not a measurement).
	p := e.pglock(nil, "run", e.dsnArg(), "--key", "ttl-tree", "--ttl", "3s", "--",
		"sh", "-c", `sleep 100 & echo $! >> pids; (while :; do sleep 0.05; done) & echo $! >> pids; wait`)
	e.want(p, exitLost)
	pids := e.awaitPIDs(2)
	noneAlive(t, "after pglock exited 76 for the TTL", pids)
	if stderr := p.stderr.String(); !strings.Contains(stderr, "SIGTERM sufficed") || strings.Contains(stderr, "SIGKILL") {
		t.Errorf("stderr %q, want it to say SIGTERM sufficed and no SIGKILL was sent", stderr)
	}
}

// Processes CMD leaves behind when it exits are stopped before the lock is
// released: they would run without it.
func TestRunStopsLeftoverProcesses(t *testing.T) {
	e := newEnv(t)
	e.writeChild()
	// CMD exits once the child ignores SIGTERM: before, the SIGTERM would
	// end it.
	p := e.pglock(nil, "run", e.dsnArg(), "--key", "leftover", "--grace", "200ms", "--",
		"sh", "-c", `sh child.sh & echo $! >> pids; until [ -e child-ready ]; do sleep 0.01; done; exit 3`)
	e.want(p, 3)
	pids := e.awaitPIDs(1)
	noneAlive(t, "after pglock exited", pids)
	// child.sh ignores SIGTERM: the message says the SIGKILL ended it.
	if !strings.Contains(p.stderr.String(), "left processes") || !strings.Contains(p.stderr.String(), "SIGKILL after the --grace 200ms") {
		t.Errorf("stderr = %q, want it to say processes were left and stopped by SIGKILL after the grace", p.stderr.String())
	}
}

// pglock killed with SIGKILL: its session ends and frees the lock, so the
// job must die too: CMD by the kernel's parent-death signal, its children
// by the watchdog.
func TestRunKilledPglockKillsJob(t *testing.T) {
	e := newEnv(t)
	e.writeChild()
	key := advisory.StringKey("sigkill")
	p := e.start(nil, "", "run", e.dsnArg(), "--key", "sigkill", "--",
		"sh", "-c", `sh child.sh & echo $$ $! >> pids; wait`)
	pids := e.awaitPIDs(2)
	e.awaitHolders(key, 1, 0)
	if err := p.cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	e.wait(p)
	e.await("every process of the job gone after pglock got SIGKILL", func() (bool, error) {
		return !slices.ContainsFunc(pids, alive), nil
	})
	e.awaitHolders(key, 0, 0)
}

// openPTY opens a pseudo-terminal pair.
func openPTY(t *testing.T) (master, slave *os.File) {
	t.Helper()
	m, err := os.OpenFile("/dev/ptmx", os.O_RDWR|syscall.O_NOCTTY, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	var unlock int32
	if _, _, errno := syscall.Syscall(syscall.SYS_IOCTL, m.Fd(), syscall.TIOCSPTLCK, uintptr(unsafe.Pointer(&unlock))); errno != 0 {
		t.Fatal(errno)
	}
	var n uint32
	if _, _, errno := syscall.Syscall(syscall.SYS_IOCTL, m.Fd(), syscall.TIOCGPTN, uintptr(unsafe.Pointer(&n))); errno != 0 {
		t.Fatal(errno)
	}
	s, err := os.OpenFile("/dev/pts/"+strconv.Itoa(int(n)), os.O_RDWR|syscall.O_NOCTTY, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return m, s
}

// A Ctrl-C (and a Ctrl-\) typed at the terminal reaches CMD exactly once,
// both with CMD in a process group of its own and with --foreground; a
// SIGTERM sent to pglock alone is passed on.
func TestRunTerminalSignalsOnce(t *testing.T) {
	// pglock keeps a signal ignored that was ignored when it started (a
	// job started with nohup), and it inherits this test's: handled here,
	// SIGHUP starts at its default in the processes the test starts, even
	// when the tests run under nohup.
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	for _, mode := range [][]string{nil, {"--foreground"}} {
		t.Run(strings.Join(append([]string{"mode"}, mode...), ""), func(t *testing.T) {
			e := newEnv(t)
			master, slave := openPTY(t)
			childEnv, argv := sigCountCmd(t)
			args := append([]string{"run", e.dsnArg(), "--key", "tty"}, mode...)
			p := &proc{cmd: exec.Command(binary, append(append(args, "--"), argv...)...), done: make(chan struct{})}
			p.cmd.Env = append(baseEnv(), childEnv...)
			p.cmd.Stdin, p.cmd.Stdout, p.cmd.Stderr = slave, slave, slave
			// pglock leads a session whose controlling terminal is the pty,
			// in the terminal's foreground process group, as at a shell prompt.
			p.cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true, Setctty: true, Ctty: 0}
			e.startProc(p)
			marks := filepath.Join(e.dir, "marks")
			e.awaitFile(marks, "start")
			// pglock is stopped while the Ctrl-C is typed, so that a copy it
			// would pass on comes long after the terminal's own: two signals
			// close together could merge into one in CMD and hide the
			// duplicate.
			e.signal(p, syscall.SIGSTOP)
			e.await("pglock stopped", func() (bool, error) { return procState(p.cmd.Process.Pid) == 'T', nil })
			if _, err := master.Write([]byte{0x03}); err != nil { // Ctrl-C
				t.Fatal(err)
			}
			e.await("the Ctrl-C's SIGINT pending for pglock", func() (bool, error) {
				return pending(t, p.cmd.Process.Pid, syscall.SIGINT), nil
			})
			e.signal(p, syscall.SIGCONT)
			e.awaitFile(marks, "int")
			// pglock handles its signals in order: a copy of the SIGINT it
			// passed on would reach CMD before this SIGHUP.
			e.signal(p, syscall.SIGHUP)
			e.awaitFile(marks, "hup")
			if _, err := master.Write([]byte{0x1c}); err != nil { // Ctrl-\
				t.Fatal(err)
			}
			e.awaitFile(marks, "quit")
			// Likewise a copy of the SIGQUIT would come before this SIGTERM.
			e.signal(p, syscall.SIGTERM)
			e.wait(p)
			e.want(p, 0)
			if got, want := readLines(t, marks), []string{"start", "int", "hup", "quit", "term"}; !slices.Equal(got, want) {
				t.Errorf("CMD saw %q, want %q: each terminal signal once", got, want)
			}
		})
	}
}

// SIGQUIT is handled like SIGTERM: while waiting it ends the wait (128+3),
// while CMD runs it is passed on.
func TestRunSIGQUIT(t *testing.T) {
	e := newEnv(t)
	key := advisory.StringKey("quit")
	holder := e.hold(key, false)
	p := e.start(nil, "", "run", e.dsnArg(), "--key", "quit", "--", "touch", "ran")
	e.awaitHolders(key, 1, 1)
	e.signal(p, syscall.SIGQUIT)
	e.wait(p)
	e.want(p, 128+3)
	if fileExists(filepath.Join(e.dir, "ran")) || strings.Contains(p.stderr.String(), "goroutine") {
		t.Errorf("CMD ran, or pglock dumped its goroutines: %s", p.stderr.String())
	}
	e.unlockAll(holder)

	childEnv, argv := sigCountCmd(t)
	p = e.start(childEnv, "", append([]string{"run", e.dsnArg(), "--key", "quit", "--"}, argv...)...)
	marks := filepath.Join(e.dir, "marks")
	e.awaitFile(marks, "start")
	e.signal(p, syscall.SIGQUIT)
	e.awaitFile(marks, "quit")
	e.signal(p, syscall.SIGTERM)
	e.wait(p)
	e.want(p, 0)
}
