// Package migrationtest holds what the migration-guard tests of the goose
// and migrate modules share: a database per test, instances run as child
// processes of the test binary, and the server-side views they assert on
// (who holds the key, what the waiters cost, what the server logged).
package migrationtest

import (
	"context"
	"fmt"
	"io"
	"net/url"
	"os"
	"os/exec"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/seed0ad592b7/advisory"
	"github.com/seed0ad592b7/advisory/internal/pgtest"
)

// Options is the server the migration tests need: local binaries (the
// SIGKILL tests read the server log), each log line naming its backend.
var Options = pgtest.Options{Local: true, Settings: map[string]string{
	"log_line_prefix":    "%m [%p] ",
	"log_disconnections": "on",
}}

// RunMain runs a migration module's tests on a server started by
// pgtest.RunMain with Options, stored in *server, and with DATABASE_URL
// pointing at it (where the examples connect, as a program would). A child
// process (EnvRole set) runs its one test without a server of its own.
func RunMain(m *testing.M, server **pgtest.Server) int {
	if os.Getenv(EnvRole) != "" {
		return m.Run()
	}
	return pgtest.RunMain(m, Options, func(s *pgtest.Server) {
		*server = s
		os.Setenv("DATABASE_URL", s.DSN)
	})
}

// EnvRole names the role a child process of the test binary plays; EnvDSN
// the database it migrates.
const (
	EnvRole = "MIGRATIONTEST_ROLE"
	EnvDSN  = "MIGRATIONTEST_DSN"
)

// Timeout bounds every wait of a test, so a broken promise fails it.
const Timeout = 90 * time.Second

// NewDatabase creates a database of its own for the test on srv and returns
// a DSN for it; at the end of the test it checks that no advisory lock is
// left there, then drops it. Advisory locks are per database, so tests on
// different databases do not see each other's keys.
func NewDatabase(t *testing.T, srv *pgtest.Server) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), Timeout)
	defer cancel()
	name := strings.ToLower(strings.NewReplacer("/", "_", " ", "_").Replace(t.Name()))
	admin, err := pgx.Connect(ctx, srv.DSN)
	if err != nil {
		t.Fatal(err)
	}
	defer admin.Close(ctx)
	if _, err := admin.Exec(ctx, "DROP DATABASE IF EXISTS "+pgx.Identifier{name}.Sanitize()+" WITH (FORCE)"); err != nil {
		t.Fatal(err)
	}
	if _, err := admin.Exec(ctx, "CREATE DATABASE "+pgx.Identifier{name}.Sanitize()); err != nil {
		t.Fatal(err)
	}
	u, err := url.Parse(srv.DSN)
	if err != nil {
		t.Fatal(err)
	}
	u.Path = "/" + name
	dsn := u.String()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), Timeout)
		defer cancel()
		admin, err := pgx.Connect(ctx, srv.DSN)
		if err != nil {
			t.Error(err)
			return
		}
		defer admin.Close(ctx)
		AwaitNoLocks(t, ctx, admin, name)
		if _, err := admin.Exec(ctx, "DROP DATABASE "+pgx.Identifier{name}.Sanitize()+" WITH (FORCE)"); err != nil {
			t.Error(err)
		}
	})
	return dsn
}

// AwaitNoLocks fails t unless the advisory locks of database are all gone
// before ctx ends (a session that ended may take a moment to leave).
func AwaitNoLocks(t *testing.T, ctx context.Context, c *pgx.Conn, database string) {
	t.Helper()
	for {
		var n int
		err := c.QueryRow(ctx, `SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'
			AND database = (SELECT oid FROM pg_database WHERE datname = $1)`, database).Scan(&n)
		if err != nil {
			t.Errorf("checking for advisory locks left: %v", err)
			return
		}
		if n == 0 {
			return
		}
		select {
		case <-ctx.Done():
			t.Errorf("at the end of the test: %d advisory locks left in database %s", n, database)
			return
		case <-time.After(5 * time.Millisecond): // polling a server state
		}
	}
}

// Child is an instance run as a child process of the test binary.
type Child struct {
	Cmd  *exec.Cmd
	out  strings.Builder
	mu   sync.Mutex
	done chan error
}

// Start runs test (a top-level test name; it plays role when EnvRole says
// so) in a child process of the test binary, migrating dsn, with more
// environment in env.
func Start(t *testing.T, test, role, dsn string, env ...string) *Child {
	t.Helper()
	c := &Child{done: make(chan error, 1)}
	c.Cmd = exec.Command(os.Args[0], "-test.run=^"+test+"$", "-test.count=1", "-test.v", "-test.timeout="+Timeout.String())
	c.Cmd.Env = append(append(os.Environ(), EnvRole+"="+role, EnvDSN+"="+dsn), env...)
	c.Cmd.Stdout = writerFunc(c.write)
	c.Cmd.Stderr = writerFunc(c.write)
	if err := c.Cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { c.done <- c.Cmd.Wait() }()
	t.Cleanup(func() {
		_ = c.Cmd.Process.Kill()
		<-c.done
		c.done <- nil
	})
	return c
}

