package advisory

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// A session whose only holds come from LockMany is watched: the loss of its
// connection closes Done, with nothing else (no WithConn, which would arm
// the watcher by itself) called on it.
func TestLockManyArmsWatcher(t *testing.T) {
	e := newEnv(t)
	pool := e.pool()
	s, err := NewSession(e.ctx, pool, HealthInterval(50*time.Millisecond))
	must(t, err)
	keys := []Key{Int64Key(1601), PairKey(16, 1)}
	if ok, err := s.LockMany(e.ctx, keys); err != nil || !ok {
		t.Fatalf("LockMany = %v, %v", ok, err)
	}
	rows := e.lockRows(keys[0])
	if len(rows) != 1 {
		t.Fatalf("rows of %s = %+v; want the session's", keys[0], rows)
	}
	e.terminate(rows[0].PID)
	e.awaitDone(s.Done(), "a session holding LockMany keys, its backend terminated")
	if !errors.Is(s.Err(), ErrLockLost) {
		t.Errorf("Err() = %v; want ErrLockLost", s.Err())
	}
	if err := s.Close(e.ctx); !errors.Is(err, ErrLockLost) {
		t.Errorf("Close after the loss = %v; want ErrLockLost", err)
	}
}

// UnlockMany and Unlock check what pg_advisory_unlock returns: a key the
// server no longer holds for the session (released behind its back, here
// through WithConn) is a lost lock, and the session ends.
func TestUnlockNotHeldOnServer(t *testing.T) {
	e := newEnv(t)
	pool := e.pool()
	for _, many := range []bool{true, false} {
		s := e.session(pool)
		keys := []Key{Int64Key(1602), PairKey(16, 2), StringKey("unlock-behind")}
		if many {
			_, err := s.LockMany(e.ctx, keys)
			must(t, err)
		} else {
			keys = keys[:1]
			_, err := s.Lock(e.ctx, keys[0])
			must(t, err)
		}
		must(t, s.WithConn(e.ctx, func(c *pgx.Conn) error {
			var ok bool
			if err := c.QueryRow(e.ctx, "SELECT pg_advisory_unlock(1602)").Scan(&ok); err != nil || !ok {
				t.Errorf("pg_advisory_unlock behind the session's back = %v, %v", ok, err)
			}
			return nil
		}))
		var err error
		if many {
			err = s.UnlockMany(e.ctx, keys)
		} else {
			err = s.Unlock(e.ctx, keys[0])
		}
		if !errors.Is(err, ErrLockLost) {
			t.Errorf("many %v: unlock of a key the server did not hold = %v; want ErrLockLost", many, err)
			continue
		}
		e.awaitDone(s.Done(), "a session whose unlock found the key not held")
		if !errors.Is(s.Err(), ErrLockLost) {
			t.Errorf("many %v: Err() = %v; want ErrLockLost", many, s.Err())
		}
		e.eventually("the session's other keys freed", func(c *pgx.Conn) (bool, error) {
			for _, k := range keys {
				if !e.tryFrom(c, k) {
					return false, nil
				}
			}
			return true, nil
		})
	}
}

