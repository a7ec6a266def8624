package advisory

import (
	"context"
	"errors"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
)

// Lock is one session-level advisory lock on a connection of its own: a
// Session holding one key. Acquire returns it; Release ends it.
//
// A Lock is safe for concurrent use.
type Lock struct {
	key  Key
	mode Mode
	s    *Session // nil when not acquired

	ttl *time.Timer // ends the session when the TTL passes; nil without TTL
	ch  *cohortHold // its part in its process's cohort (cohort.go); nil if none

	mu       sync.Mutex
	released bool
}

// closedChan is the Done channel of a Lock that was not acquired.
var closedChan = func() chan struct{} {
	c := make(chan struct{})
	close(c)
	return c
}()

// Acquire takes key on a connection of its own from pool, and keeps that
// connection until Release. Options: Shared, NoWait, WaitTimeout, TTL,
// HealthInterval, WithTracer.
//
// When the key is held elsewhere and NoWait (or WaitTimeout(0)) was given,
// Acquire returns a Lock with Acquired() == false and a nil error: the
// connection is already back in the pool and Release does nothing.
//
// Waiting is done by the server, in wait slices that hold no snapshot for
// longer than a slice (see the package documentation: "What waiting costs
// the server"). A wait bounded by WaitTimeout or ctx's deadline fails with
// ErrTimeout (also matching context.DeadlineExceeded for the deadline);
// a cancelled ctx ends the wait at once with ctx's error, once a try in
// flight has answered (at most 500 ms: see the package documentation,
// "Session locks"). A wait whose connection is lost (server restart,
// terminated backend, network cut) fails with an error that says so and
// wraps the pgx or network error; it
// does not match ErrLockLost, as the lock was never held. On any error no
// lock is held and the connection is back in the pool, or closed if its
// state could not be known.
//
// Goroutines of one process waiting for key through pool share one wait
// and one connection, and may be passed the lock, connection included, by
// the one that releases it (cohorts: see the package documentation and
// NoCohort).
func Acquire(ctx context.Context, pool *pgxpool.Pool, key Key, opts ...Option) (*Lock, error) {
	cfg, err := newConfig(callAcquire, opts)
	if err != nil {
		return nil, err
	}
	cfg.entry = EntryAcquire
	return acquire(ctx, pool, key, cfg)
}

func acquire(ctx context.Context, pool *pgxpool.Pool, key Key, cfg config) (*Lock, error) {
	if !key.Valid() {
		return nil, invalidKey("lock")
	}
	return acquireWith(ctx, pool, key, cfg, func(ctx context.Context, s *Session) (Key, error) {
		if ok, err := s.lock(ctx, key, cfg); !ok {
			return Key{}, err
		}
		return key, nil
	})
}

// acquireWith takes a session from pool and runs lock on it, which returns
// the key it took, or the zero Key when it took nothing. It returns a Lock
// holding that key, or a Lock for key that was not acquired, and closes
// the session unless it holds the lock. The whole is one traced wait.
func acquireWith(ctx context.Context, pool *pgxpool.Pool, key Key, cfg config, lock func(context.Context, *Session) (Key, error)) (*Lock, error) {
	ctx, w := traceWait(ctx, cfg, TraceWaitStartData{Key: key})
	l, err := lockInCohort(ctx, pool, key, cfg, lock)
	w.end(ctx, l != nil && l.Acquired(), err)
	return l, err
}

// newLock is acquireWith without the trace.
func newLock(ctx context.Context, pool *pgxpool.Pool, key Key, cfg config, way *coming, lock func(context.Context, *Session) (Key, error)) (*Lock, error) {
	s, err := newSession(ctx, pool, cfg, way)
	if err != nil {
		var e *Error
		if errors.As(err, &e) {
			e.Op, e.Key = "lock", key
		}
		return nil, err
	}
	held, err := lock(ctx, s)
	if err != nil || !held.Valid() {
		s.closeAfterFailedLock(err)
		if err != nil {
			return nil, err
		}
		return &Lock{key: key, mode: cfg.mode}, nil
	}
	l := &Lock{key: held, mode: cfg.mode, s: s}
	if cfg.ttl > 0 {
		l.ttl = time.AfterFunc(cfg.ttl, l.expire)
	}
	return l, nil
}

