//go:build linux

package advisory

import (
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
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

// Locks taken and released fast, each on a session of its own (Acquire),
// wake the process for their looks at most once per watchQuiet, however
// many looks they ask for: the timer fires for all the looks then due, not
// at each one's own time. Red before: a firing per lock taken (200 Acquire
// and Release cycles made about as many firings).
func TestQuietLooksWakeOncePerWatchQuiet(t *testing.T) {
	e := newEnv(t)
	pool := e.pool()
	const cycles = 200
	firings, start := quietFirings.Load(), time.Now()
	for i := range cycles {
		l, err := Acquire(e.ctx, pool, Int64Key(int64(1900+i%4)))
		must(t, err)
		must(t, l.Release(e.ctx))
	}
	firings, took := quietFirings.Load()-firings, time.Since(start)
	bound := int64(took/watchQuiet) + 1
	t.Logf("%d Acquire and Release in %v: %d firings of the looks' timer (bound %d)", cycles, took, firings, bound)
	if firings > bound {
		t.Errorf("%d Acquire and Release in %v woke the process %d times for the looks; want at most %d (one per watchQuiet)", cycles, took, firings, bound)
	}
}

// A session whose health interval is shorter than a look may take is
// watched from the call that took its lock, not from the look 10-20 ms
// later: SPEC §4 bounds the notice of a closed connection by the interval.
// Red before: its watcher had not started when Lock returned.
func TestShortHealthIntervalWatchesAtOnce(t *testing.T) {
	e := newEnv(t)
	s, err := NewSession(e.ctx, e.pool(), HealthInterval(watchQuiet))
	must(t, err)
	t.Cleanup(func() { _ = s.Close(e.ctx) })
	key := StringKey("short-health")
	if got, err := s.Lock(e.ctx, key); err != nil || !got {
		t.Fatalf("Lock(%v) = %v, %v", key, got, err)
	}
	s.mu.Lock()
	started := s.watchStarted
	s.mu.Unlock()
	if !started {
		t.Errorf("HealthInterval(%v): the watcher had not started when Lock returned; want it started at once", watchQuiet)
	}
	must(t, s.Unlock(e.ctx, key))
	must(t, s.Close(e.ctx))
	e.awaitKeyFree(key)
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

// Many sessions that make quick turns at once, each holding a lock, are
// all watched again once quiet: their backends terminated together, each
// is noticed with an hour's health interval (the looks of one firing of
// the process's one timer cover them all, whatever the order their turns
// came back in).
func TestManyQuietSessionsNoticeLoss(t *testing.T) {
	e := newEnv(t)
	const n = 16
	pool := e.pool(func(c *pgxpool.Config) { c.MaxConns = n })
	sessions := make([]*Session, n)
	for i := range sessions {
		s, err := NewSession(e.ctx, pool, HealthInterval(time.Hour))
		must(t, err)
		t.Cleanup(func() { _ = s.Close(e.ctx) })
		if got, err := s.Lock(e.ctx, Int64Key(int64(1700+i))); err != nil || !got {
			t.Fatalf("Lock = %v, %v", got, err)
		}
		sessions[i] = s
	}
	var wg sync.WaitGroup
	for i, s := range sessions {
		wg.Go(func() {
			key := Int64Key(int64(1800 + i))
			for range 20 {
				if got, err := s.Lock(e.ctx, key); err != nil || !got {
					t.Errorf("Lock(%v) = %v, %v", key, got, err)
					return
				}
				if err := s.Unlock(e.ctx, key); err != nil {
					t.Errorf("Unlock(%v) = %v", key, err)
					return
				}
			}
		})
	}
	wg.Wait()
	pids := make([]int32, n)
	for i, s := range sessions {
		pids[i] = int32(s.pc.PgConn().PID())
	}
	var terminated int
	must(t, e.adminConn().QueryRow(e.ctx, "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM unnest($1::int4[]) AS pid", pids).Scan(&terminated))
	if terminated != n {
		t.Fatalf("terminated %d of %d backends", terminated, n)
	}
	for i, s := range sessions {
		e.awaitDone(s.Done(), fmt.Sprintf("session %d of %d that made quick turns, its backend terminated", i+1, n))
		if err := s.Close(e.ctx); !errors.Is(err, ErrLockLost) {
			t.Errorf("session %d: Close after the loss = %v; want ErrLockLost", i+1, err)
		}
	}
}
