package advisory

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/seed0ad592b7/advisory/internal/pgtest"
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

// A deadline that passes while the second try before a wait is held up on
// the server (here by a lock on pg_language, which its PL/pgSQL question
// reads; a silent network cut holds it up the same way): the caller returns
// at its deadline with ErrTimeout, the try is left to end on its own, not
// cancelled (no ERROR in the server log), and the grant it gets once it
// runs, the holder gone, is dropped before the connection goes back.
func TestDeadlineDuringSecondTry(t *testing.T) {
	e := newEnv(t)
	checkLog := noErrorLogged(t)
	pool := e.pool(func(c *pgxpool.Config) { c.MaxConns = 1 })
	lent := showKeepalives(t, e.ctx, pool)
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
	const deadline, bound = 300 * time.Millisecond, 5 * time.Second
	ctx, cancel := context.WithTimeout(e.ctx, deadline)
	defer cancel()
	done := make(chan error, 1)
	go func() {
		_, err := Acquire(ctx, pool, key)
		done <- err
	}()
	e.eventually("the second try waiting for pg_language", secondTryWaits)
	select {
	case err := <-done:
		if !errors.Is(err, ErrTimeout) || !errors.Is(err, context.DeadlineExceeded) {
			t.Errorf("Acquire whose deadline passed during its second try: %v; want ErrTimeout and DeadlineExceeded", err)
		}
	case <-time.After(deadline + bound):
		must(t, tx.Rollback(e.ctx))
		<-done
		t.Fatalf("Acquire did not return within %v of its deadline while its second try was held up on the server", bound)
	}
	e.eventually("the second try still waiting for pg_language after Acquire returned (not cancelled)", secondTryWaits)

	granted := grantedThenCancelled.Load()
	must(t, holder.Release(e.ctx))
	must(t, tx.Rollback(e.ctx))
	pgtest.Await(t, "the late grant of the second try dropped", notHung, func() (bool, error) {
		return grantedThenCancelled.Load() > granted, nil
	})
	if got := showKeepalives(t, e.ctx, pool); got != lent { // the pool's one connection, back
		t.Errorf("keep-alives of the connection back in the pool: %v; want as lent, %v", got, lent)
	}
	checkLog()
}

// The same on a Session whose WithConn holds an advisory lock of its own:
// Lock returns at its deadline, the late grant of its second try is
// dropped (that key only: the WithConn's lock is kept), and the session
// serves its next Lock.
func TestSessionDeadlineDuringSecondTry(t *testing.T) {
	e := newEnv(t)
	checkLog := noErrorLogged(t)
	key, own := StringKey("session-deadline-during-second-try"), StringKey("session-deadline-during-second-try-own")
	holder := e.acquire(e.pool(), key)
	defer holder.Release(e.ctx)
	s := e.session(e.pool())
	ownID, _ := own.Int64()
	must(t, s.WithConn(e.ctx, func(c *pgx.Conn) error {
		_, err := c.Exec(e.ctx, "SELECT pg_advisory_lock($1)", ownID)
		return err
	}))

	blocker := e.conn()
	tx, err := blocker.Begin(e.ctx)
	must(t, err)
	defer tx.Rollback(e.ctx)
	if _, err := tx.Exec(e.ctx, "LOCK TABLE pg_catalog.pg_language IN ACCESS EXCLUSIVE MODE"); err != nil {
		t.Fatal(err)
	}
	const deadline, bound = 300 * time.Millisecond, 5 * time.Second
	ctx, cancel := context.WithTimeout(e.ctx, deadline)
	defer cancel()
	done := make(chan error, 1)
	go func() {
		_, err := s.Lock(ctx, key)
		done <- err
	}()
	e.eventually("the second try waiting for pg_language", secondTryWaits)
	select {
	case err := <-done:
		if !errors.Is(err, ErrTimeout) || !errors.Is(err, context.DeadlineExceeded) {
			t.Errorf("Lock whose deadline passed during its second try: %v; want ErrTimeout and DeadlineExceeded", err)
		}
	case <-time.After(deadline + bound):
		must(t, tx.Rollback(e.ctx))
		<-done
		t.Fatalf("Lock did not return within %v of its deadline while its second try was held up on the server", bound)
	}

	granted := grantedThenCancelled.Load()
	must(t, holder.Release(e.ctx))
	must(t, tx.Rollback(e.ctx))
	pgtest.Await(t, "the late grant of the second try dropped", notHung, func() (bool, error) {
		return grantedThenCancelled.Load() > granted, nil
	})
	if rows := e.lockRows(key); len(rows) != 0 {
		t.Errorf("%v after the late grant was dropped: %v; want no row", key, rows)
	}
	if rows := e.lockRows(own); len(rows) != 1 || !rows[0].Granted {
		t.Errorf("the WithConn's own lock after the late grant was dropped: %v; want it held", rows)
	}
	got, err := s.Lock(e.ctx, key)
	if err != nil || !got {
		t.Fatalf("the session's next Lock: %v, %v; want it to take the key", got, err)
	}
	must(t, s.Unlock(e.ctx, key))
	must(t, s.WithConn(e.ctx, func(c *pgx.Conn) error {
		_, err := c.Exec(e.ctx, "SELECT pg_advisory_unlock($1)", ownID)
		return err
	}))
	checkLog()
}

