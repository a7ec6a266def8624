package advisory

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/seed0ad592b7/advisory/internal/pgtest"
)

// startBouncer runs PgBouncer in transaction pooling mode in front of the
// test server with poolSize server connections, stopped when the test ends.
// A missing pgbouncer fails the test (CI installs it).
func startBouncer(t *testing.T, poolSize int) *pgtest.PgBouncer {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	b, err := pgtest.StartPgBouncerWith(ctx, server, pgtest.PgBouncerOptions{Mode: "transaction", PoolSize: poolSize})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := b.Stop(); err != nil {
			t.Error(err)
		}
	})
	return b
}

// bouncerPool is a pool through b in the given pgx query exec mode.
func (e *env) bouncerPool(b *pgtest.PgBouncer, mode string, mods ...func(*pgxpool.Config)) *pgxpool.Pool {
	e.t.Helper()
	saved := e.dsn
	e.dsn = b.DSN + "&default_query_exec_mode=" + mode
	defer func() { e.dsn = saved }()
	return e.pool(mods...)
}

// Which of pgx's query exec modes work through PgBouncer 1.18 in
// transaction mode, for a DoTx and for plain statements outside a
// transaction, each run on many concurrent clients so that consecutive
// statements land on different server connections. exec and
// simple_protocol must work; the others are logged (the documented
// finding: cache_statement fails on named prepared statements,
// describe_exec fails outside a transaction when its describe and execute
// land on different server sessions).
func TestPgBouncerExecModes(t *testing.T) {
	e := newEnv(t)
	b := startBouncer(t, 4)
	for _, mode := range []string{"simple_protocol", "exec", "cache_describe", "describe_exec", "cache_statement"} {
		pool := e.bouncerPool(b, mode, func(c *pgxpool.Config) { c.MaxConns = 8 })
		var mu sync.Mutex
		var errs []error
		var wg sync.WaitGroup
		for g := range 8 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for i := range 20 {
					var err error
					if i%2 == 0 {
						_, err = DoTx(e.ctx, pool, Int64Key(int64(500+g%2)), func(ctx context.Context, tx pgx.Tx) error {
							var n int64
							return tx.QueryRow(ctx, "SELECT $1::int8 + 1", int64(i)).Scan(&n)
						})
					} else {
						var n int64
						err = pool.QueryRow(e.ctx, "SELECT $1::int8 + $2::int8", int64(i), int64(g)).Scan(&n)
					}
					if err != nil {
						mu.Lock()
						errs = append(errs, err)
						mu.Unlock()
						return
					}
				}
			}()
		}
		wg.Wait()
		switch {
		case len(errs) == 0:
			t.Logf("default_query_exec_mode=%s: works", mode)
		case mode == "simple_protocol" || mode == "exec":
			t.Errorf("default_query_exec_mode=%s through pgbouncer: %v", mode, errors.Join(errs...))
		default:
			t.Logf("default_query_exec_mode=%s: fails: %v", mode, errs[0])
		}
	}
}

// DoTx through PgBouncer in transaction mode gives mutual exclusion:
// concurrent read-modify-writes with a separate SELECT and UPDATE, each in
// its own DoTx on the same key, lose no update.
func TestPgBouncerDoTxMutualExclusion(t *testing.T) {
	e := newEnv(t)
	b := startBouncer(t, 6)
	c := e.conn()
	_, err := c.Exec(e.ctx, `DROP TABLE IF EXISTS bouncer_counter; CREATE TABLE bouncer_counter (n bigint NOT NULL); INSERT INTO bouncer_counter VALUES (0)`)
	must(t, err)
	t.Cleanup(func() { _, _ = c.Exec(context.Background(), `DROP TABLE IF EXISTS bouncer_counter`) })
	for _, mode := range []string{"exec", "simple_protocol"} {
		pool := e.bouncerPool(b, mode, func(c *pgxpool.Config) { c.MaxConns = 12 })
		_, err := c.Exec(e.ctx, `UPDATE bouncer_counter SET n = 0`)
		must(t, err)
		const workers, each = 12, 25
		var wg sync.WaitGroup
		errs := make(chan error, workers)
		for g := range workers {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for i := range each {
					// Half wait, half use LockTx inside their own tx with NoWait and retry.
					if (g+i)%2 == 0 {
						ok, err := DoTx(e.ctx, pool, StringKey("bouncer-counter"), increment)
						if err != nil || !ok {
							errs <- fmt.Errorf("DoTx: %v, %v", ok, err)
							return
						}
						continue
					}
					for {
						tx, err := pool.Begin(e.ctx)
						if err != nil {
							errs <- err
							return
						}
						ok, err := LockTx(e.ctx, tx, StringKey("bouncer-counter"), NoWait())
						if err == nil && ok {
							err = increment(e.ctx, tx)
							if err == nil {
								err = tx.Commit(e.ctx)
							}
						}
						_ = tx.Rollback(e.ctx)
						if err != nil {
							errs <- err
							return
						}
						if ok {
							break
						}
					}
				}
			}()
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Fatalf("%s: %v", mode, err)
		}
		var n int
		must(t, c.QueryRow(e.ctx, `SELECT n FROM bouncer_counter`).Scan(&n))
		if n != workers*each {
			t.Errorf("%s: counter %d after %d locked increments through pgbouncer: lost updates", mode, n, workers*each)
		}
	}
}

