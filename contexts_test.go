package advisory

import (
	"context"
	"errors"
	"net"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgconn/ctxwatch"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/seed0ad592b7/advisory/internal/pgtest"
)

// How contexts end calls: a cancelled context still unlocks, a statement's
// own context ends only that statement, the pool's context handler never
// delays the library, and a deadline or statement_timeout is a timed-out
// wait. Each test failed on the code before its fix.

// notHung bounds a wait that must end, so that a broken promise fails the
// test instead of hanging it. It is far above every bound the library
// promises (the longest is cleanupTimeout, 5 s); the times are logged.
const notHung = 20 * time.Second

// cancelHandler makes a pool's connections end a cancelled statement with
// a cancel request, setting the socket deadline only delay later. With a
// long delay, any I/O the library leaves to the pool's context handler
// waits that long.
func cancelHandler(delay time.Duration) func(*pgxpool.Config) {
	return func(c *pgxpool.Config) {
		c.ConnConfig.BuildContextWatcherHandler = func(pg *pgconn.PgConn) ctxwatch.Handler {
			return &pgconn.CancelRequestContextWatcherHandler{Conn: pg, DeadlineDelay: delay}
		}
	}
}

// cutPool returns a pool whose connections go through a pgtest.Proxy, with
// mods applied. When the test ends, before the end checks, it waits (up to
// pgconn's own 15 s) for pgconn to finish closing the pool's connections
// that were closed under a statement: pgconn then sends a cancel request
// and drains the socket in a goroutine of its own (asyncClose), which the
// goroutine check would otherwise find still running on a loaded machine.
func (e *env) cutPool(mods ...func(*pgxpool.Config)) (*pgtest.Proxy, *pgxpool.Pool) {
	proxy := newCutProxy(e.t, net.JoinHostPort(server.Host, strconv.Itoa(server.Port)))
	var (
		mu    sync.Mutex
		conns []*pgconn.PgConn
	)
	pool := e.pool(append(mods, func(c *pgxpool.Config) {
		c.ConnConfig.Host = "127.0.0.1"
		c.ConnConfig.Port = proxy.Port()
		after := c.AfterConnect
		c.AfterConnect = func(ctx context.Context, conn *pgx.Conn) error {
			mu.Lock()
			conns = append(conns, conn.PgConn())
			mu.Unlock()
			if after != nil {
				return after(ctx, conn)
			}
			return nil
		}
	})...)
	e.t.Cleanup(func() {
		mu.Lock()
		defer mu.Unlock()
		for _, c := range conns {
			if !c.IsClosed() {
				continue // the pool closes it after this
			}
			select {
			case <-c.CleanupDone():
			case <-time.After(20 * time.Second):
				e.t.Errorf("pgconn had not finished closing a connection after 20 s")
				return
			}
		}
	})
	return proxy, pool
}

// canceled returns a context that has already ended.
func canceled(parent context.Context) context.Context {
	ctx, cancel := context.WithCancel(parent)
	cancel()
	return ctx
}

// Unlock and UnlockMany with an already-cancelled context still
// unlock (defer s.Unlock(ctx, k) after a cancellation must not leak).
func TestUnlockCancelledContext(t *testing.T) {
	e := newEnv(t)
	pool := e.pool()
	other := e.conn()
	s, err := NewSession(e.ctx, pool)
	must(t, err)
	defer s.Close(e.ctx)
	a, b, c := Int64Key(1001), PairKey(10, 2), StringKey("unlock-cancelled")
	ok, err := s.LockMany(e.ctx, []Key{a, b, c})
	must(t, err)
	if !ok {
		t.Fatal("LockMany returned false")
	}
	if err := s.Unlock(canceled(e.ctx), a); err != nil {
		t.Errorf("Unlock with a cancelled context: %v; want nil", err)
	}
	if err := s.UnlockMany(canceled(e.ctx), []Key{b, c}); err != nil {
		t.Errorf("UnlockMany with a cancelled context: %v; want nil", err)
	}
	if held := s.Held(); len(held) != 0 {
		t.Errorf("Held after the unlocks: %v", held)
	}
	for _, k := range []Key{a, b, c} {
		if !e.tryFrom(other, k) {
			t.Errorf("%s still held on the server after an unlock with a cancelled context", k)
		}
	}
}

// A fenced statement whose own context ends is cancelled (57014)
// and the lock and its connection survive.
func TestExecContextEndsKeepsLock(t *testing.T) {
	e := newEnv(t)
	pool := e.pool()
	key := StringKey("exec-timeout")
	lock := e.acquire(pool, key)
	defer lock.Release(e.ctx)
	pid := lockPID(t, e.ctx, lock)

	ctx, cancel := context.WithTimeout(e.ctx, 100*time.Millisecond)
	defer cancel()
	_, err := lock.Exec(ctx, "SELECT pg_sleep(30)")
	if sqlState(err) != codeQueryCanceled || !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("Exec whose context timed out: %v; want a 57014 matching context.DeadlineExceeded", err)
	}
	if errors.Is(err, ErrLockLost) || lock.Err() != nil {
		t.Fatalf("the lock was lost: Exec %v, Err %v", err, lock.Err())
	}
	select {
	case <-lock.Done():
		t.Fatal("Done closed after a fenced statement's context ended")
	default:
	}
	if _, err := lock.Exec(e.ctx, "SELECT 1"); err != nil {
		t.Errorf("fenced statement after the cancelled one: %v", err)
	}
	if rows := e.lockRows(key); len(rows) != 1 || rows[0].PID != pid || !rows[0].Granted {
		t.Errorf("server rows for %s: %+v; want granted to the same backend %d", key, rows, pid)
	}
	must(t, lock.Release(e.ctx))
}

