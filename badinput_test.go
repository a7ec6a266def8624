package advisory

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

// badCase is one bad input: run does it and returns the error the caller
// sees; want is the sentinel it must match (nil: any error), and msg a
// substring the message must contain ("" for none). ok marks calls that
// must succeed (a second Release is a no-op).
type badCase struct {
	name string
	run  func(e *env, pool *pgxpool.Pool) error
	want error
	msg  string
	ok   bool
	// bare: the error need not start with "advisory: " (KeyFromLockRow's
	// does not, and says "invalid advisory key").
	bare bool
}

func cancelled() context.Context {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	return ctx
}

func expired() context.Context {
	ctx, cancel := context.WithDeadline(context.Background(), time.Now().Add(-time.Second))
	_ = cancel // already expired; nothing to release early
	return ctx
}

func noop(context.Context) error             { return nil }
func noopTx(context.Context, pgx.Tx) error   { return nil }
func acquireErr(l *Lock, err error) error    { return err }
func boolErr(_ bool, err error) error        { return err }
func sessionErr(_ *Session, err error) error { return err }

// must2 (as must2(f())(t)) returns f's value, failing t on f's error.
func must2[T any](v T, err error) func(*testing.T) T {
	return func(t *testing.T) T {
		t.Helper()
		must(t, err)
		return v
	}
}

