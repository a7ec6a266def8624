package advisory

import (
	"context"
	"strings"
	"sync"
	"testing"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

// statementLog is a pgx tracer that records the statements a pool sends.
type statementLog struct {
	mu  sync.Mutex
	sql []string
}

func (l *statementLog) TraceQueryStart(ctx context.Context, _ *pgx.Conn, d pgx.TraceQueryStartData) context.Context {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.sql = append(l.sql, d.SQL)
	return ctx
}

func (l *statementLog) TraceQueryEnd(context.Context, *pgx.Conn, pgx.TraceQueryEndData) {}

// take returns the statements recorded so far and forgets them.
func (l *statementLog) take() []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	s := l.sql
	l.sql = nil
	return s
}

// count is how many of sql contain sub.
func count(sql []string, sub string) (n int) {
	for _, s := range sql {
		n += strings.Count(s, sub)
	}
	return n
}

// tracedPool is a pool of one connection whose statements log records,
// with mods applied to its config.
func (e *env) tracedPool(log *statementLog, mods ...func(*pgxpool.Config)) *pgxpool.Pool {
	return e.pool(append([]func(*pgxpool.Config){func(c *pgxpool.Config) {
		c.MaxConns = 1
		c.ConnConfig.Tracer = log
	}}, mods...)...)
}

// An uncontended DoTx is two round trips, BEGIN with the try and COMMIT,
// as a session lock's cycle; while fn runs the key is held, the transaction
// is read-write, and afterwards the connection is back as it was lent
// (default_transaction_read_only, which carried the try's outcome, is its
// old value, on the server and in pgx's view). On the code before, DoTx
// sent BEGIN, the try and COMMIT: three.
func TestDoTxTwoRoundTrips(t *testing.T) {
	e := newEnv(t)
	var log statementLog
	pool := e.tracedPool(&log)
	other := e.conn()
	key := StringKey("dotx-two-round-trips")
	for i := range 3 { // a pooled connection is reused: the setting came back each time
		ran, err := DoTx(e.ctx, pool, key, func(ctx context.Context, tx pgx.Tx) error {
			if e.tryFrom(other, key) {
				t.Error("another session took the key while fn ran")
			}
			var ro string
			if err := tx.QueryRow(ctx, "SHOW transaction_read_only").Scan(&ro); err != nil {
				return err
			}
			if ro != "off" {
				t.Errorf("transaction_read_only = %q inside fn; want off", ro)
			}
			_, err := tx.Exec(ctx, "CREATE TEMP TABLE dotx_written (i int) ON COMMIT DROP")
			return err
		})
		if err != nil || !ran {
			t.Fatalf("round %d: DoTx = %v, %v", i, ran, err)
		}
		sql := log.take()
		if len(sql) != 4 { // BEGIN and the try, SHOW, CREATE, COMMIT
			t.Errorf("round %d: DoTx sent %d statements with fn's 2; want 4: %q", i, len(sql), sql)
		}
		if n := count(sql, "pg_try_advisory"); n != 1 {
			t.Errorf("round %d: %d tries; want 1", i, n)
		}
	}
	conn, err := pool.Acquire(e.ctx)
	must(t, err)
	defer conn.Release()
	var dro string
	must(t, conn.QueryRow(e.ctx, "SHOW default_transaction_read_only").Scan(&dro))
	if ps := conn.Conn().PgConn().ParameterStatus("default_transaction_read_only"); dro != "off" || ps != "off" {
		t.Errorf("after DoTx the connection's default_transaction_read_only is %q (pgx's view %q); want off", dro, ps)
	}
}

// A host whose sessions are read-only by default keeps read-only
// transactions: the flip that reports the try's outcome does not change
// the transaction under way.
func TestDoTxReadOnlyHost(t *testing.T) {
	e := newEnv(t)
	var log statementLog
	pool := e.tracedPool(&log, func(c *pgxpool.Config) {
		c.ConnConfig.RuntimeParams["default_transaction_read_only"] = "on"
	})
	ran, err := DoTx(e.ctx, pool, StringKey("dotx-read-only"), func(ctx context.Context, tx pgx.Tx) error {
		var ro string
		if err := tx.QueryRow(ctx, "SHOW transaction_read_only").Scan(&ro); err != nil {
			return err
		}
		if ro != "on" {
			t.Errorf("transaction_read_only = %q inside fn on a read-only host; want on", ro)
		}
		return nil
	})
	if err != nil || !ran {
		t.Fatalf("DoTx = %v, %v", ran, err)
	}
	if sql := log.take(); len(sql) != 3 {
		t.Errorf("DoTx sent %d statements with fn's 1; want 3: %q", len(sql), sql)
	}
}

// A NoWait DoTx on a held key sends one try (with its BEGIN), then asks
// whether it got the key; a waiting one goes on to wait and runs fn once
// the holder lets go.
func TestDoTxContended(t *testing.T) {
	e := newEnv(t)
	var log statementLog
	pool := e.tracedPool(&log)
	holder := e.conn()
	key := StringKey("dotx-contended")
	if !e.tryFrom(holder, key) {
		t.Fatal("key not free")
	}
	_, err := holder.Exec(e.ctx, lockSQL[scopeSession][ModeExclusive][waitTry][key.space-1], key.args()...)
	must(t, err)

	ran, err := DoTx(e.ctx, pool, key, func(context.Context, pgx.Tx) error {
		t.Error("fn ran without the lock")
		return nil
	}, NoWait())
	if err != nil || ran {
		t.Fatalf("NoWait DoTx on a held key = %v, %v; want false, nil", ran, err)
	}
	sql := log.take()
	if n := count(sql, "pg_try_advisory"); n != 1 {
		t.Errorf("NoWait DoTx sent %d tries; want 1: %q", n, sql)
	}

	done := make(chan error, 1)
	go func() {
		ran, err := DoTx(e.ctx, pool, key, func(ctx context.Context, tx pgx.Tx) error {
			_, err := tx.Exec(ctx, "SELECT 1")
			return err
		})
		if err == nil && !ran {
			err = errorf("DoTx returned without running fn")
		}
		done <- err
	}()
	e.awaitWaiters(1)
	_, err = holder.Exec(e.ctx, unlockSQL[ModeExclusive][key.space-1], key.args()...)
	must(t, err)
	must(t, <-done)
}

// Through PgBouncer in transaction mode, in both exec modes that work
// there, an uncontended DoTx is two round trips too: PgBouncer passes the
// setting's report on.
func TestDoTxPgBouncerTwoRoundTrips(t *testing.T) {
	e := newEnv(t)
	b := startBouncer(t, 2)
	for _, mode := range []string{"exec", "simple_protocol"} {
		var log statementLog
		pool := e.bouncerPool(b, mode, func(c *pgxpool.Config) {
			c.MaxConns = 1
			c.ConnConfig.Tracer = &log
		})
		for i := range 3 {
			ran, err := DoTx(e.ctx, pool, StringKey("dotx-bouncer"), func(context.Context, pgx.Tx) error { return nil })
			if err != nil || !ran {
				t.Fatalf("%s round %d: DoTx = %v, %v", mode, i, ran, err)
			}
			if sql := log.take(); len(sql) != 2 {
				t.Errorf("%s round %d: DoTx sent %d statements; want 2: %q", mode, i, len(sql), sql)
			}
		}
	}
}
