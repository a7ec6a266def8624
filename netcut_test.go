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
		case <-e.ctx.Done():
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
	awaitNoAcquired(t, pool)
}
