package advisory

import (
	"context"
	"errors"
	"sync"

	"github.com/jackc/pgx/v5/pgxpool"
)

// registry knows every Session (and so every Lock) open on each pool, so
// that ReleaseAll can end them before the pool is closed.
var registry = struct {
	sync.Mutex
	open map[*pgxpool.Pool]map[*Session]struct{}
}{open: make(map[*pgxpool.Pool]map[*Session]struct{})}

func register(pool *pgxpool.Pool, s *Session) {
	registry.Lock()
	defer registry.Unlock()
	if registry.open[pool] == nil {
		registry.open[pool] = make(map[*Session]struct{})
	}
	registry.open[pool][s] = struct{}{}
}

func unregister(pool *pgxpool.Pool, s *Session) {
	registry.Lock()
	defer registry.Unlock()
	delete(registry.open[pool], s)
	if len(registry.open[pool]) == 0 {
		delete(registry.open, pool)
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
func ReleaseAll(ctx context.Context, pool *pgxpool.Pool) error {
	releaseAllCohorts(pool) // goroutines queued in the process for a lock on pool
	registry.Lock()
	sessions := make([]*Session, 0, len(registry.open[pool]))
	for s := range registry.open[pool] {
		sessions = append(sessions, s)
	}
	registry.Unlock()
	var errs []error
	for _, s := range sessions {
		errs = append(errs, s.end(errReleasedAll))
	}
	return errors.Join(errs...)
}