type writerFunc func([]byte) (int, error)

func (f writerFunc) Write(b []byte) (int, error) { return f(b) }

func (c *Child) write(b []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.out.Write(b)
}

// Output is what the child wrote so far.
func (c *Child) Output() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.out.String()
}

// Wait waits for the child to exit, at most Timeout, and returns its exit
// error; the test fails if it does not exit.
func (c *Child) Wait(t *testing.T) error {
	t.Helper()
	select {
	case err := <-c.done:
		c.done <- err
		return err
	case <-time.After(Timeout):
		t.Fatalf("child %v did not exit within %v; its output:\n%s", c.Cmd.Args, Timeout, c.Output())
		return nil
	}
}

// Result returns the value of the child's "RESULT key=value" line for key,
// or "" if it wrote none.
func (c *Child) Result(key string) string {
	for _, line := range strings.Split(c.Output(), "\n") {
		if v, ok := strings.CutPrefix(strings.TrimSpace(line), "RESULT "+key+"="); ok {
			return v
		}
	}
	return ""
}

// Report writes a "RESULT key=value" line for the parent test (Result).
func Report(w io.Writer, key string, value any) { fmt.Fprintf(w, "RESULT %s=%v\n", key, value) }

// Backend is one row of pg_stat_activity, with what it holds or waits for
// on the key.
type Backend struct {
	PID      uint32
	State    string
	Query    string
	Granted  *bool          // its pg_locks row for the key: nil if none
	XminAge  *time.Duration // how long its statement has run, if it holds a snapshot (backend_xmin)
	WaitLock bool           // waits on an advisory lock
}

// Holds reports whether the backend holds the key.
func (b Backend) Holds() bool { return b.Granted != nil && *b.Granted }

// Activity returns the client backends of c's database, with their hold
// of key and, for those holding a snapshot, the age of their running
// statement or transaction (a bound of the snapshot's age).
func Activity(ctx context.Context, c *pgx.Conn, key advisory.Key) ([]Backend, error) {
	classid, objid, objsubid := key.LockRow()
	rows, err := c.Query(ctx, `SELECT a.pid, coalesce(a.state, ''), a.query, l.granted,
			CASE WHEN a.backend_xmin IS NOT NULL THEN clock_timestamp() - coalesce(a.xact_start, a.query_start) END,
			coalesce(a.wait_event_type = 'Lock' AND a.wait_event = 'advisory', false)
		FROM pg_stat_activity a
		LEFT JOIN pg_locks l ON l.pid = a.pid AND l.locktype = 'advisory'
			AND l.classid::int8 = $1 AND l.objid::int8 = $2 AND l.objsubid = $3
		WHERE a.datname = current_database() AND a.backend_type = 'client backend' AND a.pid <> pg_backend_pid()
		ORDER BY a.pid`, int64(classid), int64(objid), objsubid)
	if err != nil {
		return nil, err
	}
	return pgx.CollectRows(rows, func(r pgx.CollectableRow) (Backend, error) {
		var b Backend
		err := r.Scan(&b.PID, &b.State, &b.Query, &b.Granted, &b.XminAge, &b.WaitLock)
		return b, err
	})
}

// await polls Activity until found returns true, failing t with what
// after Timeout.
func await(t *testing.T, c *pgx.Conn, key advisory.Key, what string, found func([]Backend) bool) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), Timeout)
	defer cancel()
	for {
		backends, err := Activity(ctx, c, key)
		if err != nil {
			t.Fatalf("awaiting %s: %v", what, err)
		}
		if found(backends) {
			return
		}
		select {
		case <-ctx.Done():
			t.Fatalf("awaiting %s: not seen within %v", what, Timeout)
		case <-time.After(5 * time.Millisecond): // polling a server state
		}
	}
}

// AwaitSleeping waits until a backend other than not runs a migration's
// pg_sleep, and returns it; t fails if that backend does not hold key (the
// lock and the migration must share a session).
func AwaitSleeping(t *testing.T, c *pgx.Conn, key advisory.Key, not uint32) (pid uint32) {
	t.Helper()
	await(t, c, key, "a migration in pg_sleep", func(backends []Backend) bool {
		for _, b := range backends {
			if b.PID != not && strings.Contains(b.Query, "pg_sleep") && b.State == "active" {
				if !b.Holds() {
					t.Fatalf("backend %d migrates without holding %s: %+v", b.PID, key, backends)
				}
				pid = b.PID
				return true
			}
		}
		return false
	})
	return pid
}

