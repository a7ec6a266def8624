//go:build linux

package advisory

import (
	"errors"
	"testing"
	"time"
)

// Turns taken and given back in quick succession on a session that holds a
// lock leave the health watcher's readiness alone: it is armed again only
// once the session has been quiet for watchQuiet, so the epoll_ctl calls
// are bounded by the time the turns took, not by their number. Red before
// watch_quiet.go: every turn disarmed and armed it again, four calls per
// Lock and Unlock.
func TestQuickTurnsLeaveTheReadinessAlone(t *testing.T) {
	e := newEnv(t)
	s, err := NewSession(e.ctx, e.pool(), HealthInterval(time.Hour))
	must(t, err)
	defer s.Close(e.ctx)
	held, cycled := StringKey("quiet-held"), StringKey("quiet-cycled")
	if got, err := s.Lock(e.ctx, held); err != nil || !got {
		t.Fatalf("Lock(%v) = %v, %v", held, got, err)
	}
	awaitWatching(t, s)
	const cycles = 200
	calls, start := readinessCalls.Load(), time.Now()
	for range cycles {
		if got, err := s.Lock(e.ctx, cycled); err != nil || !got {
			t.Fatalf("Lock(%v) = %v, %v", cycled, got, err)
		}
		must(t, s.Unlock(e.ctx, cycled))
	}
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
	s, err := NewSession(e.ctx, e.pool(), HealthInterval(time.Hour))
	must(t, err)
	defer s.Close(e.ctx)
	held, cycled := StringKey("quiet-loss-held"), StringKey("quiet-loss-cycled")
	if got, err := s.Lock(e.ctx, held); err != nil || !got {
		t.Fatalf("Lock(%v) = %v, %v", held, got, err)
	}
	awaitWatching(t, s)
	for range 20 {
		if got, err := s.Lock(e.ctx, cycled); err != nil || !got {
			t.Fatalf("Lock(%v) = %v, %v", cycled, got, err)
		}
		must(t, s.Unlock(e.ctx, cycled))
	}
	e.terminate(s.pc.PgConn().PID())
	select {
	case <-s.Done():
	case <-time.After(notHung):
		t.Fatalf("a terminated backend not noticed after %v on a session that held a lock through quick turns", notHung)
	}
	if err := s.Close(e.ctx); !errors.Is(err, ErrLockLost) {
		t.Errorf("Close after the loss = %v; want ErrLockLost", err)
	}
	e.awaitKeyFree(held)
}
