package advisory

import (
	"context"
	"errors"
	"fmt"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/seed0ad592b7/advisory/internal/pgtest"
)

// Tests of SPEC §2a: waits that do not hold the server back.

// deadlockTimeout sets the server's deadlock_timeout for a pool's sessions
// (the tests connect as a superuser), and so the length of its wait slices
// (half of it), so that a test sees many slices in little time.
func deadlockTimeout(d string, maxConns int32) func(*pgxpool.Config) {
	return func(c *pgxpool.Config) {
		c.ConnConfig.RuntimeParams["deadlock_timeout"] = d
		c.MaxConns = maxConns
	}
}

// waitersOf starts one waiter of every waiting entry point on key, each
// until ctx ends, and returns a function that waits for them all to return
// and checks that none of them got the key or failed other than by ctx.
func waitersOf(e *env, ctx context.Context, pool *pgxpool.Pool, key Key) (count int, wait func()) {
	t := e.t
	var wg sync.WaitGroup
	errs := make(chan error, 4)
	run := func(name string, f func() error) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := f(); !errors.Is(err, context.Canceled) {
				errs <- fmt.Errorf("%s: returned %v; want context.Canceled", name, err)
			}
		}()
	}
	run("Acquire", func() error {
		l, err := Acquire(ctx, pool, key, NoCohort()) // on the server, not behind the holder in the process (SPEC §13)
		if err == nil {
			_ = l.Release(ctx)
			return errors.New("acquired a held key")
		}
		return err
	})
	run("Lead", func() error {
		return Lead(ctx, pool, key, func(context.Context) error { return errors.New("led while another held the key") })
	})
	run("DoTx", func() error {
		_, err := DoTx(ctx, pool, key, func(context.Context, pgx.Tx) error { return errors.New("ran under a held key") })
		return err
	})
	run("LockMany", func() error {
		s, err := NewSession(ctx, pool)
		if err != nil {
			return err
		}
		defer s.Close(ctx)
		_, err = s.LockMany(ctx, []Key{Int64Key(1), key})
		return err
	})
	return 4, func() {
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Error(err)
		}
	}
}

// While an idle holder keeps a key and Acquire, Lead, DoTx and LockMany wait
// for it, rows that die are removable by VACUUM after at most one slice: no
// waiter keeps a snapshot from before their death. On a plain
// pg_advisory_lock wait, the waiters' backend_xmin never advances.
func TestWaitersDoNotHoldBackVacuum(t *testing.T) {
	e := newEnv(t)
	pool := e.pool(deadlockTimeout("200ms", 10))
	key := StringKey("vacuum-standby")
	holder := e.acquire(pool, key)
	defer holder.Release(e.ctx)

	ctx, cancel := context.WithCancel(e.ctx)
	n, wait := waitersOf(e, ctx, pool, key)
	defer wait()
	defer cancel()
	e.awaitWaiters(n)

	if kept := deadRowsKept(t, e, "waits_vacuum"); kept != 0 {
		t.Errorf("VACUUM left %d dead rows not yet removable while %d waiters waited; want 0", kept, n)
	}
	// Awaited, not read once: between two slices a sliced waiter is briefly
	// out of pg_locks (it failed once on a loaded machine with 4 rows of 5).
	// A waiter that gave up never comes back, and the await fails.
	e.eventually(fmt.Sprintf("the holder and %d waiters in pg_locks for the key, after their snapshots moved on", n), func(*pgx.Conn) (bool, error) {
		return len(e.lockRows(key)) == 1+n, nil
	})
}

// deadRowsKept creates table with rows, deletes them, waits until no
// other backend keeps a snapshot from before they died (awaited: a waiter
// whose snapshot never moves on fails the test), and returns how many dead
// rows VACUUM still could not remove. The table is dropped when the test
// ends.
func deadRowsKept(t *testing.T, e *env, table string) int {
	t.Helper()
	admin := e.adminConn()
	e.table(table,
		"CREATE TABLE "+table+" (id int) WITH (autovacuum_enabled = off)",
		"INSERT INTO "+table+" SELECT generate_series(1, 10000)",
	)
	var xid int64
	must(t, admin.QueryRow(e.ctx, "WITH d AS (DELETE FROM "+table+" RETURNING 1) SELECT pg_current_xact_id()::text::int8 FROM d LIMIT 1").Scan(&xid))
	e.eventually("no backend keeps a snapshot from before the rows died", func(c *pgx.Conn) (bool, error) {
		var old int
		err := c.QueryRow(context.Background(), `SELECT count(*) FROM pg_stat_activity
			WHERE datname = current_database() AND pid <> pg_backend_pid()
			AND backend_xmin IS NOT NULL AND backend_xmin::text::int8 <= $1`, xid).Scan(&old)
		return old == 0, err
	})
	return vacuumKeptDead(t, e, table)
}

