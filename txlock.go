package advisory

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
)

// LockTx takes key for the rest of transaction tx, with
// pg_advisory_xact_lock (or its _shared and try forms): the lock ends when
// tx commits or rolls back, and cannot be released earlier. Options:
// Shared, NoWait, WaitTimeout, WithTracer. It returns false with a nil error when NoWait
// found the key held elsewhere.
//
// Transaction locks work through PgBouncer in transaction pooling mode;
// session locks (Acquire, Session) do not.
//
// It tries once and, if it must wait, waits in slices (see the package
// documentation, "What waiting costs the server"), each ended by the server
// without an error: a wait that reaches its bound returns ErrTimeout and
// leaves tx usable, and tx's own lock_timeout is unchanged. When tx holds
// any lock besides its own transaction id (an earlier LockTx, a row it
// updated, a table it read: the first try asks pg_locks), or PL/pgSQL
// cannot be used, the wait is instead one server-side wait, which
// PostgreSQL's deadlock detector sees (ErrDeadlock) and which holds a
// snapshot while it lasts; a bound it reaches then fails with ErrTimeout
// and aborts tx, as any failed statement does.
//
// In a REPEATABLE READ or SERIALIZABLE tx, LockTx cannot make tx see what
// the previous holder committed: tx's snapshot was taken at its first
// statement, before the grant. Use DoTx with TxOptions instead, which
// takes fn's snapshot after the grant. Other failures
// (ErrTooManyLocks, a server error) abort tx, as any failed statement does:
// roll it back. A ctx deadline is the wait's bound. A ctx cancelled during
// the first try, which never waits on the server, lets it answer: LockTx
// returns what it got, tx usable; if it has not answered 500 ms later (a
// server or network holding it up) tx's connection is closed, whatever
// context handler its pool has (no cancel request, which would log the
// statement as an ERROR). A ctx cancelled during a wait slice is handled
// as pgx handles it for any statement (by default the connection is
// closed, ending tx). A nil, committed or rolled-back tx is an error.
func LockTx(ctx context.Context, tx pgx.Tx, key Key, opts ...Option) (bool, error) {
	cfg, err := newConfig(callLockTx, opts)
	if err != nil {
		return false, err
	}
	cfg.entry = EntryLockTx
	ctx, w := traceWait(ctx, cfg, TraceWaitStartData{Key: key})
	got, err := lockTxCall(ctx, tx, key, cfg)
	w.end(ctx, got, err)
	return got, err
}

// lockTxCall is LockTx without the trace.
func lockTxCall(ctx context.Context, tx pgx.Tx, key Key, cfg config) (bool, error) {
	if tx == nil {
		return false, errorf("lock_tx %s: nil pgx.Tx", key)
	}
	if !key.Valid() {
		return false, invalidKey("lock_tx")
	}
	if err := ctx.Err(); err != nil {
		return false, keyError("lock_tx", key, nil, err)
	}
	w, bound, byDeadline := cfg.waitPlan(ctx)
	got, err := lockTx(ctx, tx, key, cfg.mode, w, endOf(bound))
	switch {
	case err != nil:
		kind := kindOf(err)
		if kind == nil && byDeadline && errors.Is(ctx.Err(), context.DeadlineExceeded) {
			kind = ErrTimeout
		}
		e := keyError("lock_tx", key, kind, err)
		e.deadline = kind == ErrTimeout && byDeadline
		return false, e
	case !got && w != waitTry:
		e := keyError("lock_tx", key, ErrTimeout, nil)
		e.deadline = byDeadline
		return false, e
	}
	return got, nil
}

