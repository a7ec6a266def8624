package advisory

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

// soakLong returns the duration ADVISORY_LONG asks for (long mode), or 0.
func soakLong(t *testing.T) time.Duration {
	s := os.Getenv("ADVISORY_LONG")
	if s == "" {
		return 0
	}
	d, err := time.ParseDuration(s)
	if err != nil || d <= 0 {
		t.Fatalf("ADVISORY_LONG=%q: want a positive duration such as 5m", s)
	}
	return d
}

// soakStats counts what the soak did.
type soakStats struct {
	ops, acquired, notAcquired, timeouts, cancels, notHeld, ttl, deadlocks, panics, fnErrors atomic.Int64
	maxOverrun, maxCleanup                                                                   atomic.Int64 // nanoseconds
	maxTotal                                                                                 atomic.Int64
	mu                                                                                       sync.Mutex
	unexpected                                                                               []string
}

func (s *soakStats) observe(max *atomic.Int64, d time.Duration) {
	for {
		old := max.Load()
		if int64(d) <= old || max.CompareAndSwap(old, int64(d)) {
			return
		}
	}
}

func (s *soakStats) fail(format string, args ...any) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.unexpected) < 20 {
		s.unexpected = append(s.unexpected, fmt.Sprintf(format, args...))
	}
}

// errFn is the error a Do or DoTx body returns on purpose.
var errFn = errors.New("soak: the body failed on purpose")

// classify counts an expected error and reports an unexpected one.
func (s *soakStats) classify(op string, err error) {
	switch {
	case err == nil:
	case errors.Is(err, ErrTimeout), errors.Is(err, context.DeadlineExceeded):
		s.timeouts.Add(1)
	case errors.Is(err, context.Canceled):
		s.cancels.Add(1)
	case errors.Is(err, ErrTTLExceeded):
		s.ttl.Add(1)
	case errors.Is(err, ErrDeadlock):
		s.deadlocks.Add(1)
	case errors.Is(err, errFn):
		s.fnErrors.Add(1)
	default:
		s.fail("%s: %v", op, err)
	}
}

// Leaks and bounds: thousands of random lock, unlock, try, cancel and
// timeout operations across goroutines with every API (Acquire/Release,
// Session Lock/Unlock/Close, LockTx, Do, DoTx, TTL), then: no advisory lock
// left, no pool connection acquired, the pool never over MaxConns, no
// connection idle in transaction, no goroutine left (newEnv's checks). No
// operation may hang past its context (soakHangGuard; the overrun is
// logged, never asserted finely: the CPU is shared).
//
// 10,000 operations by default; with ADVISORY_LONG=DUR, as many as fit in
// DUR.
func TestSoak(t *testing.T) {
	e := newEnv(t)
	const maxConns = 10
	pool := e.pool(func(c *pgxpool.Config) { c.MaxConns = maxConns })
	ops := int64(10_000)
	var until time.Time
	if d := soakLong(t); d > 0 {
		ops = 1 << 62
		until = time.Now().Add(d)
	}
	keys := []Key{Int64Key(9001), Int64Key(9002), PairKey(90, 3), StringKey("soak")}
	var st soakStats
	var next atomic.Int64
	stopWatch := make(chan struct{})
	var watchWG sync.WaitGroup
	watchWG.Add(1)
	var overMax atomic.Int32
	go func() { // the pool never exceeds MaxConns
		defer watchWG.Done()
		tick := time.NewTicker(time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-stopWatch:
				return
			case <-tick.C:
				if n := pool.Stat().TotalConns(); n > maxConns {
					overMax.Store(n)
				}
			}
		}
	}()
	start := time.Now()
	var wg sync.WaitGroup
	for g := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(start.UnixNano()), uint64(g)))
			for next.Add(1) <= ops && (until.IsZero() || time.Now().Before(until)) {
				st.ops.Add(1)
				soakOp(t, &st, pool, keys, rng)
			}
		}()
	}
	wg.Wait()
	close(stopWatch)
	watchWG.Wait()
	elapsed := time.Since(start)

	// Closed connections leave the pool's count a moment after their
	// release (pgxpool destroys them in the background): await it.
	awaitAcquired(t, pool, 0)
	// A context of its own: the soak may outlast e.ctx on a loaded machine.
	ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
	defer cancel()
	c, err := pgx.Connect(ctx, e.dsn)
	must(t, err)
	defer c.Close(context.Background())
	var idleInTx int
	must(t, c.QueryRow(ctx, `SELECT count(*) FROM pg_stat_activity
		WHERE datname = current_database() AND state LIKE 'idle in transaction%'`).Scan(&idleInTx))
	t.Logf("soak: %d operations in %v across 8 goroutines: acquired %d, not acquired (try) %d, timeouts %d, cancels %d, "+
		"ErrNotHeld %d, TTL %d, deadlocks %d, panics %d, body errors %d; max overrun past ctx %v, max cleanup %v, "+
		"longest op %v; pool total max ok: %v; idle in transaction %d",
		st.ops.Load(), elapsed.Round(time.Millisecond), st.acquired.Load(), st.notAcquired.Load(), st.timeouts.Load(),
		st.cancels.Load(), st.notHeld.Load(), st.ttl.Load(), st.deadlocks.Load(), st.panics.Load(), st.fnErrors.Load(),
		time.Duration(st.maxOverrun.Load()), time.Duration(st.maxCleanup.Load()), time.Duration(st.maxTotal.Load()),
		overMax.Load() == 0, idleInTx)
	if len(st.unexpected) > 0 {
		t.Errorf("unexpected errors:\n  %s", strings.Join(st.unexpected, "\n  "))
	}
	if n := overMax.Load(); n != 0 {
		t.Errorf("pool had %d connections, MaxConns %d", n, maxConns)
	}
	if idleInTx != 0 {
		t.Errorf("%d connections idle in transaction after the soak", idleInTx)
	}
	// Hang guards only (the figures are logged above): the library's own
	// bounds (cancel grace 2 s, clean-up 5 s) are far below these, which
	// only an operation stuck past every bound reaches.
	if o := time.Duration(st.maxOverrun.Load()); o > soakHangGuard {
		t.Errorf("an operation returned %v after its context ended", o)
	}
	if c := time.Duration(st.maxCleanup.Load()); c > soakHangGuard {
		t.Errorf("a release or close took %v", c)
	}
	if st.acquired.Load() == 0 || st.timeouts.Load()+st.cancels.Load() == 0 {
		t.Errorf("the soak did not exercise both acquisitions and interrupted waits")
	}
}