// noErrorLogged returns a function that fails the test for every ERROR or
// WARNING line the server logged since noErrorLogged was called (a SET
// LOCAL outside a transaction block, for one, is a WARNING).
func noErrorLogged(t *testing.T) func() {
	t.Helper()
	return noErrorLoggedOn(t, server)
}

// noErrorLoggedOn is noErrorLogged for the server srv.
func noErrorLoggedOn(t *testing.T, srv *pgtest.Server) func() {
	t.Helper()
	logged := errorsLogged(t, srv)
	return func() {
		t.Helper()
		for _, line := range logged() {
			t.Errorf("server log: %s", line)
		}
	}
}

// errorsLogged returns a function that returns the ERROR and WARNING lines
// srv logged since errorsLogged was called.
func errorsLogged(t *testing.T, srv *pgtest.Server) func() []string {
	t.Helper()
	before, err := srv.Log()
	must(t, err)
	return func() (lines []string) {
		t.Helper()
		after, err := srv.Log()
		must(t, err)
		for _, line := range strings.Split(after[len(before):], "\n") {
			if strings.Contains(line, "ERROR") || strings.Contains(line, "WARNING") {
				lines = append(lines, line)
			}
		}
		return lines
	}
}

// vacuumKeptDead runs VACUUM (VERBOSE) on table and returns how many dead
// rows it reported as "dead but not yet removable".
func vacuumKeptDead(t *testing.T, e *env, table string) int {
	t.Helper()
	cfg, err := pgx.ParseConfig(e.dsn)
	must(t, err)
	var mu sync.Mutex
	var notices []string
	cfg.OnNotice = func(_ *pgconn.PgConn, n *pgconn.Notice) {
		mu.Lock()
		notices = append(notices, n.Message)
		mu.Unlock()
	}
	c, err := pgx.ConnectConfig(e.ctx, cfg)
	must(t, err)
	defer c.Close(context.Background())
	_, err = c.Exec(e.ctx, "VACUUM (VERBOSE) "+table)
	must(t, err)
	mu.Lock()
	defer mu.Unlock()
	re := regexp.MustCompile(`(\d+) are dead but not yet removable`)
	for _, n := range notices {
		if m := re.FindStringSubmatch(n); m != nil {
			kept, _ := strconv.Atoi(m[1])
			return kept
		}
	}
	t.Fatalf("VACUUM (VERBOSE) did not report dead rows: %q", notices)
	return 0
}

// A migration guard: one instance holds the lock and runs CREATE INDEX
// CONCURRENTLY, through the pool (Do's usual shape) or on the lock's own
// connection (fenced), while three others wait for the lock. The index is
// built, and the others then run in turn. On a plain pg_advisory_lock wait
// the first hangs (the cycle runs through the application) and the second
// fails with "deadlock detected".
func TestMigrationGuardCreateIndexConcurrently(t *testing.T) {
	for _, fenced := range []bool{false, true} {
		t.Run(fmt.Sprintf("fenced=%v", fenced), func(t *testing.T) {
			e := newEnv(t)
			pool := e.pool(func(c *pgxpool.Config) { c.MaxConns = 10 })
			e.table("waits_cic",
				"CREATE TABLE waits_cic (id int)",
				"INSERT INTO waits_cic SELECT generate_series(1, 1000)",
			)

			key := StringKey("migrations")
			lock := e.acquire(pool, key)
			var running, ran atomic.Int32
			var wg sync.WaitGroup
			for i := 0; i < 3; i++ {
				wg.Add(1)
				go func() {
					defer wg.Done()
					acquired, err := Do(e.ctx, pool, key, func(ctx context.Context) error {
						if running.Add(1) != 1 {
							t.Error("two migrations ran at once")
						}
						defer running.Add(-1)
						ran.Add(1)
						_, err := pool.Exec(ctx, "SELECT count(*) FROM waits_cic")
						return err
					}, NoCohort()) // instances are processes: each waits on the server (SPEC §13)
					if err != nil || !acquired {
						t.Errorf("waiting instance: acquired %v, err %v", acquired, err)
					}
				}()
			}
			e.awaitWaiters(3)

			// A hang guard, not a timing claim: the index takes milliseconds;
			// without slices it never finishes.
			cicCtx, cancel := context.WithTimeout(e.ctx, 30*time.Second)
			const cic = "CREATE INDEX CONCURRENTLY waits_cic_id ON waits_cic (id)"
			var err error
			if fenced {
				_, err = lock.Exec(cicCtx, cic)
			} else {
				_, err = pool.Exec(cicCtx, cic)
			}
			cancel()
			if err != nil {
				t.Errorf("CREATE INDEX CONCURRENTLY while three instances waited: %v", err)
			}
			must(t, lock.Release(e.ctx))
			wg.Wait()
			if ran.Load() != 3 {
				t.Errorf("%d waiting instances ran; want 3", ran.Load())
			}
		})
	}
}

