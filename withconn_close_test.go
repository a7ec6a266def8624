package advisory

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
)

// Suspected: Close or Release called from inside a WithConn callback does
// not deadlock: it closes the connection under the callback after its
// timeout, which frees the locks, and says so.
func TestCloseInsideWithConn(t *testing.T) {
	e := newEnv(t)
	pool := e.pool()
	other := e.conn()
	key := StringKey("close-inside")
	lock := e.acquire(pool, key)
	s, err := NewSession(e.ctx, pool)
	must(t, err)
	_, err = s.Lock(e.ctx, Int64Key(5))
	must(t, err)
	type result struct{ inner, outer error }
	results := make(chan result, 2)
	go func() {
		var inner error
		outer := lock.WithConn(e.ctx, func(*pgx.Conn) error { inner = lock.Release(e.ctx); return nil })
		results <- result{inner, outer}
	}()
	go func() {
		var inner error
		outer := s.WithConn(e.ctx, func(*pgx.Conn) error { inner = s.Close(e.ctx); return nil })
		results <- result{inner, outer}
	}()
	for range 2 {
		select {
		case r := <-results:
			t.Logf("Release/Close inside WithConn returned %v; WithConn returned %v", r.inner, r.outer)
			if !errors.Is(r.outer, ErrClosed) {
				t.Errorf("WithConn whose callback closed the session: %v; want ErrClosed", r.outer)
			}
		case <-time.After(notHung):
			t.Fatal("Release or Close called inside WithConn did not return")
		}
	}
	for _, k := range []Key{key, Int64Key(5)} {
		e.eventually("the server frees "+k.String(), func(*pgx.Conn) (bool, error) { return e.tryFrom(other, k), nil })
	}
}

// Suspected: Release concurrent with a long WithConn is bounded: the
// statement in flight is cancelled and the lock released cleanly; a
// callback that ignores that is cut off after cleanupTimeout.
func TestReleaseDuringLongWithConn(t *testing.T) {
	e := newEnv(t)
	pool := e.pool()
	other := e.conn()
	for _, busy := range []string{"statement", "callback"} {
		key := StringKey("release-during-" + busy)
		lock := e.acquire(pool, key)
		inside := make(chan struct{})
		unblock := make(chan struct{})
		withConn := make(chan error, 1)
		go func() {
			withConn <- lock.WithConn(e.ctx, func(c *pgx.Conn) error {
				close(inside)
				if busy == "callback" {
					<-unblock // ignores the session's end
					return nil
				}
				_, err := c.Exec(context.Background(), "SELECT pg_sleep(600)")
				return err
			})
		}()
		<-inside
		start := time.Now()
		released := make(chan error, 1)
		go func() { released <- lock.Release(e.ctx) }()
		select {
		case err := <-released:
			t.Logf("%s: Release returned %v after %v", busy, err, time.Since(start).Round(time.Millisecond))
			if busy == "statement" && err != nil {
				t.Errorf("Release during a fenced statement: %v; want nil", err)
			}
		case <-time.After(notHung):
			t.Fatalf("%s: Release during a long WithConn did not return within %v", busy, notHung)
		}
		close(unblock)
		if err := <-withConn; err == nil {
			t.Errorf("%s: WithConn cut short by Release returned nil", busy)
		}
		e.eventually("the server frees "+key.String(), func(*pgx.Conn) (bool, error) { return e.tryFrom(other, key), nil })
	}
}
