package main

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"runtime"
	"strconv"
	"strings"
	"syscall"
)

// job is CMD, run under the lock, and the processes it starts.
//
// Unless it runs in the foreground, CMD leads a process group of its own,
// and the job is that whole group: signals go to the group, and the job has
// ended only when no process is left in it. pglock is a child subreaper, so
// members of the group orphaned by their parent's death become its children
// and it reaps them (a zombie still counts as a member of its group).
//
// In the foreground, CMD stays in pglock's process group (it can read the
// terminal and use job control), and the job is CMD alone: processes it
// starts are not signalled or waited for.
//
// CMD gets SIGKILL from the kernel if the thread that started it ends
// (PR_SET_PDEATHSIG), which happens when pglock dies; a watchdog process
// kills the rest of the group then.
type job struct {
	cmd        *exec.Cmd
	foreground bool
	done       chan struct{} // closed once CMD has exited and been waited for
	watchdog   *exec.Cmd     // nil in the foreground
	wdPipe     *os.File      // the watchdog's stdin; its only write end
}

// startJob starts argv with pglock's stdin, stdout and stderr. It fails as
// exec.Cmd.Start does, or if the watchdog cannot be started (then CMD is not
// started either).
func startJob(argv []string, foreground bool) (*job, error) {
	j := &job{cmd: exec.Command(argv[0], argv[1:]...), foreground: foreground, done: make(chan struct{})}
	j.cmd.Stdin, j.cmd.Stdout, j.cmd.Stderr = os.Stdin, os.Stdout, os.Stderr
	j.cmd.SysProcAttr = sysProcAttr(foreground)
	if !foreground {
		if err := becomeSubreaper(); err != nil {
			return nil, fmt.Errorf("cannot become the subreaper of CMD's processes: %w", err)
		}
		if err := j.startWatchdog(); err != nil {
			return nil, err
		}
	}
	started := make(chan error, 1)
	go func() {
		// The kernel sends CMD its parent-death signal when the thread that
		// started it ends, not the process: this goroutine keeps that
		// thread, and lives as long as CMD.
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		if err := j.cmd.Start(); err != nil {
			started <- err
			return
		}
		started <- nil
		_ = j.cmd.Wait() // its status is in j.cmd.ProcessState
		close(j.done)
	}()
	if err := <-started; err != nil {
		j.stopWatchdog()
		return nil, err
	}
	if j.watchdog != nil {
		// Arm the watchdog with the group's id (CMD's pid).
		if _, err := fmt.Fprintln(j.wdPipe, j.cmd.Process.Pid); err != nil {
			j.signal(syscall.SIGKILL)
			<-j.done
			j.stopWatchdog()
			return nil, fmt.Errorf("cannot arm the watchdog: %w", err)
		}
	}
	return j, nil
}

// signal sends s to the job: to CMD's process group, or in the foreground
// to CMD alone (and not after it was waited for).
func (j *job) signal(s syscall.Signal) {
	if j.foreground {
		_ = j.cmd.Process.Signal(s) // a no-op once CMD was waited for
		return
	}
	_ = syscall.Kill(-j.cmd.Process.Pid, s)
}

// forward passes a signal pglock got on to the job. In the foreground,
// SIGINT and SIGQUIT are not passed on: they come from the terminal, which
// sends them to CMD as well.
func (j *job) forward(s os.Signal) {
	sig, ok := s.(syscall.Signal)
	if !ok || j.foreground && (sig == syscall.SIGINT || sig == syscall.SIGQUIT) {
		return
	}
	j.signal(sig)
}

// ended reports whether the whole job has ended: CMD was waited for and, in
// a process group, no process is left in it. It reaps the group's zombies
// that are pglock's children.
func (j *job) ended() bool {
	select {
	case <-j.done:
	default:
		return false
	}
	if j.foreground {
		return true
	}
	reapGroup(j.cmd.Process.Pid)
	if errors.Is(syscall.Kill(-j.cmd.Process.Pid, 0), syscall.ESRCH) {
		return true
	}
	// A zombie whose parent left the group (and is not pglock, which reaps
	// its own) still counts for kill, but runs nothing.
	return !groupRuns(j.cmd.Process.Pid)
}

// status is CMD's exit status, 128+N when signal N killed it. Call it
// after done is closed.
func (j *job) status() int {
	ps := j.cmd.ProcessState
	if ws, ok := ps.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
		return exitSignal + int(ws.Signal())
	}
	return ps.ExitCode()
}

// close ends the watchdog once the job has ended.
func (j *job) close() { j.stopWatchdog() }

// watchdogArg is the hidden command that runs pglock as a job's watchdog.
const watchdogArg = "__watchdog"

// startWatchdog starts pglock again as the job's watchdog, in a session of
// its own (so that a Ctrl-C meant for pglock does not reach it), reading a
// pipe whose only write end pglock holds. The kernel closes that end when
// pglock dies, however it dies.
func (j *job) startWatchdog() error {
	r, w, err := os.Pipe()
	if err != nil {
		return err
	}
	wd := exec.Command(selfExe(), watchdogArg)
	wd.Stdin, wd.Dir = r, "/"
	wd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	err = wd.Start()
	r.Close()
	if err != nil {
		w.Close()
		return fmt.Errorf("cannot start the watchdog that stops CMD if pglock dies: %w", err)
	}
	j.watchdog, j.wdPipe = wd, w
	return nil
}

// stopWatchdog kills the watchdog before its pipe closes, so that it never
// signals a process group id that may have been reused.
func (j *job) stopWatchdog() {
	if j.watchdog == nil {
		return
	}
	_ = j.watchdog.Process.Kill()
	_ = j.watchdog.Wait()
	j.wdPipe.Close()
}

// watchdog is "pglock __watchdog": it reads a process group id from in,
// then blocks until in ends (pglock died) and kills that group with
// SIGKILL. pglock kills it first when the job ends normally.
func watchdog(in io.Reader) int {
	signal.Ignore(syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP, syscall.SIGQUIT)
	br := bufio.NewReader(in)
	line, err := br.ReadString('\n')
	pgid, convErr := strconv.Atoi(strings.TrimSpace(line))
	if err != nil || convErr != nil || pgid <= 1 {
		return exitFailure
	}
	_, _ = io.Copy(io.Discard, br)
	_ = syscall.Kill(-pgid, syscall.SIGKILL)
	return exitOK
}
