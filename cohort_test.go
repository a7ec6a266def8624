package advisory

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/seed0ad592b7/advisory/internal/pgtest"
)

// queued returns how many goroutines wait in the process's queue of the
// cohort of (pool, key, mode, slots) with default options; -1 if there is
// no such cohort.
func queued(pool *pgxpool.Pool, key Key, mode Mode, slots int, health time.Duration) int {
	cohorts.Lock()
	c := cohorts.m[cohortKey{pool: pool, key: key, mode: mode, slots: slots, health: health}]
	cohorts.Unlock()
	if c == nil {
		return -1
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.queue)
}

// awaitQueued waits until n goroutines wait in the queue of key's cohort
// on pool (Acquire and Do with default options; slots -1: Sessions).
func (e *env) awaitQueued(pool *pgxpool.Pool, key Key, slots, n int) {
	e.t.Helper()
	health := DefaultHealthInterval
	if slots < 0 {
		health = 0
	}
	got := -1
	defer func() {
		if e.t.Failed() {
			e.t.Logf("%d goroutines were queued", got)
		}
	}()
	pgtest.Await(e.t, fmt.Sprintf("%d goroutines queued in the process for %v", n, key), testTimeout, func() (bool, error) {
		got = queued(pool, key, ModeExclusive, slots, health)
		return got == n, nil
	})
}

// heldWithOneQueued takes key from pool, then queues one more Acquire of
// it (with opts) behind that holder in the process, and returns the
// holder's Lock and the queued call's outcome.
func (e *env) heldWithOneQueued(pool *pgxpool.Pool, key Key, opts ...Option) (*Lock, <-chan acquired) {
	e.t.Helper()
	la := e.acquire(pool, key)
	b := acquireAsync(e.ctx, pool, key, opts...)
	e.awaitQueued(pool, key, 0, 1)
	return la, b
}

// passAlways lifts the time bound of passes for the test: a test that
// needs a pass must not depend on the machine's speed.
func passAlways(t *testing.T) {
	cohortHoldBound = time.Hour
	t.Cleanup(func() { cohortHoldBound = CohortHold })
}

// acquireAsync runs Acquire in a goroutine and returns what it returns.
type acquired struct {
	l   *Lock
	err error
}

func acquireAsync(ctx context.Context, pool *pgxpool.Pool, key Key, opts ...Option) <-chan acquired {
	ch := make(chan acquired, 1)
	go func() {
		l, err := Acquire(ctx, pool, key, opts...)
		ch <- acquired{l, err}
	}()
	return ch
}

func (e *env) got(ch <-chan acquired, what string) *Lock {
	e.t.Helper()
	select {
	case a := <-ch:
		if a.err != nil || !a.l.Acquired() {
			e.t.Fatalf("%s: Acquire = %v, %v", what, a.l, a.err)
		}
		return a.l
	case <-time.After(testTimeout):
		e.t.Fatalf("%s: Acquire did not return within %v", what, testTimeout)
	}
	return nil
}

// SPEC §13: goroutines of one process waiting for one key through one pool
// share one server-side wait and one connection; a release passes the lock
// to the next with its connection, sending nothing; each holder has its own
// Done and Err.
func TestCohortPassesWithoutRoundTrip(t *testing.T) {
	e := newEnv(t)
	passAlways(t)
	var sent queryCounter
	pool := e.pool(func(c *pgxpool.Config) { c.ConnConfig.Tracer = &sent })
	key := StringKey("cohort-pass")
	other := e.conn() // another process
	if !e.tryFrom(other, key) {
		t.Fatal("key busy")
	}
	_, err := other.Exec(e.ctx, "SELECT pg_advisory_lock($1)", mustInt64(key))
	must(t, err)

	a := acquireAsync(e.ctx, pool, key)
	e.awaitWaiters(1)
	b := acquireAsync(e.ctx, pool, key)
	e.awaitQueued(pool, key, 0, 1) // b first in the queue, then c
	c := acquireAsync(e.ctx, pool, key)
	e.awaitQueued(pool, key, 0, 2)
	if n := pool.Stat().AcquiredConns(); n != 1 {
		t.Fatalf("three goroutines waiting pin %d pool connections; want 1", n)
	}
	e.awaitWaiters(1) // still one waiter on the server
	_, err = other.Exec(e.ctx, "SELECT pg_advisory_unlock($1)", mustInt64(key))
	must(t, err)

	la := e.got(a, "the server waiter")
	before := sent.n.Load()
	must(t, la.Release(e.ctx))
	lb := e.got(b, "the first queued goroutine")
	if got := sent.n.Load() - before; got != 0 {
		t.Fatalf("the pass sent %d statements; want none", got)
	}
	if lb.s != la.s {
		t.Fatal("the lock did not pass with its session")
	}
	select {
	case <-la.Done():
	default:
		t.Fatal("the first holder's Done is open after its Release")
	}
	if la.Err() != nil {
		t.Fatalf("first holder's Err after Release = %v", la.Err())
	}
	select {
	case <-lb.Done():
		t.Fatal("the new holder's Done is closed")
	default:
	}
	if err := la.WithConn(e.ctx, func(*pgx.Conn) error { return nil }); !errors.Is(err, ErrClosed) {
		t.Fatalf("WithConn on the released Lock whose session passed on = %v; want ErrClosed", err)
	}
	if e.tryFrom(other, key) {
		t.Fatal("another session took the key while it was passed on")
	}
	must(t, lb.Release(e.ctx))
	lc := e.got(c, "the second queued goroutine")
	must(t, lc.Release(e.ctx)) // nobody queued: released on the server
	if !e.tryFrom(other, key) {
		t.Fatal("the key is still held after the last holder released it")
	}
	awaitAcquired(t, pool, 0)
}