// secondTryWaits reports whether a statement waits for pg_language: a
// second try held up by the tests' LOCK TABLE.
func secondTryWaits(c *pgx.Conn) (bool, error) {
	var n int
	err := c.QueryRow(context.Background(), `SELECT count(*) FROM pg_catalog.pg_locks
		WHERE locktype = 'relation' AND relation = 'pg_catalog.pg_language'::regclass AND NOT granted`).Scan(&n)
	return n == 1, err
}

// A key granted by the second try before a wait (the holder released it
// while the try was held up on the server) is acquired: the Lock holds it,
// with the keep-alives in force on its connection.
func TestGrantBySecondTry(t *testing.T) {
	e := newEnv(t)
	checkLog := noErrorLogged(t)
	pool := e.pool()
	key := StringKey("grant-by-second-try")
	holder := e.acquire(e.pool(), key)
	defer holder.Release(e.ctx)
	warm := e.acquire(pool, StringKey("grant-by-second-try-warm")) // the pool's connection, PL/pgSQL looked up
	must(t, warm.Release(e.ctx))

	blocker := e.conn()
	tx, err := blocker.Begin(e.ctx)
	must(t, err)
	defer tx.Rollback(e.ctx)
	if _, err := tx.Exec(e.ctx, "LOCK TABLE pg_catalog.pg_language IN ACCESS EXCLUSIVE MODE"); err != nil {
		t.Fatal(err)
	}
	type result struct {
		l   *Lock
		err error
	}
	done := make(chan result, 1)
	go func() {
		l, err := Acquire(e.ctx, pool, key)
		done <- result{l, err}
	}()
	e.eventually("the second try waiting for pg_language", secondTryWaits)
	must(t, holder.Release(e.ctx))
	must(t, tx.Rollback(e.ctx))
	var r result
	select {
	case r = <-done:
	case <-time.After(notHung):
		t.Fatalf("Acquire did not return within %v of its second try's release", notHung)
	}
	if r.err != nil || !r.l.Acquired() {
		t.Fatalf("Acquire whose second try found the key free: %v; want it acquired", r.err)
	}
	defer r.l.Release(e.ctx)
	if rows := e.lockRows(key); len(rows) != 1 || !rows[0].Granted {
		t.Errorf("%v on the server while the Lock holds it: %v; want one granted row", key, rows)
	}
	if got := sessionKeepalives(t, e, r.l.s); got != keepalivesWanted() {
		t.Errorf("keep-alives while the lock got by the second try is held: %v; want %v", got, keepalivesWanted())
	}
	must(t, r.l.Release(e.ctx))
	checkLog()
}

// A ctx cancelled while the second try before a wait is held up on the
// server: the caller returns at once with ctx's error, and the try, not
// cancelled on the server (no ERROR logged), ends on its own.
func TestCancelDuringSecondTry(t *testing.T) {
	e := newEnv(t)
	checkLog := noErrorLogged(t)
	pool := e.pool()
	key := StringKey("cancel-during-second-try")
	holder := e.acquire(e.pool(), key)
	defer holder.Release(e.ctx)
	warm := e.acquire(pool, StringKey("cancel-during-second-try-warm")) // the pool's connection, PL/pgSQL looked up
	must(t, warm.Release(e.ctx))

	blocker := e.conn()
	tx, err := blocker.Begin(e.ctx)
	must(t, err)
	defer tx.Rollback(e.ctx)
	if _, err := tx.Exec(e.ctx, "LOCK TABLE pg_catalog.pg_language IN ACCESS EXCLUSIVE MODE"); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(e.ctx)
	defer cancel()
	done := make(chan error, 1)
	go func() {
		_, err := Acquire(ctx, pool, key)
		done <- err
	}()
	e.eventually("the second try waiting for pg_language", secondTryWaits)
	cancel()
	const bound = 5 * time.Second
	select {
	case err := <-done:
		if !errors.Is(err, context.Canceled) || errors.Is(err, ErrTimeout) {
			t.Errorf("Acquire cancelled during its second try: %v; want context.Canceled", err)
		}
	case <-time.After(bound):
		must(t, tx.Rollback(e.ctx))
		<-done
		t.Fatalf("Acquire did not return within %v of its cancellation while its second try was held up on the server", bound)
	}
	e.eventually("the second try still waiting for pg_language after Acquire returned (not cancelled)", secondTryWaits)
	must(t, tx.Rollback(e.ctx))
	checkLog()
}
