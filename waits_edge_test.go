package advisory

import (
	"context"
	"errors"
	"fmt"
	"math"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

// Review of the wait slices and keep-alives (issue 9; issue 10, defects 1
// and 9).

// keepalivesWanted is what a lock's connection must show while it holds a
// lock with the default health interval.
func keepalivesWanted() (want keepalives) {
	for i, v := range keepaliveArgs(DefaultHealthInterval) {
		want[i] = v.(string)
	}
	return want
}

// sessionKeepalives reads the keep-alives of s's own connection.
func sessionKeepalives(t *testing.T, e *env, s *Session) (got keepalives) {
	t.Helper()
	must(t, s.WithConn(e.ctx, func(c *pgx.Conn) error {
		got = showKeepalives(t, e.ctx, c)
		return nil
	}))
	return got
}

// SPEC §4: "The settings are in force on every connection that holds a
// lock". A Session whose WithConn ran before its first Lock (rawUsed) takes
// that lock with lockMore, which sets no keep-alives: the lock is held with
// the pool's tcp_user_timeout (0) and keep-alives, so after a silent cut
// the server keeps it for the kernel's defaults (about two hours).
func TestKeepalivesLockAfterWithConn(t *testing.T) {
	e := newEnv(t)
	pool := e.pool(func(c *pgxpool.Config) { c.MaxConns = 2 })
	lent := showKeepalives(t, e.ctx, pool)
	for _, many := range []bool{false, true} {
		s, err := NewSession(e.ctx, pool)
		must(t, err)
		must(t, s.WithConn(e.ctx, func(c *pgx.Conn) error {
			_, err := c.Exec(e.ctx, "SELECT 1") // fenced work that takes no lock
			return err
		}))
		if many {
			_, err = s.LockMany(e.ctx, []Key{Int64Key(11), PairKey(1, 1)})
		} else {
			_, err = s.Lock(e.ctx, Int64Key(11))
		}
		must(t, err)
		if got := sessionKeepalives(t, e, s); got != keepalivesWanted() {
			t.Errorf("many=%v: keep-alives while a lock is held after WithConn = %v; want %v", many, got, keepalivesWanted())
		}
		must(t, s.Close(e.ctx))
		if got := showKeepalives(t, e.ctx, pool); got != lent {
			t.Errorf("many=%v: the pool's connection came back with %v; lent with %v", many, got, lent)
		}
	}
}

// LockTx waits in slices even in a transaction that already holds locks,
// so two transactions that wait for each other's keys are never seen by
// the deadlock detector: each slice ends before deadlock_timeout. With
// pg_advisory_xact_lock one of them fails with 40P01 after deadlock_timeout
// (ErrDeadlock); with slices both wait until their bound (or forever
// without one) and return ErrTimeout. SPEC §2a keeps one server-side wait
// for a Session that holds locks for this very reason.
func TestLockTxDeadlockUndetected(t *testing.T) {
	e := newEnv(t)
	pool := e.pool(deadlockTimeout("100ms", 4)) // slices of 50 ms
	k1, k2 := StringKey("review-dl-1"), StringKey("review-dl-2")
	txA, err := pool.Begin(e.ctx)
	must(t, err)
	defer txA.Rollback(e.ctx)
	txB, err := pool.Begin(e.ctx)
	must(t, err)
	defer txB.Rollback(e.ctx)
	_, err = LockTx(e.ctx, txA, k1)
	must(t, err)
	_, err = LockTx(e.ctx, txB, k2)
	must(t, err)

	// The bound is 30 deadlock_timeouts: a detector that runs at all
	// breaks the cycle long before it.
	const bound = 3 * time.Second
	errs := make(chan error, 2)
	var wg sync.WaitGroup
	for _, c := range []struct {
		tx  pgx.Tx
		key Key
	}{{txA, k2}, {txB, k1}} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, err := LockTx(e.ctx, c.tx, c.key, WaitTimeout(bound))
			errs <- err
		}()
	}
	wg.Wait()
	close(errs)
	deadlocks := 0
	var all []error
	for err := range errs {
		all = append(all, err)
		if errors.Is(err, ErrDeadlock) {
			deadlocks++
		}
	}
	if deadlocks != 1 {
		t.Errorf("two transactions waiting for each other's LockTx keys: %v; want one ErrDeadlock (the server's detector)", all)
	}
}

