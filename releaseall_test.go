package advisory

import (
	"context"
	"errors"
	"fmt"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/seed0ad592b7/advisory/internal/pgtest"
)

// releaseAllBound is how long the calls ReleaseAll ended get to return, and
// pool.Close to finish, before the test says which one did not.
const releaseAllBound = 10 * time.Second

// ReleaseAll ends what waits for a connection from an exhausted pool (SPEC
// §4): a Lead, a Do, an Acquire and an AcquireSemaphore, each waiting for
// the one connection a Lock holds. The connection ReleaseAll frees goes to
// none of them: each returns an error matching ErrClosed, no body runs, and
// pool.Close, which waits for every acquired connection, returns.
func TestReleaseAllEndsCallsWaitingForAConnection(t *testing.T) {
	e := newEnv(t)
	pool := e.pool(func(c *pgxpool.Config) { c.MaxConns = 1 })
	holder, err := Acquire(e.ctx, pool, StringKey("release-all-holder"))
	must(t, err)

	ctx, cancel := context.WithCancel(e.ctx)
	defer cancel() // on a failure, ends a call that took the freed connection
	var ran atomic.Int32
	body := func(ctx context.Context) error {
		ran.Add(1)
		<-ctx.Done()
		return nil
	}
	calls := map[string]func() error{
		"Lead": func() error {
			return Lead(ctx, pool, StringKey("release-all-lead"), body)
		},
		"Do": func() error {
			_, err := Do(ctx, pool, StringKey("release-all-do"), body)
			return err
		},
		"Acquire": func() error {
			l, err := Acquire(ctx, pool, StringKey("release-all-acquire"))
			if l != nil && l.Acquired() {
				ran.Add(1)
				_ = l.Release(ctx)
			}
			return err
		},
		"AcquireSemaphore": func() error {
			l, err := AcquireSemaphore(ctx, pool, StringKey("release-all-sem"), 2)
			if l != nil && l.Acquired() {
				ran.Add(1)
				_ = l.Release(ctx)
			}
			return err
		},
	}
	results := make(chan error, len(calls))
	names := make(chan string, len(calls))
	for name, call := range calls {
		go func() {
			err := call()
			names <- name
			results <- err
		}()
	}
	awaitPoolWaiters(t, len(calls))

	must(t, ReleaseAll(e.ctx, pool))
	select {
	case <-holder.Done():
	default:
		t.Error("ReleaseAll returned while the holder's Done is still open")
	}
	deadline := time.After(releaseAllBound)
	for range calls {
		select {
		case name := <-names:
			if err := <-results; !errors.Is(err, ErrClosed) {
				t.Errorf("%s waiting for a connection returned %v after ReleaseAll; want an error matching ErrClosed", name, err)
			}
		case <-deadline:
			t.Fatalf("%v after ReleaseAll, a call waiting for a connection has not returned (%d bodies ran): ReleaseAll missed it", releaseAllBound, ran.Load())
		}
	}
	if n := ran.Load(); n != 0 {
		t.Errorf("%d calls got a lock after ReleaseAll returned", n)
	}
	closed := make(chan struct{})
	go func() { pool.Close(); close(closed) }()
	select {
	case <-closed:
	case <-time.After(releaseAllBound):
		cancel()
		t.Fatalf("pool.Close still waits for a connection %v after ReleaseAll", releaseAllBound)
	}
}

// A Lead in its pause between campaigns (its campaign failed: the pool
// could not connect) returns an error matching ErrClosed when ReleaseAll
// is called, and never leads afterwards, even once the pool connects again.
func TestReleaseAllEndsLeadBetweenCampaigns(t *testing.T) {
	e := newEnv(t)
	var refuse atomic.Bool
	var tries atomic.Int32
	refuse.Store(true)
	pool := e.pool(func(c *pgxpool.Config) {
		c.MinConns = 0
		c.BeforeConnect = func(context.Context, *pgx.ConnConfig) error {
			if refuse.Load() {
				tries.Add(1)
				return errors.New("connection refused by the test")
			}
			return nil
		}
	})
	ctx, cancel := context.WithCancel(e.ctx)
	defer cancel()
	var led atomic.Bool
	done := make(chan error, 1)
	go func() {
		done <- Lead(ctx, pool, StringKey("release-all-pause"), func(ctx context.Context) error {
			led.Store(true)
			<-ctx.Done()
			return nil
		})
	}()
	// One campaign failed, the next is due: Lead is in its retry loop.
	pgtest.Await(t, "Lead trying to connect twice (it retries)", releaseAllBound, func() (bool, error) {
		return tries.Load() >= 2, nil
	})
	must(t, ReleaseAll(e.ctx, pool))
	refuse.Store(false)
	select {
	case err := <-done:
		if !errors.Is(err, ErrClosed) {
			t.Errorf("Lead between campaigns returned %v after ReleaseAll; want an error matching ErrClosed", err)
		}
	case <-time.After(releaseAllBound):
		cancel()
		<-done
		t.Fatalf("Lead between campaigns still runs %v after ReleaseAll (led: %v)", releaseAllBound, led.Load())
	}
	if led.Load() {
		t.Error("Lead led after ReleaseAll returned")
	}
}

// awaitPoolWaiters waits until n goroutines wait for a connection from a
// pgxpool (their stacks are in pgxpool's Acquire), failing the test after
// releaseAllBound: pgxpool has no count of its waiters to wait on.
func awaitPoolWaiters(t *testing.T, n int) {
	t.Helper()
	buf := make([]byte, 1<<20)
	pgtest.Await(t, fmt.Sprintf("%d goroutines waiting for a pool connection", n), releaseAllBound, func() (bool, error) {
		stacks := string(buf[:runtime.Stack(buf, true)])
		return strings.Count(stacks, "pgxpool.(*Pool).Acquire(") >= n, nil
	})
}