// AwaitWaiting waits until a backend other than holder waits on an
// advisory lock.
func AwaitWaiting(t *testing.T, c *pgx.Conn, key advisory.Key, holder uint32) {
	t.Helper()
	await(t, c, key, "an instance waiting for the key", func(backends []Backend) bool {
		for _, b := range backends {
			if b.PID != holder && b.WaitLock {
				return true
			}
		}
		return false
	})
}

// AwaitDeadBackend follows the backend of a killed migrator (dead) until it
// leaves pg_stat_activity, failing t unless, at every look, it held key
// while its statement ran and no other backend held key while it ran or
// held it. (An exiting backend releases its locks a moment before it
// leaves pg_stat_activity.) It fails t too if the statement was never seen
// running (the test then proved nothing), and logs the dead backend's
// server log lines.
func AwaitDeadBackend(t *testing.T, srv *pgtest.Server, c *pgx.Conn, key advisory.Key, dead uint32) {
	t.Helper()
	outlived := 0 // looks that saw the dead instance's statement still running
	var first, last []Backend
	await(t, c, key, fmt.Sprintf("the end of the killed migrator's backend %d", dead), func(backends []Backend) bool {
		if first == nil {
			first = backends
		}
		alive, busy := false, false
		for _, b := range backends {
			if b.PID != dead {
				continue
			}
			alive = true
			if b.State == "active" {
				if !b.Holds() {
					t.Fatalf("the dead instance's backend %d runs %q without the key: %+v", dead, b.Query, backends)
				}
				outlived++
			}
			busy = b.Holds() || b.State == "active"
			last = backends
		}
		for _, b := range backends {
			if busy && b.PID != dead && b.Holds() {
				t.Fatalf("backend %d holds the key while the dead instance's backend %d still runs or holds it: %+v", b.PID, dead, backends)
			}
		}
		return !alive
	})
	if outlived == 0 {
		t.Error("the dead instance's statement was never seen running after its process died: the test proved nothing")
	}
	t.Logf("pg_stat_activity with the key's pg_locks row, first look after the kill:\n%s\nlast look that saw the dead backend %d:\n%s",
		formatBackends(first), dead, formatBackends(last))
	lines := LogLines(t, srv, dead)
	t.Logf("%d looks saw the dead instance's statement still running after SIGKILL; its backend's server log:\n%s", outlived, strings.Join(lines, "\n"))
	if !strings.Contains(strings.Join(lines, "\n"), "disconnection") {
		t.Errorf("the server log has no disconnection of the dead instance's backend %d", dead)
	}
}

// AtOnce starts n instances at once (the test TestInstance, role
// "guarded", migration 1 sleeping 1.5 s), samples the waiters for key until
// they have all exited, fails t for any that failed, and returns how many
// reported each "applied" result, and what the sampling saw.
func AtOnce(t *testing.T, c *pgx.Conn, key advisory.Key, dsn string, n int) (applied map[string]int, w Waiters) {
	t.Helper()
	children := make([]*Child, n)
	for i := range children {
		children[i] = Start(t, "TestInstance", "guarded", dsn, "SLEEP=1.5")
	}
	w = SampleWaiters(t, c, key, func() {
		for _, ch := range children {
			_ = ch.Wait(t)
		}
	})
	applied = map[string]int{}
	for i, ch := range children {
		if err := ch.Wait(t); err != nil {
			t.Errorf("instance %d: %v; output:\n%s", i, err, ch.Output())
		}
		applied[ch.Result("applied")]++
	}
	return applied, w
}

// KillMigrator starts a guarded instance (TestInstance) whose migration 1
// sleeps 3 s, and a second one once the first migrates holding key; it
// kills the first with SIGKILL mid-statement once the second waits, and
// follows the dead backend to its end (AwaitDeadBackend). It returns the
// dead instance's backend and the second instance, still running.
func KillMigrator(t *testing.T, srv *pgtest.Server, c *pgx.Conn, key advisory.Key, dsn string) (dead uint32, next *Child) {
	t.Helper()
	a := Start(t, "TestInstance", "guarded", dsn, "SLEEP=3")
	dead = AwaitSleeping(t, c, key, 0)
	next = Start(t, "TestInstance", "guarded", dsn, "SLEEP=0")
	AwaitWaiting(t, c, key, dead)
	if err := a.Cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	_ = a.Wait(t)
	AwaitDeadBackend(t, srv, c, key, dead)
	return dead, next
}

