package advisory

import (
	"context"
	"errors"
	"math/rand/v2"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// A sliced wait whose ctx is cancelled writes nothing to the server log
// (SPEC §2a): the slice in flight is left to end on its own rather than
// cancelled (a cancel request logged "canceling statement due to user
// request" with the whole DO block), and a grant that lands as it ends is
// dropped before the connection goes back. Checked for every waiting entry
// point, with the holder letting go right after the cancel (so the slice
// left running often gets the key); the key is then free for others, no
// connection stays acquired, and a Session whose Lock was cancelled takes
// its next lock.
func TestCancelledWaitLogsNothing(t *testing.T) {
	e := newEnv(t)
	checkLog := noErrorLogged(t)
	pool := e.pool(deadlockTimeout("4s", 10)) // slices of 1 s: the cancel lands mid-slice
	key := StringKey("cancel-quiet")
	other := e.conn()
	s, err := NewSession(e.ctx, pool)
	must(t, err)
	defer s.Close(e.ctx)
	for _, c := range []struct {
		name string
		sem  bool
		wait func(ctx context.Context) error
	}{
		{"Acquire", false, func(ctx context.Context) error {
			l, err := Acquire(ctx, pool, key, NoCohort()) // a server waiter, as another process's
			if err == nil {
				_ = l.Release(ctx)
			}
			return err
		}},
		{"Session.Lock", false, func(ctx context.Context) error { _, err := s.Lock(ctx, key); return err }},
		{"Session.LockMany", false, func(ctx context.Context) error { _, err := s.LockMany(ctx, []Key{Int64Key(9), key}); return err }},
		{"DoTx", false, func(ctx context.Context) error {
			_, err := DoTx(ctx, pool, key, func(context.Context, pgx.Tx) error { return errors.New("ran") })
			return err
		}},
		{"AcquireSemaphore", true, func(ctx context.Context) error {
			l, err := AcquireSemaphore(ctx, pool, key, 1, NoCohort())
			if err == nil {
				_ = l.Release(ctx)
			}
			return err
		}},
	} {
		var holder *Lock
		if c.sem {
			holder, err = AcquireSemaphore(e.ctx, pool, key, 1)
		} else {
			holder, err = Acquire(e.ctx, pool, key)
		}
		must(t, err)
		ctx, cancel := context.WithCancel(e.ctx)
		done := make(chan error, 1)
		go func() { done <- c.wait(ctx) }()
		e.awaitWaiters(1)
		cancel()
		if err := <-done; !errors.Is(err, context.Canceled) {
			t.Errorf("%s: a cancelled wait returned %v; want context.Canceled", c.name, err)
		}
		must(t, holder.Release(e.ctx)) // a slice left running may get the key now
		e.eventually(c.name+": the key is free for another session once the cancelled wait's slice ended", func(*pgx.Conn) (bool, error) {
			return e.tryFrom(other, holder.Key()), nil
		})
	}
	if ok, err := s.Lock(e.ctx, StringKey("cancel-quiet-next")); err != nil || !ok {
		t.Errorf("a Session whose waits were cancelled: the next Lock = %v, %v", ok, err)
	}
	must(t, s.Close(e.ctx))
	awaitAcquired(t, pool, 0)
	checkLog()
}

// WaitTimeout and a context deadline both give ErrTimeout; the connection
// that waited is healthy afterwards and its lock_timeout unchanged.
func TestWaitTimeout(t *testing.T) {
	e := newEnv(t)
	pool := e.pool()
	key := Int64Key(5)
	holder := e.acquire(pool, key)
	defer holder.Release(e.ctx)

	// The wait ends at the bound inside a wait slice, which the server ends
	// without an error (SPEC §2a): ErrTimeout, and no server error behind it.
	_, err := Acquire(e.ctx, pool, key, WaitTimeout(20*time.Millisecond))
	var pgErr *pgconn.PgError
	if !errors.Is(err, ErrTimeout) || errors.As(err, &pgErr) {
		t.Errorf("WaitTimeout: err = %v; want ErrTimeout with no PgError", err)
	}
	if errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("WaitTimeout: err matches context.DeadlineExceeded without a context deadline: %v", err)
	}

	ctx, cancel := context.WithTimeout(e.ctx, 20*time.Millisecond)
	_, err = Acquire(ctx, pool, key)
	cancel()
	if !errors.Is(err, ErrTimeout) || !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("ctx deadline: err = %v; want ErrTimeout and context.DeadlineExceeded", err)
	}

	// A Session's connection survives the timeout with its holds, and its
	// lock_timeout is the server default again.
	s, err := NewSession(e.ctx, pool)
	must(t, err)
	defer s.Close(e.ctx)
	_, err = s.Lock(e.ctx, Int64Key(6))
	must(t, err)
	_, err = s.Lock(e.ctx, key, WaitTimeout(10*time.Millisecond))
	if !errors.Is(err, ErrTimeout) {
		t.Errorf("Session.Lock(WaitTimeout) = %v; want ErrTimeout", err)
	}
	if held := s.Held(); len(held) != 1 || held[0].Key != Int64Key(6) {
		t.Errorf("Held() after a timeout = %+v; want the one earlier hold", held)
	}
	must(t, s.WithConn(e.ctx, func(c *pgx.Conn) error {
		var lockTimeout string
		if err := c.QueryRow(e.ctx, "SHOW lock_timeout").Scan(&lockTimeout); err != nil {
			return err
		}
		if lockTimeout != "0" {
			t.Errorf("lock_timeout after a bounded wait = %q; want the default 0", lockTimeout)
		}
		return nil
	}))
	if rows := e.lockRows(Int64Key(6)); len(rows) != 1 {
		t.Errorf("the session's earlier hold is gone: %+v", rows)
	}
	must(t, s.Close(e.ctx))
	awaitAcquired(t, pool, 1) // only the holder's
}

