package advisory

import (
	"context"
	"errors"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

// sessionReady reports whether s's health watcher has set up its readiness
// and whether the turn was free, as the watcher leaves it while it waits.
func sessionReady(s *Session) (ready, turnFree bool) {
	select {
	case s.turn <- struct{}{}: // taken raw, so as not to disarm the readiness
		turnFree = true
	default:
		s.turn <- struct{}{}
	}
	ready = s.ready.Load() != nil
	<-s.turn
	return ready, turnFree
}

// The health watcher waits holding nothing: while it watches a held lock,
// the connection's turn is free, so a caller uses the connection at once
// and wakes nobody. Before the readiness, the watcher sat in a read holding
// the turn, and a caller had to wake it and wait for it to return.
func TestWatcherWaitsWithoutTheTurn(t *testing.T) {
	e := newEnv(t)
	lock, err := Acquire(e.ctx, e.pool(), StringKey("watcher-turn"))
	must(t, err)
	awaitWatching(t, lock.s)
	for range 3 {
		if _, free := sessionReady(lock.s); !free {
			t.Fatal("the health watcher holds the connection's turn while it waits")
		}
	}
	must(t, lock.Release(e.ctx))
}

// A terminated backend is noticed as soon as its FATAL error arrives, not
// at the next health check: with an hour's health interval the loss is
// still noticed.
func TestWatcherNoticesTerminationAtOnce(t *testing.T) {
	e := newEnv(t)
	key := StringKey("watcher-at-once")
	lock, err := Acquire(e.ctx, e.pool(), key, HealthInterval(time.Hour))
	must(t, err)
	pid := lockPID(t, e.ctx, lock)
	awaitWatching(t, lock.s)
	start := time.Now()
	e.terminate(pid)
	select {
	case <-lock.Done():
	case <-time.After(notHung):
		t.Fatalf("a terminated backend not noticed after %v with an hour's health interval", notHung)
	}
	t.Logf("a terminated backend was noticed after %v: %v", time.Since(start), lock.Err())
	if !errors.Is(lock.Err(), ErrLockLost) {
		t.Errorf("Err() = %v; want ErrLockLost", lock.Err())
	}
	if err := lock.Release(e.ctx); !errors.Is(err, ErrLockLost) {
		t.Errorf("Release after the loss = %v; want ErrLockLost", err)
	}
	e.awaitKeyFree(key)
}

// hiddenSocket is a net.Conn that is not a syscall.Conn, as a DialFunc of
// one's own may return: its socket cannot be watched.
type hiddenSocket struct{ net.Conn }

// Where the socket cannot be watched, the health checks alone notice a
// terminated backend, within the health interval.
func TestWatcherWithoutSocketPings(t *testing.T) {
	e := newEnv(t)
	pool := e.pool(func(c *pgxpool.Config) {
		var d net.Dialer
		c.ConnConfig.DialFunc = func(ctx context.Context, network, addr string) (net.Conn, error) {
			nc, err := d.DialContext(ctx, network, addr)
			if err != nil {
				return nil, err
			}
			return hiddenSocket{nc}, nil
		}
	})
	key := StringKey("watcher-no-socket")
	lock, err := Acquire(e.ctx, pool, key, HealthInterval(100*time.Millisecond))
	must(t, err)
	pid := lockPID(t, e.ctx, lock)
	awaitPing(e, pid)
	if ready, _ := sessionReady(lock.s); ready {
		t.Fatal("a readiness was set up for a connection that is not a socket")
	}
	e.terminate(pid)
	e.awaitDone(lock.Done(), "a terminated holder whose socket is not watched")
	if !errors.Is(lock.Err(), ErrLockLost) {
		t.Errorf("Err() = %v; want ErrLockLost", lock.Err())
	}
	if err := lock.Release(e.ctx); !errors.Is(err, ErrLockLost) {
		t.Errorf("Release after the loss = %v; want ErrLockLost", err)
	}
	e.awaitKeyFree(key)
}

// A notification that arrives while the session holds a lock wakes the
// watcher, which reads it with a health check: the session goes on, and the
// notification reaches the WithConn callback that waits for it.
func TestWatcherKeepsNotifications(t *testing.T) {
	e := newEnv(t)
	s := e.lockedSession(e.pool(), StringKey("watcher-notify"), time.Hour)
	defer s.Close(e.ctx)
	var pid uint32
	must(t, s.WithConn(e.ctx, func(c *pgx.Conn) error {
		pid = c.PgConn().PID()
		_, err := c.Exec(e.ctx, "LISTEN advisory_watch")
		return err
	}))
	awaitWatching(t, s)
	if _, err := e.adminConn().Exec(e.ctx, "NOTIFY advisory_watch, 'hello'"); err != nil {
		t.Fatal(err)
	}
	awaitPing(e, pid) // the watcher reads the notification with a health check
	if err := s.Err(); err != nil {
		t.Fatalf("the session ended after a notification: %v", err)
	}
	must(t, s.WithConn(e.ctx, func(c *pgx.Conn) error {
		ctx, cancel := context.WithTimeout(e.ctx, notHung)
		defer cancel()
		n, err := c.WaitForNotification(ctx)
		if err != nil {
			return err
		}
		if n.Payload != "hello" {
			t.Errorf("notification payload %q; want hello", n.Payload)
		}
		_, err = c.Exec(e.ctx, "UNLISTEN *")
		return err
	}))
	must(t, s.Close(e.ctx))
}

// awaitPing waits until the backend pid's last statement is a health
// check's ping: an empty query that says since when the session holds.
func awaitPing(e *env, pid uint32) {
	e.t.Helper()
	e.eventually("a health check on the session's connection", func(c *pgx.Conn) (bool, error) {
		var query string
		err := c.QueryRow(e.ctx, "SELECT query FROM pg_stat_activity WHERE pid = $1", int64(pid)).Scan(&query)
		return strings.HasPrefix(query, markerHeld), err
	})
}

// lockedSession opens a Session on pool checked every health interval h
// and takes key on it, failing the test if it cannot.
func (e *env) lockedSession(pool *pgxpool.Pool, key Key, h time.Duration) *Session {
	e.t.Helper()
	s, err := NewSession(e.ctx, pool, HealthInterval(h))
	must(e.t, err)
	got, err := s.Lock(e.ctx, key)
	if err != nil || !got {
		_ = s.Close(e.ctx)
		e.t.Fatalf("Lock %s = %v, %v", key, got, err)
	}
	return s
}