// formatBackends prints backends one a line: pid, state, whether it holds
// or waits for the key, and its query's first line.
func formatBackends(backends []Backend) string {
	var b strings.Builder
	for _, bk := range backends {
		granted := "-"
		if bk.Granted != nil {
			granted = fmt.Sprint(*bk.Granted)
		}
		query, _, _ := strings.Cut(bk.Query, "\n")
		fmt.Fprintf(&b, "  pid %d state %q granted %s waiting %v query %.80q\n", bk.PID, bk.State, granted, bk.WaitLock, query)
	}
	return b.String()
}

// Waiters is what sampling saw of the instances waiting for a key.
type Waiters struct {
	Samples int           // looks at a waiting backend
	Longest time.Duration // the longest a waiter's statement held a snapshot
}

// SampleWaiters looks at the waiters for key every 10 ms until wait returns.
func SampleWaiters(t *testing.T, c *pgx.Conn, key advisory.Key, wait func()) Waiters {
	t.Helper()
	done := make(chan struct{})
	go func() {
		defer close(done)
		wait()
	}()
	var w Waiters
	for sampling := true; sampling; {
		select {
		case <-done:
			sampling = false
		case <-time.After(10 * time.Millisecond): // sampling the server
		}
		backends, err := Activity(context.Background(), c, key)
		if err != nil {
			t.Fatal(err)
		}
		for _, b := range backends {
			if b.WaitLock {
				w.Samples++
				if b.XminAge != nil {
					w.Longest = max(w.Longest, *b.XminAge)
				}
			}
		}
	}
	return w
}

// Check fails t unless waiters were seen, none of them holding a snapshot
// for as long as the server's deadlock_timeout (waits are sliced).
func (w Waiters) Check(t *testing.T, c *pgx.Conn) {
	t.Helper()
	var ms int64
	if err := c.QueryRow(context.Background(), "SELECT setting::int8 FROM pg_settings WHERE name = 'deadlock_timeout'").Scan(&ms); err != nil {
		t.Fatal(err)
	}
	dt := time.Duration(ms) * time.Millisecond
	if w.Samples == 0 {
		t.Error("no instance was ever seen waiting on the server: the test proved nothing about waiters")
	}
	if w.Longest >= dt {
		t.Errorf("a waiter held a snapshot for %v; want less than deadlock_timeout (%v): waits are sliced", w.Longest, dt)
	}
	t.Logf("%d samples of waiting instances; the longest a waiter's statement held a snapshot: %v (deadlock_timeout %v)", w.Samples, w.Longest, dt)
}

// Runners returns the backends that ran the first migration and committed
// (the migrations write pg_backend_pid() to the table runs).
func Runners(t *testing.T, c *pgx.Conn) []uint32 {
	t.Helper()
	rows, err := c.Query(context.Background(), "SELECT pid FROM runs")
	if err != nil {
		t.Fatal(err)
	}
	pids, err := pgx.CollectRows(rows, pgx.RowTo[uint32])
	if err != nil {
		t.Fatal(err)
	}
	return pids
}

// CheckMigrated fails t unless the first migration committed exactly once
// and the index the second builds concurrently (items_id) is valid.
func CheckMigrated(t *testing.T, c *pgx.Conn) {
	t.Helper()
	if pids := Runners(t, c); len(pids) != 1 {
		t.Errorf("the first migration committed in backends %v; want exactly one", pids)
	}
	var valid bool
	err := c.QueryRow(context.Background(), "SELECT indisvalid FROM pg_index WHERE indexrelid = 'items_id'::regclass").Scan(&valid)
	if err != nil || !valid {
		t.Errorf("the concurrently built index: valid %v, %v; want a valid index", valid, err)
	}
}

// Prepare makes a database of its own for the test (NewDatabase) with the
// table runs the migrations write to, and returns its DSN and a
// connection to it, closed when the test ends.
func Prepare(t *testing.T, srv *pgtest.Server) (string, *pgx.Conn) {
	t.Helper()
	dsn := NewDatabase(t, srv)
	ctx, cancel := context.WithTimeout(context.Background(), Timeout)
	defer cancel()
	c, err := pgx.Connect(ctx, dsn)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close(context.Background()) })
	if _, err := c.Exec(ctx, "CREATE TABLE runs (pid int)"); err != nil {
		t.Fatal(err)
	}
	return dsn, c
}

// LogLines returns the server log's lines written by backend pid (the log
// line prefix names it).
func LogLines(t *testing.T, srv *pgtest.Server, pid uint32) []string {
	t.Helper()
	log, err := srv.Log()
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	tag := fmt.Sprintf("[%d] ", pid)
	for _, line := range strings.Split(log, "\n") {
		if strings.Contains(line, tag) {
			out = append(out, line)
		}
	}
	return out
}
