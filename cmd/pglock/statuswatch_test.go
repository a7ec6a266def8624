package main

import (
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"

	"github.com/seed0ad592b7/advisory"
)

// startWatch runs pglock with args and its stdout going to a file (not a
// terminal; emptied first), and returns it and a function that reads what
// it has written so far; it is killed if still running when the test
// ends.
func (e *env) startWatch(args ...string) (*proc, func() string) {
	e.t.Helper()
	path := filepath.Join(e.dir, "watch.out")
	f, err := os.Create(path)
	if err != nil {
		e.t.Fatal(err)
	}
	defer f.Close()
	p := &proc{cmd: exec.Command(binary, args...), done: make(chan struct{})}
	p.cmd.Env, p.cmd.Dir = baseEnv(), e.dir
	p.cmd.Stdout, p.cmd.Stderr = f, &p.stderr
	if err := p.cmd.Start(); err != nil {
		e.t.Fatal(err)
	}
	go func() {
		defer close(p.done)
		_ = p.cmd.Wait()
		p.code = p.cmd.ProcessState.ExitCode()
	}()
	e.t.Cleanup(func() {
		_ = p.cmd.Process.Kill()
		<-p.done
	})
	read := func() string {
		b, err := os.ReadFile(path)
		if err != nil {
			e.t.Fatal(err)
		}
		return string(b)
	}
	return p, read
}

// interrupt sends SIGINT to p and awaits its exit status.
func (e *env) interrupt(p *proc) int {
	e.t.Helper()
	if err := p.cmd.Process.Signal(os.Interrupt); err != nil {
		e.t.Fatal(err)
	}
	return e.wait(p)
}

// TestStatusWatchPipe: with stdout not a terminal, --watch prints readings
// one after another, each after a header line with the time and followed
// by a blank line, without escape codes; a lock taken meanwhile shows in a
// later reading; SIGINT ends it with status 0. With --json, each reading is
// one line of JSON.
func TestStatusWatchPipe(t *testing.T) {
	e := newEnv(t)
	p, read := e.startWatch("status", e.dsnArg(), "--watch", "100ms")
	header := regexp.MustCompile(`(?m)^Every 100ms: pglock status on 127\.0\.0\.1:\d+/\S+  \d{4}-\d\d-\d\d \d\d:\d\d:\d\d$`)
	e.await("two readings", func() (bool, error) { return len(header.FindAllString(read(), -1)) >= 2, nil })
	key := advisory.StringKey("watch-pipe")
	c := e.hold(key, false)
	e.await("a reading that shows the lock", func() (bool, error) {
		return strings.Contains(read(), key.String()), nil
	})
	if code := e.interrupt(p); code != 0 {
		t.Errorf("pglock status --watch exited %d after SIGINT, want 0; stderr: %s", code, p.stderr.String())
	}
	text := read()
	if strings.Contains(text, "\x1b") {
		t.Errorf("pglock status --watch wrote escape codes into a file:\n%q", text)
	}
	// Each reading: the header, a blank line, the table or a sentence, a
	// blank line.
	frames := header.Split(text, -1)
	if frames[0] != "" || len(frames) < 3 {
		t.Fatalf("output does not start with a header, or has fewer than 2 readings:\n%s", text)
	}
	for i, f := range frames[1:] {
		lines := strings.Split(f, "\n")
		if len(lines) < 5 || lines[0] != "" || lines[1] != "" || lines[2] == "" || lines[len(lines)-2] != "" || lines[len(lines)-1] != "" {
			t.Errorf("reading %d is not a header, a blank line, the table and a blank line: %q", i+1, f)
		}
	}
	if !strings.Contains(text, "no advisory locks held or awaited") {
		t.Errorf("no reading before the lock was taken:\n%s", text)
	}

	// --json: a JSON array a line, without header.
	p, read = e.startWatch("status", e.dsnArg(), "--watch", "100ms", "--json")
	e.await("two readings as JSON", func() (bool, error) { return strings.Count(read(), "\n") >= 2, nil })
	if code := e.interrupt(p); code != 0 {
		t.Errorf("pglock status --watch --json exited %d after SIGINT, want 0; stderr: %s", code, p.stderr.String())
	}
	for _, l := range strings.Split(strings.TrimSuffix(read(), "\n"), "\n") {
		if !strings.HasPrefix(l, `[{"key":"`+key.String()+`"`) || !strings.HasSuffix(l, "}]") {
			t.Errorf("pglock status --watch --json printed the line %q, want a JSON array of the lock", l)
		}
	}
	e.unlockAll(c)
}

