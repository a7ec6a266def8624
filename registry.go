package advisory

import (
	"context"
	"errors"
	"sync"

	"github.com/jackc/pgx/v5/pgxpool"
)

// registry knows every Session (and so every Lock) open on each pool, and
// every call on its way to one (waiting for a pool connection, or a Lead
// between campaigns), so that ReleaseAll can end them all before the pool
// is closed.
var registry = struct {
	sync.Mutex
	open map[*pgxpool.Pool]*onPool
}{open: make(map[*pgxpool.Pool]*onPool)}

// onPool is what the registry knows of one pool.
type onPool struct {
	sessions map[*Session]struct{}
	coming   map[*coming]struct{}
}

// coming is a call on its way to a lock on a pool: ReleaseAll cancels its
// context with errReleasedAll.
type coming struct {
	pool     *pgxpool.Pool
	ctx      context.Context // what onTheWay returned
	cancel   context.CancelCauseFunc
	released bool // ReleaseAll came; guarded by registry
}

// poolEntry returns pool's entry, creating it. The caller holds registry.
func poolEntry(pool *pgxpool.Pool) *onPool {
	p := registry.open[pool]
	if p == nil {
		p = &onPool{sessions: make(map[*Session]struct{}), coming: make(map[*coming]struct{})}
		registry.open[pool] = p
	}
	return p
}

// dropIfEmpty forgets pool when nothing is open or coming on it. The
// caller holds registry.
func dropIfEmpty(pool *pgxpool.Pool) {
	if p := registry.open[pool]; p != nil && len(p.sessions) == 0 && len(p.coming) == 0 {
		delete(registry.open, pool)
	}
}

// onTheWay registers a call on its way to a lock on pool and returns the
// context it must use until it has arrived (arrive or leave): a child of
// ctx that ReleaseAll cancels with errReleasedAll.
func onTheWay(ctx context.Context, pool *pgxpool.Pool) (context.Context, *coming) {
	ctx, cancel := context.WithCancelCause(ctx)
	c := &coming{pool: pool, ctx: ctx, cancel: cancel}
	registry.Lock()
	defer registry.Unlock()
	poolEntry(pool).coming[c] = struct{}{}
	return ctx, c
}

// leave ends the call's registration, if it has not arrived; its context
// is cancelled.
func (c *coming) leave() {
	registry.Lock()
	if p := registry.open[c.pool]; p != nil {
		delete(p.coming, c)
		dropIfEmpty(c.pool)
	}
	registry.Unlock()
	c.cancel(nil)
}

// arrive ends the call's registration and registers s, the Session it
// opened, in one step, so that ReleaseAll sees one or the other. It returns
// false, registering nothing, when ReleaseAll came first: s must then not
// be used.
func (c *coming) arrive(s *Session) bool {
	registry.Lock()
	defer registry.Unlock()
	p := registry.open[c.pool]
	delete(p.coming, c)
	if c.released {
		dropIfEmpty(c.pool)
		return false
	}
	p.sessions[s] = struct{}{}
	c.cancel(nil) // the child context is no longer used
	return true
}

func unregister(pool *pgxpool.Pool, s *Session) {
	registry.Lock()
	defer registry.Unlock()
	if p := registry.open[pool]; p != nil {
		delete(p.sessions, s)
		dropIfEmpty(pool)
	}
}

// errReleasedAll is the cause of a Do or Lead body's context when
// ReleaseAll ended its lock.
var errReleasedAll = &Error{Op: "release_all", Kind: ErrClosed, Err: errors.New("ReleaseAll released the lock")}

// ReleaseAll ends every Session and Lock this process has open on pool, as
// Close and Release do, so that pool.Close, which waits for every acquired
// connection, does not wait for them. For the code running under a lock
// it is like a loss: a Do or Lead body's context is cancelled (its cause
// matches ErrClosed), Do returns an error matching ErrClosed, and Lead,
// campaigning or leading, returns one. Call it at shutdown. Locks ended
// this way report a nil Err; a later Release of them does nothing. It
// returns the errors of the sessions that had already been lost (matching
// ErrLockLost).
//
// It also ends what is on its way to a lock on pool when it is called: an
// Acquire, Do, AcquireSemaphore, DoSemaphore or NewSession waiting for a
// pool connection returns an error matching ErrClosed, and so does a Lead
// in its pause between campaigns; none of them takes a lock or runs its
// body after ReleaseAll returned. Calls that start after it returned work
// as usual.
func ReleaseAll(ctx context.Context, pool *pgxpool.Pool) error {
	releaseAllCohorts(pool) // goroutines queued in the process for a lock on pool
	registry.Lock()
	var sessions []*Session
	if p := registry.open[pool]; p != nil {
		for c := range p.coming {
			c.released = true
			c.cancel(errReleasedAll)
		}
		for s := range p.sessions {
			sessions = append(sessions, s)
		}
	}
	registry.Unlock()
	var errs []error
	for _, s := range sessions {
		errs = append(errs, s.end(errReleasedAll))
	}
	return errors.Join(errs...)
}