// expire ends the lock's session at its TTL: the statement in flight is
// interrupted and the lock released. The end reason names the key.
func (l *Lock) expire() {
	errTTL := &Error{Op: "ttl", Key: l.key, Kind: ErrTTLExceeded}
	if l.ch != nil { // its session may have passed to another holder
		l.mu.Lock()
		defer l.mu.Unlock()
		if l.released {
			return
		}
	}
	if l.s.beginEnd(errTTL, errTTL, false) {
		l.s.finish(errTTL)
	}
}

// Acquired reports whether the lock was taken. A Lock that was not acquired
// holds nothing and no connection.
func (l *Lock) Acquired() bool { return l.s != nil }

// Key returns the key the lock is for. For a Lock from AcquireSemaphore it
// is the slot held, or the semaphore's key when no slot was acquired.
func (l *Lock) Key() Key { return l.key }

// Mode returns how the lock was asked for: ModeExclusive or ModeShared.
func (l *Lock) Mode() Mode { return l.mode }

// Done returns a channel that is closed when the lock is no longer held:
// after Release, when its TTL passed, or when its connection was lost. For a
// lock that was not acquired it is already closed.
func (l *Lock) Done() <-chan struct{} {
	if l.s == nil {
		return closedChan
	}
	if l.ch != nil {
		return l.ch.done
	}
	return l.s.Done()
}

// Err returns nil while the lock is held, after Release, and for a lock that
// was not acquired; ErrLockLost (as an *Error) once the lock was lost;
// ErrTTLExceeded once its TTL passed.
func (l *Lock) Err() error {
	if l.s == nil {
		return nil
	}
	if l.ch != nil {
		return l.ch.Err()
	}
	return l.s.Err()
}

