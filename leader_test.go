package advisory

import (
	"context"
	"errors"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

// candidates runs Lead for n candidates on key, each with its own cancel,
// and reports every term: which candidate became leader, and when its term
// ended.
type candidates struct {
	cancels []context.CancelFunc
	elected chan int // candidate index, when its fn starts
	results chan error
	wg      sync.WaitGroup
}

func startCandidates(e *env, pool *pgxpool.Pool, key Key, n int) *candidates {
	c := &candidates{elected: make(chan int, 16), results: make(chan error, n)}
	for i := range n {
		ctx, cancel := context.WithCancel(e.ctx)
		c.cancels = append(c.cancels, cancel)
		c.wg.Add(1)
		go func() {
			defer c.wg.Done()
			c.results <- Lead(ctx, pool, key, func(leaderCtx context.Context) error {
				c.elected <- i
				<-leaderCtx.Done()
				return nil
			}, HealthInterval(50*time.Millisecond))
		}()
	}
	return c
}

// leaderPID returns the one backend granted key; it fails the test unless
// exactly one is.
func (e *env) leaderPID(key Key) uint32 {
	e.t.Helper()
	var granted []uint32
	for _, r := range e.lockRows(key) {
		if r.Granted {
			granted = append(granted, r.PID)
		}
	}
	if len(granted) != 1 {
		e.t.Fatalf("%d backends hold the leader key; want exactly one", len(granted))
	}
	return granted[0]
}

// Three candidates: one leader at a time (from pg_locks), fail-over when the
// leader's backend is terminated and when the leader's ctx is cancelled.
func TestLead(t *testing.T) {
	e := newEnv(t)
	pool := e.pool()
	key := StringKey("leader")
	c := startCandidates(e, pool, key, 3)

	first := <-c.elected
	e.awaitWaiters(2)
	e.terminate(e.leaderPID(key))
	second := <-c.elected
	e.awaitWaiters(2) // the first candidate campaigns again after its loss
	e.leaderPID(key)
	t.Logf("candidate %d led, its backend was terminated, candidate %d took over", first, second)

	c.cancels[second]()
	if err := <-c.results; !errors.Is(err, context.Canceled) {
		t.Errorf("Lead after its ctx was cancelled = %v; want context.Canceled", err)
	}
	third := <-c.elected
	if third == second {
		t.Errorf("candidate %d led again after its ctx was cancelled", third)
	}
	e.awaitWaiters(1)
	e.leaderPID(key)

	for _, cancel := range c.cancels {
		cancel()
	}
	for range 2 {
		if err := <-c.results; !errors.Is(err, context.Canceled) {
			t.Errorf("Lead = %v; want context.Canceled", err)
		}
	}
	c.wg.Wait()
}

// fn's error while still leader ends Lead with it (after resigning); fn's
// nil resigns and campaigns again.
func TestLeadFnReturns(t *testing.T) {
	e := newEnv(t)
	pool := e.pool()
	other := e.conn()
	key := Int64Key(500)
	terms := 0
	stop := errors.New("stop")
	err := Lead(e.ctx, pool, key, func(ctx context.Context) error {
		terms++
		if e.tryFrom(other, key) {
			t.Error("fn runs while the key is free")
		}
		if terms < 3 {
			return nil
		}
		return stop
	})
	if !errors.Is(err, stop) || terms != 3 {
		t.Errorf("Lead = %v after %d terms; want fn's error after 3", err, terms)
	}
	if !e.tryFrom(other, key) {
		t.Error("Lead returned still holding the key")
	}
	if err := Lead(e.ctx, pool, Key{}, func(context.Context) error { return nil }); !errors.Is(err, ErrInvalidKey) {
		t.Errorf("Lead(Key{}) = %v", err)
	}
}

// cancelOnGrant is a pgx tracer that calls cancel the moment a lock
// statement comes back without error, that is when the server has just
// granted a lock: the caller's context ends between the grant and the
// library's next step, deterministically.
type cancelOnGrant struct {
	cancel context.CancelFunc
	fired  atomic.Bool
}

type lockStatementKey struct{}

// isLockSQL reports whether sql takes an advisory lock (any mode or wait).
func isLockSQL(sql string) bool { return strings.Contains(sql, "advisory_lock") }

func (c *cancelOnGrant) granted(err error) {
	if err == nil && !c.fired.Swap(true) {
		c.cancel()
	}
}

func (c *cancelOnGrant) TraceQueryStart(ctx context.Context, _ *pgx.Conn, data pgx.TraceQueryStartData) context.Context {
	if isLockSQL(data.SQL) {
		return context.WithValue(ctx, lockStatementKey{}, true)
	}
	return ctx
}

func (c *cancelOnGrant) TraceQueryEnd(ctx context.Context, _ *pgx.Conn, data pgx.TraceQueryEndData) {
	if ctx.Value(lockStatementKey{}) != nil {
		c.granted(data.Err)
	}
}

func (c *cancelOnGrant) TraceBatchStart(ctx context.Context, _ *pgx.Conn, _ pgx.TraceBatchStartData) context.Context {
	return ctx
}

func (c *cancelOnGrant) TraceBatchQuery(_ context.Context, _ *pgx.Conn, data pgx.TraceBatchQueryData) {
	if isLockSQL(data.SQL) {
		c.granted(data.Err)
	}
}

func (c *cancelOnGrant) TraceBatchEnd(context.Context, *pgx.Conn, pgx.TraceBatchEndData) {}

// A campaign won just as ctx ends does not run fn: Lead resigns and returns
// ctx's error. The tracer cancels ctx as the server's grant comes back, so
// Lead holds the lock with its ctx already ended (before the fix, fn ran
// with that dead context).
func TestLeadCtxEndsAsCampaignWins(t *testing.T) {
	e := newEnv(t)
	ctx, cancel := context.WithCancel(e.ctx)
	defer cancel()
	tracer := &cancelOnGrant{cancel: cancel}
	pool := e.pool(func(c *pgxpool.Config) { c.ConnConfig.Tracer = tracer })
	ran := false
	err := Lead(ctx, pool, Int64Key(502), func(context.Context) error {
		ran = true
		return nil
	})
	if !tracer.fired.Load() {
		t.Fatal("no lock statement was granted: the test proves nothing")
	}
	if ran {
		t.Error("Lead ran fn after its ctx had ended")
	}
	if !errors.Is(err, context.Canceled) {
		t.Errorf("Lead = %v; want context.Canceled", err)
	}
}