// soakHangGuard is how late an operation of the soak may return before it
// counts as hung.
const soakHangGuard = 30 * time.Second

// opCtx returns a context for one operation: a deadline between 1 and 200
// ms, or cancelled after up to 100 ms, and the time by which the operation
// must have ended its wait.
func opCtx(rng *rand.Rand) (context.Context, context.CancelFunc, time.Time) {
	d := time.Duration(1+rng.IntN(200)) * time.Millisecond
	if rng.IntN(3) == 0 {
		ctx, cancel := context.WithCancel(context.Background())
		timer := time.AfterFunc(d/2, cancel)
		return ctx, func() { timer.Stop(); cancel() }, time.Now().Add(d / 2)
	}
	ctx, cancel := context.WithTimeout(context.Background(), d)
	return ctx, cancel, time.Now().Add(d)
}

// waitOpts returns random wait options: none, NoWait, or WaitTimeout.
func waitOpts(rng *rand.Rand) []Option {
	var opts []Option
	switch rng.IntN(4) {
	case 0:
		opts = append(opts, NoWait())
	case 1:
		opts = append(opts, WaitTimeout(time.Duration(1+rng.IntN(50))*time.Millisecond))
	}
	if rng.IntN(3) == 0 {
		opts = append(opts, Shared())
	}
	return opts
}

// pause is jitter between operations, not synchronisation.
func pause(rng *rand.Rand) { time.Sleep(time.Duration(rng.IntN(1000)) * time.Microsecond) }