// A passed lock's new holder gets a Done of its own: a loss is seen by the
// holder of the moment, not by the one that passed it; a TTL is per holder.
func TestCohortDoneTTLPerHolder(t *testing.T) {
	e := newEnv(t)
	passAlways(t)
	pool := e.pool()
	key := StringKey("cohort-done")
	la, b := e.heldWithOneQueued(pool, key, TTL(50*time.Millisecond))
	time.Sleep(60 * time.Millisecond) // longer than b's TTL: its TTL must count from its own grant
	must(t, la.Release(e.ctx))
	lb := e.got(b, "the queued goroutine")
	if lb.s != la.s {
		t.Fatal("the lock did not pass")
	}
	select {
	case <-lb.Done():
		t.Fatal("the new holder's TTL counted from before its grant")
	default:
	}
	e.awaitDone(lb.Done(), "the TTL of the passed lock")
	if !errors.Is(lb.Err(), ErrTTLExceeded) || la.Err() != nil {
		t.Fatalf("Err: new holder %v (want ErrTTLExceeded), old holder %v (want nil)", lb.Err(), la.Err())
	}
	if err := lb.Release(e.ctx); !errors.Is(err, ErrTTLExceeded) {
		t.Fatalf("Release after the TTL = %v", err)
	}

	// A loss: the holder of the moment sees it.
	lc := e.acquire(pool, key)
	d := acquireAsync(e.ctx, pool, key)
	e.awaitQueued(pool, key, 0, 1)
	must(t, lc.Release(e.ctx))
	ld := e.got(d, "the queued goroutine")
	e.terminate(lockPID(t, e.ctx, ld))
	e.awaitDone(ld.Done(), "the passed lock after its backend was terminated")
	if !errors.Is(ld.Err(), ErrLockLost) || lc.Err() != nil {
		t.Fatalf("Err: holder %v (want ErrLockLost), previous holder %v (want nil)", ld.Err(), lc.Err())
	}
	if err := ld.Release(e.ctx); !errors.Is(err, ErrLockLost) {
		t.Fatalf("Release after the loss = %v", err)
	}
	awaitAcquired(t, pool, 0)
}

// A goroutine waiting in the process obeys its context, its WaitTimeout and
// ReleaseAll, and leaves nothing behind.
func TestCohortQueuedWaitEnds(t *testing.T) {
	e := newEnv(t)
	pool := e.pool()
	key := StringKey("cohort-ends")
	la := e.acquire(pool, key)

	ctx, cancel := context.WithCancel(e.ctx)
	b := acquireAsync(ctx, pool, key)
	e.awaitQueued(pool, key, 0, 1)
	cancel()
	if r := <-b; !errors.Is(r.err, context.Canceled) || r.l != nil {
		t.Fatalf("cancelled queued Acquire = %v, %v; want context.Canceled", r.l, r.err)
	}
	r := <-acquireAsync(e.ctx, pool, key, WaitTimeout(20*time.Millisecond))
	if !errors.Is(r.err, ErrTimeout) {
		t.Fatalf("queued Acquire with WaitTimeout = %v, %v; want ErrTimeout", r.l, r.err)
	}
	dctx, dcancel := context.WithTimeout(e.ctx, 20*time.Millisecond)
	r = <-acquireAsync(dctx, pool, key)
	dcancel()
	if !errors.Is(r.err, ErrTimeout) || !errors.Is(r.err, context.DeadlineExceeded) {
		t.Fatalf("queued Acquire past its deadline = %v, %v; want ErrTimeout and DeadlineExceeded", r.l, r.err)
	}
	if n := pool.Stat().AcquiredConns(); n != 1 {
		t.Fatalf("%d connections acquired; want the holder's only", n)
	}

	ran := make(chan error, 1)
	go func() {
		_, err := Do(e.ctx, pool, key, func(context.Context) error { return errors.New("the body ran") })
		ran <- err
	}()
	e.awaitQueued(pool, key, 0, 1)
	must(t, ReleaseAll(e.ctx, pool))
	if err := <-ran; !errors.Is(err, ErrClosed) {
		t.Fatalf("Do queued in the process across ReleaseAll = %v; want ErrClosed", err)
	}
	e.awaitDone(la.Done(), "the holder after ReleaseAll")
	must(t, la.Release(e.ctx))
	if queued(pool, key, ModeExclusive, 0, DefaultHealthInterval) != -1 {
		t.Fatal("the cohort is still known with nobody in it")
	}
	awaitAcquired(t, pool, 0)
}

