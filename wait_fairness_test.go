package advisory

import (
	"context"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// No waiter starves when every wait lasts several slices: six workers take
// turns on one key for a while, each section (20 ms of work) as long as two
// slices (deadlock_timeout 20 ms: 10 ms slices), so waiters go out of and
// back into the server's queue many times per wait. Each worker must be
// served; how evenly is logged (strict FIFO is not promised).
func TestWaitSlicesNoStarvation(t *testing.T) {
	e := newEnv(t)
	pool := e.pool(deadlockTimeout("20ms", 10))
	key := StringKey("slice-fairness")
	contend(t, 6, 1, func(fn func(context.Context) error) (bool, error) { return Do(e.ctx, pool, key, fn) })
}

// contend runs workers that each enter a section through enter, again and
// again for 3 s, a section being 20 ms of work; it fails the test if more
// than limit sections run at once or if a worker is never served, and logs
// how evenly they were served.
func contend(t *testing.T, workers int, limit int32, enter func(func(context.Context) error) (bool, error)) {
	t.Helper()
	stop := time.Now().Add(3 * time.Second)
	served := make([]int, workers)
	var running atomic.Int32
	var wg sync.WaitGroup
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for time.Now().Before(stop) {
				ok, err := enter(func(ctx context.Context) error {
					if running.Add(1) > limit {
						t.Errorf("more than %d holders at once", limit)
					}
					defer running.Add(-1)
					time.Sleep(20 * time.Millisecond) // the work: longer than a slice
					return nil
				})
				if err != nil || !ok {
					t.Errorf("worker %d: acquired %v, err %v", w, ok, err)
					return
				}
				served[w]++
			}
		}()
	}
	wg.Wait()
	least, most, total := served[0], served[0], 0
	for _, n := range served {
		least, most, total = min(least, n), max(most, n), total+n
	}
	if least == 0 {
		t.Errorf("a worker was never served: %v", served)
	}
	t.Logf("sections per worker %v: total %d, least %d, most %d", served, total, least, most)
}
