package advisory

import (
	"context"
	"errors"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
)

// A LockMany cancelled, or timed out, while it waits leaves nothing new
// held, keeps the earlier holds and the connection, and leaves the
// session's lock_timeout as it was.
func TestLockManyCancelAndTimeout(t *testing.T) {
	e := newEnv(t)
	pool := e.pool()
	blocker := e.conn()
	blockerPID := blocker.PgConn().PID()
	s := e.session(pool)
	earlier := Int64Key(-77)
	_, err := s.Lock(e.ctx, earlier)
	must(t, err)
	keys, canonical := mixedKeys(20)
	busy := canonical[13]
	_, err = blocker.Exec(e.ctx, lockSQL[scopeSession][ModeExclusive][waitForever][busy.space-1], busy.args()...)
	must(t, err)
	checkNothingNew := func(what string) {
		t.Helper()
		if granted, _ := e.grantedExcept(blockerPID); !slices.Equal(granted, []Key{earlier}) {
			t.Errorf("%s: the session holds %v; want only the earlier hold", what, granted)
		}
		if held := s.Held(); len(held) != 1 || held[0].Key != earlier {
			t.Errorf("%s: Held() = %+v; want the earlier hold only", what, held)
		}
	}

	ctx, cancel := context.WithCancel(e.ctx)
	done := make(chan error, 1)
	go func() {
		_, err := s.LockMany(ctx, keys)
		done <- err
	}()
	e.awaitWaiters(1)
	cancel()
	if err := <-done; !errors.Is(err, context.Canceled) || errors.Is(err, ErrLockLost) {
		t.Errorf("cancelled LockMany = %v; want context.Canceled, session kept", err)
	}
	checkNothingNew("cancelled")

	start := time.Now()
	_, err = s.LockMany(e.ctx, keys, WaitTimeout(200*time.Millisecond))
	if !errors.Is(err, ErrTimeout) || errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("LockMany(WaitTimeout) = %v; want ErrTimeout only", err)
	}
	// Not before the bound; how much later is logged, not asserted.
	t.Logf("LockMany(WaitTimeout(200ms)) returned after %v", time.Since(start))
	if d := time.Since(start); d < 200*time.Millisecond {
		t.Errorf("LockMany(WaitTimeout(200ms)) returned after %v, before its bound", d)
	}
	checkNothingNew("WaitTimeout")

	ctx, cancel = context.WithTimeout(e.ctx, 500*time.Millisecond) // room for the turn on a loaded machine
	_, err = s.LockMany(ctx, keys, Shared())
	cancel()
	if !errors.Is(err, ErrTimeout) || !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("LockMany at ctx deadline = %v; want ErrTimeout and DeadlineExceeded", err)
	}
	checkNothingNew("deadline")

	var timeout string
	must(t, s.WithConn(e.ctx, func(c *pgx.Conn) error {
		return c.QueryRow(e.ctx, "SHOW lock_timeout").Scan(&timeout)
	}))
	if timeout != "0" {
		t.Errorf("lock_timeout after bounded LockMany = %q; want 0", timeout)
	}
	_, err = blocker.Exec(e.ctx, unlockSQL[ModeExclusive][busy.space-1], busy.args()...)
	must(t, err)
	if ok, err := s.LockMany(e.ctx, keys, WaitTimeout(time.Second)); err != nil || !ok {
		t.Errorf("bounded LockMany of free keys = %v, %v", ok, err)
	}
	must(t, s.Close(e.ctx))
}

// Two sessions taking the same keys, passed in opposite orders, at the same
// time, many times: canonical order means neither is ever a deadlock
// victim.
func TestLockManyNoDeadlock(t *testing.T) {
	e := newEnv(t)
	pool := e.pool()
	keys, _ := mixedKeys(40)
	reversed := slices.Clone(keys)
	slices.Reverse(reversed)
	var sessions [2]*Session
	for i := range sessions {
		sessions[i] = e.session(pool)
	}
	for round := range 100 {
		var wg sync.WaitGroup
		errs := make([]error, 2)
		start := make(chan struct{})
		for i, ks := range [][]Key{keys, reversed} {
			wg.Add(1)
			go func() {
				defer wg.Done()
				<-start
				if _, err := sessions[i].LockMany(e.ctx, ks); err != nil {
					errs[i] = err
					return
				}
				errs[i] = sessions[i].UnlockMany(e.ctx, ks)
			}()
		}
		close(start)
		wg.Wait()
		if err := errors.Join(errs...); err != nil {
			t.Fatalf("round %d: %v", round, err)
		}
	}
	for _, s := range sessions {
		must(t, s.Close(e.ctx))
	}
}