// Bad input on a live server: each case gives a clear error matching the
// right sentinel where one applies, never panics, and leaves nothing behind
// (newEnv's checks: no advisory lock, no acquired connection, no goroutine).
func TestBadInput(t *testing.T) {
	k := Int64Key(777)
	cases := []badCase{
		// The zero Key.
		{name: "zero key/Acquire", want: ErrInvalidKey, run: func(e *env, p *pgxpool.Pool) error { return acquireErr(Acquire(e.ctx, p, Key{})) }},
		{name: "zero key/Do", want: ErrInvalidKey, run: func(e *env, p *pgxpool.Pool) error { return boolErr(Do(e.ctx, p, Key{}, noop)) }},
		{name: "zero key/DoTx", want: ErrInvalidKey, run: func(e *env, p *pgxpool.Pool) error { return boolErr(DoTx(e.ctx, p, Key{}, noopTx)) }},
		{name: "zero key/LockTx", want: ErrInvalidKey, run: func(e *env, p *pgxpool.Pool) error {
			tx := must2(p.Begin(e.ctx))(e.t)
			defer tx.Rollback(e.ctx)
			return boolErr(LockTx(e.ctx, tx, Key{}))
		}},
		{name: "zero key/Session.Lock", want: ErrInvalidKey, run: func(e *env, p *pgxpool.Pool) error {
			s := must2(NewSession(e.ctx, p))(e.t)
			defer s.Close(e.ctx)
			return boolErr(s.Lock(e.ctx, Key{}))
		}},
		{name: "zero key/Session.Unlock", want: ErrInvalidKey, run: func(e *env, p *pgxpool.Pool) error {
			s := must2(NewSession(e.ctx, p))(e.t)
			defer s.Close(e.ctx)
			return s.Unlock(e.ctx, Key{})
		}},
		{name: "zero key/KeyFromLockRow", want: ErrInvalidKey, bare: true, run: func(*env, *pgxpool.Pool) error {
			_, err := KeyFromLockRow(1, 2, 0)
			return err
		}},

		// nil pool, nil tx, finished tx.
		{name: "nil pool/Acquire", msg: "nil *pgxpool.Pool", run: func(e *env, _ *pgxpool.Pool) error { return acquireErr(Acquire(e.ctx, nil, k)) }},
		{name: "nil pool/Do", msg: "nil *pgxpool.Pool", run: func(e *env, _ *pgxpool.Pool) error { return boolErr(Do(e.ctx, nil, k, noop)) }},
		{name: "nil pool/DoTx", msg: "nil *pgxpool.Pool", run: func(e *env, _ *pgxpool.Pool) error { return boolErr(DoTx(e.ctx, nil, k, noopTx)) }},
		{name: "nil pool/NewSession", msg: "nil *pgxpool.Pool", run: func(e *env, _ *pgxpool.Pool) error { return sessionErr(NewSession(e.ctx, nil)) }},
		{name: "nil tx/LockTx", msg: "nil pgx.Tx", run: func(e *env, _ *pgxpool.Pool) error { return boolErr(LockTx(e.ctx, nil, k)) }},
		{name: "committed tx/LockTx", want: pgx.ErrTxClosed, run: func(e *env, p *pgxpool.Pool) error {
			tx := must2(p.Begin(e.ctx))(e.t)
			must(e.t, tx.Commit(e.ctx))
			return boolErr(LockTx(e.ctx, tx, k))
		}},
		{name: "rolled back tx/LockTx", want: pgx.ErrTxClosed, run: func(e *env, p *pgxpool.Pool) error {
			tx := must2(p.Begin(e.ctx))(e.t)
			must(e.t, tx.Rollback(e.ctx))
			return boolErr(LockTx(e.ctx, tx, k, NoWait()))
		}},
		{name: "failed tx/LockTx", msg: "current transaction is aborted", run: func(e *env, p *pgxpool.Pool) error {
			tx := must2(p.Begin(e.ctx))(e.t)
			defer tx.Rollback(e.ctx)
			_, _ = tx.Exec(e.ctx, "SELECT 1/0")
			return boolErr(LockTx(e.ctx, tx, k))
		}},
		{name: "closed pool/Acquire", msg: "closed pool", run: func(e *env, _ *pgxpool.Pool) error {
			p := e.pool()
			p.Close()
			return acquireErr(Acquire(e.ctx, p, k))
		}},

		// Cancelled and expired contexts: nothing is sent.
		{name: "cancelled ctx/Acquire", want: context.Canceled, run: func(e *env, p *pgxpool.Pool) error { return acquireErr(Acquire(cancelled(), p, k)) }},
		{name: "cancelled ctx/Do", want: context.Canceled, run: func(e *env, p *pgxpool.Pool) error { return boolErr(Do(cancelled(), p, k, noop)) }},
		{name: "cancelled ctx/DoTx", want: context.Canceled, run: func(e *env, p *pgxpool.Pool) error { return boolErr(DoTx(cancelled(), p, k, noopTx)) }},
		{name: "cancelled ctx/NewSession", want: context.Canceled, run: func(e *env, p *pgxpool.Pool) error { return sessionErr(NewSession(cancelled(), p)) }},
		{name: "cancelled ctx/LockTx", want: context.Canceled, run: func(e *env, p *pgxpool.Pool) error {
			tx := must2(p.Begin(e.ctx))(e.t)
			defer tx.Rollback(e.ctx)
			return boolErr(LockTx(cancelled(), tx, k))
		}},
		{name: "cancelled ctx/Session.Lock", want: context.Canceled, run: func(e *env, p *pgxpool.Pool) error {
			s := must2(NewSession(e.ctx, p))(e.t)
			defer s.Close(e.ctx)
			return boolErr(s.Lock(cancelled(), k))
		}},
		{name: "cancelled ctx/Session.WithConn", want: context.Canceled, run: func(e *env, p *pgxpool.Pool) error {
			s := must2(NewSession(e.ctx, p))(e.t)
			defer s.Close(e.ctx)
			return s.WithConn(cancelled(), func(*pgx.Conn) error { return errors.New("fn ran") })
		}},
		{name: "expired ctx/Acquire", want: context.DeadlineExceeded, run: func(e *env, p *pgxpool.Pool) error { return acquireErr(Acquire(expired(), p, k)) }},
		{name: "expired ctx/Session.Lock", want: context.DeadlineExceeded, run: func(e *env, p *pgxpool.Pool) error {
			s := must2(NewSession(e.ctx, p))(e.t)
			defer s.Close(e.ctx)
			return boolErr(s.Lock(expired(), k))
		}},

		// Negative timeouts and TTLs.
		{name: "negative WaitTimeout/Acquire", msg: "must not be negative", run: func(e *env, p *pgxpool.Pool) error {
			return acquireErr(Acquire(e.ctx, p, k, WaitTimeout(-time.Millisecond)))
		}},
		{name: "negative WaitTimeout/LockTx", msg: "must not be negative", run: func(e *env, p *pgxpool.Pool) error {
			tx := must2(p.Begin(e.ctx))(e.t)
			defer tx.Rollback(e.ctx)
			return boolErr(LockTx(e.ctx, tx, k, WaitTimeout(-1)))
		}},
		{name: "negative WaitTimeout/Session.Lock", msg: "must not be negative", run: func(e *env, p *pgxpool.Pool) error {
			s := must2(NewSession(e.ctx, p))(e.t)
			defer s.Close(e.ctx)
			return boolErr(s.Lock(e.ctx, k, WaitTimeout(-time.Hour)))
		}},
		{name: "negative WaitTimeout/DoTx", msg: "must not be negative", run: func(e *env, p *pgxpool.Pool) error {
			return boolErr(DoTx(e.ctx, p, k, noopTx, WaitTimeout(-1)))
		}},
		{name: "negative TTL/Do", msg: "must be positive", run: func(e *env, p *pgxpool.Pool) error { return boolErr(Do(e.ctx, p, k, noop, TTL(-time.Second))) }},
		{name: "zero TTL/Acquire", msg: "must be positive", run: func(e *env, p *pgxpool.Pool) error { return acquireErr(Acquire(e.ctx, p, k, TTL(0))) }},
		{name: "negative HealthInterval/NewSession", msg: "must be positive", run: func(e *env, p *pgxpool.Pool) error {
			return sessionErr(NewSession(e.ctx, p, HealthInterval(-time.Second)))
		}},
		{name: "nil option/Acquire", ok: true, run: func(e *env, p *pgxpool.Pool) error {
			l, err := Acquire(e.ctx, p, k, nil)
			if err == nil {
				err = l.Release(e.ctx)
			}
			return err
		}},

		// Unlocks of what is not held; double Close and Release.
		{name: "unlock not held", want: ErrNotHeld, run: func(e *env, p *pgxpool.Pool) error {
			s := must2(NewSession(e.ctx, p))(e.t)
			defer s.Close(e.ctx)
			return s.Unlock(e.ctx, k)
		}},
		{name: "unlock shared of an exclusive hold", want: ErrNotHeld, run: func(e *env, p *pgxpool.Pool) error {
			s := must2(NewSession(e.ctx, p))(e.t)
			defer s.Close(e.ctx)
			must2(s.Lock(e.ctx, k))(e.t)
			return s.Unlock(e.ctx, k, Shared())
		}},
		{name: "unlock once too often", want: ErrNotHeld, run: func(e *env, p *pgxpool.Pool) error {
			s := must2(NewSession(e.ctx, p))(e.t)
			defer s.Close(e.ctx)
			must2(s.Lock(e.ctx, k))(e.t)
			must2(s.Lock(e.ctx, k))(e.t)
			must(e.t, s.Unlock(e.ctx, k))
			must(e.t, s.Unlock(e.ctx, k))
			return s.Unlock(e.ctx, k)
		}},
		{name: "double Release", ok: true, run: func(e *env, p *pgxpool.Pool) error {
			l := must2(Acquire(e.ctx, p, k))(e.t)
			must(e.t, l.Release(e.ctx))
			return l.Release(cancelled())
		}},
		{name: "Release of a lock not acquired", ok: true, run: func(e *env, p *pgxpool.Pool) error {
			holder := must2(Acquire(e.ctx, p, k))(e.t)
			defer holder.Release(e.ctx)
			l := must2(Acquire(e.ctx, p, k, NoWait()))(e.t)
			if l.Acquired() {
				return errors.New("acquired a held key")
			}
			return errors.Join(l.Release(e.ctx), l.Release(e.ctx))
		}},
		{name: "WithConn after Release", want: ErrClosed, run: func(e *env, p *pgxpool.Pool) error {
			l := must2(Acquire(e.ctx, p, k))(e.t)
			must(e.t, l.Release(e.ctx))
			return l.WithConn(e.ctx, func(*pgx.Conn) error { return errors.New("fn ran") })
		}},
		{name: "double Close", ok: true, run: func(e *env, p *pgxpool.Pool) error {
			s := must2(NewSession(e.ctx, p))(e.t)
			must2(s.Lock(e.ctx, k))(e.t)
			must(e.t, s.Close(e.ctx))
			return s.Close(cancelled())
		}},
		{name: "Lock after Close", want: ErrClosed, run: func(e *env, p *pgxpool.Pool) error {
			s := must2(NewSession(e.ctx, p))(e.t)
			must(e.t, s.Close(e.ctx))
			return boolErr(s.Lock(e.ctx, k))
		}},
		{name: "Unlock after Close", want: ErrClosed, run: func(e *env, p *pgxpool.Pool) error {
			s := must2(NewSession(e.ctx, p))(e.t)
			must2(s.Lock(e.ctx, k))(e.t)
			must(e.t, s.Close(e.ctx))
			return s.Unlock(e.ctx, k)
		}},
		{name: "WithConn after Close", want: ErrClosed, run: func(e *env, p *pgxpool.Pool) error {
			s := must2(NewSession(e.ctx, p))(e.t)
			must(e.t, s.Close(e.ctx))
			return s.WithConn(e.ctx, func(*pgx.Conn) error { return errors.New("fn ran") })
		}},
		{name: "WithConn leaving a transaction open", msg: "left a transaction open", run: func(e *env, p *pgxpool.Pool) error {
			s := must2(NewSession(e.ctx, p))(e.t)
			defer s.Close(e.ctx)
			return s.WithConn(e.ctx, func(c *pgx.Conn) error {
				_, err := c.Exec(e.ctx, "BEGIN")
				return err
			})
		}},
		{name: "Do body panics with a nil error value", ok: true, run: func(e *env, p *pgxpool.Pool) (err error) {
			defer func() {
				if r := recover(); r == nil {
					err = errors.New("the panic did not go on")
				}
			}()
			_, err = Do(e.ctx, p, k, func(context.Context) error { panic(fmt.Errorf("boom")) })
			return err
		}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			e := newEnv(t)
			pool := e.pool()
			err := runBad(t, e, pool, c.run)
			checkBad(t, c, err)
		})
	}
}

// runBad runs one case, turning a panic into a test failure.
func runBad(t *testing.T, e *env, pool *pgxpool.Pool, run func(*env, *pgxpool.Pool) error) (err error) {
	t.Helper()
	defer func() {
		if r := recover(); r != nil {
			t.Errorf("panic: %v", r)
		}
	}()
	return run(e, pool)
}

func checkBad(t *testing.T, c badCase, err error) {
	t.Helper()
	switch {
	case c.ok:
		if err != nil {
			t.Errorf("want success, got %v", err)
		}
		return
	case err == nil:
		t.Errorf("no error; want %v %q", c.want, c.msg)
		return
	}
	t.Logf("error: %v", err)
	if c.want != nil && !errors.Is(err, c.want) {
		t.Errorf("error %v does not match %v", err, c.want)
	}
	if c.msg != "" && !strings.Contains(err.Error(), c.msg) {
		t.Errorf("error %q does not say %q", err, c.msg)
	}
	if !c.bare && !strings.HasPrefix(err.Error(), "advisory: ") {
		t.Errorf("error %q lacks the package prefix", err)
	}
}

func k777() Key { return Int64Key(777) }
