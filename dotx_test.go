package advisory

import (
	"context"
	"errors"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgproto3"
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

// wireLog records the protocol messages of a connection
// (pgproto3.Frontend.Trace), the library's own simple-protocol messages
// included, which pgx's tracer does not see.
type wireLog struct {
	mu  sync.Mutex
	buf strings.Builder
}

func (w *wireLog) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.buf.Write(p)
}

// sent is how many times sub occurs in the messages the client sent.
func (w *wireLog) sent(sub string) (n int) {
	w.mu.Lock()
	defer w.mu.Unlock()
	for _, line := range strings.Split(w.buf.String(), "\n") {
		if strings.HasPrefix(line, "F") {
			n += strings.Count(line, sub)
		}
	}
	return n
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

// An uncontended DoTx changes nothing that fn or the host can observe to
// learn its try's outcome: inside fn default_transaction_read_only is the
// connection's (on the server and in pgx's view of its reports), the
// transaction is read-write, the key is held; afterwards the connection is
// back as it was lent. Before, the BEGIN flipped default_transaction_read_only
// for the rest of fn's transaction (SPEC §3 forbids it).
func TestDoTxChangesNothingObservable(t *testing.T) {
	e := newEnv(t)
	var log statementLog
	pool := e.tracedPool(&log)
	other := e.conn()
	key := StringKey("dotx-nothing-observable")
	for i := range 3 { // a pooled connection is reused
		ran, err := DoTx(e.ctx, pool, key, func(ctx context.Context, tx pgx.Tx) error {
			if e.tryFrom(other, key) {
				t.Error("another session took the key while fn ran")
			}
			var ro, dro string
			if err := tx.QueryRow(ctx, "SELECT current_setting('transaction_read_only'), current_setting('default_transaction_read_only')").Scan(&ro, &dro); err != nil {
				return err
			}
			if ro != "off" || dro != "off" {
				t.Errorf("inside fn transaction_read_only = %q, default_transaction_read_only = %q; want off, off", ro, dro)
			}
			if ps := tx.Conn().PgConn().ParameterStatus("default_transaction_read_only"); ps != "off" {
				t.Errorf("inside fn the server reported default_transaction_read_only = %q; want off", ps)
			}
			_, err := tx.Exec(ctx, "CREATE TEMP TABLE dotx_written (i int) ON COMMIT DROP")
			return err
		})
		if err != nil || !ran {
			t.Fatalf("round %d: DoTx = %v, %v", i, ran, err)
		}
		if n := count(log.take(), "default_transaction_read_only"); n != 1 {
			t.Errorf("round %d: DoTx's own statements name default_transaction_read_only (%d statements with fn's)", i, n)
		}
	}
}

// A host whose sessions are read-only by default keeps read-only
// transactions.
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
}

// TxOptions sets fn's transaction's isolation level, access mode and
// deferrable mode, and fn's snapshot is taken after the grant: a waiter
// under REPEATABLE READ or SERIALIZABLE sees the row the previous holder
// committed just before letting the key go.
func TestDoTxTxOptionsSnapshotAfterGrant(t *testing.T) {
	e := newEnv(t)
	pool := e.pool(deadlockTimeout("100ms", 4))
	e.table("dotx_seen",
		"CREATE TABLE dotx_seen (n int)",
	)
	key := StringKey("dotx-snapshot")
	for n, o := range []pgx.TxOptions{
		{IsoLevel: pgx.RepeatableRead},
		{IsoLevel: pgx.Serializable, AccessMode: pgx.ReadOnly, DeferrableMode: pgx.Deferrable},
		{IsoLevel: pgx.ReadCommitted, AccessMode: pgx.ReadOnly},
	} {
		holder, err := pool.Begin(e.ctx)
		must(t, err)
		if ok, err := LockTx(e.ctx, holder, key); err != nil || !ok {
			t.Fatalf("holder's LockTx = %v, %v", ok, err)
		}
		got := make(chan error, 1)
		go func() {
			ran, err := DoTx(e.ctx, pool, key, func(ctx context.Context, tx pgx.Tx) error {
				var iso, ro string
				var seen int
				if err := tx.QueryRow(ctx, `SELECT current_setting('transaction_isolation'), current_setting('transaction_read_only'),
					(SELECT count(*) FROM dotx_seen WHERE n = $1)`, n).Scan(&iso, &ro, &seen); err != nil {
					return err
				}
				if iso != string(o.IsoLevel) || (ro == "on") != (o.AccessMode == pgx.ReadOnly) {
					t.Errorf("%+v: fn's transaction is %s, read only %s", o, iso, ro)
				}
				if seen != 1 {
					t.Errorf("%+v: fn sees %d rows the previous holder committed; want 1", o, seen)
				}
				return nil
			}, TxOptions(o))
			if err == nil && !ran {
				err = errors.New("fn did not run")
			}
			got <- err
		}()
		awaitSlices(e, 2)
		_, err = holder.Exec(e.ctx, "INSERT INTO dotx_seen VALUES ($1)", n)
		must(t, err)
		must(t, holder.Commit(e.ctx))
		if err := <-got; err != nil {
			t.Errorf("%+v: DoTx: %v", o, err)
		}
	}
}

