package advisory

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/seed0ad592b7/advisory/internal/pgtest"
)

// Sessions own their connections, but Sessions of one process that wait for
// one key (in one mode) queue in the process: the server sees one waiter.
// Shared ones let the next through as soon as they hold the key: they all
// hold it together.
func TestCohortSessionsQueue(t *testing.T) {
	for _, mode := range []Mode{ModeExclusive, ModeShared} {
		t.Run(mode.String(), func(t *testing.T) {
			e := newEnv(t)
			pool := e.pool()
			key := StringKey("cohort-sessions")
			var opts []Option
			if mode == ModeShared {
				opts = append(opts, Shared())
			}
			other := e.conn()
			_, err := other.Exec(e.ctx, "SELECT pg_advisory_lock($1)", mustInt64(key))
			must(t, err)
			const n = 3
			got := make(chan *Session, n)
			for range n {
				s, err := NewSession(e.ctx, pool)
				must(t, err)
				t.Cleanup(func() { _ = s.Close(context.Background()) })
				go func() {
					ok, err := s.Lock(e.ctx, key, opts...)
					if !ok || err != nil {
						t.Errorf("Session.Lock = %v, %v", ok, err)
					}
					got <- s
				}()
			}
			pgtest.Await(t, fmt.Sprintf("%d Sessions queued in the process for %v", n-1, key), testTimeout, func() (bool, error) {
				return queued(pool, key, mode, -1, 0) == n-1, nil
			})
			e.awaitWaiters(1)
			_, err = other.Exec(e.ctx, "SELECT pg_advisory_unlock($1)", mustInt64(key))
			must(t, err)
			var held []*Session
			for range n {
				s := receive(e, got, "a queued Session getting the key")
				if mode == ModeExclusive {
					must(t, s.Unlock(e.ctx, key))
				}
				held = append(held, s)
			}
			if mode == ModeShared {
				if rows := e.lockRows(key); len(rows) != n {
					t.Fatalf("pg_locks rows of %v = %+v; want %d shared holders at once", key, rows, n)
				}
				for _, s := range held {
					must(t, s.Unlock(e.ctx, key, opts...))
				}
			}
			for _, s := range held {
				must(t, s.Close(e.ctx))
			}
			awaitAcquired(t, pool, 0)
		})
	}
}

// gated is a Session.Lock of key started in the background on a new
// Session of pool, and the outcome it reports.
type gated struct {
	s   *Session
	got chan error
}

func (e *env) lockGated(pool *pgxpool.Pool, key Key) gated {
	e.t.Helper()
	s, err := NewSession(e.ctx, pool)
	must(e.t, err)
	return e.lockOn(s, key)
}

// lockOn is lockGated on s, closed when the test ends.
func (e *env) lockOn(s *Session, key Key) gated {
	e.t.Cleanup(func() { _ = s.Close(context.Background()) })
	g := gated{s: s, got: make(chan error, 1)}
	go func() {
		ok, err := s.Lock(e.ctx, key)
		if err == nil && !ok {
			err = errors.New("Lock returned false without an error")
		}
		g.got <- err
	}()
	return g
}

// awaitGranted waits for g's Lock to return, and fails unless it took the
// key.
func (e *env) awaitGranted(g gated, what string) {
	e.t.Helper()
	select {
	case err := <-g.got:
		if err != nil {
			e.t.Fatalf("%s: Lock: %v", what, err)
		}
	case <-time.After(testTimeout):
		e.t.Fatalf("%s: the queued Session did not get the key within %v", what, testTimeout)
	}
}

// awaitWaitingSessions waits until n Sessions of pool wait for key, in
// the process's queue or on the server, and fails unless all of them wait
// in the process.
func (e *env) awaitWaitingSessions(pool *pgxpool.Pool, key Key, n int) {
	e.t.Helper()
	var inProcess, onServer int
	pgtest.Await(e.t, fmt.Sprintf("%d Sessions waiting for %v", n, key), testTimeout, func() (bool, error) {
		inProcess, onServer = e.sessionsWaiting(pool, key)
		return inProcess+onServer == n, nil
	})
	if onServer > 0 {
		e.t.Fatalf("%d of %d Sessions wait on the server while a Session of their process holds the key; want all in the process", onServer, n)
	}
}

