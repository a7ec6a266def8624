package advisory

import (
	"context"
	"encoding/binary"
	"errors"
	"net"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

// The keep-alive paths that keepalive_test.go does not reach
// (its checks use WithConn, which sets rawUsed, so every session it ends
// goes through unlock_all), and an interrupt that reaches the server
// before the statement it is for.

// Every way a session ends without WithConn gives the pool its connection
// back with the keep-alives it was lent with: a Lock's Release (the one-key
// statement), a Session that unlocked everything, LockMany alone, both
// modes, shared only, a semaphore slot, TTL, ReleaseAll. Pins the edges.
func TestKeepalivesResetWithoutWithConn(t *testing.T) {
	e := newEnv(t)
	pool := e.pool(func(c *pgxpool.Config) { c.MaxConns = 1 })
	lent := showKeepalives(t, e.ctx, pool)
	checkLent := func(name string) {
		t.Helper()
		if got := showKeepalives(t, e.ctx, pool); got != lent {
			t.Errorf("%s: the pool's connection has keep-alives %v afterwards; the pool lent it with %v", name, got, lent)
		}
	}
	newSession := func() *Session {
		t.Helper()
		s, err := NewSession(e.ctx, pool)
		must(t, err)
		return s
	}

	l, err := Acquire(e.ctx, pool, Int64Key(1))
	must(t, err)
	must(t, l.Release(e.ctx))
	checkLent("Acquire and Release")

	l, err = Acquire(e.ctx, pool, Int64Key(1), Shared())
	must(t, err)
	must(t, l.Release(e.ctx))
	checkLent("shared Acquire and Release")

	s := newSession()
	_, err = s.Lock(e.ctx, Int64Key(1))
	must(t, err)
	must(t, s.Unlock(e.ctx, Int64Key(1)))
	_, err = s.Lock(e.ctx, Int64Key(2)) // a first lock again, keep-alives already set
	must(t, err)
	must(t, s.Unlock(e.ctx, Int64Key(2)))
	must(t, s.Close(e.ctx))
	checkLent("Session Lock, Unlock twice, Close")

	s = newSession()
	_, err = s.LockMany(e.ctx, []Key{Int64Key(1), PairKey(1, 2)})
	must(t, err)
	must(t, s.Close(e.ctx))
	checkLent("LockMany, Close")

	s = newSession()
	_, err = s.LockMany(e.ctx, []Key{Int64Key(1), PairKey(1, 2)}, NoWait())
	must(t, err)
	must(t, s.Close(e.ctx))
	checkLent("LockMany NoWait, Close")

	s = newSession()
	_, err = s.Lock(e.ctx, Int64Key(1))
	must(t, err)
	_, err = s.Lock(e.ctx, Int64Key(2), Shared())
	must(t, err)
	must(t, s.Close(e.ctx))
	checkLent("both modes, Close")

	s = newSession()
	_, err = s.Lock(e.ctx, Int64Key(1), Shared())
	must(t, err)
	_, err = s.Lock(e.ctx, Int64Key(2), Shared())
	must(t, err)
	must(t, s.Close(e.ctx))
	checkLent("shared only, Close")

	l, err = AcquireSemaphore(e.ctx, pool, StringKey("cancel-race-sem"), 3)
	must(t, err)
	must(t, l.Release(e.ctx))
	checkLent("AcquireSemaphore and Release")

	l, err = Acquire(e.ctx, pool, Int64Key(1), TTL(20*time.Millisecond))
	must(t, err)
	<-l.Done()
	if err := l.Release(e.ctx); !errors.Is(err, ErrTTLExceeded) {
		t.Errorf("Release after the TTL = %v; want ErrTTLExceeded", err)
	}
	checkLent("TTL")

	l, err = Acquire(e.ctx, pool, Int64Key(1))
	must(t, err)
	must(t, ReleaseAll(e.ctx, pool))
	must(t, l.Release(e.ctx))
	checkLent("ReleaseAll")
}

// startHook is a pgx tracer that calls fn, once, when a statement whose
// text starts with prefix is about to be sent: after runFor marked it in
// flight, before its bytes leave.
type startHook struct {
	prefix string
	armed  atomic.Bool
	fn     func()
}

func (h *startHook) TraceQueryStart(ctx context.Context, _ *pgx.Conn, d pgx.TraceQueryStartData) context.Context {
	if strings.HasPrefix(d.SQL, h.prefix) && h.armed.CompareAndSwap(true, false) {
		h.fn()
	}
	return ctx
}

func (h *startHook) TraceQueryEnd(context.Context, *pgx.Conn, pgx.TraceQueryEndData) {}

// cancelAcks is a pgconn DialFunc that tells, on acked, when the server
// has taken a cancel request sent through a connection it dialled: pgconn
// writes the request, reads until the server closes its end, and only then
// closes the connection.
type cancelAcks struct{ acked chan struct{} }

func newCancelAcks() *cancelAcks { return &cancelAcks{acked: make(chan struct{}, 1)} }

func (a *cancelAcks) dial(ctx context.Context, network, addr string) (net.Conn, error) {
	c, err := (&net.Dialer{}).DialContext(ctx, network, addr)
	if err != nil {
		return nil, err
	}
	return &cancelConn{Conn: c, acks: a}, nil
}

// cancelRequestCode opens a CancelRequest message (the PostgreSQL protocol,
// "Message Formats"), after its length.
const cancelRequestCode = 80877102

// cancelConn is a connection dialled by cancelAcks.
type cancelConn struct {
	net.Conn
	acks          *cancelAcks
	wrote, cancel atomic.Bool // the first write was made; it was a CancelRequest
}

func (c *cancelConn) Write(b []byte) (int, error) {
	if c.wrote.CompareAndSwap(false, true) && len(b) >= 8 && binary.BigEndian.Uint32(b[4:8]) == cancelRequestCode {
		c.cancel.Store(true)
	}
	return c.Conn.Write(b)
}

func (c *cancelConn) Close() error {
	err := c.Conn.Close()
	if c.cancel.Load() {
		select {
		case c.acks.acked <- struct{}{}:
		default: // one already waits to be read
		}
	}
	return err
}

// interruptBeforeSend runs a Lock that waits on the server (the session
// already holds a key, so one pg_advisory_lock) for a key held elsewhere;
// just before the statement is sent, trigger runs and the test waits for
// the interrupt it causes to reach the server, which drops it (the backend
// is idle). It returns the Lock's error and the session.
func interruptBeforeSend(t *testing.T, e *env, trigger func(s *Session, cancel context.CancelFunc)) (*Session, error) {
	hook := &startHook{prefix: "SELECT pg_advisory_lock("}
	acks := newCancelAcks()
	pool := e.pool(func(c *pgxpool.Config) { c.ConnConfig.Tracer, c.ConnConfig.DialFunc = hook, acks.dial })
	other := e.pool()
	busy := Int64Key(2)
	holder, err := Acquire(e.ctx, other, busy)
	must(t, err)
	t.Cleanup(func() { _ = holder.Release(e.ctx) })
	s, err := NewSession(e.ctx, pool)
	must(t, err)
	_, err = s.Lock(e.ctx, Int64Key(1))
	must(t, err)

	// No deadline: a bounded wait is another statement (lock_timeout).
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	hook.fn = func() {
		trigger(s, cancel)
		select {
		case <-acks.acked:
		case <-time.After(notHung): // only "it did not hang"
			t.Error("no interrupt was sent")
		}
	}
	hook.armed.Store(true)
	_, err = s.Lock(ctx, busy)
	if hook.armed.Load() {
		t.Fatal("the hook never ran: the Lock sent another statement")
	}
	return s, err
}

// SPEC §2: a Lock whose ctx is cancelled is interrupted with a cancel
// request and the connection survives, with the session's other holds.
// When the cancel request reaches the server before the statement (ctx
// cancelled just as the statement starts), PostgreSQL drops it; unless
// another is sent, the stopper closes the connection after cancelGrace and
// the session is lost with every hold (red before cancel requests were
// re-sent every cancelRetry).
func TestCancelBeforeStatementSentLosesSession(t *testing.T) {
	e := newEnv(t)
	s, err := interruptBeforeSend(t, e, func(_ *Session, cancel context.CancelFunc) { cancel() })
	defer func() { _ = s.Close(e.ctx) }()
	if !errors.Is(err, context.Canceled) || errors.Is(err, ErrLockLost) {
		t.Errorf("Lock with ctx cancelled as its statement started = %v; want context.Canceled, not ErrLockLost", err)
	}
	if err := s.Err(); err != nil {
		t.Errorf("the session ended: %v; want it alive, still holding its first key", err)
	}
}

// Close while a statement is just starting: the session's end interrupts
// it (statement.interruptForEnd), but the cancel request arrives before the
// statement and is dropped; unless another is sent, the Lock waits until
// the stopper closes the connection (cancelGrace), fails with ErrLockLost
// instead of ErrClosed, and the connection is closed instead of going back
// to the pool (red before cancel requests were re-sent every cancelRetry).
func TestCloseAsStatementStartsDropsInterrupt(t *testing.T) {
	e := newEnv(t)
	closed := make(chan error, 1)
	s, err := interruptBeforeSend(t, e, func(s *Session, _ context.CancelFunc) {
		go func() { closed <- s.Close(context.Background()) }()
		<-s.ctx.Done()
	})
	if err := <-closed; err != nil {
		t.Errorf("Close = %v", err)
	}
	if !errors.Is(err, ErrClosed) || errors.Is(err, ErrLockLost) {
		t.Errorf("Lock interrupted by Close = %v; want ErrClosed, not ErrLockLost", err)
	}
	if !s.pc.IsClosed() {
		return
	}
	t.Error("the session's connection was closed instead of going back to the pool")
}