// releaseAllWhileRunning runs call in a goroutine, giving it a body that
// waits for its context to end (for at most notHung) and returns nil; once
// the body runs, it calls ReleaseAll on pool. It returns the cause with
// which the body's context ended (nil if it did not), and what call
// returned; it stops the test if call returns before running the body, or
// does not return within notHung after ReleaseAll.
func (e *env) releaseAllWhileRunning(pool *pgxpool.Pool, call func(body func(context.Context) error) error) (cause, err error) {
	e.t.Helper()
	running := make(chan struct{})
	var once sync.Once
	causes := make(chan error, 1)
	done := make(chan error, 1)
	go func() {
		done <- call(func(ctx context.Context) error {
			once.Do(func() { close(running) })
			var cause error
			select {
			case <-ctx.Done():
				cause = context.Cause(ctx)
			case <-time.After(notHung):
			}
			select {
			case causes <- cause:
			default: // a body run again: the first run's cause is the one
			}
			return nil
		})
	}()
	select {
	case <-running:
	case err := <-done:
		e.t.Fatalf("returned before running its body: %v", err)
	}
	must(e.t, ReleaseAll(e.ctx, pool))
	cause = <-causes
	select {
	case err = <-done:
	case <-time.After(notHung): // only "it did not hang"
		e.t.Fatal("did not return after ReleaseAll")
	}
	return cause, err
}

// ReleaseAll cancels the context of a running Do body before
// another session can take the key, and Do reports it (fn returns nil).
func TestReleaseAllCancelsDo(t *testing.T) {
	e := newEnv(t)
	pool := e.pool()
	other := e.conn()
	key := StringKey("release-all-do")
	cause, err := e.releaseAllWhileRunning(pool, func(body func(context.Context) error) error {
		_, err := Do(e.ctx, pool, key, body)
		return err
	})
	if !errors.Is(cause, ErrClosed) {
		t.Errorf("fn's context after ReleaseAll: cause %v; want one matching ErrClosed", cause)
	}
	if !errors.Is(err, ErrClosed) {
		t.Errorf("Do after ReleaseAll: %v; want an error matching ErrClosed", err)
	}
	if !e.tryFrom(other, key) {
		t.Error("the key is still held after ReleaseAll")
	}
}

// For Lead: ReleaseAll cancels the leader's context and Lead
// returns (rather than campaigning again on a pool about to close).
func TestReleaseAllEndsLead(t *testing.T) {
	e := newEnv(t)
	pool := e.pool()
	cause, err := e.releaseAllWhileRunning(pool, func(body func(context.Context) error) error {
		return Lead(e.ctx, pool, StringKey("release-all-lead"), body)
	})
	if cause == nil {
		t.Error("the leader's context was not cancelled by ReleaseAll")
	}
	if !errors.Is(err, ErrClosed) {
		t.Errorf("Lead after ReleaseAll: %v; want an error matching ErrClosed", err)
	}
}

// A goroutine of a cohort told to wait on the server, before it has taken a
// pool connection, is on its way to a lock: a ReleaseAll that comes then
// ends it (SPEC §4), and it never gets the lock after ReleaseAll returned.
func TestCohortServerTurnAcrossReleaseAll(t *testing.T) {
	e := newEnv(t)
	pool := e.pool()
	key := StringKey("cohort-server-turn-release-all")
	other := e.conn() // another process's holder
	if _, err := other.Exec(e.ctx, lockSQL[scopeSession][ModeExclusive][waitForever][key.space-1], key.args()...); err != nil {
		t.Fatal(err)
	}

	first := acquireAsync(e.ctx, pool, key, WaitTimeout(time.Second)) // the cohort's server waiter
	e.awaitWaiters(1)
	turned, resume := make(chan struct{}), make(chan struct{})
	hook := func() {
		close(turned)
		<-resume
	}
	testHookServerTurn.Store(&hook)
	defer testHookServerTurn.Store(nil)
	second := acquireAsync(e.ctx, pool, key)
	e.awaitQueued(pool, key, 0, 1)
	if r := <-first; !errors.Is(r.err, ErrTimeout) { // its WaitTimeout: the queue's first is told to wait on the server
		t.Fatalf("the server waiter's Acquire = %v, %v; want ErrTimeout", r.l, r.err)
	}
	select {
	case <-turned:
	case <-time.After(testTimeout):
		t.Fatalf("the queued goroutine was not told to wait on the server within %v", testTimeout)
	}
	must(t, ReleaseAll(e.ctx, pool))
	close(resume)
	if _, err := other.Exec(e.ctx, "SELECT pg_advisory_unlock_all()"); err != nil {
		t.Fatal(err)
	}
	select {
	case r := <-second:
		if r.l != nil && r.l.Acquired() {
			_ = r.l.Release(e.ctx)
			t.Fatalf("a goroutine told to wait on the server before ReleaseAll got the lock after it returned")
		}
		if !errors.Is(r.err, ErrClosed) {
			t.Fatalf("its Acquire = %v, %v; want ErrClosed", r.l, r.err)
		}
	case <-time.After(testTimeout):
		t.Fatalf("its Acquire did not return within %v of ReleaseAll", testTimeout)
	}
	awaitAcquired(t, pool, 0)
}
