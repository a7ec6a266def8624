package advisory

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/seed0ad592b7/advisory/internal/pgtest"
)

// lockPID returns the backend pid of the lock's own connection.
func lockPID(t *testing.T, ctx context.Context, l *Lock) uint32 {
	t.Helper()
	var pid uint32
	must(t, l.WithConn(ctx, func(c *pgx.Conn) error { pid = c.PgConn().PID(); return nil }))
	return pid
}

func (e *env) terminate(pid uint32) {
	e.t.Helper()
	var ok bool
	must(e.t, e.adminConn().QueryRow(e.ctx, "SELECT pg_terminate_backend($1)", int64(pid)).Scan(&ok))
	if !ok {
		e.t.Fatalf("pg_terminate_backend(%d) = false", pid)
	}
}

// awaitDone waits for a lock or session to report its end, failing the
// test after notHung.
func (e *env) awaitDone(done <-chan struct{}, what string) {
	e.t.Helper()
	select {
	case <-done:
	case <-time.After(notHung):
		e.t.Fatalf("%s: Done() not closed after %v", what, notHung)
	}
}

// Terminating the holder's backend: Done closes, Err and Release say
// ErrLockLost, fenced statements fail, and another session can take the key.
func TestTerminatedHolder(t *testing.T) {
	e := newEnv(t)
	freshKeyNames(t)
	pool := e.pool()
	other := e.conn()
	key := StringKey("terminated")
	lock, err := Acquire(e.ctx, pool, key, HealthInterval(50*time.Millisecond))
	must(t, err)
	if _, err := lock.Exec(e.ctx, "SELECT 1"); err != nil {
		t.Fatalf("fenced statement while held: %v", err)
	}
	start := time.Now()
	e.terminate(lockPID(t, e.ctx, lock))
	e.awaitDone(lock.Done(), "terminated holder")
	t.Logf("loss noticed %v after pg_terminate_backend (health interval 50ms)", time.Since(start))
	if !errors.Is(lock.Err(), ErrLockLost) {
		t.Errorf("Err() = %v; want ErrLockLost", lock.Err())
	}
	var lossErr *Error
	if !errors.As(lock.Err(), &lossErr) || lossErr.Key != key || !strings.Contains(lock.Err().Error(), `"terminated" (`+key.String()+`)`) {
		t.Errorf("the session-loss error %q does not name its key %s", lock.Err(), key.describe())
	}
	if _, err := lock.Exec(e.ctx, "SELECT 1"); !errors.Is(err, ErrLockLost) {
		t.Errorf("fenced statement after the loss = %v; want ErrLockLost", err)
	}
	if err := lock.Release(e.ctx); !errors.Is(err, ErrLockLost) {
		t.Errorf("Release after the loss = %v; want ErrLockLost", err)
	}
	if err := lock.Release(e.ctx); err != nil {
		t.Errorf("second Release = %v; want nil", err)
	}
	// The client reads the FATAL before the backend has exited and freed its
	// locks: await the server state.
	e.eventually("another session can take the key after the holder's backend died", func(*pgx.Conn) (bool, error) {
		return e.tryFrom(other, key), nil
	})
}

// Do cancels fn's context when the lock is lost and returns ErrLockLost
// joined with fn's error.
func TestDoLost(t *testing.T) {
	e := newEnv(t)
	pool := e.pool()
	key := Int64Key(31)
	pids := make(chan uint32, 1)
	type result struct {
		acquired bool
		err      error
		cause    error
	}
	done := make(chan result, 1)
	// The loss must end fn's wait; the deadline only bounds it, so that a
	// loss never told fails the test after notHung (cause: the deadline).
	ctx, cancel := context.WithTimeout(e.ctx, notHung)
	defer cancel()
	go func() {
		var cause error
		acquired, err := Do(ctx, pool, key, func(ctx context.Context) error {
			var pid uint32
			if err := pool.QueryRow(ctx, `SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND objid = 31 AND granted`).Scan(&pid); err != nil {
				return err
			}
			pids <- pid
			<-ctx.Done()
			cause = context.Cause(ctx)
			return ctx.Err()
		}, HealthInterval(50*time.Millisecond))
		done <- result{acquired, err, cause}
	}()
	select {
	case pid := <-pids:
		e.terminate(pid)
	case r := <-done:
		t.Fatalf("Do returned before the loss: %+v", r)
	}
	r := <-done
	if !r.acquired || !errors.Is(r.err, ErrLockLost) || !errors.Is(r.err, context.Canceled) {
		t.Errorf("Do after the loss = %v, %v; want true and ErrLockLost joined with fn's context.Canceled", r.acquired, r.err)
	}
	if !errors.Is(r.cause, ErrLockLost) {
		t.Errorf("fn's context cause = %v; want ErrLockLost", r.cause)
	}
}