// A statement run through WithConn that finds the connection dead is a
// lost lock: WithConn says ErrLockLost (not just the network error), and
// the holder is told at once. The backend ends during the callback (the
// watcher cannot notice first: the callback holds the connection).
func TestWithConnDeadConnection(t *testing.T) {
	e := newEnv(t)
	pool := e.pool()
	for _, how := range []string{"terminated by the callback", "terminated from outside"} {
		lock, err := Acquire(e.ctx, pool, Int64Key(1603), HealthInterval(time.Hour))
		must(t, err)
		err = lock.WithConn(e.ctx, func(c *pgx.Conn) error {
			if how == "terminated by the callback" {
				_, err := c.Exec(e.ctx, "SELECT pg_terminate_backend(pg_backend_pid())")
				return err
			}
			e.terminate(c.PgConn().PID())
			e.eventually("the backend gone", func(a *pgx.Conn) (bool, error) {
				var n int
				err := a.QueryRow(e.ctx, "SELECT count(*) FROM pg_stat_activity WHERE pid = $1", int64(c.PgConn().PID())).Scan(&n)
				return n == 0, err
			})
			_, err := c.Exec(e.ctx, "SELECT 1")
			return err
		})
		if !errors.Is(err, ErrLockLost) {
			t.Errorf("%s: WithConn = %v; want ErrLockLost", how, err)
		}
		e.awaitDone(lock.Done(), how)
		if !errors.Is(lock.Err(), ErrLockLost) {
			t.Errorf("%s: Err() = %v; want ErrLockLost", how, lock.Err())
		}
		if err := lock.Release(e.ctx); !errors.Is(err, ErrLockLost) {
			t.Errorf("%s: Release = %v; want ErrLockLost", how, err)
		}
	}
}

// Ending a session interrupts the statement in flight on its connection:
// a WithConn callback in pg_sleep is cancelled on the server (57014) when
// the session is closed, released by ReleaseAll, or its lock's TTL passes;
// the end does not wait for the statement, nor cut the connection under
// it.
func TestSessionEndInterruptsStatement(t *testing.T) {
	e := newEnv(t)
	pool := e.pool()
	key := Int64Key(1604)
	for _, tc := range []struct {
		name string
		ttl  bool
		end  func(*Lock) error
		kind error
	}{
		{"Close", false, func(l *Lock) error { return l.s.Close(e.ctx) }, ErrClosed},
		{"ReleaseAll", false, func(*Lock) error { return ReleaseAll(e.ctx, pool) }, ErrClosed},
		{"TTL", true, nil, ErrTTLExceeded},
	} {
		opts := []Option{}
		if tc.ttl {
			opts = append(opts, TTL(500*time.Millisecond))
		}
		lock, err := Acquire(e.ctx, pool, key, opts...)
		must(t, err)
		pid := e.lockRows(key)[0].PID
		done := make(chan error, 1)
		go func() {
			done <- lock.WithConn(e.ctx, func(c *pgx.Conn) error {
				_, err := c.Exec(e.ctx, "SELECT pg_sleep(3600)")
				return err
			})
		}()
		e.eventually(tc.name+": the callback's pg_sleep running on the server", func(c *pgx.Conn) (bool, error) {
			var n int
			err := c.QueryRow(e.ctx, `SELECT count(*) FROM pg_stat_activity
				WHERE pid = $1 AND state = 'active' AND query LIKE '%pg_sleep(3600)%'`, int64(pid)).Scan(&n)
			return n == 1, err
		})
		start := time.Now()
		var endErr error
		if tc.end != nil {
			endErr = tc.end(lock)
		}
		var err2 error
		select {
		case err2 = <-done:
		case <-e.ctx.Done():
			t.Fatalf("%s: the callback's statement was never interrupted", tc.name)
		}
		t.Logf("%s: the statement in flight returned %v after the end began: %v", tc.name, time.Since(start), err2)
		var pgErr *pgconn.PgError
		if !errors.As(err2, &pgErr) || pgErr.Code != codeQueryCanceled {
			t.Errorf("%s: WithConn = %v; want the statement cancelled on the server (57014), not cut off", tc.name, err2)
		}
		if !errors.Is(err2, tc.kind) {
			t.Errorf("%s: WithConn = %v; want it to match %v", tc.name, err2, tc.kind)
		}
		if endErr != nil {
			t.Errorf("%s: ending the session = %v; want nil", tc.name, endErr)
		}
		e.awaitDone(lock.Done(), tc.name)
		if err := lock.Release(context.Background()); tc.ttl != errors.Is(err, ErrTTLExceeded) {
			t.Errorf("%s: Release = %v", tc.name, err)
		}
		if rows := e.lockRows(key); len(rows) != 0 {
			t.Errorf("%s: the key is still held: %+v", tc.name, rows)
		}
	}
}