// soakOp runs one random operation.
func soakOp(t *testing.T, st *soakStats, pool *pgxpool.Pool, keys []Key, rng *rand.Rand) {
	key := keys[rng.IntN(len(keys))]
	ctx, cancel, bound := opCtx(rng)
	defer cancel()
	began := time.Now()
	waited := func() {
		st.observe(&st.maxOverrun, time.Since(bound))
		st.observe(&st.maxTotal, time.Since(began))
	}
	cleanup := func(f func() error, op string) {
		t0 := time.Now()
		err := f()
		st.observe(&st.maxCleanup, time.Since(t0))
		if err != nil {
			st.fail("%s: %v", op, err)
		}
	}
	switch rng.IntN(6) {
	case 0: // Acquire, hold a moment, Release (sometimes with a cancelled ctx)
		lock, err := Acquire(ctx, pool, key, waitOpts(rng)...)
		waited()
		if err != nil {
			st.classify("acquire", err)
			return
		}
		if !lock.Acquired() {
			st.notAcquired.Add(1)
			cleanup(func() error { return lock.Release(ctx) }, "release of a lock not acquired")
			return
		}
		st.acquired.Add(1)
		pause(rng)
		relCtx := context.Background()
		if rng.IntN(4) == 0 {
			c, cancel := context.WithCancel(relCtx)
			cancel()
			relCtx = c
		}
		cleanup(func() error { return lock.Release(relCtx) }, "release")
		cleanup(func() error { return lock.Release(relCtx) }, "second release")
	case 1: // a Session: several keys, re-entrant, unlock some, one not held, Close
		s, err := NewSession(ctx, pool)
		waited()
		if err != nil {
			st.classify("new session", err)
			return
		}
		held := map[hold]int{}
		for range 1 + rng.IntN(3) {
			k := keys[rng.IntN(len(keys))]
			opts := waitOpts(rng)
			var c config
			for _, o := range opts {
				o(&c)
			}
			ok, err := s.Lock(ctx, k, opts...)
			waited()
			switch {
			case err != nil:
				st.classify("session lock", err)
			case ok:
				st.acquired.Add(1)
				held[hold{k, c.mode}]++
			default:
				st.notAcquired.Add(1)
			}
		}
		for h, n := range held {
			if rng.IntN(2) == 0 {
				continue // left for Close
			}
			for range n {
				cleanup(func() error { return s.unlock(context.Background(), h) }, "unlock")
			}
		}
		if err := s.Unlock(context.Background(), Int64Key(424242)); !errors.Is(err, ErrNotHeld) {
			st.fail("unlock of a key not held: %v", err)
		} else {
			st.notHeld.Add(1)
		}
		cleanup(func() error { return s.Close(ctx) }, "close")
		cleanup(func() error { return s.Close(ctx) }, "second close")
	case 2: // LockTx in a transaction, commit or roll back
		tx, err := pool.Begin(ctx)
		if err != nil {
			waited()
			st.classify("begin", err)
			return
		}
		ok, err := LockTx(ctx, tx, key, waitOpts(rng)...)
		waited()
		switch {
		case err != nil:
			st.classify("lock_tx", err)
		case ok:
			st.acquired.Add(1)
			pause(rng)
		default:
			st.notAcquired.Add(1)
		}
		if rng.IntN(2) == 0 {
			_ = tx.Commit(context.Background()) // fails when the lock failed: the tx is aborted
		}
		_ = tx.Rollback(context.Background())
	case 3: // Do: the body holds a moment, fails or panics
		st.doBody(rng, func(fn func(context.Context) error) (bool, error) {
			return Do(ctx, pool, key, fn, waitOpts(rng)...)
		}, waited)
	case 4: // DoTx
		st.doBody(rng, func(fn func(context.Context) error) (bool, error) {
			return DoTx(ctx, pool, key, func(ctx context.Context, tx pgx.Tx) error { return fn(ctx) }, waitOpts(rng)...)
		}, waited)
	case 5: // Do with a TTL shorter than the body, which ignores its ctx half the time
		ttl := time.Duration(1+rng.IntN(5)) * time.Millisecond
		acquired, err := Do(ctx, pool, key, func(fctx context.Context) error {
			if rng.IntN(2) == 0 {
				time.Sleep(2 * ttl) // the scenario: a body that ignores its ctx past the TTL
				return nil
			}
			select {
			case <-fctx.Done():
				return fctx.Err()
			case <-time.After(2 * ttl):
				return nil
			}
		}, append(waitOpts(rng), TTL(ttl))...)
		waited()
		if acquired {
			st.acquired.Add(1)
		}
		st.classify("do with ttl", err)
	}
}

// doBody runs a Do-like call whose body holds a moment and then returns,
// fails, or panics.
func (st *soakStats) doBody(rng *rand.Rand, do func(func(context.Context) error) (bool, error), waited func()) {
	behaviour := rng.IntN(10)
	var acquired bool
	var err error
	func() {
		defer func() {
			if r := recover(); r != nil {
				if r != "soak panic" {
					panic(r)
				}
				st.panics.Add(1)
			}
		}()
		acquired, err = do(func(ctx context.Context) error {
			pause(rng)
			switch behaviour {
			case 0:
				return errFn
			case 1:
				panic("soak panic")
			}
			return nil
		})
	}()
	waited()
	if acquired {
		st.acquired.Add(1)
	} else if err == nil && behaviour != 1 {
		st.notAcquired.Add(1)
	}
	st.classify("do", err)
}