// Keys at the edges of both key spaces, formatted into the DO blocks of
// the slices: every waiting entry point waits in slices for them and gets
// them when the holder lets go.
func TestSliceKeyLiterals(t *testing.T) {
	e := newEnv(t)
	pool := e.pool(deadlockTimeout("40ms", 12))
	keys := []Key{
		Int64Key(math.MinInt64), Int64Key(math.MaxInt64), Int64Key(-1), Int64Key(0),
		PairKey(math.MinInt32, -1), PairKey(-1, math.MinInt32), PairKey(math.MaxInt32, math.MinInt32),
	}
	holder, err := NewSession(e.ctx, pool)
	must(t, err)
	defer holder.Close(e.ctx)
	_, err = holder.LockMany(e.ctx, keys)
	must(t, err)

	type result struct {
		name string
		err  error
	}
	results := make(chan result, len(keys)+2)
	var wg sync.WaitGroup
	start := func(name string, f func() error) {
		wg.Add(1)
		go func() { defer wg.Done(); results <- result{name, f()} }()
	}
	for _, k := range keys {
		start("Acquire "+k.String(), func() error {
			l, err := Acquire(e.ctx, pool, k, WaitTimeout(20*time.Second))
			if err != nil {
				return err
			}
			return l.Release(e.ctx)
		})
	}
	e.awaitWaiters(len(keys))
	must(t, holder.UnlockMany(e.ctx, keys))
	wg.Wait()

	_, err = holder.LockMany(e.ctx, keys)
	must(t, err)
	start("LockMany", func() error {
		s, err := NewSession(e.ctx, pool)
		if err != nil {
			return err
		}
		defer s.Close(e.ctx)
		if ok, err := s.LockMany(e.ctx, keys, WaitTimeout(20*time.Second)); !ok || err != nil {
			return fmt.Errorf("%v, %v", ok, err)
		}
		return nil
	})
	start("DoTx", func() error {
		ran := 0
		for _, k := range keys {
			ok, err := DoTx(e.ctx, pool, k, func(context.Context, pgx.Tx) error { ran++; return nil }, WaitTimeout(20*time.Second))
			if !ok || err != nil {
				return fmt.Errorf("%s: %v, %v", k, ok, err)
			}
		}
		return nil
	})
	e.awaitWaiters(2)
	must(t, holder.UnlockMany(e.ctx, keys))
	wg.Wait()
	close(results)
	for r := range results {
		if r.err != nil {
			t.Errorf("%s: %v", r.name, r.err)
		}
	}
}