// lockTx tries key once and, if it must wait, waits until it holds key, end
// (the zero time: none) passes (got == false, nil error) or a statement
// fails: in slices (see sliceTxSQL) when the session holds no advisory
// lock, and otherwise in one server-side wait, so that a deadlock through
// locks it holds is detected (two transactions slicing on each other's keys
// would wait for ever, each unseen by the other's detector).
func lockTx(ctx context.Context, tx pgx.Tx, key Key, m Mode, w wait, end time.Time) (got bool, err error) {
	var (
		dtMs              int64
		holdsAny, canDoPL *bool
	)
	// The try never waits: ctx's end does not interrupt it (runTryOn).
	err = runTryOn(ctx, tx.Conn(), func(ctx context.Context, _ *pgx.Conn) error {
		return tx.QueryRow(ctx, txFirstTrySQL[m][key.space-1], key.args()...).Scan(&got, &dtMs, &holdsAny, &canDoPL)
	})
	if err != nil || got || w == waitTry {
		return got, err
	}
	if err := ctx.Err(); err != nil { // ended during the try: no wait begins
		return false, err
	}
	switch {
	case holdsAny != nil && *holdsAny:
		return lockTxOnce(ctx, tx, key, m, end)
	case canDoPL != nil && !*canDoPL:
		noteNoSlices(ctx, nil)
		return lockTxOnce(ctx, tx, key, m, end)
	}
	return inSlices(ctx, dtMs, end, func(ctx context.Context, ms int64) (bool, error) {
		got, err := sliceReport(tx.Conn().PgConn().Exec(ctx, txSliceSQL(key, m, ms)).ReadAll())
		return got > 0, err
	})
}

// lockTxOnce waits for key in one server-side wait, under lock_timeout
// until end if there is one. A wait that reaches end fails with 55P03 and,
// as any failed statement, aborts the transaction.
func lockTxOnce(ctx context.Context, tx execer, key Key, m Mode, end time.Time) (bool, error) {
	w, bound := waitForever, time.Duration(0)
	if !end.IsZero() {
		if bound = time.Until(end); bound <= 0 {
			return false, nil
		}
		w = waitBounded
	}
	if _, ok := ctx.Deadline(); ok {
		var cancel context.CancelFunc
		ctx, cancel = pastDeadline(ctx, deadlineGrace)
		defer cancel()
	}
	sql, args := lockStatement(scopeTx, m, w, key, bound)
	_, err := tx.Exec(ctx, sql, args...)
	return err == nil, err
}

// DoTx runs fn in a transaction that holds key: it takes key on a
// connection of pool as LockTx does (options as LockTx, and TxOptions),
// begins fn's transaction holding it, runs fn, and commits. fn runs only if
// the lock was acquired; acquired reports whether it ran. The transaction
// is rolled back when fn returns an error (returned as is) and when fn
// panics (the panic goes on). The lock ends with the transaction.
//
// DoTx never waits inside fn's transaction: it tries the key in a
// transaction of its own and, if it must wait, waits in slices that are
// each a short transaction of their own (so a holder's CREATE INDEX
// CONCURRENTLY, which waits for every transaction that had a snapshot when
// it began, waits for a slice at most). Once a try or a slice holds the
// key, the same message that begins fn's transaction (with TxOptions'
// isolation level, access mode and deferrable mode) takes the key in it
// and lets the waiting transaction's hold go, so that fn's snapshot is
// taken after the grant, whatever its isolation level: a REPEATABLE READ
// or SERIALIZABLE fn sees what the previous holder committed. Nothing
// observable is changed on the connection to learn an outcome.
//
// An uncontended DoTx is three round trips: the try, the BEGIN of fn's
// transaction, the COMMIT. All of it works through PgBouncer in
// transaction pooling mode: each step is one transaction or one message.
// A cancelled ctx returns with ctx's error, and fn does not run: at once
// during a wait slice, which is left to end on its own (within one slice),
// the connection going back to the pool after it without a grant that came
// late; during the try, which never waits on the server, once it has
// answered (a round trip; if it has not answered 500 ms later, the
// connection is closed, never cancelled, whatever context handler the pool
// has).
func DoTx(ctx context.Context, pool *pgxpool.Pool, key Key, fn func(context.Context, pgx.Tx) error, opts ...Option) (acquired bool, err error) {
	cfg, err := newConfig(callDoTx, opts)
	if err != nil {
		return false, err
	}
	if pool == nil {
		return false, errorf("lock_tx %s: nil *pgxpool.Pool", key)
	}
	if !key.Valid() {
		return false, invalidKey("lock_tx")
	}
	cfg.entry = EntryDoTx
	waitCtx, w := traceWait(ctx, cfg, TraceWaitStartData{Key: key})
	conn, err := pool.Acquire(waitCtx)
	if err != nil {
		err = beginError(waitCtx, key, err)
		w.end(waitCtx, false, err)
		return false, err
	}
	tx, err := beginLocked(waitCtx, conn, key, cfg)
	w.end(waitCtx, tx != nil, err)
	if tx == nil {
		return false, err
	}
	defer conn.Release() // after the rollback below; a connection left in a transaction is destroyed
	committed := false
	defer func() {
		if !committed {
			rollback(ctx, tx)
		}
	}()
	if err := fn(ctx, tx); err != nil {
		return true, err
	}
	committed = true
	if err := tx.Commit(ctx); err != nil {
		return true, keyError("commit", key, nil, err)
	}
	return true, nil
}

