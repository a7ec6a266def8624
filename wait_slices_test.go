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

// Waits in slices at their edges: in a transaction that already holds
// locks, on keys at the ends of both key spaces, under a lock_timeout the
// host set, with the backend terminated mid-slice, through PgBouncer.

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
	k1, k2 := StringKey("undetected-cycle-1"), StringKey("undetected-cycle-2")
	txA, txB := e.begin(pool), e.begin(pool)
	_, err := LockTx(e.ctx, txA, k1)
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
			key := StringKey("user-lt")
			holder := e.acquire(pool, key)
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

// Semaphore slices that time out log nothing either.
func TestSemaphoreSlicesLogNoError(t *testing.T) {
	e := newEnv(t)
	checkLog := noErrorLogged(t)
	pool := e.pool(deadlockTimeout("40ms", 6))
	key := StringKey("sem-log")
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

// A waiter whose backend is terminated in the middle of a slice: Acquire
// returns an error (not a lock), leaves nothing held and no connection
// acquired, and Lead campaigns again and becomes leader when the holder
// lets go.
func TestTerminateMidSlice(t *testing.T) {
	e := newEnv(t)
	pool := e.pool(deadlockTimeout("400ms", 4))
	other := e.pool()
	key := StringKey("terminate")
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
	key := StringKey("bouncer-slices")
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
