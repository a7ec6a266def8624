package pgtest

import (
	"errors"
	"os"
	"os/exec"
	"sync"
	"syscall"
)

// reaper is a watchdog process: a shell that blocks reading a pipe whose
// only write end this process holds. When this process dies for any reason
// the kernel closes the write end, the read returns and the shell runs its
// cleanup script. It runs in its own session, so a Ctrl-C aimed at the test
// process does not kill it first.
type reaper struct {
	cmd *exec.Cmd
	w   *os.File
}

// liveReapers keeps the write ends reachable until cancel, so that the
// garbage collector never closes them behind our back.
var (
	liveReapersMu sync.Mutex
	liveReapers   = map[*reaper]struct{}{}
)

// startReaper starts a watchdog that runs script (sh syntax) once this
// process exits without calling cancel.
func startReaper(script string) (*reaper, error) {
	r, w, err := os.Pipe()
	if err != nil {
		return nil, err
	}
	cmd := exec.Command("/bin/sh", "-c", "trap '' INT TERM HUP; read line; "+script)
	cmd.Stdin = r
	cmd.Dir = "/"
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	err = cmd.Start()
	r.Close()
	if err != nil {
		w.Close()
		return nil, err
	}
	rp := &reaper{cmd: cmd, w: w}
	liveReapersMu.Lock()
	liveReapers[rp] = struct{}{}
	liveReapersMu.Unlock()
	return rp, nil
}

// cancel kills the watchdog without running its script.
func (rp *reaper) cancel() error {
	liveReapersMu.Lock()
	delete(liveReapers, rp)
	liveReapersMu.Unlock()
	err := rp.cmd.Process.Kill()
	if errors.Is(err, os.ErrProcessDone) {
		err = nil
	}
	_ = rp.cmd.Wait() // reports "signal: killed"
	return errors.Join(err, rp.w.Close())
}
