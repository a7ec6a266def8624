package advisory

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"go.uber.org/goleak"

	"github.com/seed0ad592b7/advisory/internal/pgtest"
)

// Lock table exhaustion on a private server with a small lock table, for
// every kind of lock, and then a server that is gone: every call fails
// with a clear error bounded by its context, held locks are reported lost,
// nothing panics and no goroutine or pool connection is left.
func TestBadServer(t *testing.T) {
	srv, err := pgtest.Start(context.Background(), pgtest.Options{Private: true, Settings: map[string]string{
		"max_locks_per_transaction": "10", "max_connections": "10",
	}})
	must(t, err)
	t.Cleanup(func() { must(t, srv.Stop()) })

	exhaust := []badCase{
		{name: "Session.Lock", want: ErrTooManyLocks, run: func(e *env, p *pgxpool.Pool) error {
			s := must2(NewSession(e.ctx, p))(e.t)
			defer s.Close(e.ctx)
			for i := range 100_000 {
				if _, err := s.Lock(e.ctx, PairKey(1, int32(i))); err != nil {
					return err
				}
			}
			return nil
		}},
		{name: "LockTx", want: ErrTooManyLocks, run: func(e *env, p *pgxpool.Pool) error {
			tx := must2(p.Begin(e.ctx))(e.t)
			defer tx.Rollback(e.ctx)
			for i := range 100_000 {
				if _, err := LockTx(e.ctx, tx, PairKey(2, int32(i)), Shared()); err != nil {
					return err
				}
			}
			return nil
		}},
		// A full lock table also stops new backends from starting: the
		// connection fails with FATAL 53200, which must still read as
		// ErrTooManyLocks.
		{name: "Acquire while a session fills the table", want: ErrTooManyLocks, run: func(e *env, p *pgxpool.Pool) error {
			s := must2(NewSession(e.ctx, p))(e.t)
			defer s.Close(e.ctx)
			for i := 0; ; i++ {
				if _, err := s.Lock(e.ctx, PairKey(3, int32(i)), NoWait()); err != nil {
					if !errors.Is(err, ErrTooManyLocks) {
						return err
					}
					break
				}
			}
			return acquireErr(Acquire(e.ctx, p, k777()))
		}},
	}
	for _, c := range exhaust {
		t.Run("lock table full/"+c.name, func(t *testing.T) {
			e := newEnvOn(t, srv)
			pool := e.pool()
			err := runBad(t, e, pool, c.run)
			checkBad(t, c, err)
			if err != nil && !strings.Contains(err.Error(), "max_locks_per_transaction") {
				t.Errorf("error lacks the hint: %v", err)
			}
		})
	}

	t.Run("server gone", func(t *testing.T) {
		defer goleak.VerifyNone(t)
		ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
		defer cancel()
		pool, err := pgxpool.New(ctx, srv.DSN)
		must(t, err)
		defer pool.Close()
		// On a failure below, the held locks must not keep pool.Close
		// waiting (for the whole package's timeout).
		defer func() { _ = ReleaseAll(context.Background(), pool) }()
		lock := must2(Acquire(ctx, pool, k777(), HealthInterval(50*time.Millisecond)))(t)
		s := must2(NewSession(ctx, pool, HealthInterval(50*time.Millisecond)))(t)
		must2(s.Lock(ctx, k777(), Shared(), NoWait()))(t) // not granted: the lock is exclusive elsewhere
		must2(s.Lock(ctx, PairKey(5, 5)))(t)
		must(t, srv.Stop())

		// Held locks are reported lost within the health interval (50 ms;
		// notHung allows for a loaded machine).
		bound := time.After(notHung)
		for what, done := range map[string]<-chan struct{}{"lock": lock.Done(), "session": s.Done()} {
			select {
			case <-done:
			case <-bound:
				t.Fatalf("%s: Done not closed %v after the server stopped (health interval 50 ms)", what, notHung)
			}
		}
		if !errors.Is(lock.Err(), ErrLockLost) || !errors.Is(s.Err(), ErrLockLost) {
			t.Errorf("Err after the server stopped: lock %v, session %v; want ErrLockLost", lock.Err(), s.Err())
		}
		if err := lock.Release(ctx); !errors.Is(err, ErrLockLost) {
			t.Errorf("Release after the server stopped: %v; want ErrLockLost", err)
		}
		if err := s.Close(ctx); !errors.Is(err, ErrLockLost) {
			t.Errorf("Close after the server stopped: %v; want ErrLockLost", err)
		}
		if err := s.WithConn(ctx, func(*pgx.Conn) error { return nil }); !errors.Is(err, ErrLockLost) {
			t.Errorf("WithConn after the server stopped: %v; want ErrLockLost", err)
		}

		// New calls fail, bounded by their context.
		calls := map[string]func(context.Context) error{
			"Acquire":    func(ctx context.Context) error { return acquireErr(Acquire(ctx, pool, k777())) },
			"Do":         func(ctx context.Context) error { return boolErr(Do(ctx, pool, k777(), noop)) },
			"DoTx":       func(ctx context.Context) error { return boolErr(DoTx(ctx, pool, k777(), noopTx)) },
			"NewSession": func(ctx context.Context) error { return sessionErr(NewSession(ctx, pool)) },
		}
		for name, call := range calls {
			cctx, cancel := context.WithTimeout(ctx, 2*time.Second)
			start := time.Now()
			err := call(cctx)
			cancel()
			if err == nil {
				t.Errorf("%s on a stopped server succeeded", name)
				continue
			}
			t.Logf("%s on a stopped server (%v): %v", name, time.Since(start).Round(time.Millisecond), err)
			if !strings.HasPrefix(err.Error(), "advisory: ") {
				t.Errorf("%s: error %q lacks the package prefix", name, err)
			}
			// A hang guard only: the time is logged above.
			if d := time.Since(start); d > 2*time.Second+soakHangGuard {
				t.Errorf("%s took %v with a 2 s context", name, d)
			}
		}
		awaitAcquired(t, pool, 0)
	})
}