// Release unlocks the key and gives the connection back to the pool. It
// does not obey ctx: a cancelled ctx still gets the unlock done. A second
// Release, and Release of a lock that was not acquired, do nothing and
// return nil.
//
// It returns an error matching ErrLockLost when the server no longer held
// the lock or the unlock failed (the connection is then closed, never
// returned); ErrTTLExceeded on the first Release after the TTL passed; nil
// after ReleaseAll. A WithConn in progress is interrupted; if it keeps the
// connection over 5 s, the connection is closed under it, which ends the
// lock on the server.
//
// When another goroutine of the process waits for the key through the same
// pool, Release may instead pass the lock to it with its connection,
// sending nothing (cohorts: see the package documentation); this Lock then
// ends as after a release.
func (l *Lock) Release(ctx context.Context) error {
	if l.s == nil {
		return nil
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.released {
		return nil
	}
	l.released = true
	if l.ttl != nil {
		l.ttl.Stop()
	}
	if l.ch != nil {
		return l.ch.release(ctx, l)
	}
	return l.s.Close(ctx)
}

// WithConn runs fn with exclusive use of the lock's own connection: see
// Session.WithConn. Statements fn runs there cannot run after the lock is
// lost. It returns ErrLockLost (joined with fn's error) if the lock was lost
// before or during fn, and ErrClosed after Release or for a lock that was
// not acquired.
func (l *Lock) WithConn(ctx context.Context, fn func(*pgx.Conn) error) error {
	if l.s == nil {
		return &Error{Op: "with_conn", Key: l.key, Kind: ErrClosed}
	}
	if l.ch != nil {
		return l.ch.withConn(l, func(s *Session) error { return s.WithConn(ctx, fn) })
	}
	return l.s.WithConn(ctx, fn)
}

// Do runs fn while holding key, the context-manager form of Acquire: fn
// runs only if the lock was acquired, and the lock is released when fn
// returns or panics (the panic goes on after the release). acquired reports
// whether fn ran.
//
// fn's context is cancelled when the lock is lost, its TTL passes or
// ReleaseAll ends it; Do then returns, once fn has returned, an error
// matching ErrLockLost, ErrTTLExceeded or ErrClosed joined with fn's own
// error. Errors from Acquire are
// returned with acquired == false.
func Do(ctx context.Context, pool *pgxpool.Pool, key Key, fn func(context.Context) error, opts ...Option) (acquired bool, err error) {
	cfg, err := newConfig(callDo, opts)
	if err != nil {
		return false, err
	}
	cfg.entry = EntryDo
	lock, err := acquire(ctx, pool, key, cfg)
	return runHeld(ctx, lock, err, fn)
}

// runHeld is Do once the lock was asked for: lock and err are what Acquire
// (or AcquireSemaphore) returned.
func runHeld(ctx context.Context, lock *Lock, acquireErr error, fn func(context.Context) error) (acquired bool, err error) {
	if acquireErr != nil || !lock.Acquired() {
		return false, acquireErr
	}
	defer func() {
		if releaseErr := lock.Release(ctx); releaseErr != nil {
			err = errors.Join(releaseErr, err)
		}
	}()
	if why := context.Cause(lock.s.ctx); errors.Is(why, errReleasedAll) {
		return false, why // ReleaseAll came as the lock was granted: fn does not run
	}
	return true, lock.run(ctx, fn)
}

// run calls fn with a context derived from ctx that is cancelled, with the
// reason as its cause, when the lock's session ends while fn runs: lost,
// TTL passed, or ended by ReleaseAll. In the last case, which Release does
// not report, run returns an error matching ErrClosed joined with fn's. If
// fn panics (or ends its goroutine), run releases the lock and its
// connection before the panic goes on up.
func (l *Lock) run(ctx context.Context, fn func(context.Context) error) error {
	fnCtx, cancel := context.WithCancelCause(context.WithValue(ctx, heldLockKey{}, l))
	defer cancel(nil)
	stop := context.AfterFunc(l.s.ctx, func() { cancel(context.Cause(l.s.ctx)) })
	defer stop()
	returned := false
	defer func() {
		if !returned {
			_ = l.Release(ctx) // the panic is what the caller sees
		}
	}()
	err := fn(fnCtx)
	returned = true
	if why := context.Cause(l.s.ctx); errors.Is(why, errReleasedAll) {
		err = errors.Join(why, err)
	}
	return err
}

// heldLockKey is the context key of the Lock a body runs under.
type heldLockKey struct{}

// LockFromContext returns the Lock held for the body of Do, DoSemaphore or
// Lead that ctx was given to (or derived from), for fenced work on the
// lock's own connection: its WithConn and Exec run statements that cannot
// land once the lock is lost. Under nested bodies it is the innermost
// body's Lock. It returns nil for any other ctx. Once the body has
// returned, the Lock is released and its WithConn returns ErrClosed.
func LockFromContext(ctx context.Context) *Lock {
	l, _ := ctx.Value(heldLockKey{}).(*Lock)
	return l
}

// Exec runs one statement on the lock's own connection (see WithConn): it
// cannot run after the lock is lost. When ctx ends first, the statement is
// cancelled (SQLSTATE 57014, the error also matching ctx's error) and the
// lock and its connection survive.
func (l *Lock) Exec(ctx context.Context, sql string, args ...any) (tag pgconn.CommandTag, err error) {
	err = l.WithConn(ctx, func(c *pgx.Conn) error {
		tag, err = c.Exec(context.WithoutCancel(ctx), sql, args...)
		return l.s.answered(err) // unlike a WithConn callback, this one talked to the server
	})
	return tag, err
}
