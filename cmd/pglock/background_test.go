package main

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
)

// backgroundScript is a non-interactive shell script that starts pglock
// run in the background ("&", so the shell starts it with SIGINT and
// SIGQUIT ignored), writes its pid to pids, waits for it and appends its
// exit status to marks. CMD appends "start PID" to marks and waits for the
// file release.
const backgroundScript = `"$PGLOCK" run --dsn "$DSN" --key "$KEY" -- sh -c 'echo "start $$" >> marks; while [ ! -e release ]; do sleep 0.01; done' &
echo $! > pids
wait $!
echo "exited $?" >> marks
`

// sigIgnored reports whether process pid ignores sig (/proc's SigIgn).
func sigIgnored(t *testing.T, pid int, sig syscall.Signal) bool {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	for l := range strings.Lines(string(b)) {
		if mask, ok := strings.CutPrefix(l, "SigIgn:"); ok {
			m, err := strconv.ParseUint(strings.TrimSpace(mask), 16, 64)
			if err != nil {
				t.Fatal(err)
			}
			return m&(1<<(uint(sig)-1)) != 0
		}
	}
	t.Fatalf("no SigIgn in /proc/%d/status", pid)
	return false
}

// A pglock run started with "&" from a script inherits SIGINT as ignored
// and keeps it so, for itself and for CMD: a SIGINT does not stop it and
// CMD runs to its end; a SIGTERM does stop it, passed on to CMD. Its
// --help says so, and that connecting is bounded by 10s.
func TestRunBackgroundKeepsSIGINTIgnored(t *testing.T) {
	e := newEnv(t)
	marks := filepath.Join(e.dir, "marks")
	for _, c := range []struct {
		sig  syscall.Signal
		exit string // the script's line for pglock's exit status
	}{
		{syscall.SIGINT, "exited 0"},    // ignored: CMD ends when released
		{syscall.SIGTERM, "exited 143"}, // passed on: CMD killed by it
	} {
		for _, f := range []string{marks, filepath.Join(e.dir, "pids"), filepath.Join(e.dir, "release")} {
			_ = os.Remove(f)
		}
		sh := &proc{cmd: exec.Command("sh", "-c", backgroundScript), done: make(chan struct{})}
		sh.cmd.Env = append(baseEnv(), "PGLOCK="+binary, "DSN="+e.dsn, "KEY=background-"+c.sig.String())
		e.startProc(sh)
		pglockPID := e.awaitPIDs(1)[0]
		var cmdPID int
		e.await("CMD started", func() (bool, error) {
			for _, l := range readLines(t, marks) {
				if pid, ok := strings.CutPrefix(l, "start "); ok {
					var err error
					cmdPID, err = strconv.Atoi(pid)
					return err == nil, err
				}
			}
			return false, nil
		})
		if !sigIgnored(t, pglockPID, syscall.SIGINT) || !sigIgnored(t, cmdPID, syscall.SIGINT) {
			t.Errorf("pglock %d or CMD %d started with & does not ignore SIGINT", pglockPID, cmdPID)
		}
		if err := syscall.Kill(pglockPID, c.sig); err != nil {
			t.Fatal(err)
		}
		if c.sig == syscall.SIGINT {
			touch(t, filepath.Join(e.dir, "release"))
		}
		e.awaitFile(marks, c.exit)
		e.wait(sh)
	}

	p := e.pglock(nil, "run", "--help")
	help := strings.Join(strings.Fields(p.stdout.String()+p.stderr.String()), " ")
	for _, want := range []string{"with SIGINT and SIGQUIT ignored", "Stop it with SIGTERM", "after 10s"} {
		if !strings.Contains(help, want) {
			t.Errorf("pglock run --help does not say %q:\n%s", want, help)
		}
	}
}
