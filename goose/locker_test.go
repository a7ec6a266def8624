package advisorygoose

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"errors"
	"fmt"
	"os"
	"strings"
	"testing"
	"testing/fstest"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
	_ "github.com/jackc/pgx/v5/stdlib"
	"github.com/pressly/goose/v3"
	"github.com/pressly/goose/v3/lock"

	"github.com/seed0ad592b7/advisory"
	"github.com/seed0ad592b7/advisory/compat"
	"github.com/seed0ad592b7/advisory/internal/migrationtest"
	"github.com/seed0ad592b7/advisory/internal/pgtest"
)

// The tests migrate a real PostgreSQL started by the advisory module's
// internal/pgtest, each in a database of its own; instances that must be
// killed are child processes of the test binary (TestInstance).
var server *pgtest.Server

func TestMain(m *testing.M) {
	if os.Getenv(migrationtest.EnvRole) != "" { // a child: the server is the parent's
		os.Exit(m.Run())
	}
	os.Exit(pgtest.RunMain(m, migrationtest.Options, func(s *pgtest.Server) {
		server = s
		os.Setenv("DATABASE_URL", s.DSN) // where the example connects, as a program would
	}))
}

// gooseKey is compat.Goose() as the bigint pg_locks shows.
var gooseKey = int64(4097083626)

// migrations are the test's goose migrations: a table, written in a
// transaction that also sleeps for sleep seconds (so that a test can find
// it running, or kill it mid-statement) and records which backend ran it
// in runs (a table the test made), then an index built concurrently (no
// transaction).
func migrations(sleep string) fstest.MapFS {
	return fstest.MapFS{
		"00001_items.sql": {Data: []byte("-- +goose Up\nCREATE TABLE items (id int);\n" +
			"INSERT INTO runs VALUES (pg_backend_pid());\nSELECT pg_sleep(" + sleep + ");\n")},
		"00002_items_id.sql": {Data: []byte("-- +goose NO TRANSACTION\n-- +goose Up\n" +
			"CREATE INDEX CONCURRENTLY items_id ON items (id);\n")},
	}
}

// up runs goose up on dsn with locker, as one instance of a service would.
func up(ctx context.Context, dsn string, locker lock.SessionLocker, sleep string) (applied int, err error) {
	db, err := sql.Open("pgx", dsn)
	if err != nil {
		return 0, err
	}
	defer db.Close()
	p, err := goose.NewProvider(goose.DialectPostgres, db, migrations(sleep), goose.WithSessionLocker(locker))
	if err != nil {
		return 0, err
	}
	res, err := p.Up(ctx)
	return len(res), err
}

// TestInstance is not a test: it is one goose instance, run by the tests
// below as a child process (migrationtest.Start). MIGRATIONTEST_ROLE says
// which locker it uses ("guarded": NewSessionLocker(compat.Goose());
// "plain": goose's own), SLEEP how long migration 1 sleeps.
func TestInstance(t *testing.T) {
	role := os.Getenv(migrationtest.EnvRole)
	if role == "" {
		return // run as a test of its own: nothing to do
	}
	ctx, cancel := context.WithTimeout(context.Background(), migrationtest.Timeout)
	defer cancel()
	var locker lock.SessionLocker = NewSessionLocker(compat.Goose())
	if role == "plain" {
		var err error
		if locker, err = lock.NewPostgresSessionLocker(lock.WithLockTimeout(1, 60)); err != nil {
			t.Fatal(err)
		}
	}
	applied, err := up(ctx, os.Getenv(migrationtest.EnvDSN), locker, os.Getenv("SLEEP"))
	migrationtest.Report(os.Stdout, "applied", applied)
	if err != nil {
		t.Fatal(err)
	}
}

