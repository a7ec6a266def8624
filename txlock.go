package advisory

import (
	"context"
	"errors"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

// txDeadlineGrace is how long past ctx's deadline a bounded LockTx lets its
// statement run, so that the server's lock_timeout (set to the deadline)
// ends the wait and pgx does not close the transaction's connection.
const txDeadlineGrace = 500 * time.Millisecond

// LockTx takes key for the rest of transaction tx, with
// pg_advisory_xact_lock (or its _shared and try forms): the lock ends when
// tx commits or rolls back, and cannot be released earlier. Options:
// Shared, NoWait, WaitTimeout. It returns false with a nil error when NoWait
// found the key held elsewhere.
//
// Transaction locks work through PgBouncer in transaction pooling mode;
// session locks (Acquire, Session) do not.
//
// Like any failed statement, a failed wait (ErrTimeout, ErrDeadlock,
// ErrTooManyLocks) aborts tx: roll it back. A try (NoWait) never does. A
// cancelled ctx is handled as pgx handles it for any statement (by default
// the connection is closed, ending tx). A nil, committed or rolled-back tx
// is an error. The lock_timeout of a bounded wait is set for the one
// statement and then restored, so tx's own lock_timeout is unchanged.
func LockTx(ctx context.Context, tx pgx.Tx, key Key, opts ...Option) (bool, error) {
	cfg, err := newConfig(opts)
	if err != nil {
		return false, err
	}
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
	sql, args := lockStatement(scopeTx, cfg.mode, w, key, bound)
	stmtCtx := ctx
	if byDeadline {
		var cancel context.CancelFunc
		stmtCtx, cancel = pastDeadline(ctx, txDeadlineGrace)
		defer cancel()
	}
	got := true
	if w == waitTry {
		err = tx.QueryRow(stmtCtx, sql, args...).Scan(&got)
	} else {
		_, err = tx.Exec(stmtCtx, sql, args...)
	}
	if err == nil {
		return got, nil
	}
	kind := kindOf(err)
	if kind == nil && byDeadline && errors.Is(ctx.Err(), context.DeadlineExceeded) {
		kind = ErrTimeout
	}
	e := keyError("lock_tx", key, kind, err)
	e.deadline = kind == ErrTimeout && byDeadline
	return false, e
}

// pastDeadline returns a context that is cancelled when ctx is cancelled,
// but that outlives ctx's deadline by grace.
func pastDeadline(ctx context.Context, grace time.Duration) (context.Context, context.CancelFunc) {
	d, _ := ctx.Deadline()
	c, cancel := context.WithDeadline(context.WithoutCancel(ctx), d.Add(grace))
	stop := context.AfterFunc(ctx, func() {
		if !errors.Is(ctx.Err(), context.DeadlineExceeded) {
			cancel()
		}
	})
	return c, func() { stop(); cancel() }
}

// DoTx runs fn in a transaction that holds key: it begins a transaction on
// pool, takes key with LockTx (options as LockTx), runs fn, and commits. fn
// runs only if the lock was acquired; acquired reports whether it ran. The
// transaction is rolled back when the lock is not acquired, when fn returns
// an error (returned as is), and when fn panics (the panic goes on). The
// lock ends with the transaction.
func DoTx(ctx context.Context, pool *pgxpool.Pool, key Key, fn func(context.Context, pgx.Tx) error, opts ...Option) (acquired bool, err error) {
	if pool == nil {
		return false, errorf("lock_tx %s: nil *pgxpool.Pool", key)
	}
	if !key.Valid() {
		return false, invalidKey("lock_tx")
	}
	tx, err := pool.Begin(ctx)
	if err != nil {
		return false, keyError("lock_tx", key, kindOf(err), err)
	}
	committed := false
	defer func() {
		if !committed {
			rollbackCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), cleanupTimeout)
			defer cancel()
			_ = tx.Rollback(rollbackCtx) // fails only if the connection is gone, which ends tx too
		}
	}()
	if acquired, err = LockTx(ctx, tx, key, opts...); err != nil || !acquired {
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