// A Session of the process that holds a key keeps the process's other
// Sessions waiting for it in the process, off the server, until it
// releases; they then take it in their turn.
func TestGateHeldKeepsSessionsInProcess(t *testing.T) {
	e := newEnv(t)
	pool := e.pool()
	key := StringKey("gate-held")
	a := e.lockGated(pool, key)
	e.awaitGranted(a, "holder")
	b := e.lockGated(pool, key)
	e.awaitWaitingSessions(pool, key, 1)
	c := e.lockGated(pool, key)
	e.awaitWaitingSessions(pool, key, 2)
	must(t, a.s.Unlock(e.ctx, key))
	e.awaitGranted(b, "first queued")
	if n := queued(pool, key, ModeExclusive, -1, 0); n != 1 {
		t.Fatalf("%d Sessions queued while the first queued holds the key; want 1", n)
	}
	select {
	case err := <-c.got:
		t.Fatalf("the second queued Session returned (%v) while the first held the key", err)
	default:
	}
	must(t, b.s.Unlock(e.ctx, key))
	e.awaitGranted(c, "second queued")
	must(t, c.s.Unlock(e.ctx, key))
	for _, s := range []*Session{a.s, b.s, c.s} {
		must(t, s.Close(e.ctx))
	}
	awaitAcquired(t, pool, 0)
}

// The Session queued behind a holder of its process gets the key however
// the holder lets it go: its last Unlock of a re-entered key, UnlockMany,
// Close, or the loss of its connection.
func TestGateLeftWhenHoldEnds(t *testing.T) {
	for _, tc := range []struct {
		name string
		end  func(e *env, a *Session, key Key)
	}{
		{"unlock re-entered", func(e *env, a *Session, key Key) {
			if ok, err := a.Lock(e.ctx, key); !ok || err != nil {
				e.t.Fatalf("re-entrant Lock = %v, %v", ok, err)
			}
			must(e.t, a.Unlock(e.ctx, key))
			if n := queued(a.pool, key, ModeExclusive, -1, 0); n != 1 {
				e.t.Fatalf("%d Sessions queued after the first of two Unlocks; want 1", n)
			}
			must(e.t, a.Unlock(e.ctx, key))
		}},
		{"UnlockMany", func(e *env, a *Session, key Key) {
			must(e.t, a.UnlockMany(e.ctx, []Key{key}))
		}},
		{"UnlockMany of it and another key", func(e *env, a *Session, key Key) {
			another := StringKey("gate-left-another")
			if ok, err := a.Lock(e.ctx, another); !ok || err != nil {
				e.t.Fatalf("Lock of another key = %v, %v", ok, err)
			}
			must(e.t, a.Unlock(e.ctx, another))
			if n := queued(a.pool, key, ModeExclusive, -1, 0); n != 1 {
				e.t.Fatalf("%d Sessions queued after the Unlock of another key; want 1", n)
			}
			if ok, err := a.Lock(e.ctx, another); !ok || err != nil {
				e.t.Fatalf("Lock of another key = %v, %v", ok, err)
			}
			must(e.t, a.UnlockMany(e.ctx, []Key{another, key}))
		}},
		{"Close", func(e *env, a *Session, key Key) {
			must(e.t, a.Close(e.ctx))
		}},
		{"Unlock after WithConn unlocked it", func(e *env, a *Session, key Key) {
			must(e.t, a.WithConn(e.ctx, func(c *pgx.Conn) error {
				_, err := c.Exec(e.ctx, "SELECT pg_advisory_unlock($1)", mustInt64(key))
				return err
			}))
			// The Session still counts its hold, and keeps the gate, until
			// its Unlock finds the key not held and ends it.
			if err := a.Unlock(e.ctx, key); !errors.Is(err, ErrLockLost) {
				e.t.Fatalf("Unlock of a key WithConn unlocked = %v; want ErrLockLost", err)
			}
		}},
		{"cut off under a WithConn that kept the connection", func(e *env, a *Session, key Key) {
			inFn, release, returned := make(chan struct{}), make(chan struct{}), make(chan error, 1)
			go func() {
				returned <- a.WithConn(context.Background(), func(*pgx.Conn) error {
					close(inFn)
					<-release // ignores the Close: cut off after cleanupTimeout
					return nil
				})
			}()
			receive(e, inFn, "the WithConn callback running")
			closed := make(chan error, 1)
			go func() { closed <- a.Close(context.Background()) }()
			e.awaitDone(a.Done(), "holder cut off")
			close(release)
			receive(e, returned, "the WithConn callback returning")
			receive(e, closed, "Close returning")
		}},
		{"terminated", func(e *env, a *Session, key Key) {
			e.terminate(e.leaderPID(key))
			e.awaitDone(a.Done(), "terminated holder")
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t)
			pool := e.pool()
			key := StringKey("gate-left-" + tc.name)
			a := e.lockGated(pool, key)
			e.awaitGranted(a, "holder")
			b := e.lockGated(pool, key)
			e.awaitWaitingSessions(pool, key, 1)
			tc.end(e, a.s, key)
			e.awaitGranted(b, tc.name)
			must(t, b.s.Unlock(e.ctx, key))
			_ = a.s.Close(e.ctx)
			must(t, b.s.Close(e.ctx))
			awaitAcquired(t, pool, 0)
		})
	}
}

