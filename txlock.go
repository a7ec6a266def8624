package advisory

import (
	"context"
	"errors"
	"time"

	"github.com/jackc/pgx/v5"
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
// leaves tx usable, and tx's own lock_timeout is unchanged. When tx's
// session already holds an advisory lock (an earlier LockTx in tx, say), the
// wait is instead one server-side wait, which PostgreSQL's deadlock detector
// sees (ErrDeadlock) and which holds a snapshot while it lasts; a bound it
// reaches then fails with ErrTimeout and aborts tx, as any failed statement
// does. Other failures
// (ErrTooManyLocks, a server error) abort tx, as any failed statement does:
// roll it back. A cancelled ctx is handled as pgx handles it for any
// statement (by default the connection is closed, ending tx); a ctx
// deadline is the wait's bound. A nil, committed or rolled-back tx is an
// error.
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
		dtMs     int64
		holdsAny *bool
	)
	if err := tx.QueryRow(ctx, txFirstTrySQL[m][key.space-1], key.args()...).Scan(&got, &dtMs, &holdsAny); err != nil || got || w == waitTry {
		return got, err
	}
	if holdsAny != nil && *holdsAny {
		return lockTxOnce(ctx, tx, key, m, end)
	}
	return inSlices(ctx, dtMs, end, func(ctx context.Context, ms int64) (bool, error) {
		return sliceReport(tx.Conn().PgConn().Exec(ctx, txSliceSQL(key, m, ms)).ReadAll())
	})
}

// lockTxOnce waits for key in one server-side wait, under lock_timeout
// until end if there is one. A wait that reaches end fails with 55P03 and,
// as any failed statement, aborts the transaction.
func lockTxOnce(ctx context.Context, tx pgx.Tx, key Key, m Mode, end time.Time) (bool, error) {
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

// DoTx runs fn in a transaction that holds key: it begins a transaction on
// a connection of pool, takes key in it as LockTx does (options as LockTx),
// runs fn, and commits. fn runs only if the lock was acquired; acquired
// reports whether it ran. The transaction is rolled back when the lock is
// not acquired, when fn returns an error (returned as is), and when fn
// panics (the panic goes on). The lock ends with the transaction.
//
// An uncontended DoTx is two round trips, as a session lock's cycle: the
// BEGIN carries the first try, and the COMMIT ends the
// lock. A contended one goes on as LockTx.
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
	// Released after the rollback below; a connection left in a failed
	// transaction (a BEGIN whose try failed with an error) is destroyed by
	// the pool rather than reused.
	defer conn.Release()
	tx, acquired, err := beginLocked(waitCtx, conn.Conn(), key, cfg)
	w.end(waitCtx, acquired, err)
	if tx == nil {
		return false, err
	}
	committed := false
	defer func() {
		if !committed {
			rollback(ctx, tx)
		}
	}()
	if err != nil || !acquired {
		return acquired, err
	}
	if err := fn(ctx, tx); err != nil {
		return true, err
	}
	committed = true
	if err := tx.Commit(ctx); err != nil {
		return true, keyError("commit", key, nil, err)
	}
	return true, nil
}

// beginLocked begins a transaction on c and takes key in it, as LockTx
// does. When the server reports beginTrySignal, the BEGIN carries the first
// try (beginTrySQL), and a reported change of the setting means the try got
// the key: one round trip. Otherwise (the try did not get the key, or its
// flip was not reported) it goes on as LockTx: a NoWait asks pg_locks
// whether the BEGIN's try got the key (heldSQL: a NoWait sends one try), a
// wait starts with LockTx's first try. On a server that does not report the
// setting (before PostgreSQL 14) the BEGIN is plain and LockTx follows.
// tx is nil when no transaction began; err is then the failure of BEGIN.
func beginLocked(ctx context.Context, c *pgx.Conn, key Key, cfg config) (tx pgx.Tx, got bool, err error) {
	pc := c.PgConn()
	seen := pc.ParameterStatus(beginTrySignal)
	var opts pgx.TxOptions
	if seen == "on" || seen == "off" {
		opts.BeginQuery = txBeginTrySQL(key, cfg.mode, seen)
	}
	if tx, err = c.BeginTx(ctx, opts); err != nil {
		return nil, false, beginError(ctx, key, err)
	}
	switch {
	case opts.BeginQuery == "":
	case pc.ParameterStatus(beginTrySignal) != seen:
		return tx, true, nil
	case cfg.noWait:
		classid, objid, objsubid := key.LockRow()
		if err := tx.QueryRow(ctx, heldSQL, int64(classid), int64(objid), objsubid, cfg.mode.lockMode()).Scan(&got); err != nil {
			return tx, false, keyError("lock_tx", key, kindOf(err), err)
		}
		return tx, got, nil
	}
	got, err = lockTxCall(ctx, tx, key, cfg)
	return tx, got, err
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