// beginLocked takes key on conn in a transaction of its own (txWait) and,
// once it holds it, begins fn's transaction holding key (txBridgeSQL). It
// returns fn's transaction, or nil and the reason (nil when NoWait found
// the key busy, ErrTimeout when the bound passed): then conn has been
// released, or will be once a slice left to end on its own has ended.
func beginLocked(ctx context.Context, conn *pgxpool.Conn, key Key, cfg config) (pgx.Tx, error) {
	got, err := txWait(ctx, conn, key, cfg)
	if !got {
		return nil, err // txWait released conn
	}
	tx, err := conn.Conn().BeginTx(ctx, pgx.TxOptions{
		BeginQuery:  txBridgeSQL(key, cfg.mode, beginSQLOf(cfg.tx)),
		CommitQuery: cfg.tx.CommitQuery,
	})
	if err != nil {
		// The message may have failed after the waiting transaction's
		// COMMIT, with the session-level hold it takes still held: only
		// closing the connection is sure to end it.
		_ = conn.Hijack().Close(context.Background())
		return nil, beginError(ctx, key, err)
	}
	return tx, nil
}

// txWait takes key in a transaction of its own on conn: one try and, if it
// must wait, wait slices, each its own transaction. It returns true when
// that transaction holds key (still open, for txBridgeSQL). Otherwise it
// has ended the transaction and released conn (or left both to a slice
// that ends on its own, when ctx ended), and returns nil when NoWait found
// the key busy, ErrTimeout when the bound passed, or the failure.
func txWait(ctx context.Context, conn *pgxpool.Conn, key Key, cfg config) (got bool, err error) {
	pc := conn.Conn().PgConn()
	w, bound, byDeadline := cfg.waitPlan(ctx)
	end := endOf(bound)
	var (
		dtMs    int64
		canDoPL bool
	)
	err = runTryOn(ctx, conn.Conn(), func(ctx context.Context, _ *pgx.Conn) error { // not interrupted by ctx's end
		results, err := pc.Exec(ctx, txTrySQL(key, cfg.mode)).ReadAll()
		got, err = txReport(results, err, &dtMs, &canDoPL)
		return err
	})
	switch {
	case err == nil && ctx.Err() != nil: // ended during the try: no wait begins, fn would not run
		got, err = false, context.Cause(ctx)
	case err != nil || got || w == waitTry:
	case !canDoPL:
		noteNoSlices(ctx, nil)
		got, err = txWaitOnce(ctx, conn.Conn(), key, cfg.mode, end)
	default:
		var left bool
		got, err = inSlices(ctx, dtMs, end, func(ctx context.Context, ms int64) (bool, error) {
			sql := txWaitSliceSQL(key, cfg.mode, ms)
			got, err := sliceDetached(ctx, func() (bool, error) {
				sctx, cancel := context.WithTimeout(context.Background(), time.Duration(ms)*time.Millisecond+sliceCap+minPingTimeout)
				defer cancel()
				results, err := pc.Exec(sctx, sql).ReadAll()
				return txReport(results, err, nil, nil)
			}, func(bool, error) { endTxWait(conn) })
			left = left || isLeftToEnd(err)
			return got, err
		})
		if left {
			return false, txWaitError(ctx, key, byDeadline, err)
		}
	}
	if got && err == nil {
		return true, nil
	}
	endTxWait(conn)
	switch {
	case err != nil:
		return false, txWaitError(ctx, key, byDeadline, err)
	case w != waitTry:
		return false, &Error{Op: "lock_tx", Key: key, Kind: ErrTimeout, deadline: byDeadline}
	}
	return false, nil
}