// A lock_timeout the host set on the session (the slice's outcome flag
// uses '1ms' and '2ms' as values of lock_timeout) or in the caller's
// transaction: a wait that times out still reports not acquired, a wait
// that is served reports acquired, the session's and the transaction's
// lock_timeout are unchanged afterwards, and nothing is logged as an error.
func TestSliceUserLockTimeout(t *testing.T) {
	for _, lt := range []string{"1ms", "2ms", "0", "5s"} {
		t.Run(lt, func(t *testing.T) {
			e := newEnv(t)
			checkLog := noErrorLogged(t)
			pool := e.pool(func(c *pgxpool.Config) {
				c.ConnConfig.RuntimeParams["deadlock_timeout"] = "40ms"
				c.ConnConfig.RuntimeParams["lock_timeout"] = lt
				c.MaxConns = 4
			})
			key := StringKey("review-user-lt")
			holder, err := Acquire(e.ctx, pool, key)
			must(t, err)
			if l, err := Acquire(e.ctx, pool, key, WaitTimeout(150*time.Millisecond)); !errors.Is(err, ErrTimeout) {
				t.Errorf("Acquire of a held key: lock %v, err %v; want ErrTimeout", l, err)
				if l != nil {
					_ = l.Release(e.ctx)
				}
			}
			s, err := NewSession(e.ctx, pool)
			must(t, err)
			if ok, err := s.LockMany(e.ctx, []Key{Int64Key(3), key}, WaitTimeout(150*time.Millisecond)); ok || !errors.Is(err, ErrTimeout) {
				t.Errorf("LockMany of a held key: %v, %v; want ErrTimeout", ok, err)
			}
			must(t, s.Close(e.ctx))
			tx, err := pool.Begin(e.ctx)
			must(t, err)
			_, err = tx.Exec(e.ctx, "SET LOCAL lock_timeout = '"+lt+"'")
			must(t, err)
			if ok, err := LockTx(e.ctx, tx, key, WaitTimeout(150*time.Millisecond)); ok || !errors.Is(err, ErrTimeout) {
				t.Errorf("LockTx of a held key: %v, %v; want ErrTimeout", ok, err)
			}
			var inTx string
			must(t, tx.QueryRow(e.ctx, "SHOW lock_timeout").Scan(&inTx))
			must(t, tx.Rollback(e.ctx))

			got := make(chan error, 1)
			go func() {
				l, err := Acquire(e.ctx, pool, key, WaitTimeout(20*time.Second), NoCohort()) // on the server (SPEC §13)
				if err == nil {
					err = l.Release(e.ctx)
				}
				got <- err
			}()
			e.awaitWaiters(1)
			must(t, holder.Release(e.ctx))
			if err := <-got; err != nil {
				t.Errorf("Acquire served during a slice: %v", err)
			}
			wantLT := lt
			if lt == "5s" {
				wantLT = "5s"
			}
			if inTx != wantLT {
				t.Errorf("transaction's lock_timeout after LockTx = %q; want %q", inTx, wantLT)
			}
			var after string
			must(t, pool.QueryRow(e.ctx, "SHOW lock_timeout").Scan(&after))
			if after != lt {
				t.Errorf("session lock_timeout after the waits = %q; want %q", after, lt)
			}
			checkLog()
		})
	}
}

// A ctx deadline shorter than one slice: the server ends the slice at the
// deadline, the wait fails with ErrTimeout matching DeadlineExceeded, no
// ERROR is logged, and the connection is healthy (it serves the next
// Acquire, on a one-connection pool).
func TestDeadlineShorterThanSlice(t *testing.T) {
	e := newEnv(t)
	checkLog := noErrorLogged(t)
	pool := e.pool(deadlockTimeout("2s", 1)) // slices of 1 s
	other := e.pool()
	key := StringKey("review-short-deadline")
	holder, err := Acquire(e.ctx, other, key)
	must(t, err)
	for i := 0; i < 5; i++ {
		ctx, cancel := context.WithTimeout(e.ctx, 30*time.Millisecond)
		_, err := Acquire(ctx, pool, key)
		cancel()
		if !errors.Is(err, ErrTimeout) || !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("Acquire with a 30 ms deadline: %v; want ErrTimeout and DeadlineExceeded", err)
		}
		tx, err := pool.Begin(e.ctx)
		must(t, err)
		ctx, cancel = context.WithTimeout(e.ctx, 30*time.Millisecond)
		_, err = LockTx(ctx, tx, key)
		cancel()
		if !errors.Is(err, ErrTimeout) {
			t.Errorf("LockTx with a 30 ms deadline: %v; want ErrTimeout", err)
		}
		if _, err := tx.Exec(e.ctx, "SELECT 1"); err != nil {
			t.Errorf("the transaction after LockTx timed out: %v", err)
		}
		must(t, tx.Rollback(e.ctx))
	}
	must(t, holder.Release(e.ctx))
	checkLog()
}