// increment is a read-modify-write in two statements: without mutual
// exclusion, concurrent increments are lost.
func increment(ctx context.Context, tx pgx.Tx) error {
	var n int64
	if err := tx.QueryRow(ctx, `SELECT n FROM bouncer_counter`).Scan(&n); err != nil {
		return err
	}
	_, err := tx.Exec(ctx, `UPDATE bouncer_counter SET n = $1`, n+1)
	return err
}

// backendPID is pg_backend_pid() of the server session a query through q
// runs on.
func queryPID(t *testing.T, ctx context.Context, q interface {
	QueryRow(context.Context, string, ...any) pgx.Row
}) uint32 {
	t.Helper()
	var pid uint32
	must(t, q.QueryRow(ctx, `SELECT pg_backend_pid()`).Scan(&pid))
	return pid
}

// lockThroughBouncer starts a PgBouncer in transaction mode with
// serverConns server connections, and Acquires key through it as client
// A. It returns A's lock, client B's pool on the same PgBouncer, a direct
// connection to the server, and the server backend the lock is held on.
// It stops the test unless pg_locks shows the lock granted to one backend.
func (e *env) lockThroughBouncer(serverConns int, key Key) (lock *Lock, other *pgxpool.Pool, direct *pgx.Conn, serverPID uint32) {
	e.t.Helper()
	b := startBouncer(e.t, serverConns)
	pool := e.bouncerPool(b, "exec")
	other = e.bouncerPool(b, "exec")
	direct = e.conn()
	lock, err := Acquire(e.ctx, pool, key, HealthInterval(time.Hour))
	must(e.t, err)
	rows := e.lockRows(key)
	if len(rows) != 1 || !rows[0].Granted {
		e.t.Fatalf("after Acquire through pgbouncer: pg_locks rows %v", rows)
	}
	return lock, other, direct, rows[0].PID
}

// Session locks through PgBouncer in transaction mode are unsafe, shown
// two ways (the docs say so):
//
//  1. With one server connection, a lock Acquire holds is on a server
//     session every other client shares: an unrelated client's try-lock
//     succeeds while the lock is "held", and after both "released", one
//     hold stays on the server connection, owned by nobody.
//  2. With two server connections, the unlock runs on another server session
//     than the lock: Release fails with ErrLockLost and the lock stays held
//     on the server connection the first statement ran on.
func TestPgBouncerSessionLocksUnsafe(t *testing.T) {
	key := StringKey("bouncer-session-lock")

	t.Run("shared server session", func(t *testing.T) {
		e := newEnv(t)
		lock, other, c, serverPID := e.lockThroughBouncer(1, key)
		// An unrelated client gets the lock too: its statement runs on the
		// same server session, and session locks are re-entrant.
		var got bool
		must(t, other.QueryRow(e.ctx, `SELECT pg_try_advisory_lock($1)`, mustInt64(key)).Scan(&got))
		if !got {
			t.Fatal("an unrelated client through pgbouncer could not take the lock: the unsafety this test documents did not happen")
		}
		t.Logf("lock held by client A on server pid %d; unrelated client B's pg_try_advisory_lock returned true", serverPID)
		if e.tryFrom(c, key) {
			t.Error("a direct connection could take the lock while A held it")
		}
		// A releases: the unlock returns true (B's hold counted), so Release
		// reports success, yet the server still holds the key.
		must(t, lock.Release(e.ctx))
		rows := e.lockRows(key)
		if len(rows) != 1 || rows[0].PID != serverPID {
			t.Errorf("after A's Release: pg_locks rows %v; want still held by server pid %d", rows, serverPID)
		}
		if e.tryFrom(c, key) {
			t.Error("after A's Release the key was free: B's hold should have kept it")
		}
		t.Logf("after A's successful Release the lock is still held on server pid %d, by no client", serverPID)
		// Clean up the server connection pgbouncer keeps.
		_, err := c.Exec(e.ctx, `SELECT pg_terminate_backend($1)`, serverPID)
		must(t, err)
	})

	t.Run("unlock on another server session", func(t *testing.T) {
		e := newEnv(t)
		lock, other, c, serverPID := e.lockThroughBouncer(2, key)
		// Another client's transaction takes that server connection (it
		// is the most recently used idle one) and keeps it, so A's next
		// statement, the unlock, runs on the other one.
		tx, err := other.Begin(e.ctx)
		must(t, err)
		if pid := queryPID(t, e.ctx, tx); pid != serverPID {
			_ = tx.Rollback(e.ctx)
			_, _ = c.Exec(e.ctx, `SELECT pg_terminate_backend($1)`, serverPID)
			_ = lock.Release(e.ctx)
			t.Fatalf("the other client's transaction ran on server pid %d, not %d: cannot set up the demonstration", pid, serverPID)
		}
		err = lock.Release(e.ctx)
		if !errors.Is(err, ErrLockLost) {
			t.Errorf("Release through pgbouncer with the lock's server session busy: %v; want ErrLockLost", err)
		}
		t.Logf("Release: %v", err)
		must(t, tx.Commit(e.ctx))
		rows := e.lockRows(key)
		if len(rows) != 1 || rows[0].PID != serverPID || !rows[0].Granted {
			t.Errorf("after Release: pg_locks rows %v; want still held by server pid %d", rows, serverPID)
		}
		if e.tryFrom(c, key) {
			t.Error("the key was free after the failed Release")
		}
		t.Logf("after Release the lock is still held on server pid %d, a connection pgbouncer hands to other clients", serverPID)
		_, err = c.Exec(e.ctx, `SELECT pg_terminate_backend($1)`, serverPID)
		must(t, err)
	})
}