// tmux drives a tmux server of the test's own (its socket in a temporary
// directory, no configuration file), killed when the test ends.
type tmux struct {
	e    *env
	sock string
}

func newTmux(e *env) *tmux {
	e.t.Helper()
	if _, err := exec.LookPath("tmux"); err != nil {
		e.t.Fatal("tmux is not installed; this test runs pglock status --watch in a real terminal: install tmux (apt-get install tmux)")
	}
	m := &tmux{e: e, sock: filepath.Join(e.t.TempDir(), "tmux")}
	e.t.Cleanup(func() { _, _ = m.command("kill-server") })
	return m
}

// status runs pglock status on the test server with args (shell words) in
// the tmux session "status", a 200x30 terminal whose pane stays once
// pglock has exited.
func (m *tmux) status(args string) {
	m.e.t.Helper()
	cmd := "exec " + shellQuote(binary) + " status " + shellQuote(m.e.dsnArg()) + " " + args
	m.run("new-session", "-d", "-s", "status", "-x", "200", "-y", "30", cmd,
		";", "set-option", "-w", "-t", "status", "remain-on-exit", "on")
}

func (m *tmux) command(args ...string) (string, error) {
	cmd := exec.CommandContext(m.e.ctx, "tmux", append([]string{"-S", m.sock, "-f", "/dev/null"}, args...)...)
	cmd.Env = append(baseEnv(), "TERM=xterm-256color")
	out, err := cmd.CombinedOutput()
	return string(out), err
}

func (m *tmux) run(args ...string) string {
	m.e.t.Helper()
	out, err := m.command(args...)
	if err != nil {
		m.e.t.Fatalf("tmux %q: %v\n%s", args, err, out)
	}
	return out
}

// screen is what the pane shows.
func (m *tmux) screen() string { return m.run("capture-pane", "-p", "-t", "status") }

// awaitScreen polls the pane until ok accepts what it shows.
func (m *tmux) awaitScreen(what string, ok func(screen string) bool) string {
	m.e.t.Helper()
	var last string
	defer func() {
		if m.e.t.Failed() {
			m.e.t.Logf("the screen last showed:\n%s", last)
		}
	}()
	m.e.await(what, func() (bool, error) {
		last = m.screen()
		return ok(last), nil
	})
	return last
}