// Semaphore slices that time out log nothing either.
func TestSemaphoreSlicesLogNoError(t *testing.T) {
	e := newEnv(t)
	checkLog := noErrorLogged(t)
	pool := e.pool(deadlockTimeout("40ms", 6))
	key := StringKey("review-sem-log")
	var held []*Lock
	for range 2 {
		l, err := AcquireSemaphore(e.ctx, pool, key, 2)
		must(t, err)
		held = append(held, l)
	}
	if _, err := AcquireSemaphore(e.ctx, pool, key, 2, WaitTimeout(300*time.Millisecond)); !errors.Is(err, ErrTimeout) {
		t.Errorf("AcquireSemaphore of a full semaphore: %v; want ErrTimeout", err)
	}
	for _, l := range held {
		must(t, l.Release(e.ctx))
	}
	checkLog()
}

// SPEC §4: "a connection goes back to the pool as the pool gave it". A host
// that sets keep-alives on its connections in the startup packet
// (RuntimeParams, or the connection string) gets them back after a lock.
// (One set with SET after connecting, in AfterConnect, is reset to the
// startup value: the documented limit of the release's RESET, doc.go.)
func TestKeepalivesHostSettingsKept(t *testing.T) {
	e := newEnv(t)
	pool := e.pool(func(c *pgxpool.Config) {
		c.MaxConns = 1
		c.ConnConfig.RuntimeParams["tcp_keepalives_idle"] = "30"
		c.ConnConfig.RuntimeParams["tcp_user_timeout"] = "9000"
	})
	lent := showKeepalives(t, e.ctx, pool)
	if lent[0] != "30" || lent[3] != "9000" {
		t.Fatalf("the pool lent %v; the host set idle 30, user timeout 9000", lent)
	}
	l, err := Acquire(e.ctx, pool, StringKey("review-host-keepalives"))
	must(t, err)
	must(t, l.Release(e.ctx))
	if got := showKeepalives(t, e.ctx, pool); got != lent {
		t.Errorf("after Acquire and Release the pool's connection has %v; the pool lent it with %v", got, lent)
	}
}

// A waiter whose backend is terminated in the middle of a slice: Acquire
// returns an error (not a lock), leaves nothing held and no connection
// acquired, and Lead campaigns again and becomes leader when the holder
// lets go.
func TestTerminateMidSlice(t *testing.T) {
	e := newEnv(t)
	pool := e.pool(deadlockTimeout("400ms", 4))
	other := e.pool()
	key := StringKey("review-terminate")
	holder, err := Acquire(e.ctx, other, key)
	must(t, err)
	type res struct {
		l   *Lock
		err error
	}
	got := make(chan res, 1)
	go func() {
		l, err := Acquire(e.ctx, pool, key)
		got <- res{l, err}
	}()
	e.awaitWaiters(1)
	terminateWaiters(t, e, 1)
	r := <-got
	if r.err == nil {
		t.Errorf("Acquire whose backend was terminated mid-slice returned a lock (acquired %v); want an error", r.l.Acquired())
		_ = r.l.Release(e.ctx)
	}
	t.Logf("Acquire after its backend was terminated: %v (ErrLockLost %v)", r.err, errors.Is(r.err, ErrLockLost))

	led := make(chan struct{})
	ctx, cancel := context.WithCancel(e.ctx)
	defer cancel()
	leadErr := make(chan error, 1)
	go func() {
		leadErr <- Lead(ctx, pool, key, func(lctx context.Context) error {
			close(led)
			<-lctx.Done()
			return nil
		})
	}()
	e.awaitWaiters(1)
	terminateWaiters(t, e, 1)
	e.awaitWaiters(1) // Lead campaigns again
	must(t, holder.Release(e.ctx))
	select {
	case <-led:
	case err := <-leadErr:
		t.Fatalf("Lead returned %v before leading", err)
	case <-e.ctx.Done():
		t.Fatal("Lead never led after its waiting backend was terminated")
	}
	cancel()
	if err := <-leadErr; !errors.Is(err, context.Canceled) {
		t.Errorf("Lead: %v; want context.Canceled", err)
	}
}