// prepare makes a database for the test, with the runs table the
// migrations write to, and returns its DSN and a connection to it.
func prepare(t *testing.T) (string, *pgx.Conn) {
	t.Helper()
	dsn := migrationtest.NewDatabase(t, server)
	ctx, cancel := context.WithTimeout(context.Background(), migrationtest.Timeout)
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

// runners returns the backends that ran migration 1 and committed.
func runners(t *testing.T, c *pgx.Conn) []uint32 {
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

// checkIndex fails t unless migration 2's index was built and is valid.
func checkIndex(t *testing.T, c *pgx.Conn) {
	t.Helper()
	var valid bool
	err := c.QueryRow(context.Background(), "SELECT indisvalid FROM pg_index WHERE indexrelid = 'items_id'::regclass").Scan(&valid)
	if err != nil || !valid {
		t.Errorf("the concurrently built index: valid %v, %v; want a valid index", valid, err)
	}
}

// deadlockTimeout is the server's deadlock_timeout: a wait slice is shorter.
func deadlockTimeout(t *testing.T, c *pgx.Conn) time.Duration {
	t.Helper()
	var ms int64
	if err := c.QueryRow(context.Background(), "SELECT setting::int8 FROM pg_settings WHERE name = 'deadlock_timeout'").Scan(&ms); err != nil {
		t.Fatal(err)
	}
	return time.Duration(ms) * time.Millisecond
}

// N instances start at once: exactly one migrates (CREATE INDEX
// CONCURRENTLY included), the others wait and then find nothing to do; no
// waiter holds a snapshot for as long as deadlock_timeout.
func TestInstancesAtOnce(t *testing.T) {
	dsn, c := prepare(t)
	const n = 4
	children := make([]*migrationtest.Child, n)
	for i := range children {
		children[i] = migrationtest.Start(t, "TestInstance", "guarded", dsn, "SLEEP=1.5")
	}
	exited := make(chan struct{})
	go func() {
		for _, ch := range children {
			_ = ch.Wait(t)
		}
		close(exited)
	}()
	var (
		waitSamples int
		longest     time.Duration
	)
	for sampling := true; sampling; {
		select {
		case <-exited:
			sampling = false
		case <-time.After(10 * time.Millisecond): // sampling the server
		}
		backends, err := migrationtest.Activity(context.Background(), c, gooseKey)
		if err != nil {
			t.Fatal(err)
		}
		for _, b := range backends {
			if b.WaitLock {
				waitSamples++
				if b.XminAge != nil {
					longest = max(longest, *b.XminAge)
				}
			}
		}
	}
	applied := map[string]int{}
	for i, ch := range children {
		if err := ch.Wait(t); err != nil {
			t.Errorf("instance %d: %v; output:\n%s", i, err, ch.Output())
		}
		applied[ch.Result("applied")]++
	}
	if applied["2"] != 1 || applied["0"] != n-1 {
		t.Errorf("migrations applied per instance: %v; want one instance applying 2 and %d applying 0", applied, n-1)
	}
	if pids := runners(t, c); len(pids) != 1 {
		t.Errorf("migration 1 ran in backends %v; want exactly one", pids)
	}
	checkIndex(t, c)
	if waitSamples == 0 {
		t.Error("no instance was ever seen waiting on the server: the test proved nothing about waiters")
	}
	dt := deadlockTimeout(t, c)
	if longest >= dt {
		t.Errorf("a waiter held a snapshot for %v; want less than deadlock_timeout (%v): waits are sliced", longest, dt)
	}
	t.Logf("%d samples of waiting instances; the longest a waiter's statement held a snapshot: %v (deadlock_timeout %v)", waitSamples, longest, dt)
}

// The migrating instance is killed (SIGKILL) in the middle of a statement
// of its migration: the server runs that statement to its end, and until
// the dead instance's backend has ended, it holds the key and no other
// backend holds it or migrates; the next instance then migrates from
// scratch (the dead one's transaction was rolled back).
func TestKilledMigrator(t *testing.T) {
	dsn, c := prepare(t)
	ctx, cancel := context.WithTimeout(context.Background(), migrationtest.Timeout)
	defer cancel()
	a := migrationtest.Start(t, "TestInstance", "guarded", dsn, "SLEEP=3")
	dead := awaitSleeping(t, ctx, c, 0)
	b := migrationtest.Start(t, "TestInstance", "guarded", dsn, "SLEEP=0")
	awaitWaiting(t, ctx, c, dead)

	if err := a.Cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	_ = a.Wait(t)
	outlived := 0 // samples where the dead instance's statement still ran
	for {
		backends, err := migrationtest.Activity(ctx, c, gooseKey)
		if err != nil {
			t.Fatal(err)
		}
		// The dead instance's backend, as long as it shows: while its
		// statement runs it holds the key, and while it runs or holds the
		// key nobody else holds it. (An exiting backend releases its locks
		// a moment before it leaves pg_stat_activity.)
		alive, busy := false, false
		for _, bk := range backends {
			if bk.PID != dead {
				continue
			}
			alive = true
			held := bk.Granted != nil && *bk.Granted
			if bk.State == "active" {
				if !held {
					t.Fatalf("the dead instance's backend %d runs %q without the key: %+v", dead, bk.Query, backends)
				}
				outlived++
			}
			busy = held || bk.State == "active"
		}
		for _, bk := range backends {
			if busy && bk.PID != dead && bk.Granted != nil && *bk.Granted {
				t.Fatalf("backend %d holds the key while the dead instance's backend %d still runs or holds it: %+v", bk.PID, dead, backends)
			}
		}
		if !alive {
			break
		}
		if ctx.Err() != nil {
			t.Fatal("the dead instance's backend never ended")
		}
	}
	if outlived == 0 {
		t.Error("the dead instance's statement was never seen running after its process died: the test proved nothing")
	}
	if err := b.Wait(t); err != nil || b.Result("applied") != "2" {
		t.Errorf("the next instance: %v, applied %q; want 2 migrations applied; output:\n%s", err, b.Result("applied"), b.Output())
	}
	if pids := runners(t, c); len(pids) != 1 || pids[0] == dead {
		t.Errorf("migration 1 committed by backends %v; want one, not the dead instance's %d", pids, dead)
	}
	checkIndex(t, c)
	lines := migrationtest.LogLines(t, server, dead)
	t.Logf("%d samples saw the dead instance's statement still running after SIGKILL; its backend's server log:\n%s", outlived, strings.Join(lines, "\n"))
	if !strings.Contains(strings.Join(lines, "\n"), "disconnection") {
		t.Errorf("the server log has no disconnection of the dead instance's backend %d", dead)
	}
}

// awaitSleeping waits until a backend other than not runs migration 1's
// pg_sleep holding the key (the lock and the migration share a session),
// and returns it.
func awaitSleeping(t *testing.T, ctx context.Context, c *pgx.Conn, not uint32) uint32 {
	t.Helper()
	for {
		backends, err := migrationtest.Activity(ctx, c, gooseKey)
		if err != nil {
			t.Fatalf("awaiting a migration in pg_sleep holding the key: %v", err)
		}
		for _, b := range backends {
			if b.PID != not && strings.Contains(b.Query, "pg_sleep") && b.State == "active" {
				if b.Granted == nil || !*b.Granted {
					t.Fatalf("backend %d migrates without holding the key: %+v", b.PID, backends)
				}
				return b.PID
			}
		}
		select {
		case <-ctx.Done():
			t.Fatal("no migration was seen in pg_sleep holding the key")
		case <-time.After(5 * time.Millisecond): // polling a server state
		}
	}
}

// awaitWaiting waits until a backend other than holder waits for the key.
func awaitWaiting(t *testing.T, ctx context.Context, c *pgx.Conn, holder uint32) {
	t.Helper()
	for {
		backends, err := migrationtest.Activity(ctx, c, gooseKey)
		if err != nil {
			t.Fatalf("awaiting a waiter: %v", err)
		}
		for _, b := range backends {
			if b.PID != holder && b.WaitLock {
				return
			}
		}
		select {
		case <-ctx.Done():
			t.Fatal("no instance was seen waiting for the key")
		case <-time.After(5 * time.Millisecond): // polling a server state
		}
	}
}

// Guarded instances and goose's own locker exclude each other, both ways:
// whichever comes second waits, then finds nothing to do.
func TestExcludesGooseLocker(t *testing.T) {
	for _, plainFirst := range []bool{true, false} {
		t.Run(fmt.Sprintf("plain-first=%v", plainFirst), func(t *testing.T) {
			dsn, c := prepare(t)
			ctx, cancel := context.WithTimeout(context.Background(), migrationtest.Timeout)
			defer cancel()
			plain, err := lock.NewPostgresSessionLocker(lock.WithLockTimeout(1, 60))
			if err != nil {
				t.Fatal(err)
			}
			lockers := []lock.SessionLocker{NewSessionLocker(compat.Goose()), plain}
			if plainFirst {
				lockers[0], lockers[1] = lockers[1], lockers[0]
			}
			type result struct {
				applied int
				err     error
			}
			results := make([]chan result, 2)
			start := func(i int, sleep string) {
				results[i] = make(chan result, 1)
				go func() {
					n, err := up(ctx, dsn, lockers[i], sleep)
					results[i] <- result{n, err}
				}()
			}
			start(0, "1.5")
			first := awaitSleeping(t, ctx, c, 0)
			start(1, "0")
			if plainFirst { // goose's own locker polls with pg_try_advisory_lock: only ours shows as a waiter
				awaitWaiting(t, ctx, c, first)
			}
			var got [2]result
			for i := range results {
				got[i] = <-results[i]
				if got[i].err != nil {
					t.Errorf("instance %d: %v", i, got[i].err)
				}
			}
			if got[0].applied != 2 || got[1].applied != 0 {
				t.Errorf("applied: first %d, second %d; want 2 and 0", got[0].applied, got[1].applied)
			}
			if pids := runners(t, c); len(pids) != 1 || pids[0] != first {
				t.Errorf("migration 1 committed by backends %v; want only the first instance's %d", pids, first)
			}
		})
	}
}

// goose run inside advisory.Do on the key its SessionLocker locks would
// wait for its own lock for ever: SessionLock refuses at once.
func TestRefusesSelfDeadlock(t *testing.T) {
	dsn, c := prepare(t)
	ctx, cancel := context.WithTimeout(context.Background(), migrationtest.Timeout)
	defer cancel()
	pool, err := pgxpool.New(ctx, dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer pool.Close()
	var upErr error
	ran, err := advisory.Do(ctx, pool, compat.Goose(), func(ctx context.Context) error {
		_, upErr = up(ctx, dsn, NewSessionLocker(compat.Goose()), "0")
		return nil
	})
	if !ran || err != nil {
		t.Fatalf("Do = %v, %v", ran, err)
	}
	if !errors.Is(upErr, ErrHeldByCaller) {
		t.Errorf("goose up under Do on the same key = %v; want ErrHeldByCaller", upErr)
	}
	if pids := runners(t, c); len(pids) != 0 {
		t.Errorf("migration 1 ran in %v; want not at all", pids)
	}
	if n := pool.Stat().AcquiredConns(); n != 0 {
		t.Errorf("%d pool connections still acquired", n)
	}
}

// The lock is lost during a migration (its backend, which also runs the
// migration, is terminated): the migration's statement fails with the
// session, and SessionUnlock reports ErrLockLost.
func TestLockLostDuringMigration(t *testing.T) {
	dsn, c := prepare(t)
	ctx, cancel := context.WithTimeout(context.Background(), migrationtest.Timeout)
	defer cancel()
	done := make(chan error, 1)
	go func() {
		_, err := up(ctx, dsn, NewSessionLocker(compat.Goose()), "30")
		done <- err
	}()
	pid := awaitSleeping(t, ctx, c, 0)
	var ok bool
	if err := c.QueryRow(ctx, "SELECT pg_terminate_backend($1)", int64(pid)).Scan(&ok); err != nil || !ok {
		t.Fatalf("pg_terminate_backend = %v, %v", ok, err)
	}
	err := <-done
	if !errors.Is(err, advisory.ErrLockLost) {
		t.Errorf("goose up whose lock was lost = %v; want an error matching advisory.ErrLockLost", err)
	}
	var pgErr *pgconn.PgError
	if !errors.As(err, &pgErr) || pgErr.Code != "57P01" {
		t.Errorf("goose up whose lock was lost = %v; want the migration's statement failed with 57P01 (admin shutdown)", err)
	}
	if pids := runners(t, c); len(pids) != 0 {
		t.Errorf("migration 1 committed by %v; want nothing committed", pids)
	}
}

// A *sql.Conn of another driver is refused with an error naming pgx's.
func TestRefusesOtherDriver(t *testing.T) {
	sql.Register("advisorygoose-other", otherDriver{})
	db, err := sql.Open("advisorygoose-other", "")
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	ctx := context.Background()
	conn, err := db.Conn(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	l := NewSessionLocker(compat.Goose())
	err = l.SessionLock(ctx, conn)
	if !errors.Is(err, ErrNotPgx) || !strings.Contains(err.Error(), "github.com/jackc/pgx/v5/stdlib") {
		t.Errorf("SessionLock on another driver's connection = %v; want ErrNotPgx naming pgx's stdlib", err)
	}
	if err := l.SessionUnlock(ctx, conn); err == nil {
		t.Error("SessionUnlock of a connection that holds nothing succeeded")
	}
}

// otherDriver is a database/sql driver that is not pgx's; it never talks to
// a server (the locker must refuse it before any statement).
type otherDriver struct{}

func (otherDriver) Open(string) (driver.Conn, error) { return otherConn{}, nil }

type otherConn struct{}

func (otherConn) Prepare(string) (driver.Stmt, error) { return nil, errors.New("not supported") }
func (otherConn) Close() error                        { return nil }
func (otherConn) Begin() (driver.Tx, error)           { return nil, errors.New("not supported") }