// Sessions are told too, with every hold gone.
func TestSessionLost(t *testing.T) {
	e := newEnv(t)
	pool := e.pool()
	s, err := NewSession(e.ctx, pool, HealthInterval(50*time.Millisecond))
	must(t, err)
	for _, k := range []Key{Int64Key(1), PairKey(2, 3)} {
		_, err := s.Lock(e.ctx, k)
		must(t, err)
	}
	var pid uint32
	must(t, s.WithConn(e.ctx, func(c *pgx.Conn) error { pid = c.PgConn().PID(); return nil }))
	e.terminate(pid)
	e.awaitDone(s.Done(), "terminated session")
	if !errors.Is(s.Err(), ErrLockLost) {
		t.Errorf("Err() = %v; want ErrLockLost", s.Err())
	}
	if held := s.Held(); len(held) != 0 {
		t.Errorf("Held() after the loss = %+v", held)
	}
	if _, err := s.Lock(e.ctx, Int64Key(4)); !errors.Is(err, ErrLockLost) {
		t.Errorf("Lock after the loss = %v; want ErrLockLost", err)
	}
	if err := s.Close(e.ctx); !errors.Is(err, ErrLockLost) {
		t.Errorf("first Close after the loss = %v; want ErrLockLost", err)
	}
	if err := s.Close(e.ctx); err != nil {
		t.Errorf("second Close = %v", err)
	}
}

// A server restart ends every session; afterwards new locks work and the
// pool recovers.
func TestServerRestart(t *testing.T) {
	srv, err := pgtest.Start(context.Background(), pgtest.Options{Private: true})
	must(t, err)
	t.Cleanup(func() { must(t, srv.Stop()) })
	e := newEnvOn(t, srv)
	pool := e.pool()
	a, err := Acquire(e.ctx, pool, Int64Key(1), HealthInterval(50*time.Millisecond))
	must(t, err)
	b, err := Acquire(e.ctx, pool, PairKey(1, 2), Shared(), HealthInterval(50*time.Millisecond))
	must(t, err)
	s, err := NewSession(e.ctx, pool, HealthInterval(50*time.Millisecond))
	must(t, err)
	_, err = s.Lock(e.ctx, Int64Key(3))
	must(t, err)

	must(t, srv.Restart(e.ctx))
	for name, d := range map[string]interface {
		Done() <-chan struct{}
		Err() error
	}{"lock a": a, "lock b": b, "session": s} {
		e.awaitDone(d.Done(), name)
		if !errors.Is(d.Err(), ErrLockLost) {
			t.Errorf("%s: Err() = %v; want ErrLockLost", name, d.Err())
		}
	}
	for _, err := range []error{a.Release(e.ctx), b.Release(e.ctx), s.Close(e.ctx)} {
		if !errors.Is(err, ErrLockLost) {
			t.Errorf("release after the restart = %v; want ErrLockLost", err)
		}
	}
	lock, err := Acquire(e.ctx, pool, Int64Key(1))
	must(t, err)
	if !lock.Acquired() {
		t.Error("cannot lock after the restart")
	}
	must(t, lock.Release(e.ctx))
}

// TTL: fn's context is cancelled at the deadline and the lock released even
// while fn ignores its context; Do returns ErrTTLExceeded.
func TestTTL(t *testing.T) {
	e := newEnv(t)
	freshKeyNames(t)
	pool := e.pool()
	other := e.conn()
	key := StringKey("ttl")

	var cause error
	acquired, err := Do(e.ctx, pool, key, func(ctx context.Context) error {
		<-ctx.Done()
		cause = context.Cause(ctx)
		return nil
	}, TTL(50*time.Millisecond))
	if !acquired || !errors.Is(err, ErrTTLExceeded) || !errors.Is(cause, ErrTTLExceeded) {
		t.Errorf("Do with TTL = %v, %v, fn's cause %v; want ErrTTLExceeded", acquired, err, cause)
	}
	if !e.tryFrom(other, key) {
		t.Error("key held after the TTL")
	}

	// fn ignores its context: the lock is released under it anyway.
	released := make(chan struct{})
	acquired, err = Do(e.ctx, pool, key, func(context.Context) error {
		e.eventually("the key freed by its TTL while fn runs", func(c *pgx.Conn) (bool, error) {
			return e.tryFrom(c, key), nil
		})
		close(released)
		return nil
	}, TTL(50*time.Millisecond))
	<-released
	if !acquired || !errors.Is(err, ErrTTLExceeded) {
		t.Errorf("Do with TTL and a stubborn fn = %v, %v; want ErrTTLExceeded", acquired, err)
	}

	lock, err := Acquire(e.ctx, pool, key, TTL(20*time.Millisecond))
	must(t, err)
	e.awaitDone(lock.Done(), "lock with TTL")
	if !errors.Is(lock.Err(), ErrTTLExceeded) || !errors.Is(lock.Release(e.ctx), ErrTTLExceeded) {
		t.Errorf("Err() after the TTL = %v; want ErrTTLExceeded from Err and Release", lock.Err())
	}
	if !strings.Contains(lock.Err().Error(), key.describe()) {
		t.Errorf("the TTL error %q does not name its key %s", lock.Err(), key.describe())
	}
}

