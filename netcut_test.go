package advisory

import (
	"context"
	"errors"
	"net"
	"strconv"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/seed0ad592b7/advisory/internal/pgtest"
)

// Two kinds of silent network cut, neither touching the host's network
// configuration:
//
//   - pgtest.Proxy, in process and without privileges: a TCP proxy between
//     client and server that stops forwarding. The client hears nothing;
//     the server does not notice either, but only because the proxy's
//     kernel still answers its keep-alives.
//   - netns, for root: a network namespace of the test's own, holding a
//     server of its own, whose loopback interface the test takes down.
//     Packets are then dropped for both ends, keep-alives included, as on
//     a real cut, so the server's side of the story can be observed too.

// newCutProxy returns a proxy to target (see pgtest.Proxy), closed when the
// test ends.
func newCutProxy(t *testing.T, target string) *pgtest.Proxy {
	t.Helper()
	p, err := pgtest.NewProxy(target)
	must(t, err)
	t.Cleanup(p.Close)
	return p
}

// A silent network cut (no packet delivered, no RST, no FIN): the holder is
// told its lock is lost (Done, Err = ErrLockLost) by the health check while
// the server, which has not noticed anything, still shows the lock held by
// the old backend. So the holder gives the lock up before the server can
// free it (SPEC §4). Release and later calls report ErrLockLost. The time
// to detection is logged, not asserted.
func TestSilentNetworkCut(t *testing.T) {
	e := newEnv(t)
	host, port := server.Host, server.Port
	proxy := newCutProxy(t, net.JoinHostPort(host, strconv.Itoa(port)))
	pool := e.pool(func(c *pgxpool.Config) {
		c.ConnConfig.Host = "127.0.0.1"
		c.ConnConfig.Port = proxy.Port()
	})
	const interval = 100 * time.Millisecond
	key, key2 := Int64Key(4711), PairKey(47, 11)
	lock, err := Acquire(e.ctx, pool, key, HealthInterval(interval))
	must(t, err)
	s, err := NewSession(e.ctx, pool, HealthInterval(interval))
	must(t, err)
	ok, err := s.Lock(e.ctx, key2)
	must(t, err)
	if !ok {
		t.Fatal("Session.Lock returned false")
	}
	var lockPID uint32
	must(t, lock.WithConn(e.ctx, func(c *pgx.Conn) error {
		return c.QueryRow(e.ctx, "SELECT pg_backend_pid()").Scan(&lockPID)
	}))

	proxy.Cut()
	start := time.Now()
	for what, done := range map[string]<-chan struct{}{"Lock": lock.Done(), "Session": s.Done()} {
		select {
		case <-done:
		case <-time.After(notHung - time.Since(start)):
			t.Fatalf("%s: Done not closed %v after a silent network cut", what, time.Since(start))
		}
	}
	t.Logf("a silent cut was noticed after %v with HealthInterval(%v)", time.Since(start).Round(time.Millisecond), interval)
	if !errors.Is(lock.Err(), ErrLockLost) || !errors.Is(s.Err(), ErrLockLost) {
		t.Errorf("Err after the cut: lock %v, session %v; want ErrLockLost", lock.Err(), s.Err())
	}
	// The server has not noticed: the old backend still holds the key.
	rows := e.lockRows(key)
	if len(rows) != 1 || rows[0].PID != lockPID || !rows[0].Granted {
		t.Errorf("server rows for %s after the holder gave up: %v; want still granted to pid %d", key, rows, lockPID)
	}

	_, err = s.Lock(context.Background(), Int64Key(1))
	if !errors.Is(err, ErrLockLost) {
		t.Errorf("Session.Lock after the cut: %v; want ErrLockLost", err)
	}
	if errors.Is(err, context.DeadlineExceeded) {
		// Reported, not asserted: the session's end reason (the health
		// check's ping timeout) is in the chain, although this call's
		// context has no deadline.
		t.Logf("note: Session.Lock after the cut also matches context.DeadlineExceeded: %v", err)
	}
	if err := lock.Release(e.ctx); !errors.Is(err, ErrLockLost) {
		t.Errorf("Release after the cut: %v; want ErrLockLost", err)
	}
	if err := s.Close(e.ctx); !errors.Is(err, ErrLockLost) {
		t.Errorf("Close after the cut: %v; want ErrLockLost", err)
	}
	// The network comes back: the server sees the closes and frees the
	// locks (newEnv's check awaits that). Until then pgxpool counts the
	// dead connections as acquired: pgx closes a connection that timed out
	// in the background, sending a cancel request first, which waits up to
	// 15 s for an answer that a cut network never brings.
	proxy.Close()
	awaitAcquired(t, pool, 0)
	e.awaitKeyFree(key)
	e.awaitKeyFree(key2)
}

