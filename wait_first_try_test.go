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

// The first try of a lock (a Session's, so an Acquire's and a Do's too; a
// semaphore's; LockTx's and DoTx's) held up on the server when the
// caller's ctx ends: by a lock on a catalog it reads, pg_proc (the try's
// function, looked up when a connection first parses it) or pg_language
// (the semaphore's, LockTx's and DoTx's tries ask whether PL/pgSQL can be
// used); a silent network cut holds it up the same way. The try is not interrupted by a cancel request, which would write
// an ERROR with the statement to the server log (SPEC §2a); the caller
// returns within deadlineGrace of its ctx's end, its connection closed
// (the server ends whatever the try took with it), and nothing is held.

// A cancel during the first try of an Acquire, on a connection that has
// never parsed it: ctx's error, the connection closed, nothing logged.
func TestCancelDuringFirstTry(t *testing.T) {
	testEndDuringFirstTry(t, false)
}

// A deadline during the first try of an Acquire: ErrTimeout.
func TestDeadlineDuringFirstTry(t *testing.T) {
	testEndDuringFirstTry(t, true)
}

func testEndDuringFirstTry(t *testing.T, byDeadline bool) {
	e := newEnv(t)
	t.Cleanup(noErrorLogged(t)) // also when the test stops early, after the catalog lock ends
	pool := e.pool(func(c *pgxpool.Config) { c.MaxConns = 1 })
	must(t, pool.Ping(e.ctx)) // connected, without the try parsed
	key := StringKey(t.Name())
	tx, awaitTry := firstTryHeldUp(e, "pg_proc")
	err := endDuringTry(e, "first", tx, awaitTry, byDeadline, func(ctx context.Context) error {
		_, err := Acquire(ctx, pool, key)
		return err
	})
	wantCtxError(t, "Acquire", err, byDeadline)
	must(t, tx.Rollback(e.ctx))
	awaitNotHeld(e, key)
	l := e.acquire(pool, key) // the pool serves the next lock
	must(t, l.Release(e.ctx))
}

// A cancel during the first try of a semaphore's acquire (its slots' try,
// held up by a lock on pg_language on a connection that has run it
// before): ctx's error, nothing logged, no slot held.
func TestCancelDuringSemaphoreFirstTry(t *testing.T) {
	e := newEnv(t)
	t.Cleanup(noErrorLogged(t)) // also when the test stops early, after the catalog lock ends
	pool := e.pool(func(c *pgxpool.Config) { c.MaxConns = 1 })
	key := StringKey(t.Name())
	warm, err := AcquireSemaphore(e.ctx, pool, key, 2)
	must(t, err)
	must(t, warm.Release(e.ctx))
	tx, awaitTry := firstTryHeldUp(e, "pg_language")
	err = endDuringTry(e, "first", tx, awaitTry, false, func(ctx context.Context) error {
		_, err := AcquireSemaphore(ctx, pool, key, 2)
		return err
	})
	wantCtxError(t, "AcquireSemaphore", err, false)
	must(t, tx.Rollback(e.ctx))
	for _, slot := range SemaphoreKeys(key, 2) {
		awaitNotHeld(e, slot)
	}
}

// firstTryHeldUp locks catalog (pg_proc or pg_language) in a transaction,
// which holds up a statement that reads it, until it is rolled back (at
// the latest when the test ends, before its end-of-test checks). awaitTry
// awaits a statement waiting for catalog, on a connection opened (and its
// question parsed) before the lock: a new backend's start-up, and a first
// parse, can themselves wait for a locked catalog.
func firstTryHeldUp(e *env, catalog string) (tx pgx.Tx, awaitTry func(what string)) {
	e.t.Helper()
	probe := e.conn()
	var pids []uint32 // of the backends waiting for catalog, logged: a failed test's server log names its backends by pid
	waits := func() (bool, error) {
		pids = pids[:0]
		rows, err := probe.Query(context.Background(), `SELECT pid FROM pg_catalog.pg_locks
			WHERE locktype = 'relation' AND relation = $1::regclass AND NOT granted`, "pg_catalog."+catalog)
		if err == nil {
			pids, err = pgx.AppendRows(pids, rows, pgx.RowTo[uint32])
		}
		return len(pids) == 1, err
	}
	if _, err := waits(); err != nil {
		e.t.Fatal(err)
	}
	tx, err := e.conn().Begin(e.ctx)
	must(e.t, err)
	if _, err := tx.Exec(e.ctx, "LOCK TABLE pg_catalog."+catalog+" IN ACCESS EXCLUSIVE MODE"); err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(func() { _ = tx.Rollback(e.ctx) }) // before the end-of-test checks; may have ended already
	return tx, func(what string) {
		e.t.Helper()
		pgtest.Await(e.t, what+" (on the server)", notHung, waits)
		e.t.Logf("%s: backend %v", what, pids)
	}
}