// While a lock is held its connection carries the keep-alive settings that
// bound the server side of a network cut. They are sent once per connection,
// in the first lock's round trip, and stay: the next lock on that
// connection costs its two statements only.
func TestKeepaliveSettings(t *testing.T) {
	e := newEnv(t)
	var counter queryCounter
	pool := e.pool(func(c *pgxpool.Config) { c.MaxConns = 1; c.ConnConfig.Tracer = &counter })
	show := func(c *pgx.Conn) string {
		var idle, interval, count, user string
		must(t, c.QueryRow(e.ctx, `SELECT current_setting('tcp_keepalives_idle'), current_setting('tcp_keepalives_interval'),
			current_setting('tcp_keepalives_count'), current_setting('tcp_user_timeout')`).Scan(&idle, &interval, &count, &user))
		return strings.Join([]string{idle, interval, count, user}, " ")
	}
	for round := range 2 {
		lock, err := Acquire(e.ctx, pool, Int64Key(8))
		must(t, err)
		var held string
		must(t, lock.WithConn(e.ctx, func(c *pgx.Conn) error { held = show(c); return nil }))
		if held != "1 1 4 5000" {
			t.Errorf("round %d: settings while held = %q; want \"1 1 4 5000\" for the default 1s health interval", round, held)
		}
		before := counter.n.Load()
		must(t, lock.Release(e.ctx))
		lock, err = Acquire(e.ctx, pool, Int64Key(8))
		must(t, err)
		must(t, lock.Release(e.ctx))
		// One pooled connection: the second Acquire reuses it, keep-alives
		// already set: unlock (and unlock_all, as WithConn was used), then
		// lock + unlock, nothing else.
		if n := counter.n.Load() - before; n != 4 {
			t.Errorf("round %d: %d statements for Release, Acquire, Release on a tuned connection; want 4", round, n)
		}
	}
	s, err := NewSession(e.ctx, pool, HealthInterval(3*time.Second))
	must(t, err)
	_, err = s.Lock(e.ctx, Int64Key(9))
	must(t, err)
	var held string
	must(t, s.WithConn(e.ctx, func(c *pgx.Conn) error { held = show(c); return nil }))
	if held != "3 3 4 15000" {
		t.Errorf("a session with a 3s health interval has %q; want its own keep-alives \"3 3 4 15000\"", held)
	}
	must(t, s.Close(e.ctx))
}

// ReleaseAll ends every lock and session on a pool, so pool.Close does not
// wait for them; their later Release does nothing.
func TestReleaseAll(t *testing.T) {
	e := newEnv(t)
	pool := e.pool()
	other := e.pool()
	a, err := Acquire(e.ctx, pool, Int64Key(1))
	must(t, err)
	s, err := NewSession(e.ctx, pool)
	must(t, err)
	_, err = s.Lock(e.ctx, Int64Key(2))
	must(t, err)
	kept, err := Acquire(e.ctx, other, Int64Key(3))
	must(t, err)

	must(t, ReleaseAll(e.ctx, pool))
	awaitAcquired(t, pool, 0)
	for _, d := range []<-chan struct{}{a.Done(), s.Done()} {
		e.awaitDone(d, "released by ReleaseAll")
	}
	if rows := e.lockRows(Int64Key(3)); len(rows) != 1 {
		t.Errorf("ReleaseAll touched another pool's lock: rows %+v", rows)
	}
	if err := a.Release(e.ctx); err != nil || a.Err() != nil {
		t.Errorf("Release after ReleaseAll = %v, Err() = %v; want nil, nil", err, a.Err())
	}
	must(t, kept.Release(e.ctx))
}