// Mutual exclusion, bounded passes and fairness inside one process: many
// goroutines on few keys, every one served, never two holders of a key.
func TestCohortContended(t *testing.T) {
	e := newEnv(t)
	pool := e.pool(func(c *pgxpool.Config) { c.MaxConns = 8 })
	var tr recorder
	const workers, keys, rounds = 16, 4, 30
	var inside [keys]atomic.Int32
	var overlaps atomic.Int32
	var wg sync.WaitGroup
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			k := w % keys
			for range rounds {
				ok, err := Do(e.ctx, pool, StringKey(fmt.Sprint("cohort-contended-", k)), func(ctx context.Context) error {
					if inside[k].Add(1) != 1 {
						overlaps.Add(1)
					}
					time.Sleep(100 * time.Microsecond) // the work: a second holder now would be counted
					inside[k].Add(-1)
					return nil
				}, WithTracer(&tr))
				if !ok || err != nil {
					t.Errorf("Do = %v, %v", ok, err)
					return
				}
			}
		}()
	}
	wg.Wait()
	if overlaps.Load() != 0 {
		t.Fatalf("%d overlaps", overlaps.Load())
	}
	starts, ends := 0, 0
	for _, ev := range tr.take() {
		switch ev.what {
		case "hold-start":
			starts++
		case "hold-end":
			ends++
			if ev.hold.End != HoldReleased {
				t.Errorf("hold ended %v", ev.hold.End)
			}
		}
	}
	if starts != workers*rounds || ends != workers*rounds {
		t.Fatalf("tracer saw %d hold starts and %d ends; want %d each", starts, ends, workers*rounds)
	}
	awaitAcquired(t, pool, 0)
}

// NoCohort: each waiter waits on the server with a connection of its own.
func TestCohortOff(t *testing.T) {
	e := newEnv(t)
	pool := e.pool()
	key := StringKey("cohort-off")
	la := e.acquire(pool, key)
	b := acquireAsync(e.ctx, pool, key, NoCohort())
	e.awaitWaiters(1)
	must(t, la.Release(e.ctx))
	lb := e.got(b, "the waiter")
	if lb.s == la.s {
		t.Fatal("a NoCohort waiter was passed a session")
	}
	must(t, lb.Release(e.ctx))
	awaitAcquired(t, pool, 0)
}

// A holder whose WithConn ran is never passed on: the callback may have left
// locks of its own or, when it panicked, a transaction open. The next
// goroutine gets a connection of its own, in no transaction.
func TestCohortNoPassAfterWithConn(t *testing.T) {
	e := newEnv(t)
	passAlways(t)
	pool := e.pool()
	key := StringKey("cohort-withconn")
	la, b := e.heldWithOneQueued(pool, key)
	func() {
		defer func() { _ = recover() }()
		_ = la.WithConn(e.ctx, func(c *pgx.Conn) error {
			if _, err := c.Exec(e.ctx, "BEGIN"); err != nil {
				return err
			}
			panic("the callback panics inside its transaction")
		})
	}()
	_ = la.Release(e.ctx) // may report the open transaction; it must not pass it
	lb := e.got(b, "the queued goroutine")
	if lb.s == la.s {
		t.Error("a session whose WithConn ran was passed to the next holder")
	}
	must(t, lb.WithConn(e.ctx, func(c *pgx.Conn) error {
		if st := c.PgConn().TxStatus(); st != 'I' {
			t.Errorf("the next holder's connection is in transaction state %q; want idle", st)
		}
		return nil
	}))
	must(t, lb.Release(e.ctx))
}
