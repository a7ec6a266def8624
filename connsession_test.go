package advisory

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
)

// A Session on a connection the caller owns waits in slices like any
// Session, holds the key on that very backend (so the caller's statements
// run under it), and at Close releases it, resets the keep-alives and
// leaves the connection open and usable to its owner.
func TestConnSessionLocksOnCallersConn(t *testing.T) {
	e := newEnv(t)
	key := StringKey("conn-session")
	owned := e.conn()
	lent := showKeepalives(t, e.ctx, owned)

	holder := e.conn()
	must(t, holder.QueryRow(e.ctx, "SELECT pg_advisory_lock($1)", mustInt64(key)).Scan(nil))
	s, err := NewConnSession(owned)
	must(t, err)
	got := make(chan error, 1)
	go func() {
		ok, err := s.Lock(e.ctx, key)
		if err == nil && !ok {
			err = errors.New("Lock returned false without NoWait")
		}
		got <- err
	}()
	e.awaitWaiters(1)
	if pid := e.waiterPID(key); pid != owned.PgConn().PID() {
		t.Fatalf("the waiter is backend %d; want the owner's connection, backend %d", pid, owned.PgConn().PID())
	}
	must(t, holder.QueryRow(e.ctx, "SELECT pg_advisory_unlock($1)", mustInt64(key)).Scan(nil))
	must(t, <-got)
	rows := e.lockRows(key)
	if len(rows) != 1 || !rows[0].Granted || rows[0].PID != owned.PgConn().PID() {
		t.Fatalf("pg_locks rows of %s = %+v; want one granted to the owner's backend %d", key, rows, owned.PgConn().PID())
	}
	if ka := showKeepalives(t, e.ctx, owned); ka == lent {
		t.Errorf("keep-alives while held = %v; want the lock's, not the connection's own", ka)
	}
	must(t, s.Close(e.ctx))
	if owned.IsClosed() {
		t.Fatal("Close of a clean session closed the owner's connection")
	}
	if ka := showKeepalives(t, e.ctx, owned); ka != lent {
		t.Errorf("keep-alives after Close = %v; want the connection's own %v", ka, lent)
	}
	if rows := e.lockRows(key); len(rows) != 0 {
		t.Errorf("pg_locks rows of %s after Close = %+v; want none", key, rows)
	}
}

// A lock lost while its owner used the connection, found by the owner's
// own statement (which closed the connection), is reported by Close as
// ErrLockLost: the session has no watcher, so nothing else saw it.
func TestConnSessionLostUnderOwner(t *testing.T) {
	e := newEnv(t)
	key := StringKey("conn-session-lost")
	for _, ownerSaw := range []bool{true, false} {
		owned, err := pgx.Connect(e.ctx, e.dsn)
		must(t, err)
		s, err := NewConnSession(owned)
		must(t, err)
		if ok, err := s.Lock(e.ctx, key); err != nil || !ok {
			t.Fatalf("Lock = %v, %v", ok, err)
		}
		e.terminate(owned.PgConn().PID())
		if ownerSaw {
			if _, err := owned.Exec(e.ctx, "SELECT 1"); err == nil {
				t.Fatal("a statement on a terminated backend succeeded")
			}
			if !owned.IsClosed() {
				t.Fatal("pgx did not close the connection whose backend was terminated")
			}
		}
		err = s.Close(e.ctx)
		if !errors.Is(err, ErrLockLost) {
			t.Errorf("owner saw the loss %v: Close = %v; want ErrLockLost", ownerSaw, err)
		}
		if !errors.Is(s.Err(), ErrLockLost) {
			t.Errorf("owner saw the loss %v: Err = %v; want ErrLockLost", ownerSaw, s.Err())
		}
		if !owned.IsClosed() {
			t.Errorf("owner saw the loss %v: the connection of a lost session is still open", ownerSaw)
			owned.Close(e.ctx)
		}
	}
}

// A connection that cannot take a session's locks is refused.
func TestConnSessionRefuses(t *testing.T) {
	e := newEnv(t)
	if _, err := NewConnSession(nil); err == nil {
		t.Error("NewConnSession(nil) succeeded")
	}
	c := e.conn()
	tx, err := c.Begin(e.ctx)
	must(t, err)
	if _, err := NewConnSession(c); err == nil {
		t.Error("NewConnSession of a connection inside a transaction succeeded")
	}
	must(t, tx.Rollback(e.ctx))
	if _, err := NewConnSession(c, HealthInterval(-1)); err == nil {
		t.Error("NewConnSession with an invalid option succeeded")
	}
	closed, err := pgx.Connect(e.ctx, e.dsn)
	must(t, err)
	must(t, closed.Close(e.ctx))
	if _, err := NewConnSession(closed); !errors.Is(err, ErrClosed) {
		t.Errorf("NewConnSession of a closed connection = %v; want ErrClosed", err)
	}
}