// terminateWaiters terminates the n backends waiting on an advisory lock.
func terminateWaiters(t *testing.T, e *env, n int) {
	t.Helper()
	var killed int
	must(t, e.adminConn().QueryRow(e.ctx, `SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
		WHERE wait_event_type = 'Lock' AND wait_event = 'advisory' AND datname = current_database()`).Scan(&killed))
	if killed != n {
		t.Fatalf("terminated %d waiting backends; want %d", killed, n)
	}
}

// LockTx waits of many slices through PgBouncer in transaction mode, in
// both exec modes PgBouncer supports: the lock is acquired once the holder
// lets go, inside the caller's transaction (its lock_timeout unchanged),
// and nothing is logged as an error.
func TestPgBouncerLockTxSlices(t *testing.T) {
	e := newEnv(t)
	checkLog := noErrorLogged(t)
	b := startBouncer(t, 4)
	key := StringKey("review-bouncer-slices")
	for _, mode := range []string{"exec", "simple_protocol"} {
		pool := e.bouncerPool(b, mode, func(c *pgxpool.Config) { c.MaxConns = 4 })
		holder := e.conn()
		_, err := holder.Exec(e.ctx, "SELECT pg_advisory_lock($1)", mustInt64(key))
		must(t, err)
		got := make(chan error, 1)
		go func() {
			got <- func() error {
				tx, err := pool.Begin(e.ctx)
				if err != nil {
					return err
				}
				defer tx.Rollback(e.ctx)
				if _, err := tx.Exec(e.ctx, "SET LOCAL deadlock_timeout = '20ms'"); err != nil {
					return err
				}
				if _, err := tx.Exec(e.ctx, "SET LOCAL lock_timeout = '3s'"); err != nil {
					return err
				}
				if ok, err := LockTx(e.ctx, tx, key, WaitTimeout(20*time.Second)); !ok || err != nil {
					return fmt.Errorf("LockTx: %v, %v", ok, err)
				}
				var lt string
				if err := tx.QueryRow(e.ctx, "SHOW lock_timeout").Scan(&lt); err != nil {
					return err
				}
				if lt != "3s" {
					return fmt.Errorf("lock_timeout in the transaction after the wait = %q; want 3s", lt)
				}
				return tx.Commit(e.ctx)
			}()
		}()
		awaitSlices(e, 3)
		_, err = holder.Exec(e.ctx, "SELECT pg_advisory_unlock($1)", mustInt64(key))
		must(t, err)
		if err := <-got; err != nil {
			t.Errorf("%s: LockTx through PgBouncer: %v", mode, err)
		}
	}
	checkLog()
}

// awaitSlices waits until the one backend waiting on an advisory lock has
// started n statements (slices) since the call.
func awaitSlices(e *env, n int) {
	e.t.Helper()
	var last time.Time
	seen := -1
	e.eventually(fmt.Sprintf("%d wait slices", n), func(c *pgx.Conn) (bool, error) {
		var start time.Time
		err := c.QueryRow(context.Background(), `SELECT query_start FROM pg_stat_activity
			WHERE wait_event_type = 'Lock' AND wait_event = 'advisory' AND datname = current_database()`).Scan(&start)
		if errors.Is(err, pgx.ErrNoRows) {
			return false, nil
		}
		if err == nil && !start.Equal(last) {
			last, seen = start, seen+1
		}
		return seen >= n, err
	})
}

// slowFirstTry is a pgx tracer that delays the statement a LockTx or a
// session wait starts with (its first try), as a slow link or a busy
// server would.
type slowFirstTry struct{ delay time.Duration }