// txWaitOnce is DoTx's wait where slices cannot run (no PL/pgSQL): a new
// waiting transaction that waits in one statement, as lockTxOnce.
func txWaitOnce(ctx context.Context, c *pgx.Conn, key Key, m Mode, end time.Time) (bool, error) {
	if _, err := c.PgConn().Exec(ctx, txRestartSQL).ReadAll(); err != nil {
		return false, err
	}
	return lockTxOnce(ctx, c, key, m, end)
}

// txReport reads the last row of a DoTx try or slice message: whether the
// waiting transaction holds the key, and for the try (dtMs and canDoPL not
// nil) the server's deadlock_timeout and, when the try failed, whether
// PL/pgSQL can be used.
func txReport(results []*pgconn.Result, err error, dtMs *int64, canDoPL *bool) (bool, error) {
	if err != nil {
		return false, err
	}
	if len(results) == 0 || len(results[len(results)-1].Rows) != 1 {
		return false, errors.New("a DoTx try or wait slice returned no report")
	}
	row := results[len(results)-1].Rows[0]
	if dtMs != nil {
		if len(row) != 3 {
			return false, errors.New("a DoTx try returned no deadlock_timeout")
		}
		v, err := strconv.ParseInt(string(row[1]), 10, 64)
		if err != nil {
			return false, fmt.Errorf("a DoTx try reported deadlock_timeout %q", row[1])
		}
		*dtMs, *canDoPL = v, string(row[2]) == "t"
	}
	switch v := string(row[0]); v {
	case "t":
		return true, nil
	case "f":
		return false, nil
	default:
		return false, fmt.Errorf("a DoTx try or wait slice reported %q", v)
	}
}

// endTxWait ends DoTx's waiting transaction, and with it a grant that came
// too late, and releases conn; a connection whose transaction cannot be
// ended is closed.
func endTxWait(conn *pgxpool.Conn) {
	ctx, cancel := context.WithTimeout(context.Background(), cleanupTimeout)
	defer cancel()
	pc := conn.Conn().PgConn()
	if pc.TxStatus() != 'I' {
		if _, err := pc.Exec(ctx, rollbackSQL).ReadAll(); err != nil {
			_ = conn.Hijack().Close(ctx)
			return
		}
	}
	conn.Release()
}

// txWaitError is DoTx's error for a wait that failed.
func txWaitError(ctx context.Context, key Key, byDeadline bool, err error) *Error {
	kind := kindOf(err)
	if ctxErr := ctx.Err(); ctxErr != nil {
		if errors.Is(ctxErr, context.DeadlineExceeded) && byDeadline {
			kind = ErrTimeout
		}
	}
	e := keyError("lock_tx", key, kind, err)
	e.deadline = kind == ErrTimeout && byDeadline
	return e
}

// execer runs a statement: a pgx.Tx, or the *pgx.Conn of DoTx's waiting
// transaction.
type execer interface {
	Exec(ctx context.Context, sql string, args ...any) (pgconn.CommandTag, error)
}

// beginError is the error of DoTx when no transaction began: a pool
// connection or the BEGIN failed. A ctx deadline that passed meanwhile (a
// pool exhausted by holders and waiters, say) is a wait that timed out.
func beginError(ctx context.Context, key Key, err error) *Error {
	e := keyError("lock_tx", key, kindOf(err), err)
	if errors.Is(ctx.Err(), context.DeadlineExceeded) {
		e.Kind, e.deadline = ErrTimeout, true
	}
	return e
}

// rollback ends tx, bounded by cleanupTimeout even when ctx has ended.
func rollback(ctx context.Context, tx pgx.Tx) {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), cleanupTimeout)
	defer cancel()
	_ = tx.Rollback(ctx) // fails only if the connection is gone, which ends tx too
}