// The body of Do, DoSemaphore and Lead finds its Lock in its context
// (nil elsewhere); a fenced write made after the lock was lost never lands,
// whether the loss came before the statement or during it.
func TestFencedBody(t *testing.T) {
	e := newEnv(t)
	pool := e.pool()
	if l := LockFromContext(e.ctx); l != nil {
		t.Fatalf("LockFromContext outside a body = %v; want nil", l)
	}
	_, err := e.adminConn().Exec(e.ctx, "CREATE TABLE fenced_body (n int)")
	must(t, err)
	defer func() { _, _ = e.adminConn().Exec(e.ctx, "DROP TABLE fenced_body") }()
	key := StringKey("fenced-body")

	for _, during := range []bool{false, true} {
		ran, err := Do(e.ctx, pool, key, func(ctx context.Context) error {
			l := LockFromContext(ctx)
			if l == nil || l.Key() != key {
				t.Fatalf("LockFromContext in Do's body = %v; want the lock on %s", l, key)
			}
			if _, err := l.Exec(ctx, "INSERT INTO fenced_body VALUES (1)"); err != nil {
				return err
			}
			pid := e.lockRows(key)[0].PID
			if !during {
				e.terminate(pid)
				<-ctx.Done() // the loss is noticed: the body's context ends
				_, err := l.Exec(context.WithoutCancel(ctx), "INSERT INTO fenced_body VALUES (2)")
				return err
			}
			werr := make(chan error, 1)
			go func() {
				_, err := l.Exec(context.WithoutCancel(ctx), "SELECT pg_sleep(30); INSERT INTO fenced_body VALUES (3)")
				werr <- err
			}()
			e.eventually("the fenced statement running", func(c *pgx.Conn) (bool, error) {
				var n int
				err := c.QueryRow(e.ctx, "SELECT count(*) FROM pg_stat_activity WHERE pid = $1 AND query LIKE 'SELECT pg_sleep(30)%' AND state = 'active'", int64(pid)).Scan(&n)
				return n == 1, err
			})
			e.terminate(pid)
			return <-werr
		}, HealthInterval(50*time.Millisecond))
		if !ran || !errors.Is(err, ErrLockLost) {
			t.Errorf("during %v: Do = %v, %v; want true and ErrLockLost", during, ran, err)
		}
		var rows []int
		r, qerr := e.adminConn().Query(e.ctx, "SELECT n FROM fenced_body ORDER BY n")
		must(t, qerr)
		rows, qerr = pgx.CollectRows(r, pgx.RowTo[int])
		must(t, qerr)
		if len(rows) != 1 || rows[0] != 1 {
			t.Errorf("during %v: rows landed = %v; want only [1], the write made while the lock was held", during, rows)
		}
		_, qerr = e.adminConn().Exec(e.ctx, "TRUNCATE fenced_body")
		must(t, qerr)
	}

	ran, err := DoSemaphore(e.ctx, pool, key, 2, func(ctx context.Context) error {
		l := LockFromContext(ctx)
		if l == nil || l.Key() == key {
			t.Errorf("LockFromContext in DoSemaphore's body = %v; want the slot's lock", l)
			return nil
		}
		_, err := l.Exec(ctx, "INSERT INTO fenced_body VALUES (4)")
		return err
	})
	if !ran || err != nil {
		t.Errorf("DoSemaphore = %v, %v", ran, err)
	}
	stop := errors.New("led once")
	err = Lead(e.ctx, pool, key, func(ctx context.Context) error {
		l := LockFromContext(ctx)
		if l == nil || l.Key() != key {
			t.Errorf("LockFromContext in Lead's body = %v; want the lock on %s", l, key)
			return stop
		}
		_, err := l.Exec(ctx, "INSERT INTO fenced_body VALUES (5)")
		return errors.Join(stop, err)
	})
	if !errors.Is(err, stop) {
		t.Errorf("Lead = %v; want its body's error", err)
	}
	var n int
	must(t, e.adminConn().QueryRow(e.ctx, "SELECT count(*) FROM fenced_body WHERE n IN (4, 5)").Scan(&n))
	if n != 2 {
		t.Errorf("fenced writes of DoSemaphore's and Lead's bodies landed: %d; want 2", n)
	}
}
