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

// The second try a Session sends before a wait, when its first try found
// the key held, held up on the server (by a lock on pg_language, which its
// PL/pgSQL question reads; a silent network cut holds it up the same way):
// a deadline or a cancel during it returns the caller in time, the try is
// left to end on its own, not cancelled (no ERROR in the server log), and
// a grant it gets then is dropped; a grant it gets in time counts.

// A deadline during the second try of an Acquire: ErrTimeout, and the
// pool's one connection comes back as the pool lent it.
func TestDeadlineDuringSecondTry(t *testing.T) {
	e := newEnv(t)
	checkLog := noErrorLogged(t)
	pool := e.pool(func(c *pgxpool.Config) { c.MaxConns = 1 })
	lent := showKeepalives(t, e.ctx, pool)
	key := StringKey("deadline-during-second-try")
	holder, tx, awaitTry := secondTryHeldUp(e, pool, key)
	err := endDuringTry(e, "second", tx, awaitTry, true, func(ctx context.Context) error {
		_, err := Acquire(ctx, pool, key)
		return err
	})
	if !errors.Is(err, ErrTimeout) || !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("Acquire whose deadline passed during its second try: %v; want ErrTimeout and DeadlineExceeded", err)
	}
	awaitTry("the second try still waiting for pg_language after Acquire returned (not cancelled)")
	lateGrantDropped(e, holder, tx)
	if got := showKeepalives(t, e.ctx, pool); got != lent { // the pool's one connection, back
		t.Errorf("keep-alives of the connection back in the pool: %v; want as lent, %v", got, lent)
	}
	checkLog()
}

// A cancel during the second try of an Acquire: ctx's error, at once.
func TestCancelDuringSecondTry(t *testing.T) {
	e := newEnv(t)
	checkLog := noErrorLogged(t)
	pool := e.pool()
	key := StringKey("cancel-during-second-try")
	_, tx, awaitTry := secondTryHeldUp(e, pool, key)
	err := endDuringTry(e, "second", tx, awaitTry, false, func(ctx context.Context) error {
		_, err := Acquire(ctx, pool, key)
		return err
	})
	if !errors.Is(err, context.Canceled) || errors.Is(err, ErrTimeout) {
		t.Errorf("Acquire cancelled during its second try: %v; want context.Canceled", err)
	}
	awaitTry("the second try still waiting for pg_language after Acquire returned (not cancelled)")
	must(t, tx.Rollback(e.ctx))
	checkLog()
}

// A deadline during the second try on a Session whose WithConn holds an
// advisory lock of its own: the late grant is dropped (that key only: the
// WithConn's lock is kept), and the session serves its next Lock.
func TestSessionDeadlineDuringSecondTry(t *testing.T) {
	e := newEnv(t)
	checkLog := noErrorLogged(t)
	key, own := StringKey("session-deadline-during-second-try"), StringKey("session-deadline-during-second-try-own")
	pool := e.pool()
	s := e.session(pool)
	ownID, _ := own.Int64()
	must(t, s.WithConn(e.ctx, func(c *pgx.Conn) error {
		_, err := c.Exec(e.ctx, "SELECT pg_advisory_lock($1)", ownID)
		return err
	}))
	holder, tx, awaitTry := secondTryHeldUp(e, pool, key)
	err := endDuringTry(e, "second", tx, awaitTry, true, func(ctx context.Context) error {
		_, err := s.Lock(ctx, key)
		return err
	})
	if !errors.Is(err, ErrTimeout) || !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("Lock whose deadline passed during its second try: %v; want ErrTimeout and DeadlineExceeded", err)
	}
	lateGrantDropped(e, holder, tx)
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