// wantCtxError checks the error of call whose ctx ended: ErrTimeout and
// context.DeadlineExceeded for a deadline, context.Canceled for a cancel.
func wantCtxError(t *testing.T, call string, err error, byDeadline bool) {
	t.Helper()
	switch {
	case byDeadline && (!errors.Is(err, ErrTimeout) || !errors.Is(err, context.DeadlineExceeded)):
		t.Errorf("%s whose deadline passed during its first try: %v; want ErrTimeout and DeadlineExceeded", call, err)
	case !byDeadline && (!errors.Is(err, context.Canceled) || errors.Is(err, ErrTimeout)):
		t.Errorf("%s cancelled during its first try: %v; want context.Canceled", call, err)
	}
}

// awaitNotHeld awaits key held by no backend (one that ends with its
// closed connection ends its locks a moment later).
func awaitNotHeld(e *env, key Key) {
	e.t.Helper()
	pgtest.Await(e.t, key.String()+" held by no backend", notHung, func() (bool, error) { return len(e.lockRows(key)) == 0, nil })
}

// A cancel during DoTx's try (held up by a lock on pg_language, which it
// reads), on a pool whose connections end a cancelled statement with a
// cancel request (cancelHandler) as on the default one: ctx's error,
// nothing logged, fn not run, nothing held.
func TestCancelDuringDoTxFirstTry(t *testing.T) {
	eachContextHandler(t, func(t *testing.T, handler func(*pgxpool.Config)) {
		e := newEnv(t)
		t.Cleanup(noErrorLogged(t)) // also when the test stops early, after the catalog lock ends
		pool := e.pool(handler, func(c *pgxpool.Config) { c.MaxConns = 1 })
		key := StringKey(t.Name())
		noop := func(context.Context, pgx.Tx) error { return nil }
		_, err := DoTx(e.ctx, pool, key, noop)
		must(t, err)
		tx, awaitTry := firstTryHeldUp(e, "pg_language")
		ran := false
		err = endDuringTry(e, "first", tx, awaitTry, false, func(ctx context.Context) error {
			_, err := DoTx(ctx, pool, key, func(context.Context, pgx.Tx) error { ran = true; return nil })
			return err
		})
		wantCtxError(t, "DoTx", err, false)
		if ran {
			t.Error("DoTx ran fn after its ctx was cancelled during its try")
		}
		must(t, tx.Rollback(e.ctx))
		awaitNotHeld(e, key)
		_, err = DoTx(e.ctx, pool, key, noop) // the pool serves the next one
		must(t, err)
	})
}

// A cancel during LockTx's first try (held up by a lock on pg_language):
// ctx's error, nothing logged.
func TestCancelDuringLockTxFirstTry(t *testing.T) {
	eachContextHandler(t, func(t *testing.T, handler func(*pgxpool.Config)) {
		e := newEnv(t)
		t.Cleanup(noErrorLogged(t)) // also when the test stops early, after the catalog lock ends
		pool := e.pool(handler, func(c *pgxpool.Config) { c.MaxConns = 1 })
		key := StringKey(t.Name())
		warm := e.begin(pool) // ended before the lock: a transaction that read pg_language holds it up
		_, err := LockTx(e.ctx, warm, StringKey(t.Name()+"-warm"))
		must(t, err)
		must(t, warm.Commit(e.ctx))
		host := e.begin(pool)
		tx, awaitTry := firstTryHeldUp(e, "pg_language")
		err = endDuringTry(e, "first", tx, awaitTry, false, func(ctx context.Context) error {
			_, err := LockTx(ctx, host, key)
			return err
		})
		wantCtxError(t, "LockTx", err, false)
		must(t, tx.Rollback(e.ctx))
		_ = host.Rollback(e.ctx)
		awaitNotHeld(e, key)
	})
}

// eachContextHandler runs test in a subtest for each context handler a
// pool's connections may have, which a try must not depend on: pgx's
// default (the socket's deadline, which closes the connection) and a
// cancel request (cancelHandler).
func eachContextHandler(t *testing.T, test func(t *testing.T, handler func(*pgxpool.Config))) {
	t.Run("default", func(t *testing.T) { test(t, func(*pgxpool.Config) {}) })
	t.Run("cancel-request", func(t *testing.T) { test(t, cancelHandler(time.Second)) })
}