// shellQuote quotes s for sh.
func shellQuote(s string) string { return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'" }

// TestStatusWatchInTerminal runs "pglock status --watch 200ms" in a tmux
// pane, a real terminal of 200×30, and reads the screen as a person would:
// one reading redrawn in place, showing a chain of holders and waiters
// made while it runs as a tree, then the chain after its head let go; a
// smaller terminal gets a cut screen; Ctrl-C ends it with status 0 and
// gives the screen back.
func TestStatusWatchInTerminal(t *testing.T) {
	e := newEnv(t)
	m := newTmux(e)
	m.status("--watch 200ms")
	title := "Every 200ms: pglock status on 127.0.0.1:"
	m.awaitScreen("the first reading", func(s string) bool {
		return strings.HasPrefix(s, title) && strings.Contains(s, "no advisory locks held or awaited")
	})

	// A holds k1; B holds k2 and waits for k1; C waits for k2.
	k1, k2 := advisory.StringKey("tmux-1"), advisory.StringKey("tmux-2")
	a, b, c := e.hold(k1, false), e.hold(k2, false), e.conn()
	bWaited, cWaited := e.lockIn(b, k1), e.lockIn(c, k2)
	pa, pb, pc := pidOf(a), pidOf(b), pidOf(c)
	chain := []statusRow{
		{pid: pa, cells: map[string]string{"WAITS FOR": "-", "HOLDS": k1.String(), "CLIENT": "127.0.0.1"}},
		{pid: pb, tree: "└─ ", cells: map[string]string{"WAITS FOR": k1.String(), "HOLDS": k2.String()}},
		{pid: pc, tree: "   └─ ", cells: map[string]string{"WAITS FOR": k2.String(), "HOLDS": "-"}},
	}
	t.Logf("A, B, C: %d, %d, %d", pa, pb, pc)
	s := m.awaitScreen("the chain as a tree", func(s string) bool { return showsTree(readStatusTable(t, s), chain) })
	if n := strings.Count(s, title); n != 1 || !strings.HasPrefix(s, title) {
		t.Errorf("the screen shows %d headers, want one at the top (redrawn in place):\n%s", n, s)
	}

	// A lets go: B holds both keys, C still waits under it.
	e.unlockAll(a)
	if err := <-bWaited; err != nil {
		t.Fatal(err)
	}
	both := []string{k1.String(), k2.String()}
	if compareKeys(k2, k1) < 0 {
		both[0], both[1] = both[1], both[0]
	}
	after := []statusRow{
		{pid: pb, cells: map[string]string{"WAITS FOR": "-", "HOLDS": strings.Join(both, ", ")}},
		{pid: pc, tree: "└─ ", cells: map[string]string{"WAITS FOR": k2.String(), "HOLDS": "-"}},
	}
	m.awaitScreen("B at the top, C under it", func(s string) bool {
		rows := readStatusTable(t, s)
		return len(rows) == 2 && showsTree(rows, after)
	})

	// A terminal of 4 lines: the header, a blank line, the titles and a
	// note of what is cut: two sessions, and the note on the times marked
	// "*" with its blank line.
	m.run("resize-window", "-t", "status", "-x", "60", "-y", "4")
	m.awaitScreen("a screen cut to 4 lines", func(s string) bool {
		lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
		return len(lines) == 4 && strings.HasPrefix(lines[0], "Every 200ms") &&
			strings.HasPrefix(lines[2], "PID") && lines[3] == "… 4 more lines: a taller terminal, or --key, shows them"
	})

	m.run("send-keys", "-t", "status", "C-c")
	var dead []string
	m.awaitScreen("pglock exited", func(string) bool {
		dead = strings.Fields(m.run("display-message", "-p", "-t", "status", "#{pane_dead} #{pane_dead_status} #{pane_dead_signal}"))
		return len(dead) > 0 && dead[0] == "1"
	})
	switch {
	case len(dead) == 1:
		// tmux sometimes records no status for a dead pane (seen about once
		// in ten runs on a loaded machine). The exit status after SIGINT is
		// checked in a pipe by TestStatusWatchPipe; here what a person sees
		// is checked below.
		t.Logf("tmux recorded no exit status for the pane")
	case !slices.Equal(dead, []string{"1", "0"}):
		t.Errorf("pglock status --watch ended after Ctrl-C with status and signal %q, want status 0", dead[1:])
	}
	if s := m.screen(); strings.Contains(s, "Every 200ms") {
		t.Errorf("after Ctrl-C the screen still shows the status; want the terminal given back:\n%s", s)
	}

	e.unlockAll(b)
	if err := <-cWaited; err != nil {
		t.Fatal(err)
	}
	e.unlockAll(c)
}

// TestStatusWatchReconnects: a reading that fails (the server ended
// pglock's session) is shown in its frame, and the next reading connects
// again.
func TestStatusWatchReconnects(t *testing.T) {
	e := newEnv(t)
	p, read := e.startWatch("status", e.dsnArg(), "--watch", "100ms")
	e.await("a reading", func() (bool, error) { return strings.Contains(read(), "no advisory locks held"), nil })
	var ended int
	if err := e.conn().QueryRow(e.ctx, `SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = 'pglock status'`).Scan(&ended); err != nil || ended != 1 {
		t.Fatalf("ended %d pglock status sessions (%v), want 1", ended, err)
	}
	failed := regexp.MustCompile(`(?m)^pglock: .+\n\(trying again every 100ms\)\n`)
	e.await("a failed reading, then a good one", func() (bool, error) {
		text := read()
		at := failed.FindStringIndex(text)
		return at != nil && strings.Contains(text[at[1]:], "no advisory locks held"), nil
	})
	if code := e.interrupt(p); code != 0 {
		t.Errorf("pglock status --watch exited %d after SIGINT, want 0; stderr: %s", code, p.stderr.String())
	}
}