func (s slowFirstTry) TraceQueryStart(ctx context.Context, _ *pgx.Conn, d pgx.TraceQueryStartData) context.Context {
	if d.SQL == txFirstTrySQL[ModeExclusive][0] || d.SQL == firstTrySQL[ModeExclusive][0] {
		time.Sleep(s.delay) // the latency under test, not synchronisation
	}
	return ctx
}

func (slowFirstTry) TraceQueryEnd(context.Context, *pgx.Conn, pgx.TraceQueryEndData) {}

// slowFirstTryOnHeldKey returns a pool whose waits try first for 700 ms
// (slowFirstTry) and then wait in slices of 1 s, with key held by another
// pool until the test ends.
func (e *env) slowFirstTryOnHeldKey(key Key) *pgxpool.Pool {
	e.t.Helper()
	pool := e.pool(func(c *pgxpool.Config) {
		c.ConnConfig.RuntimeParams["deadlock_timeout"] = "2s" // slices of 1 s
		c.ConnConfig.Tracer = slowFirstTry{700 * time.Millisecond}
		c.MaxConns = 2
	})
	holder, err := Acquire(e.ctx, e.pool(), key)
	must(e.t, err)
	e.t.Cleanup(func() { _ = holder.Release(e.ctx) })
	return pool
}

// A ctx deadline bounds the whole LockTx wait (SPEC §2a), and a wait that
// reaches its bound leaves the transaction usable. inSlices measures the
// bound from its own start, after the first try, so when the first try
// takes longer than deadlineGrace (500 ms) the last slice outlives the
// grace ctx; pgx's default ctx handler then closes the connection and the
// caller's transaction is gone.
func TestLockTxSlowFirstTryDeadline(t *testing.T) {
	e := newEnv(t)
	key := StringKey("review-slow-first-try")
	pool := e.slowFirstTryOnHeldKey(key)
	tx, err := pool.Begin(e.ctx)
	must(t, err)
	defer tx.Rollback(e.ctx)
	ctx, cancel := context.WithTimeout(e.ctx, 1500*time.Millisecond)
	defer cancel()
	if ok, err := LockTx(ctx, tx, key); ok || !errors.Is(err, ErrTimeout) {
		t.Errorf("LockTx of a held key with a 1.5 s deadline: %v, %v; want ErrTimeout", ok, err)
	}
	if _, err := tx.Exec(e.ctx, "SELECT 1"); err != nil {
		t.Errorf("the transaction after LockTx reached its deadline: %v; want it usable", err)
	}
}

// The same for Acquire: the last slice outlives the grace, is cancelled
// with a cancel request, and the server logs the cancel as an ERROR.
func TestAcquireSlowFirstTryDeadline(t *testing.T) {
	e := newEnv(t)
	checkLog := noErrorLogged(t)
	key := StringKey("review-slow-first-try-acquire")
	pool := e.slowFirstTryOnHeldKey(key)
	ctx, cancel := context.WithTimeout(e.ctx, 1500*time.Millisecond)
	defer cancel()
	start := time.Now()
	if _, err := Acquire(ctx, pool, key); !errors.Is(err, ErrTimeout) {
		t.Errorf("Acquire of a held key with a 1.5 s deadline: %v; want ErrTimeout", err)
	}
	t.Logf("Acquire returned after %v", time.Since(start))
	checkLog()
}