// A silent network cut that both ends only learn of through their own
// timers (packets dropped both ways, keep-alives included): the holder steps
// down, and only after that does the server free the lock, which it does
// through the keep-alives the lock's session set. The cut takes down the
// loopback interface of a network namespace the test creates for a server
// of its own, so it needs root and the local PostgreSQL binaries; the
// test's own questions to that server go through its unix socket, which the
// cut does not touch. The times are logged, not asserted.
func TestNetworkCut(t *testing.T) {
	e, ns, pool := newCutEnv(t)
	const interval = 200 * time.Millisecond
	key := StringKey("cut")
	lock, err := Acquire(e.ctx, pool, key, HealthInterval(interval))
	must(t, err)

	must(t, ns.setLoopback(false))
	steppedDown, freedAfter := e.awaitFreedAfterStepDown(key, lock.Done(), time.Now())
	if !errors.Is(lock.Err(), ErrLockLost) {
		t.Errorf("Err() = %v; want ErrLockLost", lock.Err())
	}
	if err := lock.Release(e.ctx); !errors.Is(err, ErrLockLost) {
		t.Errorf("Release after the cut: %v; want ErrLockLost", err)
	}
	t.Logf("network cut: holder stepped down after %v, server freed the lock after %v (health interval %v)",
		steppedDown, freedAfter, interval)
	// The network comes back. Until then pgxpool counts the dead
	// connection as acquired: pgx closes it in the background, sending a
	// cancel request first, whose dial waits up to 15 s on a cut network.
	must(t, ns.setLoopback(true))
	awaitAcquired(t, pool, 0)
}

// awaitFreedAfterStepDown waits until the server frees key after a cut at
// cut, and fails the test unless done (the holder's Done) had closed while
// the server still held key: the holder must step down first (SPEC §4). It
// returns when each happened after the cut.
func (e *env) awaitFreedAfterStepDown(key Key, done <-chan struct{}, cut time.Time) (steppedDown, freedAfter time.Duration) {
	e.t.Helper()
	heldWhenSteppedDown := false
	e.eventually("the server frees the cut holder's lock", func(c *pgx.Conn) (bool, error) {
		var n int
		classid, objid, objsubid := key.LockRow()
		err := c.QueryRow(context.Background(), `SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'
			AND classid::int8 = $1 AND objid::int8 = $2 AND objsubid = $3`, int64(classid), int64(objid), objsubid).Scan(&n)
		select {
		case <-done:
			if steppedDown == 0 {
				steppedDown = time.Since(cut).Round(time.Millisecond)
				heldWhenSteppedDown = n > 0
			}
		default:
		}
		if n == 0 {
			freedAfter = time.Since(cut).Round(time.Millisecond)
		}
		return n == 0, err
	})
	if steppedDown == 0 || !heldWhenSteppedDown {
		e.t.Errorf("the server freed the lock (after %v) before the holder stepped down (after %v; 0: not yet)",
			freedAfter, steppedDown)
	}
	return steppedDown, freedAfter
}

// A silent network cut while a Session that holds a lock waits for another
// in one server-side wait (a Session that holds locks does not wait in
// slices, so that the deadlock detector sees it): the wait keeps the
// connection's turn, so the health watcher cannot ping, and the client
// hears nothing. A backend waiting on a lock does not read its socket, so
// the server keeps the held lock while the wait lasts; once the other
// holder lets the awaited key go, the backend finds its client gone and
// ends, freeing both. The holder must step down before that (SPEC §4). The
// times are logged, not asserted.
func TestNetworkCutDuringWaitWhileHolding(t *testing.T) {
	e, ns, pool := newCutEnv(t)
	other := e.conn() // through the unix socket: the cut does not touch it
	held, waited := StringKey("cut-held"), StringKey("cut-waited")
	if !e.tryFromKeep(other, waited) {
		t.Fatal("the other connection could not take the key")
	}
	const interval = 200 * time.Millisecond
	s, err := NewSession(e.ctx, pool, HealthInterval(interval))
	must(t, err)
	got, err := s.Lock(e.ctx, held)
	must(t, err)
	if !got {
		t.Fatal("Lock returned false")
	}
	result := make(chan error, 1)
	go func() {
		_, err := s.Lock(e.ctx, waited)
		result <- err
	}()
	e.awaitWaiters(1)

	must(t, ns.setLoopback(false))
	cut := time.Now()
	if _, err := other.Exec(e.ctx, "SELECT pg_advisory_unlock_all()"); err != nil {
		t.Fatal(err)
	}
	steppedDown, freedAfter := e.awaitFreedAfterStepDown(held, s.Done(), cut)
	t.Logf("cut during a wait while holding: holder stepped down after %v, server freed the lock after %v (health interval %v)",
		steppedDown, freedAfter, interval)
	if err := s.Close(e.ctx); !errors.Is(err, ErrLockLost) {
		t.Errorf("Close after the cut: %v; want ErrLockLost", err)
	}
	if err := <-result; !errors.Is(err, ErrLockLost) {
		t.Errorf("the wait cut by the network: %v; want ErrLockLost", err)
	}
	must(t, ns.setLoopback(true))
	awaitAcquired(t, pool, 0)
}