// sessionsWaiting returns how many Sessions wait for key exclusively in
// the process's queue of pool's gate, and how many backends wait for it on
// the server.
func (e *env) sessionsWaiting(pool *pgxpool.Pool, key Key) (inProcess, onServer int) {
	inProcess = max(0, queued(pool, key, ModeExclusive, -1, 0))
	for _, r := range e.lockRows(key) {
		if !r.Granted {
			onServer++
		}
	}
	return inProcess, onServer
}

// awaitOnServer waits until a Session waiting for key shows, in the
// process's queue of pool's gate or on the server, and fails unless it
// waits on the server.
func (e *env) awaitOnServer(pool *pgxpool.Pool, key Key, what string) {
	e.t.Helper()
	var inProcess, onServer int
	pgtest.Await(e.t, what+": a Session waiting for "+key.String(), testTimeout, func() (bool, error) {
		inProcess, onServer = e.sessionsWaiting(pool, key)
		return inProcess+onServer > 0, nil
	})
	if inProcess > 0 {
		e.t.Fatalf("%s: the Session waits in the process's gate; want it waiting on the server", what)
	}
}

// Sessions on connections their caller owns (NewConnSession) have no pool,
// and the gate is per pool: they wait on the server. A gate shared by every
// such Session of the process would keep one waiting in the process behind
// a holder on another database, where its key is free, or behind a holder
// whose backend was terminated, which such a Session (no health watcher)
// notices only at its next call.
func TestGateNotForConnSessions(t *testing.T) {
	t.Run("terminated holder", func(t *testing.T) {
		e := newEnv(t)
		key := StringKey("gate-conn-terminated")
		ca := e.conn()
		a, err := NewConnSession(ca)
		must(t, err)
		t.Cleanup(func() { _ = a.Close(context.Background()) })
		if ok, err := a.Lock(e.ctx, key); !ok || err != nil {
			t.Fatalf("Lock = %v, %v", ok, err)
		}
		b := e.lockConnSession(e.conn(), key)
		e.awaitOnServer(nil, key, "behind a holder on a lent connection")
		e.terminate(ca.PgConn().PID())
		e.awaitGranted(b, "after the holder's backend was terminated")
		must(t, b.s.Unlock(e.ctx, key))
		must(t, b.s.Close(e.ctx))
		if err := a.Close(e.ctx); !errors.Is(err, ErrLockLost) {
			t.Errorf("Close of the terminated holder = %v; want ErrLockLost", err)
		}
	})
	t.Run("other database", func(t *testing.T) {
		e := newEnv(t)
		key := StringKey("gate-conn-other-db")
		other := e.otherDatabase("advisory_gate_other")
		a, err := NewConnSession(e.conn())
		must(t, err)
		t.Cleanup(func() { _ = a.Close(context.Background()) })
		if ok, err := a.Lock(e.ctx, key); !ok || err != nil {
			t.Fatalf("Lock = %v, %v", ok, err)
		}
		b := e.lockConnSession(other, key)
		var got error
		returned := false
		pgtest.Await(t, "the Session on another database to return or queue in the process", testTimeout, func() (bool, error) {
			select {
			case got = <-b.got:
				returned = true
				return true, nil
			default:
			}
			return queued(nil, key, ModeExclusive, -1, 0) > 0, nil
		})
		if !returned {
			t.Fatalf("a Session on another database, where %v is free, waits in the process's gate behind a holder on this one", key)
		}
		must(t, got)
		must(t, b.s.Unlock(e.ctx, key))
		must(t, b.s.Close(e.ctx))
		must(t, a.Unlock(e.ctx, key))
		must(t, a.Close(e.ctx))
	})
}