// A holder's CREATE INDEX CONCURRENTLY, on another connection than its
// lock's, while three DoTx wait for the key: the index is built, as each
// DoTx slice is a transaction of its own. Before, every slice of a DoTx
// ran in the one transaction fn would get, which the index waited for to
// its end: the build hung (the cycle runs through the application).
func TestDoTxWaitersLetCreateIndexConcurrentlyFinish(t *testing.T) {
	e := newEnv(t)
	pool := e.pool(func(c *pgxpool.Config) { c.MaxConns = 10 })
	e.table("dotx_cic",
		"CREATE TABLE dotx_cic (id int)",
		"INSERT INTO dotx_cic SELECT generate_series(1, 1000)",
	)
	key := StringKey("dotx-migrations")
	lock := e.acquire(pool, key)
	var wg sync.WaitGroup
	for range 3 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ran, err := DoTx(e.ctx, pool, key, func(ctx context.Context, tx pgx.Tx) error {
				_, err := tx.Exec(ctx, "SELECT count(*) FROM dotx_cic")
				return err
			})
			if err != nil || !ran {
				t.Errorf("waiting DoTx: ran %v, err %v", ran, err)
			}
		}()
	}
	e.awaitWaiters(3)
	const bound = 15 * time.Second // a hang guard: the index takes milliseconds
	cicCtx, cancel := context.WithTimeout(e.ctx, bound)
	_, err := pool.Exec(cicCtx, "CREATE INDEX CONCURRENTLY dotx_cic_id ON dotx_cic (id)")
	cancel()
	if err != nil {
		t.Errorf("CREATE INDEX CONCURRENTLY while three DoTx waited (bound %v): %v", bound, err)
	}
	must(t, lock.Release(e.ctx))
	wg.Wait()
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

	var wire wireLog
	conn, err := pool.Acquire(e.ctx)
	must(t, err)
	conn.Conn().PgConn().Frontend().Trace(&wire, pgproto3.TracerOptions{SuppressTimestamps: true})
	conn.Release()
	ran, err := DoTx(e.ctx, pool, key, func(context.Context, pgx.Tx) error {
		t.Error("fn ran without the lock")
		return nil
	}, NoWait())
	if err != nil || ran {
		t.Fatalf("NoWait DoTx on a held key = %v, %v; want false, nil", ran, err)
	}
	if n := wire.sent("pg_try_advisory"); n != 1 {
		t.Errorf("NoWait DoTx sent %d tries; want 1", n)
	}
	conn, err = pool.Acquire(e.ctx)
	must(t, err)
	conn.Conn().PgConn().Frontend().Untrace()
	if st := conn.Conn().PgConn().TxStatus(); st != 'I' {
		t.Errorf("after a NoWait DoTx on a held key, its connection's transaction status is %c; want I (idle)", st)
	}
	conn.Release()

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
// there, DoTx works, uncontended and after a wait, under REPEATABLE READ:
// its try, its slices and the message that begins fn's transaction each
// stay on one server connection. pgx sees two statements of DoTx's own
// (the BEGIN of fn's transaction and the COMMIT).
func TestDoTxPgBouncer(t *testing.T) {
	e := newEnv(t)
	b := startBouncer(t, 2)
	for _, mode := range []string{"exec", "simple_protocol"} {
		var log statementLog
		pool := e.bouncerPool(b, mode, func(c *pgxpool.Config) {
			c.MaxConns = 1
			c.ConnConfig.Tracer = &log
		})
		for i := range 3 {
			ran, err := DoTx(e.ctx, pool, StringKey("dotx-bouncer"), func(context.Context, pgx.Tx) error { return nil },
				TxOptions(pgx.TxOptions{IsoLevel: pgx.RepeatableRead}))
			if err != nil || !ran {
				t.Fatalf("%s round %d: DoTx = %v, %v", mode, i, ran, err)
			}
			if sql := log.take(); len(sql) != 2 {
				t.Errorf("%s round %d: DoTx sent %d statements; want 2: %q", mode, i, len(sql), sql)
			}
		}
		holder := e.conn()
		key := StringKey("dotx-bouncer")
		_, err := holder.Exec(e.ctx, lockSQL[scopeSession][ModeExclusive][waitForever][key.space-1], key.args()...)
		must(t, err)
		got := make(chan error, 1)
		go func() {
			ran, err := DoTx(e.ctx, pool, key, func(context.Context, pgx.Tx) error { return nil },
				TxOptions(pgx.TxOptions{IsoLevel: pgx.RepeatableRead}))
			if err == nil && !ran {
				err = errors.New("fn did not run")
			}
			got <- err
		}()
		awaitSlices(e, 2)
		_, err = holder.Exec(e.ctx, unlockSQL[ModeExclusive][key.space-1], key.args()...)
		must(t, err)
		if err := <-got; err != nil {
			t.Errorf("%s: a DoTx that waited through PgBouncer: %v", mode, err)
		}
	}
}