// The pool's one connection comes back as lent, with no lock, after a wait
// cancelled mid-slice, and after ReleaseAll ends a Session holding keys in
// both modes plus a lock its WithConn callback took.
func TestKeepalivesCancelAndReleaseAll(t *testing.T) {
	e := newEnv(t)
	pool := e.pool(func(c *pgxpool.Config) {
		c.ConnConfig.RuntimeParams["deadlock_timeout"] = "40ms"
		c.MaxConns = 1
	})
	lent := showKeepalives(t, e.ctx, pool)
	key := StringKey("review-cancel-mid-slice")
	holder, err := Acquire(e.ctx, e.pool(), key)
	must(t, err)
	ctx, cancel := context.WithCancel(e.ctx)
	done := make(chan error, 1)
	go func() {
		_, err := Acquire(ctx, pool, key)
		done <- err
	}()
	awaitSlices(e, 2)
	cancel()
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Errorf("Acquire cancelled mid-slice: %v; want context.Canceled", err)
	}
	must(t, holder.Release(e.ctx))
	if got := showKeepalives(t, e.ctx, pool); got != lent {
		t.Errorf("after a cancelled wait: %v; lent %v", got, lent)
	}

	s, err := NewSession(e.ctx, pool)
	must(t, err)
	_, err = s.LockMany(e.ctx, []Key{Int64Key(-5), PairKey(-1, -2)})
	must(t, err)
	_, err = s.LockMany(e.ctx, []Key{Int64Key(-5), Int64Key(6)}, Shared())
	must(t, err)
	must(t, s.WithConn(e.ctx, func(c *pgx.Conn) error {
		_, err := c.Exec(e.ctx, "SELECT pg_advisory_lock(77)")
		return err
	}))
	must(t, ReleaseAll(e.ctx, pool))
	if got := showKeepalives(t, e.ctx, pool); got != lent {
		t.Errorf("after ReleaseAll: %v; lent %v", got, lent)
	}
}

// The try a wait sends before its slices, when its first try failed, is
// not cancelled when the caller's deadline passes while it runs: a cancel
// request would write an ERROR to the server log (SPEC §2a). The try is
// held up on the server here by a lock on pg_language, which it reads.
func TestDeadlineDuringSecondTry(t *testing.T) {
	e := newEnv(t)
	checkLog := noErrorLogged(t)
	pool := e.pool()
	key := StringKey("deadline-during-second-try")
	holder, err := Acquire(e.ctx, e.pool(), key)
	must(t, err)
	defer holder.Release(e.ctx)
	warm, err := Acquire(e.ctx, pool, StringKey("deadline-during-second-try-warm")) // the pool's connection, PL/pgSQL looked up
	must(t, err)
	must(t, warm.Release(e.ctx))

	blocker := e.conn()
	tx, err := blocker.Begin(e.ctx)
	must(t, err)
	defer tx.Rollback(e.ctx)
	if _, err := tx.Exec(e.ctx, "LOCK TABLE pg_catalog.pg_language IN ACCESS EXCLUSIVE MODE"); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(e.ctx, 300*time.Millisecond)
	defer cancel()
	done := make(chan error, 1)
	go func() {
		_, err := Acquire(ctx, pool, key)
		done <- err
	}()
	e.eventually("the second try waiting for pg_language", func(c *pgx.Conn) (bool, error) {
		var n int
		err := c.QueryRow(context.Background(), `SELECT count(*) FROM pg_catalog.pg_locks
			WHERE locktype = 'relation' AND relation = 'pg_catalog.pg_language'::regclass AND NOT granted`).Scan(&n)
		return n == 1, err
	})
	<-ctx.Done()
	select {
	case err := <-done: // interrupted: the server log has its ERROR
		t.Errorf("Acquire returned while its second try was held up on the server (%v): the try was cancelled", err)
		must(t, tx.Rollback(e.ctx))
		checkLog()
		return
	case <-time.After(time.Second): // the try runs on past the deadline, as it should
	}
	must(t, tx.Rollback(e.ctx))
	select {
	case err := <-done:
		if !errors.Is(err, ErrTimeout) || !errors.Is(err, context.DeadlineExceeded) {
			t.Errorf("Acquire whose deadline passed during its second try: %v; want ErrTimeout and DeadlineExceeded", err)
		}
	case <-time.After(testTimeout):
		t.Fatalf("Acquire did not return within %v of its try's end", testTimeout)
	}
	checkLog()
}