// lockConnSession is lockGated on a Session on c (NewConnSession).
func (e *env) lockConnSession(c *pgx.Conn, key Key) gated {
	e.t.Helper()
	s, err := NewConnSession(c)
	must(e.t, err)
	return e.lockOn(s, key)
}

// otherDatabase makes a database of the test's own, name, on the test's
// server, and returns a connection to it, closed and the database dropped
// when the test ends (after its cleanups, before the end-of-test checks'
// closers).
func (e *env) otherDatabase(name string) *pgx.Conn {
	e.t.Helper()
	admin := e.adminConn()
	for _, sql := range []string{"DROP DATABASE IF EXISTS " + name + " WITH (FORCE)", "CREATE DATABASE " + name} {
		if _, err := admin.Exec(e.ctx, sql); err != nil {
			e.t.Fatalf("making database %s: %v", name, err)
		}
	}
	cfg, err := pgx.ParseConfig(e.dsn)
	must(e.t, err)
	cfg.Database = name
	c, err := pgx.ConnectConfig(e.ctx, cfg)
	must(e.t, err)
	e.t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), pgtest.FailedGrace)
		defer cancel()
		c.Close(ctx)
		_, _ = admin.Exec(ctx, "DROP DATABASE IF EXISTS "+name+" WITH (FORCE)")
	})
	return c
}

// panicOnHold is a HoldTracer whose first TraceHoldStart panics with the
// tracer itself.
type panicOnHold struct{ panicked bool }

func (p *panicOnHold) TraceWaitStart(ctx context.Context, _ TraceWaitStartData) context.Context {
	return ctx
}
func (p *panicOnHold) TraceWaitEnd(context.Context, TraceWaitEndData) {}
func (p *panicOnHold) TraceHoldStart(ctx context.Context, _ TraceHoldStartData) context.Context {
	if !p.panicked {
		p.panicked = true
		panic(p)
	}
	return ctx
}
func (p *panicOnHold) TraceHoldEnd(context.Context, TraceHoldEndData) {}

// A Lock that took the key through the gate and then panicked (its
// tracer's, recovered by the caller) keeps the gate as any holder does, and
// its Unlock lets the next Session through: the gate is not left closed for
// good.
func TestGateLeftAfterPanickingLock(t *testing.T) {
	e := newEnv(t)
	pool := e.pool()
	key := StringKey("gate-panic")
	tr := &panicOnHold{}
	a, err := NewSession(e.ctx, pool, WithTracer(tr))
	must(t, err)
	t.Cleanup(func() { _ = a.Close(context.Background()) })
	func() {
		defer func() {
			if r := recover(); r != tr {
				t.Fatalf("recovered %v; want the tracer's panic", r)
			}
		}()
		ok, err := a.Lock(e.ctx, key)
		t.Fatalf("Lock returned %v, %v instead of letting the tracer's panic go on", ok, err)
	}()
	if held := a.Held(); len(held) != 1 || held[0].Key != key {
		t.Fatalf("Held after the panic = %v; want %v (the server granted it)", held, key)
	}
	b := e.lockGated(pool, key)
	e.awaitWaitingSessions(pool, key, 1)
	must(t, a.Unlock(e.ctx, key))
	if n := queued(pool, key, ModeExclusive, -1, 0); n > 0 {
		t.Fatalf("%d Sessions still queued in the process after the holder's Unlock; want the gate left", n)
	}
	e.awaitGranted(b, "after the Unlock of the holder whose Lock panicked")
	must(t, b.s.Unlock(e.ctx, key))
	must(t, b.s.Close(e.ctx))
	must(t, a.Close(e.ctx))
	awaitAcquired(t, pool, 0)
}
