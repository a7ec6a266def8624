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

	"github.com/seed0ad592b7/advisory/internal/pgtest"
)

// Options is the server the migration tests need: local binaries (the
// SIGKILL tests read the server log), each log line naming its backend.
var Options = pgtest.Options{Local: true, Settings: map[string]string{
	"log_line_prefix":    "%m [%p] ",
	"log_disconnections": "on",
}}

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

// Activity returns the client backends of database dsn's, with their hold
// of key (classid, objid; a bigint key) and how long those holding a
// snapshot have held it (the age of their running statement or
// transaction, a bound of the snapshot's age).
func Activity(ctx context.Context, c *pgx.Conn, key int64) ([]Backend, error) {
	rows, err := c.Query(ctx, `SELECT a.pid, coalesce(a.state, ''), a.query, l.granted,
			CASE WHEN a.backend_xmin IS NOT NULL THEN clock_timestamp() - coalesce(a.xact_start, a.query_start) END,
			coalesce(a.wait_event_type = 'Lock' AND a.wait_event = 'advisory', false)
		FROM pg_stat_activity a
		LEFT JOIN pg_locks l ON l.pid = a.pid AND l.locktype = 'advisory' AND l.objsubid = 1
			AND l.classid::int8 = ($1::int8 >> 32) AND l.objid::int8 = ($1::int8 & 4294967295)
		WHERE a.datname = current_database() AND a.backend_type = 'client backend' AND a.pid <> pg_backend_pid()
		ORDER BY a.pid`, key)
	if err != nil {
		return nil, err
	}
	return pgx.CollectRows(rows, func(r pgx.CollectableRow) (Backend, error) {
		var b Backend
		err := r.Scan(&b.PID, &b.State, &b.Query, &b.Granted, &b.XminAge, &b.WaitLock)
		return b, err
	})
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
