package main

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"go.uber.org/goleak"

	"github.com/seed0ad592b7/advisory"
	"github.com/seed0ad592b7/advisory/internal/pgtest"
)

// The tests build pglock once and run it as a subprocess against a real
// PostgreSQL server (SPEC §8).
var (
	server *pgtest.Server
	binary string // the built pglock
)

func TestMain(m *testing.M) {
	os.Exit(testMain(m))
}

func testMain(m *testing.M) int {
	if os.Getenv(childEnv) == "sigcount" {
		return sigCount()
	}
	dir, err := os.MkdirTemp("", "pglock-bin-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(dir)
	binary = filepath.Join(dir, "pglock")
	args := []string{"build", "-o", binary}
	if raceEnabled {
		args = append(args, "-race")
	}
	// go test puts its own GOROOT/bin first on PATH.
	build := exec.Command("go", append(args, ".")...)
	if out, err := build.CombinedOutput(); err != nil {
		fmt.Fprintf(os.Stderr, "go build pglock: %v\n%s", err, out)
		return 1
	}
	return pgtest.RunMain(m, pgtest.Options{}, func(s *pgtest.Server) { server = s })
}

func fileExists(p string) bool {
	_, err := os.Stat(p)
	return err == nil
}

// testTimeout bounds each test: its subprocesses and every wait in it.
const testTimeout = 90 * time.Second

// notHung bounds each awaited event (pglock's exit, a state polled for), so
// that a test fails at its own bound, saying what it awaited, not at
// testTimeout: far above what any of them takes on a loaded machine.
const notHung = 30 * time.Second

// env is one test's view of the server. When the test ends
// (pgtest.CheckAtEnd), while the test's connections and pglock processes
// are still open and running, it awaits that no advisory lock is left in
// the database (so a lock left on them is reported, not freed unseen by
// closing them first); then it kills the processes still running, closes
// the connections, and checks that no goroutine leaked.
type env struct {
	t   *testing.T
	ctx context.Context
	dsn string
	dir string // a scratch directory for marks files

	mu    sync.Mutex
	conns []*pgx.Conn
	procs []*proc
	owned *pgtest.Owned // what the test owns, closed after the lock check, last first
}

func newEnv(t *testing.T) *env {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
	e := &env{t: t, ctx: ctx, dsn: server.DSN, dir: t.TempDir()}
	e.owned = pgtest.CheckAtEnd(t, pgtest.EndCheck{
		DSN:   e.dsn,
		Open:  e.open,
		Grace: testTimeout,
		Key: func(classid, objid uint32, objsubid int16) string {
			key, _ := advisory.KeyFromLockRow(classid, objid, objsubid)
			return key.String()
		},
		Goroutines: func() error { return goleak.Find() },
	})
	e.own(cancel) // closed last
	return e
}

// own registers a closer, run after the end-of-test lock check.
func (e *env) own(close func()) { e.owned.Own(close) }

// open returns what the test still has open, for the end-of-test check:
// the backends of its open connections, and how many of its pglock
// processes still run. A lock held by either cannot go away by waiting.
func (e *env) open() pgtest.Open {
	e.mu.Lock()
	defer e.mu.Unlock()
	open := pgtest.Open{PIDs: make(map[uint32]string)}
	for _, c := range e.conns {
		if !c.IsClosed() {
			open.PIDs[c.PgConn().PID()] = "a connection the test opened with env.conn"
		}
	}
	for _, p := range e.procs {
		select {
		case <-p.done:
		default:
			open.Running++
		}
	}
	return open
}

// conn returns a plain connection, closed after the end-of-test lock
// check.
func (e *env) conn() *pgx.Conn {
	e.t.Helper()
	c, err := pgx.Connect(e.ctx, e.dsn)
	if err != nil {
		e.t.Fatal(err)
	}
	e.mu.Lock()
	e.conns = append(e.conns, c)
	e.mu.Unlock()
	e.own(func() { c.Close(context.Background()) })
	return c
}

// await polls cond until it is true, failing the test after notHung.
func (e *env) await(what string, cond func() (bool, error)) {
	e.t.Helper()
	pgtest.Await(e.t, what, notHung, cond)
}

// awaitHolders awaits key's holders and waiters as the server shows them.
func (e *env) awaitHolders(key advisory.Key, held, waiting int) []advisory.Holder {
	e.t.Helper()
	c := e.conn()
	var hs []advisory.Holder
	e.await(fmt.Sprintf("%d holders and %d waiters of %s", held, waiting, key), func() (bool, error) {
		var err error
		hs, err = advisory.Holders(e.ctx, c, key)
		h, w := 0, 0
		for _, x := range hs {
			if x.Granted {
				h++
			} else {
				w++
			}
		}
		return h == held && w == waiting, err
	})
	return hs
}

// awaitSessionEnd awaits the end of the backend pid (a pglock's session,
// identified while it ran), and checks that it left no lock: neither held
// nor awaited by that pid, at any point after its end.
func (e *env) awaitSessionEnd(pid int32) {
	e.t.Helper()
	c := e.conn()
	e.await(fmt.Sprintf("the session of backend %d ended", pid), func() (bool, error) {
		var n int
		err := c.QueryRow(e.ctx, `SELECT count(*) FROM pg_stat_activity WHERE pid = $1`, pid).Scan(&n)
		return n == 0, err
	})
	var n int
	if err := c.QueryRow(e.ctx, `SELECT count(*) FROM pg_locks WHERE pid = $1`, pid).Scan(&n); err != nil {
		e.t.Fatal(err)
	}
	if n != 0 {
		e.t.Errorf("backend %d ended but pg_locks still shows %d of its locks", pid, n)
	}
}

// awaitFile awaits a line in a marks file.
func (e *env) awaitFile(path, line string) {
	e.t.Helper()
	e.await(fmt.Sprintf("%q in %s", line, filepath.Base(path)), func() (bool, error) {
		return contains(readLines(e.t, path), line), nil
	})
}

func contains(lines []string, line string) bool {
	for _, l := range lines {
		if l == line {
			return true
		}
	}
	return false
}

// readLines returns the lines of a file, none if it does not exist.
func readLines(t *testing.T, path string) []string {
	t.Helper()
	b, err := os.ReadFile(path)
	if os.IsNotExist(err) {
		return nil
	}
	if err != nil {
		t.Fatal(err)
	}
	text := strings.TrimSpace(string(b))
	if text == "" {
		return nil
	}
	return strings.Split(text, "\n")
}

// touch creates an empty file.
func touch(t *testing.T, path string) {
	t.Helper()
	if err := os.WriteFile(path, nil, 0o644); err != nil {
		t.Fatal(err)
	}
}

// hold takes key on a plain connection with pg_advisory_lock and returns
// the connection. The test must let it go (e.unlockAll): a lock still held
// when the test ends is reported as a leak, before the connection closes.
func (e *env) hold(key advisory.Key, shared bool) *pgx.Conn {
	e.t.Helper()
	c := e.conn()
	fn := "pg_advisory_lock"
	if shared {
		fn = "pg_advisory_lock_shared"
	}
	var err error
	if a, b, ok := key.Pair(); ok {
		_, err = c.Exec(e.ctx, "SELECT "+fn+"($1::int4, $2::int4)", a, b)
	} else {
		v, _ := key.Int64()
		_, err = c.Exec(e.ctx, "SELECT "+fn+"($1::int8)", v)
	}
	if err != nil {
		e.t.Fatal(err)
	}
	return c
}

// unlockAll releases every session lock of c.
func (e *env) unlockAll(c *pgx.Conn) {
	e.t.Helper()
	if _, err := c.Exec(e.ctx, "SELECT pg_advisory_unlock_all()"); err != nil {
		e.t.Fatal(err)
	}
}

// proc is a running pglock.
type proc struct {
	cmd            *exec.Cmd
	stdout, stderr bytes.Buffer
	started        time.Time
	done           chan struct{}
	code           int
	elapsed        time.Duration
}

// baseEnv is the test process's environment without any database setting,
// so that a subprocess sees only what a test gives it.
func baseEnv() []string {
	var out []string
	for _, kv := range os.Environ() {
		name, _, _ := strings.Cut(kv, "=")
		if strings.HasPrefix(name, "PG") || name == "DATABASE_URL" || name == pgtest.EnvDSN {
			continue
		}
		out = append(out, kv)
	}
	return out
}

// start runs pglock with args, the environment baseEnv plus extraEnv, and
// stdin (nil: none), in the test's scratch directory.
func (e *env) start(extraEnv []string, stdin string, args ...string) *proc {
	e.t.Helper()
	p := &proc{cmd: exec.Command(binary, args...), done: make(chan struct{})}
	p.cmd.Env = append(baseEnv(), extraEnv...)
	p.cmd.Stdout, p.cmd.Stderr = &p.stdout, &p.stderr
	if stdin != "" {
		p.cmd.Stdin = strings.NewReader(stdin)
	}
	return e.startProc(p)
}

// startProc starts p.cmd, prepared by the caller, in the test's scratch
// directory, and kills it if it still runs when the test ends.
func (e *env) startProc(p *proc) *proc {
	e.t.Helper()
	p.cmd.Dir = e.dir
	// Processes pglock left behind may hold its stdout and stderr open:
	// Wait returns this long after pglock exited even then (a hang guard).
	p.cmd.WaitDelay = 10 * time.Second
	p.started = time.Now()
	if err := p.cmd.Start(); err != nil {
		e.t.Fatal(err)
	}
	go func() {
		defer close(p.done)
		_ = p.cmd.Wait()
		p.elapsed = time.Since(p.started)
		p.code = p.cmd.ProcessState.ExitCode()
	}()
	e.mu.Lock()
	e.procs = append(e.procs, p)
	e.mu.Unlock()
	e.own(func() {
		select {
		case <-p.done:
		default:
			_ = p.cmd.Process.Kill()
			<-p.done
		}
	})
	return p
}

// wait waits for p to exit and returns its exit status, failing the test
// (and killing p) after notHung.
func (e *env) wait(p *proc) int {
	e.t.Helper()
	return e.waitWithin(p, notHung)
}

// waitWithin is wait with a bound of d.
func (e *env) waitWithin(p *proc, notHung time.Duration) int {
	e.t.Helper()
	select {
	case <-p.done:
	case <-time.After(notHung):
		_ = p.cmd.Process.Kill()
		<-p.done
		e.t.Fatalf("pglock %q did not exit within %v (killed after %v); stdout: %s\nstderr: %s",
			p.cmd.Args[1:], notHung, p.elapsed, p.stdout.String(), p.stderr.String())
	}
	return p.code
}

// pglock runs pglock to completion.
func (e *env) pglock(extraEnv []string, args ...string) *proc {
	e.t.Helper()
	p := e.start(extraEnv, "", args...)
	e.wait(p)
	return p
}

// want fails the test unless p exited with code.
func (e *env) want(p *proc, code int) {
	e.t.Helper()
	if p.code != code {
		e.t.Errorf("pglock %q exited %d, want %d\nstdout: %s\nstderr: %s",
			p.cmd.Args[1:], p.code, code, p.stdout.String(), p.stderr.String())
	}
}