// Cancelling ctx mid-wait returns promptly and leaves nothing behind, also
// when the cancel lands just as the lock is granted: 200 rounds with the
// holder's release and the cancel at random moments.
func TestCancelMidWait(t *testing.T) {
	e := newEnv(t)
	pool := e.pool()
	holder := e.conn()
	key := Int64Key(77)
	rounds, acquired := 201, 0
	before := grantedThenCancelled.Load()
	for i := range rounds {
		if _, err := holder.Exec(e.ctx, "SELECT pg_advisory_lock($1)", int64(77)); err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithCancel(e.ctx)
		defer cancel() // each round cancels it; this is for go vet
		type result struct {
			lock *Lock
			err  error
		}
		done := make(chan result, 1)
		go func() {
			l, err := Acquire(ctx, pool, key)
			done <- result{l, err}
		}()
		if i%4 == 0 {
			e.awaitWaiters(1) // some rounds cancel a wait known to be on the server
		}
		// Three orders: a cancel mid-wait; the release just before the
		// cancel; the cancel just before the release, racing the grant.
		order := i % 3
		pause := func() { time.Sleep(time.Duration(rand.IntN(2000)) * time.Microsecond) } // jitter, not synchronisation
		unlock := func() {
			if _, err := holder.Exec(e.ctx, "SELECT pg_advisory_unlock($1)", int64(77)); err != nil {
				t.Fatal(err)
			}
		}
		var r result
		switch order {
		case 0:
			cancel()
			r = <-done
			unlock()
		case 1:
			unlock()
			pause()
			cancel()
			r = <-done
		case 2:
			cancel()
			pause() // about as long as a cancel request takes to reach the server
			unlock()
			r = <-done
		}
		switch {
		case r.err == nil && r.lock.Acquired():
			acquired++
			must(t, r.lock.Release(e.ctx))
		case r.err == nil:
			t.Fatalf("round %d: no error and not acquired from a waiting Acquire", i)
		case !errors.Is(r.err, context.Canceled):
			t.Fatalf("round %d: err = %v; want context.Canceled", i, r.err)
		}
		awaitAcquired(t, pool, 0) // a closed connection leaves the count a moment after
		if rows := e.lockRows(key); len(rows) != 0 {
			t.Fatalf("round %d (order %d, err %v): rows left %+v", i, order, r.err, rows)
		}
	}
	t.Logf("%d rounds: %d acquired before the cancel landed, %d cancelled (%d of them after the server had granted the lock)",
		rounds, acquired, rounds-acquired, grantedThenCancelled.Load()-before)
}