// awaitWatching waits until s's health watcher watches the socket: it has
// set up its readiness and the registration is armed.
func awaitWatching(t *testing.T, s *Session) {
	t.Helper()
	pgtest.Await(t, "the health watcher watching the socket", notHung, func() (bool, error) {
		s.turn <- struct{}{} // the turn guards ready; taken raw, so as not to disarm it
		defer func() { <-s.turn }()
		return s.ready.Load() != nil && s.ready.Load().armed, nil
	})
}

// With a pool whose context handler sends a cancel request and
// sets the socket deadline only later, a caller while the watcher watches
// does not wait for that delay. (The watcher then sat in a read that the
// caller ended; now it waits holding nothing, TestWatcherWaitsWithoutTheTurn.)
func TestWatcherIgnoresPoolContextHandler(t *testing.T) {
	e := newEnv(t)
	pool := e.pool(cancelHandler(time.Minute))
	lock, err := Acquire(e.ctx, pool, StringKey("watcher-handler"))
	must(t, err)
	defer lock.Release(e.ctx)
	for range 3 {
		awaitWatching(t, lock.s)
		ctx, cancel := context.WithTimeout(e.ctx, notHung)
		start := time.Now()
		_, err := lock.Exec(ctx, "SELECT 1")
		cancel()
		if err != nil {
			t.Fatalf("a fenced statement while the watcher watches: %v (after %v)", err, time.Since(start))
		}
		t.Logf("a fenced statement while the watcher watches took %v", time.Since(start))
	}
	must(t, lock.Release(e.ctx))
}

// A ctx deadline that passes while waiting for a connection from
// an exhausted pool is a timed-out wait: ErrTimeout and
// context.DeadlineExceeded, for Acquire, NewSession and DoTx (DoTx's error
// matched only context.DeadlineExceeded before).
func TestPoolExhaustedDeadlineIsTimeout(t *testing.T) {
	e := newEnv(t)
	pool := e.pool(func(c *pgxpool.Config) { c.MaxConns = 1 })
	held, err := Acquire(e.ctx, pool, Int64Key(71))
	must(t, err)
	defer held.Release(e.ctx)
	ctx, cancel := context.WithTimeout(e.ctx, 50*time.Millisecond)
	defer cancel()
	lock, err := Acquire(ctx, pool, Int64Key(72))
	if lock != nil || !errors.Is(err, ErrTimeout) || !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("Acquire from an exhausted pool past its deadline: %v; want ErrTimeout and context.DeadlineExceeded", err)
	}
	_, err = NewSession(ctx, pool)
	if !errors.Is(err, ErrTimeout) {
		t.Errorf("NewSession from an exhausted pool past its deadline: %v; want ErrTimeout", err)
	}
	ctx, cancel = context.WithTimeout(e.ctx, 50*time.Millisecond) // a wait on the pool, not a ctx already ended
	defer cancel()
	ran, err := DoTx(ctx, pool, Int64Key(73), func(context.Context, pgx.Tx) error {
		t.Error("fn ran")
		return nil
	})
	if ran || !errors.Is(err, ErrTimeout) || !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("DoTx from an exhausted pool past its deadline = %v, %v; want ErrTimeout and context.DeadlineExceeded", ran, err)
	}
	must(t, held.Release(e.ctx))
}

// Suspected: a wait ended by the server's statement_timeout is a timed-out
// wait (ErrTimeout, the 57014 reachable), not a bare server error.
func TestStatementTimeoutIsTimeout(t *testing.T) {
	e := newEnv(t)
	pool := e.pool(func(c *pgxpool.Config) { c.ConnConfig.RuntimeParams["statement_timeout"] = "200" })
	other := e.conn()
	key := StringKey("statement-timeout")
	if !e.tryFromKeep(other, key) {
		t.Fatal("could not take the key")
	}
	lock, err := Acquire(e.ctx, pool, key)
	var pgErr *pgconn.PgError
	if lock != nil || !errors.Is(err, ErrTimeout) || !errors.As(err, &pgErr) || pgErr.Code != codeQueryCanceled {
		t.Errorf("Acquire ended by statement_timeout: %v; want ErrTimeout with the 57014 reachable", err)
	}
	t.Logf("the error: %v", err)
	s, err := NewSession(e.ctx, pool)
	must(t, err)
	_, err = s.LockMany(e.ctx, []Key{Int64Key(3), key})
	if !errors.Is(err, ErrTimeout) {
		t.Errorf("LockMany ended by statement_timeout: %v; want ErrTimeout", err)
	}
	must(t, s.Close(e.ctx))
	if _, err := other.Exec(e.ctx, "SELECT pg_advisory_unlock_all()"); err != nil {
		t.Fatal(err)
	}
}
