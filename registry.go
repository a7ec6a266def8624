package advisory

import (
	"context"
	"errors"
	"sync"

	"github.com/jackc/pgx/v5/pgxpool"
)

// registry knows every Session (and so every Lock) open on a pool, and
// every call on its way to one (waiting for a pool connection, or a Lead
// between campaigns), so that ReleaseAll can end them all before the pool
// is closed. It is one set of each for the process, not one per pool:
// ReleaseAll, called at shutdown, picks its pool's; a set per pool, made
// when the pool's first call came and dropped when its last left, cost an
// Acquire three allocations whenever no other lock was open on the pool.
var registry = struct {
	sync.Mutex
	sessions map[*Session]struct{} // the Sessions open on a pool (s.pool)
	coming   map[*coming]struct{}  // the calls on their way to a lock (c.pool)
}{sessions: make(map[*Session]struct{}), coming: make(map[*coming]struct{})}

// coming is a call on its way to a lock on a pool: ReleaseAll cancels its
// context with errReleasedAll.
type coming struct {
	pool     *pgxpool.Pool
	ctx      context.Context // what onTheWay returned
	cancel   context.CancelCauseFunc
	released bool // ReleaseAll came; guarded by registry
}

// onTheWay registers a call on its way to a lock on pool and returns the
// context it must use until it has arrived (arrive or leave): a child of
// ctx that ReleaseAll cancels with errReleasedAll.
func onTheWay(ctx context.Context, pool *pgxpool.Pool) (context.Context, *coming) {
	ctx, cancel := context.WithCancelCause(ctx)
	c := &coming{pool: pool, ctx: ctx, cancel: cancel}
	registry.Lock()
	defer registry.Unlock()
	registry.coming[c] = struct{}{}
	return ctx, c
}

// leave ends the call's registration, if it has not arrived; its context
// is cancelled.
func (c *coming) leave() {
	registry.Lock()
	delete(registry.coming, c)
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
	delete(registry.coming, c)
	if c.released {
		return false
	}
	registry.sessions[s] = struct{}{}
	c.cancel(nil) // the child context is no longer used
	return true
}

// unregister forgets s, which has ended.
func unregister(s *Session) {
	registry.Lock()
	defer registry.Unlock()
	delete(registry.sessions, s)
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
	for c := range registry.coming {
		if c.pool == pool {
			c.released = true
			c.cancel(errReleasedAll)
		}
	}
	for s := range registry.sessions {
		if s.pool == pool {
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