// A key granted by the second try (the holder released it while the try
// was held up) is acquired: the Lock holds it, with the keep-alives in
// force on its connection.
func TestGrantBySecondTry(t *testing.T) {
	e := newEnv(t)
	checkLog := noErrorLogged(t)
	pool := e.pool()
	key := StringKey("grant-by-second-try")
	holder, tx, awaitTry := secondTryHeldUp(e, pool, key)
	type result struct {
		l   *Lock
		err error
	}
	done := make(chan result, 1)
	go func() {
		l, err := Acquire(e.ctx, pool, key)
		done <- result{l, err}
	}()
	awaitTry("the second try waiting for pg_language")
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

// secondTryHeldUp takes key from a pool of its own, warms pool's
// connection (PL/pgSQL looked up: the catalog is then read only by the
// second try's question) and locks pg_language in a transaction, which
// holds up the second try of a wait for key until it is rolled back. Both
// end when the test ends, before its end-of-test checks, if not before.
// awaitTry awaits a statement waiting for pg_language (the second try), on
// a connection opened before the lock: a new backend's start-up can itself
// wait for pg_language while it is locked (CI saw a connect time out).
func secondTryHeldUp(e *env, pool *pgxpool.Pool, key Key) (holder *Lock, tx pgx.Tx, awaitTry func(what string)) {
	e.t.Helper()
	holder = e.acquire(e.pool(), key)
	warm := e.acquire(pool, StringKey(e.t.Name()+"-warm"))
	must(e.t, warm.Release(e.ctx))
	probe := e.conn()
	tx, err := e.conn().Begin(e.ctx)
	must(e.t, err)
	if _, err := tx.Exec(e.ctx, "LOCK TABLE pg_catalog.pg_language IN ACCESS EXCLUSIVE MODE"); err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(func() { // before the end-of-test checks; either may have ended already
		_ = tx.Rollback(e.ctx)
		_ = holder.Release(e.ctx)
	})
	return holder, tx, func(what string) {
		e.t.Helper()
		pgtest.Await(e.t, what+" (on the server)", notHung, func() (bool, error) { return secondTryWaits(probe) })
	}
}

// secondTryWaits reports whether a statement waits for pg_language: a
// second try held up by secondTryHeldUp.
func secondTryWaits(c *pgx.Conn) (bool, error) {
	var n int
	err := c.QueryRow(context.Background(), `SELECT count(*) FROM pg_catalog.pg_locks
		WHERE locktype = 'relation' AND relation = 'pg_catalog.pg_language'::regclass AND NOT granted`).Scan(&n)
	return n == 1, err
}

// endDuringTry runs call with a ctx that ends while call's try (which
// names it: "first", "second") is held up (by tx: secondTryHeldUp,
// firstTryHeldUp), its 300 ms deadline passing or, if !byDeadline,
// cancelled once the try waits, and returns call's error. If call has not
// returned within 5 s of that end, it rolls tx back and fails the test.
func endDuringTry(e *env, which string, tx pgx.Tx, awaitTry func(string), byDeadline bool, call func(context.Context) error) error {
	e.t.Helper()
	const deadline, bound = 300 * time.Millisecond, 5 * time.Second
	var (
		ctx    context.Context
		cancel context.CancelFunc
	)
	if byDeadline {
		ctx, cancel = context.WithTimeout(e.ctx, deadline)
	} else {
		ctx, cancel = context.WithCancel(e.ctx)
	}
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- call(ctx) }()
	awaitTry("the " + which + " try waiting for the locked catalog")
	if !byDeadline {
		cancel()
	}
	select {
	case err := <-done:
		return err
	case <-time.After(deadline + bound):
		must(e.t, tx.Rollback(e.ctx))
		<-done
		e.t.Fatalf("the call did not return within %v of its ctx's end while its %s try was held up on the server", bound, which)
		return nil
	}
}

// lateGrantDropped releases holder and rolls tx back (secondTryHeldUp),
// so that the second try left to end on its own gets the key, and awaits
// the drop of that late grant.
func lateGrantDropped(e *env, holder *Lock, tx pgx.Tx) {
	e.t.Helper()
	granted := grantedThenCancelled.Load()
	must(e.t, holder.Release(e.ctx))
	must(e.t, tx.Rollback(e.ctx))
	pgtest.Await(e.t, "the late grant of the second try dropped", notHung, func() (bool, error) {
		return grantedThenCancelled.Load() > granted, nil
	})
}
