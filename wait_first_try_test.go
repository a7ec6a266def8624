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
// used); a silent network cut holds it up the same way. The try is not
// interrupted (SPEC §2a: a cancel request would write an ERROR with the
// statement to the server log): it answers once the catalog is free, and
// its answer stands. Held up for longer than the grace (500 ms after ctx's
// end), its connection is closed and the caller returns.

// A cancel during the first try of an Acquire, on a connection that has
// never parsed it: the try still waits on the server after the cancel and,
// once it answers, the Acquire holds the key; nothing is logged.
func TestCancelDuringFirstTry(t *testing.T) {
	testAnswerAfterEnd(t, false)
}

// The same when ctx's deadline passes during the try.
func TestDeadlineDuringFirstTry(t *testing.T) {
	testAnswerAfterEnd(t, true)
}

func testAnswerAfterEnd(t *testing.T, byDeadline bool) {
	e, pool := newTryEnv(t)
	must(t, pool.Ping(e.ctx)) // connected, without the try parsed
	key := StringKey(t.Name())
	var l *Lock
	err := answerAfterEnd(e, firstTryHeldUp(e, "pg_proc"), byDeadline, func(ctx context.Context) (err error) {
		l, err = Acquire(ctx, pool, key)
		return err
	})
	if err != nil || !l.Acquired() {
		t.Fatalf("Acquire whose first try answered after its ctx ended: %v; want the key, which is free", err)
	}
	if rows := e.lockRows(key); len(rows) != 1 || !rows[0].Granted {
		t.Errorf("%v on the server while the Lock holds it: %v; want one granted row", key, rows)
	}
	must(t, l.Release(e.ctx))
}

// A cancel during the first try of a semaphore's acquire (its slots' try,
// on a connection that has run it before): the same.
func TestCancelDuringSemaphoreFirstTry(t *testing.T) {
	e, pool := newTryEnv(t)
	key := StringKey(t.Name())
	l, err := AcquireSemaphore(e.ctx, pool, key, 2)
	must(t, err)
	must(t, l.Release(e.ctx))
	err = answerAfterEnd(e, firstTryHeldUp(e, "pg_language"), false, func(ctx context.Context) (err error) {
		l, err = AcquireSemaphore(ctx, pool, key, 2)
		return err
	})
	if err != nil || !l.Acquired() {
		t.Fatalf("AcquireSemaphore whose first try answered after its ctx ended: %v; want a slot, all are free", err)
	}
	must(t, l.Release(e.ctx))
}

// A cancel during DoTx's try, on a pool whose connections end a cancelled
// statement with a cancel request (cancelHandler) as on the default one:
// the try answers (it got the key), DoTx returns ctx's error without
// running fn, and the key is not held; nothing is logged.
func TestCancelDuringDoTxFirstTry(t *testing.T) {
	eachContextHandler(t, func(t *testing.T, handler func(*pgxpool.Config)) {
		e, pool := newTryEnv(t, handler)
		key := StringKey(t.Name())
		noop := func(context.Context, pgx.Tx) error { return nil }
		_, err := DoTx(e.ctx, pool, key, noop)
		must(t, err)
		ran := false
		err = answerAfterEnd(e, firstTryHeldUp(e, "pg_language"), false, func(ctx context.Context) error {
			_, err := DoTx(ctx, pool, key, func(context.Context, pgx.Tx) error { ran = true; return nil })
			return err
		})
		wantCtxError(t, "DoTx", err, false)
		if ran {
			t.Error("DoTx ran fn after its ctx was cancelled during its try")
		}
		awaitNotHeld(e, key)
		_, err = DoTx(e.ctx, pool, key, noop) // the pool serves the next one
		must(t, err)
	})
}

// A cancel during LockTx's try: the try answers, LockTx holds the key,
// and the caller's transaction is usable; nothing is logged.
func TestCancelDuringLockTxFirstTry(t *testing.T) {
	eachContextHandler(t, func(t *testing.T, handler func(*pgxpool.Config)) {
		e, pool := newTryEnv(t, handler)
		key := StringKey(t.Name())
		warm := e.begin(pool) // ended before the lock: a transaction that read pg_language holds it up
		_, err := LockTx(e.ctx, warm, StringKey(t.Name()+"-warm"))
		must(t, err)
		must(t, warm.Commit(e.ctx))
		host := e.begin(pool)
		got := false
		err = answerAfterEnd(e, firstTryHeldUp(e, "pg_language"), false, func(ctx context.Context) (err error) {
			got, err = LockTx(ctx, host, key)
			return err
		})
		if err != nil || !got {
			t.Fatalf("LockTx whose try answered after its ctx was cancelled: %v, %v; want the key, which is free", got, err)
		}
		if _, err := host.Exec(e.ctx, "SELECT 1"); err != nil {
			t.Errorf("the transaction after LockTx: %v; want it usable", err)
		}
		must(t, host.Rollback(e.ctx))
		awaitNotHeld(e, key)
	})
}

// A first try held up for longer than the grace after a cancel or a
// deadline: Acquire returns within 5 s with ctx's error, its connection
// closed, nothing held, and the pool serves the next lock. The server log
// is not looked at: pgx sends a cancel request of its own when it closes a
// connection under a read, which the server logs if the try is still held
// up when it lands.
func TestFirstTryHeldUpPastGrace(t *testing.T) {
	for _, byDeadline := range []bool{false, true} {
		t.Run(map[bool]string{false: "cancel", true: "deadline"}[byDeadline], func(t *testing.T) {
			e := newEnv(t)
			pool := e.pool(func(c *pgxpool.Config) { c.MaxConns = 1 })
			must(t, pool.Ping(e.ctx)) // connected, without the try parsed
			key := StringKey(t.Name())
			h := firstTryHeldUp(e, "pg_proc")
			err := endDuringTry(e, "first", h.tx, h.await, byDeadline, func(ctx context.Context) error {
				_, err := Acquire(ctx, pool, key)
				return err
			})
			wantCtxError(t, "Acquire", err, byDeadline)
			must(t, h.tx.Rollback(e.ctx))
			awaitNotHeld(e, key)
			l := e.acquire(pool, key) // the pool serves the next lock
			must(t, l.Release(e.ctx))
		})
	}
}