// The end of a slice is not an error: a wait of many slices that times out,
// for Acquire, LockMany and LockTx, writes no ERROR line to the server log,
// and LockTx leaves its transaction usable.
func TestWaitSlicesLogNoError(t *testing.T) {
	e := newEnv(t)
	checkLog := noErrorLogged(t)
	pool := e.pool(deadlockTimeout("40ms", 10)) // slices of 20 ms
	key := StringKey("quiet-slices")
	holder := e.acquire(pool, key)

	const bound = 300 * time.Millisecond // about 15 slices
	if _, err := Acquire(e.ctx, pool, key, WaitTimeout(bound)); !errors.Is(err, ErrTimeout) {
		t.Errorf("Acquire: %v; want ErrTimeout", err)
	}
	s, err := NewSession(e.ctx, pool)
	must(t, err)
	if _, err := s.LockMany(e.ctx, []Key{Int64Key(1), key}, WaitTimeout(bound)); !errors.Is(err, ErrTimeout) {
		t.Errorf("LockMany: %v; want ErrTimeout", err)
	}
	must(t, s.Close(e.ctx))
	tx, err := pool.Begin(e.ctx)
	must(t, err)
	if _, err := LockTx(e.ctx, tx, key, WaitTimeout(bound)); !errors.Is(err, ErrTimeout) {
		t.Errorf("LockTx: %v; want ErrTimeout", err)
	}
	if _, err := tx.Exec(e.ctx, "SELECT 1"); err != nil {
		t.Errorf("the transaction after a LockTx that timed out: %v; want it usable", err)
	}
	must(t, tx.Rollback(e.ctx))
	must(t, holder.Release(e.ctx))

	checkLog()
}

// LockTx granted during a slice leaves the transaction's own lock_timeout
// as it was, and the lock is the transaction's.
func TestLockTxSliceGranted(t *testing.T) {
	e := newEnv(t)
	pool := e.pool(deadlockTimeout("40ms", 10))
	key := StringKey("tx-slices")
	holder := e.acquire(pool, key)
	tx, err := pool.Begin(e.ctx)
	must(t, err)
	defer tx.Rollback(e.ctx)
	_, err = tx.Exec(e.ctx, "SET LOCAL lock_timeout = '7s'")
	must(t, err)
	got := make(chan error, 1)
	go func() {
		ok, err := LockTx(e.ctx, tx, key)
		if err == nil && !ok {
			err = errors.New("LockTx returned false without a bound")
		}
		got <- err
	}()
	e.awaitWaiters(1)
	must(t, holder.Release(e.ctx))
	must(t, <-got)
	var lt string
	must(t, tx.QueryRow(e.ctx, "SHOW lock_timeout").Scan(&lt))
	if lt != "7s" {
		t.Errorf("lock_timeout in the transaction after LockTx = %q; want 7s", lt)
	}
	if rows := e.lockRows(key); len(rows) != 1 || !rows[0].Granted {
		t.Errorf("pg_locks rows for the key = %+v; want one granted", rows)
	}
	must(t, tx.Commit(e.ctx))
}

// With 1 ms slices, many grants land just as a slice ends. Every Acquire
// without a bound still gets the key, one holder at a time, and nothing is
// left behind.
func TestWaitSlicesHandOffRace(t *testing.T) {
	e := newEnv(t)
	pool := e.pool(deadlockTimeout("2ms", 10))
	key := StringKey("slice-race")
	const workers, rounds = 8, 25
	var running atomic.Int32
	var wg sync.WaitGroup
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for r := 0; r < rounds; r++ {
				ok, err := Do(e.ctx, pool, key, func(ctx context.Context) error {
					if running.Add(1) != 1 {
						t.Error("two holders at once")
					}
					running.Add(-1)
					return nil
				})
				if err != nil || !ok {
					t.Errorf("Do: acquired %v, err %v", ok, err)
					return
				}
			}
		}()
	}
	wg.Wait()
}
