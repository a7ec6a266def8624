package advisory

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

// A ctx deadline shorter than one slice: the server ends the slice at the
// deadline, the wait fails with ErrTimeout matching DeadlineExceeded, no
// ERROR is logged, and the connection is healthy (it serves the next
// Acquire, on a one-connection pool).
func TestDeadlineShorterThanSlice(t *testing.T) {
	e := newEnv(t)
	checkLog := noErrorLogged(t)
	pool := e.pool(deadlockTimeout("2s", 1)) // slices of 1 s
	other := e.pool()
	key := StringKey("short-deadline")
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
	key := StringKey("slow-first-try")
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
	key := StringKey("slow-first-try-acquire")
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