// longTryGrace gives a try in flight when its ctx ends notHung to answer,
// for the rest of the test, so that a test can hold it up on the server
// past its ctx's end for as long as it looks.
func longTryGrace(t *testing.T) {
	was := tryGrace.Swap(int64(notHung))
	t.Cleanup(func() { tryGrace.Store(was) })
}

// newTryEnv is the set-up of a test whose try is held up past its ctx's
// end: a long tryGrace, a check that the server logged no ERROR (also
// when the test stops early, after the catalog lock ends), and a pool of
// one connection (with mods).
func newTryEnv(t *testing.T, mods ...func(*pgxpool.Config)) (*env, *pgxpool.Pool) {
	e := newEnv(t)
	t.Cleanup(noErrorLogged(t))
	longTryGrace(t)
	return e, e.pool(append(mods, func(c *pgxpool.Config) { c.MaxConns = 1 })...)
}

// answerAfterEnd runs call with a ctx that ends while call's first try is
// held up (h): its 300 ms deadline passing or, if !byDeadline, cancelled
// once the try waits. It checks that the try still waits on the server
// for stillFor after that end and that call has not returned, then ends
// the hold, and returns call's error, awaited for notHung.
func answerAfterEnd(e *env, h heldTry, byDeadline bool, call func(context.Context) error) error {
	e.t.Helper()
	const stillFor = time.Second
	var (
		ctx    context.Context
		cancel context.CancelFunc
	)
	if byDeadline {
		ctx, cancel = context.WithTimeout(e.ctx, 300*time.Millisecond)
	} else {
		ctx, cancel = context.WithCancel(e.ctx)
	}
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- call(ctx) }()
	h.await("the first try waiting for the locked catalog")
	if !byDeadline {
		cancel()
	}
	<-ctx.Done() // the deadline passes while the try waits
	// Polling the server's state: the try must go on waiting.
	for end := time.Now().Add(stillFor); time.Now().Before(end); time.Sleep(pgtest.PollEvery) {
		select {
		case err := <-done:
			must(e.t, h.tx.Rollback(e.ctx))
			e.t.Fatalf("the call returned (%v) while its first try, held up on the server, had not answered", err)
		default:
		}
		if ok, err := h.waiting(); err != nil || !ok {
			must(e.t, h.tx.Rollback(e.ctx))
			<-done
			e.t.Fatalf("the first try stopped waiting on the server after its ctx ended (interrupted): %v", err)
		}
	}
	must(e.t, h.tx.Rollback(e.ctx))
	return receive(e, done, "the call whose first try was let answer")
}

// heldTry is a try held up on the server by a lock on a catalog it reads
// (firstTryHeldUp).
type heldTry struct {
	tx      pgx.Tx               // holds the catalog lock until it ends
	await   func(what string)    // awaits the try waiting for the catalog
	waiting func() (bool, error) // whether it waits now
}

// firstTryHeldUp locks catalog (pg_proc or pg_language) in a transaction,
// which holds up a statement that reads it, until it is rolled back (at
// the latest when the test ends, before its end-of-test checks). Whether
// a statement waits for the catalog is asked on a connection opened (and
// its question parsed) before the lock: a new backend's start-up, and a
// first parse, can themselves wait for a locked catalog.
func firstTryHeldUp(e *env, catalog string) heldTry {
	e.t.Helper()
	probe := e.conn()
	var pids []uint32 // of the backends waiting for catalog, logged: a failed test's server log names its backends by pid
	waiting := func() (bool, error) {
		pids = pids[:0]
		rows, err := probe.Query(context.Background(), `SELECT pid FROM pg_catalog.pg_locks
			WHERE locktype = 'relation' AND relation = $1::regclass AND NOT granted`, "pg_catalog."+catalog)
		if err == nil {
			pids, err = pgx.AppendRows(pids, rows, pgx.RowTo[uint32])
		}
		return len(pids) == 1, err
	}
	if _, err := waiting(); err != nil {
		e.t.Fatal(err)
	}
	tx, err := e.conn().Begin(e.ctx)
	must(e.t, err)
	if _, err := tx.Exec(e.ctx, "LOCK TABLE pg_catalog."+catalog+" IN ACCESS EXCLUSIVE MODE"); err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(func() { _ = tx.Rollback(e.ctx) }) // before the end-of-test checks; may have ended already
	return heldTry{tx: tx, waiting: waiting, await: func(what string) {
		e.t.Helper()
		pgtest.Await(e.t, what+" (on the server)", notHung, waiting)
		e.t.Logf("%s: backend %v", what, pids)
	}}
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

// eachContextHandler runs test in a subtest for each context handler a
// pool's connections may have, which a try must not depend on: pgx's
// default (the socket's deadline, which closes the connection) and a
// cancel request (cancelHandler).
func eachContextHandler(t *testing.T, test func(t *testing.T, handler func(*pgxpool.Config))) {
	t.Run("default", func(t *testing.T) { test(t, func(*pgxpool.Config) {}) })
	t.Run("cancel-request", func(t *testing.T) { test(t, cancelHandler(time.Second)) })
}
