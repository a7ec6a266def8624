//go:build linux

package advisory

import (
	"errors"
	"testing"
	"time"
)

// watchedSession returns a Session with an hour's health interval that
// holds key, once its watcher watches it.
func watchedSession(t *testing.T, e *env, key Key) *Session {
	t.Helper()
	s, err := NewSession(e.ctx, e.pool(), HealthInterval(time.Hour))
	must(t, err)
	t.Cleanup(func() { _ = s.Close(e.ctx) })
	if got, err := s.Lock(e.ctx, key); err != nil || !got {
		t.Fatalf("Lock(%v) = %v, %v", key, got, err)
	}
	awaitWatching(t, s)
	return s
}

// lockUnlock locks and unlocks key on s, n times.
func lockUnlock(t *testing.T, e *env, s *Session, key Key, n int) {
	t.Helper()
	for range n {
		if got, err := s.Lock(e.ctx, key); err != nil || !got {
			t.Fatalf("Lock(%v) = %v, %v", key, got, err)
		}
		must(t, s.Unlock(e.ctx, key))
	}
}

// Turns taken and given back in quick succession on a session that holds a
// lock leave the health watcher's readiness alone: it is armed again only
// once the session has been quiet for watchQuiet, so the epoll_ctl calls
// are bounded by the time the turns took, not by their number. Red before
// watch_quiet.go: every turn disarmed and armed it again, four calls per
// Lock and Unlock.
func TestQuickTurnsLeaveTheReadinessAlone(t *testing.T) {
	e := newEnv(t)
	held := StringKey("quiet-held")
	s := watchedSession(t, e, held)
	const cycles = 200
	calls, start := readinessCalls.Load(), time.Now()
	lockUnlock(t, e, s, StringKey("quiet-cycled"), cycles)
	calls, took := readinessCalls.Load()-calls, time.Since(start)
	// At most one look per watchQuiet arms the readiness, and the next
	// turn disarms it; and the first turn disarmed what awaitWatching saw.
	bound := 2*int64(took/watchQuiet+1) + 1
	t.Logf("%d Lock and Unlock in %v: %d epoll_ctl calls (bound %d)", cycles, took, calls, bound)
	if calls > bound {
		t.Errorf("%d Lock and Unlock in %v made %d epoll_ctl calls; want at most %d (two per watchQuiet)", cycles, took, calls, bound)
	}
	must(t, s.Unlock(e.ctx, held))
	must(t, s.Close(e.ctx))
	e.awaitKeyFree(held)
}

// After quick turns, a session that still holds a lock is watched again: a
// terminated backend is noticed with an hour's health interval.
func TestWatcherNoticesLossAfterQuickTurns(t *testing.T) {
	e := newEnv(t)
	held := StringKey("quiet-loss-held")
	s := watchedSession(t, e, held)
	lockUnlock(t, e, s, StringKey("quiet-loss-cycled"), 20)
	e.terminate(s.pc.PgConn().PID())
	e.awaitDone(s.Done(), "a session that held a lock through quick turns, its backend terminated")
	if err := s.Close(e.ctx); !errors.Is(err, ErrLockLost) {
		t.Errorf("Close after the loss = %v; want ErrLockLost", err)
	}
	e.awaitKeyFree(held)
}
