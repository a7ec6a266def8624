package advisory

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/seed0ad592b7/advisory/internal/pgtest"
)

// waiterPID returns the one backend waiting for key.
func (e *env) waiterPID(key Key) uint32 {
	e.t.Helper()
	for _, r := range e.lockRows(key) {
		if !r.Granted {
			return r.PID
		}
	}
	e.t.Fatalf("nobody waits for %s", key)
	return 0
}

// startWait waits on s for busy, with Lock, or with LockMany of busy and
// more keys, in a goroutine; the channel gets its error.
func startWait(ctx context.Context, s *Session, many bool, busy Key, more ...Key) <-chan error {
	done := make(chan error, 1)
	go func() {
		var err error
		if many {
			_, err = s.LockMany(ctx, append([]Key{busy}, more...))
		} else {
			_, err = s.Lock(ctx, busy)
		}
		done <- err
	}()
	return done
}

// A wait whose connection dies (its backend terminated) ends the session,
// for Lock and for LockMany (which then already holds the keys before the
// busy one: they go with the session), and fails with an error that says
// the connection was lost while waiting: the session held nothing, so the
// call never held the lock, and its error does not match ErrLockLost (SPEC
// §4). Close reports the session's end (ErrLockLost).
func TestWaitConnectionLost(t *testing.T) {
	e := newEnv(t)
	pool := e.pool()
	holder := e.conn()
	busy := Int64Key(1610)
	_, err := holder.Exec(e.ctx, "SELECT pg_advisory_lock(1610)")
	must(t, err)
	for _, many := range []bool{false, true} {
		s, err := NewSession(e.ctx, pool)
		must(t, err)
		done := startWait(e.ctx, s, many, busy, Int64Key(1), Int64Key(2), Int64Key(-1))
		e.awaitWaiters(1)
		e.terminate(e.waiterPID(busy))
		err = <-done
		if err == nil || errors.Is(err, ErrLockLost) {
			t.Errorf("many %v: a wait whose backend was terminated = %v; want an error not matching ErrLockLost", many, err)
		}
		// The message says it once, on one line; Lock's names the key
		// (LockMany's errors have the zero Key).
		if msg := fmt.Sprint(err); strings.Count(msg, errLostWaiting.Error()) != 1 || strings.Contains(msg, "\n") ||
			(!many && !strings.Contains(msg, busy.String())) {
			t.Errorf("many %v: the lost wait's message: %q", many, msg)
		}
		e.awaitDone(s.Done(), "the session of a wait lost")
		if err := s.Close(e.ctx); !errors.Is(err, ErrLockLost) {
			t.Errorf("many %v: Close = %v; want ErrLockLost", many, err)
		}
	}
	_, err = holder.Exec(e.ctx, "SELECT pg_advisory_unlock_all()")
	must(t, err)
}

// Close ends a wait on the session with ErrClosed; calls after Close fail
// with ErrClosed, sending nothing.
func TestWaitEndedByClose(t *testing.T) {
	e := newEnv(t)
	pool := e.pool()
	holder := e.conn()
	_, err := holder.Exec(e.ctx, "SELECT pg_advisory_lock(1611)")
	must(t, err)
	for _, many := range []bool{false, true} {
		s, err := NewSession(e.ctx, pool)
		must(t, err)
		done := startWait(e.ctx, s, many, Int64Key(1611), PairKey(1, 1))
		e.awaitWaiters(1)
		must(t, s.Close(e.ctx))
		if err := <-done; !errors.Is(err, ErrClosed) {
			t.Errorf("many %v: a wait ended by Close = %v; want ErrClosed", many, err)
		}
		if err := s.UnlockMany(e.ctx, []Key{Int64Key(1)}); !errors.Is(err, ErrClosed) {
			t.Errorf("many %v: UnlockMany after Close = %v; want ErrClosed", many, err)
		}
	}
	_, err = holder.Exec(e.ctx, "SELECT pg_advisory_unlock_all()")
	must(t, err)
}

// proxiedPool returns a pool whose connections go through a cut proxy.
func (e *env) proxiedPool(mods ...func(*pgxpool.Config)) (*pgxpool.Pool, *pgtest.Proxy) {
	e.t.Helper()
	proxy := newCutProxy(e.t, net.JoinHostPort(server.Host, strconv.Itoa(server.Port)))
	pool := e.pool(append([]func(*pgxpool.Config){func(c *pgxpool.Config) {
		c.ConnConfig.Host = "127.0.0.1"
		c.ConnConfig.Port = proxy.Port()
	}}, mods...)...)
	return pool, proxy
}

// A cancelled wait on a cut network (new connections refused too): the
// wait returns ctx's error at once (no cancel request is sent for a wait
// slice; SPEC §2a), never ErrLockLost (a waiter never held the lock, SPEC
// §4); the slice left to end on its own gets no answer, so the connection
// is closed: the session is lost, never left with a wait that may still be
// granted.
func TestCancelRequestFails(t *testing.T) {
	e := newEnv(t)
	pool, proxy := e.proxiedPool()
	holder := e.conn()
	_, err := holder.Exec(e.ctx, "SELECT pg_advisory_lock(1612)")
	must(t, err)
	s, err := NewSession(e.ctx, pool, HealthInterval(time.Hour))
	must(t, err)
	ctx, cancel := context.WithCancel(e.ctx)
	defer cancel()
	done := make(chan error, 1)
	go func() {
		_, err := s.Lock(ctx, Int64Key(1612))
		done <- err
	}()
	e.awaitWaiters(1)
	proxy.Cut()
	cancel()
	if err := <-done; !errors.Is(err, context.Canceled) || errors.Is(err, ErrLockLost) {
		t.Errorf("a cancelled wait on a cut network = %v; want context.Canceled, not ErrLockLost", err)
	}
	e.awaitDone(s.Done(), "the session whose cancel request failed")
	if err := s.Close(e.ctx); !errors.Is(err, ErrLockLost) {
		t.Errorf("Close = %v; want ErrLockLost", err)
	}
	// The server's waiter is an orphan until it is granted and finds its
	// client gone.
	_, err = holder.Exec(e.ctx, "SELECT pg_advisory_unlock_all()")
	must(t, err)
}

