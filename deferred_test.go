package advisory

import (
	"errors"
	"sync"
	"testing"
	"time"
)

// The one timer of deferred.go serves every session: a clean-up statement
// that gets no answer is still interrupted at its bound while other
// sessions keep putting work in and taking it out of the same queues
// (watcher starts; bounds that end before they are due, in front of it,
// behind it and around it), and those sessions' watchers still start.
func TestDeferredBoundAmidOtherSessions(t *testing.T) {
	e := newEnv(t)
	cutPool, proxy := e.proxiedPool()
	pool := e.pool()
	cut, err := NewSession(e.ctx, cutPool, HealthInterval(time.Hour)) // its watcher cannot notice the cut
	must(t, err)
	_, err = cut.Lock(e.ctx, Int64Key(1650))
	must(t, err)

	// Busy sessions: Acquire and Release over and over, some holding past
	// watchQuiet so that their watchers start.
	stop := make(chan struct{})
	var busy sync.WaitGroup
	var errs [4]error
	cycles := make([]int, len(errs))
	for i := range errs {
		busy.Go(func() {
			for {
				select {
				case <-stop:
					return
				default:
				}
				lock, err := Acquire(e.ctx, pool, Int64Key(1651+int64(i)))
				if err != nil {
					errs[i] = err
					return
				}
				if cycles[i]%50 == 49 {
					errs[i] = watchingSoon(lock.s)
				}
				if err := errors.Join(errs[i], lock.Release(e.ctx)); err != nil {
					errs[i] = err
					return
				}
				cycles[i]++
			}
		})
	}

	proxy.Cut()
	start := time.Now()
	closeErr := cut.Close(e.ctx)
	took := time.Since(start)
	close(stop)
	busy.Wait()
	if !errors.Is(closeErr, ErrLockLost) {
		t.Errorf("Close over a cut network, amid other sessions' work = %v; want ErrLockLost", closeErr)
	}
	// Loose: the bound is cleanupTimeout, then cancelGrace; a Close that
	// waited for the test's own timeout would mean the bound was lost.
	if took > 4*cleanupTimeout {
		t.Errorf("Close over a cut network took %v; its clean-up bound is %v", took, cleanupTimeout)
	}
	for i, err := range errs {
		if err != nil {
			t.Errorf("busy session %d: %v", i, err)
		}
	}
	t.Logf("Close returned after %v; the busy sessions ran %v cycles meanwhile", took, cycles)
}
