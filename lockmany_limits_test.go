package advisory

import (
	"context"
	"errors"
	"slices"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/seed0ad592b7/advisory/internal/pgtest"
)

// A LockMany that runs the server's lock table out fails with
// ErrTooManyLocks and leaves none of its keys held, although the statement
// had taken thousands before it failed; earlier holds stay.
func TestLockManyTooMany(t *testing.T) {
	e := newEnv(t)
	pool := e.pool()
	s := e.session(pool)
	earlier := StringKey("earlier")
	_, err := s.Lock(e.ctx, earlier)
	must(t, err)
	keys, _ := mixedKeys(20_000) // the default lock table has room for about 8,000
	_, err = s.LockMany(e.ctx, keys)
	var pgErr *pgconn.PgError
	if !errors.Is(err, ErrTooManyLocks) || !errors.As(err, &pgErr) || errors.Is(err, ErrLockLost) {
		t.Fatalf("LockMany(20,000) = %v; want ErrTooManyLocks with its PgError", err)
	}
	if granted, _ := e.grantedExcept(0); !slices.Equal(granted, []Key{earlier}) {
		t.Errorf("after the failure the server holds %d keys; want only the earlier hold", len(granted))
	}
	if held := s.Held(); len(held) != 1 || held[0].Key != earlier {
		t.Errorf("Held() = %+v; want the earlier hold only", held)
	}
	must(t, s.Close(e.ctx))
}

// 10,000 keys are taken and released in one statement each (the issue
// allows three round trips), on a server with a lock table big enough.
func TestLockMany10k(t *testing.T) {
	srv, err := pgtest.Start(context.Background(), pgtest.Options{Settings: map[string]string{
		"max_locks_per_transaction": "256",
	}})
	must(t, err)
	t.Cleanup(func() { must(t, srv.Stop()) })
	e := newEnvOn(t, srv)
	var counter roundTrips
	pool := e.pool(func(c *pgxpool.Config) { c.ConnConfig.Tracer = &counter })
	s := e.session(pool)
	keys, canonical := mixedKeys(10_000)
	// UnlockMany takes only the mode (Shared) among the options.
	for _, opt := range []struct{ lock, unlock Option }{{nil, nil}, {Shared(), Shared()}, {NoWait(), nil}, {WaitTimeout(5 * time.Second), nil}} {
		counter.n.Store(0)
		start := time.Now()
		ok, err := s.LockMany(e.ctx, keys, opt.lock)
		if err != nil || !ok {
			t.Fatalf("LockMany(10,000) = %v, %v", ok, err)
		}
		took := time.Since(start)
		if n := counter.n.Load(); n > 3 {
			t.Errorf("LockMany(10,000) sent %d statements; want at most 3", n)
		}
		t.Logf("LockMany(10,000): %d statements, %v", counter.n.Load(), took)
		if granted, _ := e.grantedExcept(0); !slices.Equal(granted, canonical) {
			t.Errorf("the server holds %d keys; want the 10,000", len(granted))
		}
		counter.n.Store(0)
		must(t, s.UnlockMany(e.ctx, keys, opt.unlock))
		if n := counter.n.Load(); n > 3 {
			t.Errorf("UnlockMany(10,000) sent %d statements; want at most 3", n)
		}
		if granted, _ := e.grantedExcept(0); len(granted) != 0 {
			t.Errorf("after UnlockMany the server holds %d keys", len(granted))
		}
	}
	must(t, s.Close(e.ctx))
}