// Close of a session whose network was cut silently: its clean-up
// statement gets no answer within the clean-up timeout, so the connection
// is closed and Close reports the locks lost.
func TestCloseCleanupTimesOut(t *testing.T) {
	e := newEnv(t)
	pool, proxy := e.proxiedPool()
	s, err := NewSession(e.ctx, pool, HealthInterval(time.Hour)) // the watcher only listens: it cannot notice a silent cut
	must(t, err)
	_, err = s.Lock(e.ctx, Int64Key(1613))
	must(t, err)
	proxy.Cut()
	start := time.Now()
	if err := s.Close(e.ctx); !errors.Is(err, ErrLockLost) {
		t.Errorf("Close over a cut network = %v; want ErrLockLost", err)
	}
	t.Logf("Close over a cut network returned after %v", time.Since(start))
}

// A clean-up statement's bound is one timer for the process, set for the
// earliest statement in flight (overdue.go): after many unlocks that ended in time, an unlock over
// a silently cut network is still interrupted at its bound, and the
// session ends with its locks reported lost.
func TestUnlockCleanupTimesOutAfterManyInTime(t *testing.T) {
	e := newEnv(t)
	pool, proxy := e.proxiedPool()
	s, err := NewSession(e.ctx, pool, HealthInterval(time.Hour)) // the watcher only listens: it cannot notice a silent cut
	must(t, err)
	key := Int64Key(1614)
	for range 20 {
		_, err := s.Lock(e.ctx, key)
		must(t, err)
		must(t, s.Unlock(e.ctx, key))
	}
	_, err = s.Lock(e.ctx, key)
	must(t, err)
	proxy.Cut()
	start := time.Now()
	if err := s.Unlock(e.ctx, key); !errors.Is(err, ErrLockLost) {
		t.Errorf("Unlock over a cut network = %v; want ErrLockLost", err)
	}
	e.awaitDone(s.Done(), "the session whose unlock got no answer")
	if err := s.Close(e.ctx); !errors.Is(err, ErrLockLost) {
		t.Errorf("Close = %v; want ErrLockLost", err)
	}
	t.Logf("Unlock over a cut network returned after %v", time.Since(start))
}

// Clean-up statements that hang at the same time are each cut at their own
// bound, not one after another: the Closes of several sessions over a
// silently cut network, where a cancel request cannot connect either (its
// dial hangs, as to a host that drops packets), each return once their
// unlock has run for cleanupTimeout and its cancel request for
// cancelRequestTimeout, however many were due at once. Red at 3ae4e9a:
// overdue.go's one timer interrupted the statements due at a firing one
// after another, each waiting out its cancel request, so the n-th Close
// returned (n-1) × 2 s late.
func TestCloseCleanupsOverdueTogether(t *testing.T) {
	e := newEnv(t)
	const n = 5
	var cut atomic.Bool // dials hang, until the test ends
	ended := make(chan struct{})
	t.Cleanup(func() { close(ended) }) // before the end check: pgconn's own cancel requests give up
	pool, proxy := e.proxiedPool(func(c *pgxpool.Config) {
		c.MaxConns = n
		dial := c.ConnConfig.DialFunc
		c.ConnConfig.DialFunc = func(ctx context.Context, network, addr string) (net.Conn, error) {
			if cut.Load() {
				select {
				case <-ctx.Done():
				case <-ended:
				}
				return nil, errors.New("the network is cut")
			}
			return dial(ctx, network, addr)
		}
	})
	sessions := make([]*Session, n)
	for i := range sessions {
		s, err := NewSession(e.ctx, pool, HealthInterval(time.Hour)) // the watcher only listens: it cannot notice a silent cut
		must(t, err)
		if got, err := s.Lock(e.ctx, Int64Key(1620+int64(i))); err != nil || !got {
			t.Fatalf("Lock = %v, %v", got, err)
		}
		sessions[i] = s
	}
	cut.Store(true)
	proxy.Cut()
	bound := cleanupTimeout + cancelRequestTimeout + cancelGrace
	took := make(chan time.Duration, n)
	start := make(chan struct{})
	for _, s := range sessions {
		go func() {
			<-start
			began := time.Now()
			if err := s.Close(e.ctx); !errors.Is(err, ErrLockLost) {
				t.Errorf("Close over a cut network = %v; want ErrLockLost", err)
			}
			took <- time.Since(began)
		}()
	}
	close(start)
	for range n {
		var d time.Duration
		select {
		case d = <-took:
		case <-time.After(3 * bound):
			t.Fatalf("a Close over a cut network has not returned after %v", 3*bound)
		}
		t.Logf("Close over a cut network, its cancel request hanging, returned after %v", d)
		if d > bound {
			t.Errorf("Close over a cut network returned after %v; want at most %v (cleanupTimeout, cancelRequestTimeout and a grace)", d, bound)
		}
	}
}
