package advisory

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
)

// LockTx holds until commit or rollback; the try form; a finished or nil
// transaction is an error; a bounded wait leaves the transaction's
// lock_timeout as it was.
func TestLockTx(t *testing.T) {
	e := newEnv(t)
	pool := e.pool()
	other := e.conn()
	key := Int64Key(11)

	for _, end := range []func(pgx.Tx) error{
		func(tx pgx.Tx) error { return tx.Commit(e.ctx) },
		func(tx pgx.Tx) error { return tx.Rollback(e.ctx) },
	} {
		tx, err := pool.Begin(e.ctx)
		must(t, err)
		ok, err := LockTx(e.ctx, tx, key)
		if err != nil || !ok {
			t.Fatalf("LockTx = %v, %v", ok, err)
		}
		if rows := e.lockRows(key); len(rows) != 1 || !rows[0].Granted {
			t.Errorf("server rows = %+v", rows)
		}
		if e.tryFrom(other, key) {
			t.Error("key free while the transaction holds it")
		}
		must(t, end(tx))
		if !e.tryFrom(other, key) {
			t.Error("key still held after the transaction ended")
		}
		if ok, err := LockTx(e.ctx, tx, key); ok || !errors.Is(err, pgx.ErrTxClosed) {
			t.Errorf("LockTx on a finished transaction = %v, %v; want pgx.ErrTxClosed", ok, err)
		}
	}
	if _, err := LockTx(e.ctx, nil, key); err == nil {
		t.Error("LockTx(nil tx) succeeded")
	}

	// The try form, and a bounded wait, against a holder.
	if _, err := other.Exec(e.ctx, "SELECT pg_advisory_lock(11)"); err != nil {
		t.Fatal(err)
	}
	tx, err := pool.Begin(e.ctx)
	must(t, err)
	if ok, err := LockTx(e.ctx, tx, key, NoWait()); ok || err != nil {
		t.Errorf("LockTx(NoWait) on a busy key = %v, %v; want false, nil", ok, err)
	}
	if ok, err := LockTx(e.ctx, tx, key, NoWait(), Shared()); ok || err != nil {
		t.Errorf("LockTx(NoWait, Shared) on a busy key = %v, %v; want false, nil", ok, err)
	}
	if _, err := tx.Exec(e.ctx, "SET LOCAL lock_timeout = '7s'"); err != nil {
		t.Fatal(err)
	}
	if ok, err := LockTx(e.ctx, tx, Int64Key(12), WaitTimeout(time.Second)); !ok || err != nil {
		t.Errorf("bounded LockTx on a free key = %v, %v", ok, err)
	}
	var lockTimeout string
	must(t, tx.QueryRow(e.ctx, "SHOW lock_timeout").Scan(&lockTimeout))
	if lockTimeout != "7s" {
		t.Errorf("the transaction's lock_timeout became %q; want 7s kept", lockTimeout)
	}
	if _, err := LockTx(e.ctx, tx, key, WaitTimeout(10*time.Millisecond)); !errors.Is(err, ErrTimeout) {
		t.Errorf("bounded LockTx on a busy key = %v; want ErrTimeout", err)
	}
	must(t, tx.Rollback(e.ctx))

	ctx, cancel := context.WithTimeout(e.ctx, 20*time.Millisecond)
	tx, err = pool.Begin(e.ctx)
	must(t, err)
	_, err = LockTx(ctx, tx, key)
	cancel()
	if !errors.Is(err, ErrTimeout) || !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("LockTx at the ctx deadline = %v; want ErrTimeout and DeadlineExceeded", err)
	}
	must(t, tx.Rollback(e.ctx)) // the connection survived the timeout
	if _, err := other.Exec(e.ctx, "SELECT pg_advisory_unlock(11)"); err != nil {
		t.Fatal(err)
	}
}

// DoTx commits fn's work under the lock; rolls back on error, on panic and
// when the lock is not acquired.
func TestDoTx(t *testing.T) {
	e := newEnv(t)
	pool := e.pool()
	other := e.conn()
	key := StringKey("dotx")
	if _, err := other.Exec(e.ctx, "CREATE TABLE IF NOT EXISTS dotx (v int)"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { other.Exec(context.Background(), "DROP TABLE dotx") })
	count := func() int {
		var n int
		must(t, other.QueryRow(e.ctx, "SELECT count(*) FROM dotx").Scan(&n))
		return n
	}
	insert := func(ctx context.Context, tx pgx.Tx) error {
		if e.tryFrom(other, key) {
			t.Error("fn runs without the lock")
		}
		_, err := tx.Exec(ctx, "INSERT INTO dotx VALUES (1)")
		return err
	}

	ok, err := DoTx(e.ctx, pool, key, insert)
	if !ok || err != nil || count() != 1 {
		t.Fatalf("DoTx = %v, %v, rows %d; want true, nil, 1", ok, err, count())
	}
	if !e.tryFrom(other, key) {
		t.Error("key held after DoTx committed")
	}

	fnErr := errors.New("fn failed")
	ok, err = DoTx(e.ctx, pool, key, func(ctx context.Context, tx pgx.Tx) error {
		must(t, insert(ctx, tx))
		return fnErr
	})
	if !ok || !errors.Is(err, fnErr) || count() != 1 {
		t.Errorf("DoTx with failing fn = %v, %v, rows %d; want true, fn's error, 1 (rolled back)", ok, err, count())
	}

	func() {
		defer func() {
			if r := recover(); r != "boom" {
				t.Errorf("recovered %v; want the panic to go on", r)
			}
		}()
		_, _ = DoTx(e.ctx, pool, key, func(ctx context.Context, tx pgx.Tx) error {
			must(t, insert(ctx, tx))
			panic("boom")
		})
	}()
	if count() != 1 || !e.tryFrom(other, key) {
		t.Errorf("after a panic: rows %d (want 1), or key still held", count())
	}

	if _, err := other.Exec(e.ctx, "SELECT pg_advisory_lock($1)", mustInt64(key)); err != nil {
		t.Fatal(err)
	}
	ran := false
	ok, err = DoTx(e.ctx, pool, key, func(context.Context, pgx.Tx) error { ran = true; return nil }, NoWait())
	if ok || ran || err != nil {
		t.Errorf("DoTx(NoWait) on a busy key = %v, ran %v, %v", ok, ran, err)
	}
	if _, err := other.Exec(e.ctx, "SELECT pg_advisory_unlock($1)", mustInt64(key)); err != nil {
		t.Fatal(err)
	}
}
