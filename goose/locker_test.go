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

// The tests migrate a real PostgreSQL (migrationtest.RunMain), each in a
// database of its own; instances that must be killed are child processes
// of the test binary (TestInstance).
var server *pgtest.Server

func TestMain(m *testing.M) { os.Exit(migrationtest.RunMain(m, &server)) }

// migrations are the test's goose migrations: a table, written in a
// transaction that also sleeps for sleep seconds (so that a test can find
// it running, or kill it mid-statement) and records which backend ran it
// in runs (a table the test made), then an index built concurrently (no
// transaction).
func migrations(sleep string) fstest.MapFS {
	return fstest.MapFS{
		"00001_items.sql":    {Data: []byte("-- +goose Up\n" + migrationtest.ItemsSQL(sleep))},
		"00002_items_id.sql": {Data: []byte("-- +goose NO TRANSACTION\n-- +goose Up\n" + migrationtest.IndexSQL)},
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
	ctx := migrationtest.Context(t)
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

// N instances start at once: exactly one migrates (CREATE INDEX
// CONCURRENTLY included), the others wait and then find nothing to do; no
// waiter holds a snapshot for as long as deadlock_timeout.
func TestInstancesAtOnce(t *testing.T) {
	dsn, c := migrationtest.Prepare(t, server)
	const n = 4
	applied, waiters := migrationtest.AtOnce(t, c, compat.Goose(), dsn, n)
	if applied["2"] != 1 || applied["0"] != n-1 {
		t.Errorf("migrations applied per instance: %v; want one instance applying 2 and %d applying 0", applied, n-1)
	}
	migrationtest.CheckMigrated(t, c)
	waiters.Check(t, c)
}

// The migrating instance is killed (SIGKILL) in the middle of a statement
// of its migration: the server runs that statement to its end, and until
// the dead instance's backend has ended, it holds the key and no other
// backend holds it or migrates; the next instance then migrates from
// scratch (the dead one's transaction was rolled back).
func TestKilledMigrator(t *testing.T) {
	dsn, c := migrationtest.Prepare(t, server)
	dead, b := migrationtest.KillMigrator(t, server, c, compat.Goose(), dsn)
	if err := b.Wait(t); err != nil || b.Result("applied") != "2" {
		t.Errorf("the next instance: %v, applied %q; want 2 migrations applied; output:\n%s", err, b.Result("applied"), b.Output())
	}
	migrationtest.CheckMigrated(t, c)
	if pids := migrationtest.Runners(t, c); len(pids) == 1 && pids[0] == dead {
		t.Errorf("migration 1 committed by the dead instance's backend %d", dead)
	}
}

// Guarded instances and goose's own locker exclude each other, both ways:
// whichever comes second waits, then finds nothing to do.
func TestExcludesGooseLocker(t *testing.T) {
	for _, plainFirst := range []bool{true, false} {
		t.Run(fmt.Sprintf("plain-first=%v", plainFirst), func(t *testing.T) {
			dsn, c := migrationtest.Prepare(t, server)
			ctx := migrationtest.Context(t)
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
			first := migrationtest.AwaitSleeping(t, c, compat.Goose(), 0)
			start(1, "0")
			if plainFirst { // goose's own locker polls with pg_try_advisory_lock: only ours shows as a waiter
				migrationtest.AwaitWaiting(t, c, compat.Goose(), first)
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
			if pids := migrationtest.Runners(t, c); len(pids) != 1 || pids[0] != first {
				t.Errorf("migration 1 committed by backends %v; want only the first instance's %d", pids, first)
			}
		})
	}
}

// goose run inside advisory.Do on the key its SessionLocker locks would
// wait for its own lock for ever: SessionLock refuses at once.
func TestRefusesSelfDeadlock(t *testing.T) {
	dsn, c := migrationtest.Prepare(t, server)
	ctx := migrationtest.Context(t)
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
	if pids := migrationtest.Runners(t, c); len(pids) != 0 {
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
	dsn, c := migrationtest.Prepare(t, server)
	ctx := migrationtest.Context(t)
	done := make(chan error, 1)
	go func() {
		_, err := up(ctx, dsn, NewSessionLocker(compat.Goose()), "30")
		done <- err
	}()
	pid := migrationtest.AwaitSleeping(t, c, compat.Goose(), 0)
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
	if pids := migrationtest.Runners(t, c); len(pids) != 0 {
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

// SessionLock and SessionUnlock on a *sql.Conn: the lock is on that
// connection's backend with the keep-alives set, and SessionUnlock gives the
// connection back as it was; a bounded wait for a key held elsewhere ends
// with advisory.ErrTimeout, holding nothing.
func TestSessionLockOnConn(t *testing.T) {
	dsn, c := migrationtest.Prepare(t, server)
	ctx := migrationtest.Context(t)
	db, err := sql.Open("pgx", dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	conn, err := db.Conn(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	show := func() (pid uint32, idle string) {
		t.Helper()
		if err := conn.QueryRowContext(ctx, "SELECT pg_backend_pid(), current_setting('tcp_keepalives_idle')").Scan(&pid, &idle); err != nil {
			t.Fatal(err)
		}
		return pid, idle
	}
	pid, lent := show()
	key := advisory.StringKey("advisorygoose-conn")
	l := NewSessionLocker(key)
	if err := l.SessionLock(ctx, conn); err != nil {
		t.Fatal(err)
	}
	backends, err := migrationtest.Activity(ctx, c, key)
	if err != nil {
		t.Fatal(err)
	}
	for _, b := range backends {
		if b.Holds() != (b.PID == pid) {
			t.Errorf("backend %d holds %s: %v; want only the *sql.Conn's backend %d to hold it", b.PID, key, b.Holds(), pid)
		}
	}
	if _, idle := show(); idle == lent {
		t.Errorf("tcp_keepalives_idle while locked = %s; want the lock's, not the connection's own", idle)
	}
	bounded := NewSessionLocker(key, advisory.WaitTimeout(300*time.Millisecond))
	other, err := db.Conn(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := bounded.SessionLock(ctx, other); !errors.Is(err, advisory.ErrTimeout) {
		t.Errorf("a bounded SessionLock of a held key = %v; want ErrTimeout", err)
	}
	if err := other.Close(); err != nil {
		t.Error(err)
	}
	if err := l.SessionUnlock(ctx, conn); err != nil {
		t.Fatal(err)
	}
	if _, idle := show(); idle != lent {
		t.Errorf("tcp_keepalives_idle after SessionUnlock = %s; want the connection's own %s", idle, lent)
	}
	if err := l.SessionUnlock(ctx, conn); err == nil {
		t.Error("a second SessionUnlock succeeded")
	}
}
