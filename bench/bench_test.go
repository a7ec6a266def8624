package bench

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/seed0ad592b7/advisory"
)

// Keys: each benchmark uses its own range, so a lock left by a failed
// benchmark cannot stall the next.
const (
	cycleKey     = 1_000
	handoffKey   = 2_000
	contendedKey = 3_000
	manyKeyBase  = 1_000_000
)

// BenchmarkCycle: one uncontended lock+unlock cycle per op, one client per
// subject. ns/op is the mean; p50-ns and p99-ns are per cycle.
func BenchmarkCycle(b *testing.B) {
	ctx := context.Background()
	for i, s := range subjects {
		b.Run(s.name, func(b *testing.B) {
			pool := newPool(b, 4)
			warm(b, pool, 1)
			c := s.open(b, pool, cycleKey+int64(i))
			measureCycles(b, func() error { return cycle(ctx, c) })
		})
	}
}

// measureCycles runs run once untimed (to prepare statements and open
// connections), then b.N times, and reports the p50 and p99 of a run.
func measureCycles(b *testing.B, run func() error) {
	b.Helper()
	if err := run(); err != nil {
		b.Fatal(err)
	}
	samples := make([]time.Duration, 0, b.N)
	b.ResetTimer()
	for range b.N {
		start := time.Now()
		if err := run(); err != nil {
			b.Fatal(err)
		}
		samples = append(samples, time.Since(start))
	}
	b.StopTimer()
	reportPercentiles(b, samples)
}

func cycle(ctx context.Context, c client) error {
	if err := c.lock(ctx); err != nil {
		return err
	}
	return c.unlock(ctx)
}

// pollingHandoffs caps the hand-offs measured per run for a subject that
// polls (goose: up to 5 s each), so that the suite stays short.
const pollingHandoffs = 3

// BenchmarkHandoff: two clients of one key take turns. The holder releases
// at t0 (just before its unlock call, so t1−t0 includes the unlock's round
// trip) while the other client waits; the waiter's lock call returns at t1.
// p50-ns and p99-ns are of t1−t0; ns/op also counts the set-up of each
// hand-off (waiting until the waiter is queued on the server) and means
// nothing. A client that waits on the server is released once the server
// shows it waiting; a polling client (goose) is released at a uniformly
// random moment of its first poll interval, as a real holder would be.
func BenchmarkHandoff(b *testing.B) {
	for i, s := range subjects {
		b.Run(s.name, func(b *testing.B) { handoff(b, s, handoffKey+int64(i), 0) })
	}
}

// longWait is how long BenchmarkHandoffLong's waiter waits before the
// release: longer than one wait slice (half of the default deadlock_timeout,
// 1 s), so the waiter is in a later slice when the key is released.
const longWait = 700 * time.Millisecond

// BenchmarkHandoffLong is BenchmarkHandoff after a wait of longWait, for the
// subjects that wait on the server: the hand-off must stay at the floor's
// when waits are cut into slices (SPEC §2a). ns/op means nothing.
func BenchmarkHandoffLong(b *testing.B) {
	for i, s := range subjects {
		if s.polls || s.name == "pgxpool-naive" || s.name == "migrate-pgx5" {
			continue
		}
		b.Run(s.name, func(b *testing.B) { handoff(b, s, handoffKey+100+int64(i), longWait) })
	}
}

// handoff measures b.N hand-offs of key between two clients of s, the
// waiter having waited at least wait (0: released as soon as it is queued).
func handoff(b *testing.B, s subject, key int64, wait time.Duration) {
	n := b.N
	if s.polls {
		n = min(n, pollingHandoffs)
	}
	one := newHandoff(b, s, key, wait)
	samples := make([]time.Duration, 0, n)
	b.ResetTimer()
	for range n {
		samples = append(samples, one())
	}
	b.StopTimer()
	reportPercentiles(b, samples)
}

// newHandoff prepares hand-offs of key between two clients of s (the
// holder takes key now, and the last holder lets go when the benchmark
// ends) and returns one hand-off, which returns its t1−t0.
func newHandoff(b *testing.B, s subject, key int64, wait time.Duration) func() time.Duration {
	ctx := context.Background()
	// Each client on a pool of its own, as in two processes: two
	// goroutines of one process on one pool would hand the lock over
	// inside the process (SPEC §13), never through the server.
	pools := [2]*pgxpool.Pool{newPool(b, 4), newPool(b, 4)}
	warm(b, pools[0], 1)
	warm(b, pools[1], 1)
	monitor := newConn(b)
	holder, waiter := s.open(b, pools[0], key), s.open(b, pools[1], key)
	if err := holder.lock(ctx); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() {
		if err := holder.unlock(ctx); err != nil {
			b.Error(err)
		}
	})
	return func() time.Duration {
		d := handOver(b, holder, waiter, func() {
			if s.polls {
				time.Sleep(rand.N(5 * time.Second)) // a polling holder releases at a random moment
			} else {
				awaitWaiter(b, monitor)
			}
			if wait > 0 {
				time.Sleep(wait) // the scenario: a wait longer than a slice
				awaitWaiter(b, monitor)
			}
		})
		holder, waiter = waiter, holder
		return d
	}
}

// handOver starts waiter's lock, runs queued (which returns once the
// waiter should be released), and then has holder let go at t0; it
// returns t1−t0, t1 being when the waiter's lock returned.
func handOver(b *testing.B, holder, waiter client, queued func()) time.Duration {
	ctx := context.Background()
	got := make(chan error, 1)
	var t1 time.Time
	go func() {
		err := waiter.lock(ctx)
		t1 = time.Now()
		got <- err
	}()
	queued()
	t0 := time.Now()
	if err := holder.unlock(ctx); err != nil {
		b.Fatal(err)
	}
	if err := <-got; err != nil {
		b.Fatal(err)
	}
	return t1.Sub(t0)
}

// Contended throughput: contenders clients on contendedKeys keys (client g
// on key g % contendedKeys), b.N lock+unlock cycles in all, each around a
// tiny critical section that fails the run if two clients are ever inside
// it for one key at once.
const (
	contenders    = 16
	contendedKeys = 4
)

// BenchmarkContended reports ops/s (cycles per second, all clients
// together). goose is left out: its waiters poll every 5 s, so 16 clients
// on 4 keys do a few cycles a minute (FIELD-NOTES measured 11 of 16
// starving); BenchmarkHandoff shows the cause.
func BenchmarkContended(b *testing.B) {
	for i, s := range subjects {
		if s.polls {
			continue
		}
		b.Run(s.name, func(b *testing.B) {
			clients, _ := openContenders(b, s, contendedKey+int64(i*contendedKeys))
			b.ResetTimer()
			elapsed, served := contend(b, clients, b.N)
			b.StopTimer()
			b.ReportMetric(float64(b.N)/elapsed.Seconds(), "ops/s")
			// How evenly the clients were served: how many got at least
			// one critical section, and the least served one's cycles
			// against a fair share (b.N / contenders).
			clientsServed, least := 0, int64(b.N)
			for _, n := range served {
				if n > 0 {
					clientsServed++
				}
				least = min(least, n)
			}
			b.ReportMetric(float64(clientsServed), "clients-served")
			b.ReportMetric(float64(least)*contenders/float64(b.N), "min-share")
		})
	}
}

// openContenders opens the contenders clients of s, client g on key
// firstKey + g % contendedKeys, each on its own connection or checkout,
// and runs one cycle on each (to prepare statements and connect).
func openContenders(b *testing.B, s subject, firstKey int64) ([]client, *pgxpool.Pool) {
	b.Helper()
	pool := newPool(b, contenders+4)
	warm(b, pool, contenders)
	clients := make([]client, contenders)
	for g := range clients {
		clients[g] = s.open(b, pool, firstKey+int64(g%contendedKeys))
		if err := cycle(context.Background(), clients[g]); err != nil {
			b.Fatal(err)
		}
	}
	return clients, pool
}

// contend runs n lock+unlock cycles in all on clients, each around a tiny
// critical section that fails the benchmark if two clients are ever inside
// it for one key at once, and returns how long that took and how many
// cycles each client ran.
func contend(b *testing.B, clients []client, n int) (time.Duration, []int64) {
	b.Helper()
	ctx := context.Background()
	var (
		inside  [contendedKeys]atomic.Int32
		left    atomic.Int64
		overlap atomic.Int64
		served  = make([]atomic.Int64, len(clients))
		errMu   sync.Mutex
		errs    []error
		wg      sync.WaitGroup
	)
	fail := func(err error) {
		errMu.Lock()
		errs = append(errs, err)
		errMu.Unlock()
	}
	left.Store(int64(n))
	start := time.Now()
	for g, c := range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			k := g % contendedKeys
			for left.Add(-1) >= 0 {
				if err := c.lock(ctx); err != nil {
					fail(err)
					return
				}
				if inside[k].Add(1) != 1 {
					overlap.Add(1)
				}
				runtime.Gosched() // the critical section: let another goroutine run
				inside[k].Add(-1)
				served[g].Add(1)
				if err := c.unlock(ctx); err != nil {
					fail(err)
					return
				}
			}
		}()
	}
	wg.Wait()
	elapsed := time.Since(start)
	if err := errors.Join(errs...); err != nil {
		b.Fatal(err)
	}
	if n := overlap.Load(); n > 0 {
		b.Fatalf("mutual exclusion broken: %d overlapping critical sections", n)
	}
	counts := make([]int64, len(served))
	for i := range served {
		counts[i] = served[i].Load()
	}
	return elapsed, counts
}

// manyKeys is the size of BenchmarkManyKeys's set. One Lock per key is
// measured on perKeyKeys keys: 10,000 when BENCH_FULL=1 (run.sh), else
// 1,000, because holding thousands of locks slows every statement of the
// session on the server (see BENCHMARKS.md) and one op at 10,000 takes
// about 100 s.
const manyKeys = 10_000

var perKeyKeys = func() int {
	if os.Getenv("BENCH_FULL") == "1" {
		return 10_000
	}
	return 1_000
}()

// queryCounter is a pgx tracer that counts the statements sent, a batch as
// one.
type queryCounter struct{ n atomic.Int64 }

func (q *queryCounter) TraceQueryStart(ctx context.Context, _ *pgx.Conn, _ pgx.TraceQueryStartData) context.Context {
	q.n.Add(1)
	return ctx
}

func (q *queryCounter) TraceQueryEnd(context.Context, *pgx.Conn, pgx.TraceQueryEndData) {}

// TraceBatchStart counts a batch (a Session's first lock goes out as one,
// with its keep-alive settings) as one statement: one round trip.
func (q *queryCounter) TraceBatchStart(ctx context.Context, _ *pgx.Conn, _ pgx.TraceBatchStartData) context.Context {
	q.n.Add(1)
	return ctx
}

func (q *queryCounter) TraceBatchQuery(context.Context, *pgx.Conn, pgx.TraceBatchQueryData) {}
func (q *queryCounter) TraceBatchEnd(context.Context, *pgx.Conn, pgx.TraceBatchEndData)     {}

// BenchmarkManyKeys: many keys on one Session, taken and released, per op:
// 10,000 with LockMany/UnlockMany, and perKeyKeys with one Lock/Unlock per
// key. p50-ns and p99-ns are of the lock phase only (ns/op is lock and
// unlock), lock-round-trips the statements sent to take the keys,
// round-trips/op those for lock and unlock, B/held-lock the client heap per
// held lock (measured once, on a fresh Session, after GC).
func BenchmarkManyKeys(b *testing.B) {
	ctx := context.Background()
	keys := make([]advisory.Key, max(manyKeys, perKeyKeys))
	for i := range keys {
		keys[i] = advisory.Int64Key(manyKeyBase + int64(i))
	}
	perKey := func(s *advisory.Session, keys []advisory.Key) (lock, unlock func() error) {
		return func() error {
				for _, k := range keys {
					if _, err := s.Lock(ctx, k); err != nil {
						return err
					}
				}
				return nil
			}, func() error {
				for _, k := range keys {
					if err := s.Unlock(ctx, k); err != nil {
						return err
					}
				}
				return nil
			}
	}
	many := func(s *advisory.Session, keys []advisory.Key) (lock, unlock func() error) {
		return func() error {
				ok, err := s.LockMany(ctx, keys)
				if err == nil && !ok {
					err = fmt.Errorf("LockMany returned false")
				}
				return err
			}, func() error {
				return s.UnlockMany(ctx, keys)
			}
	}
	for _, way := range []struct {
		name  string
		n     int
		funcs func(*advisory.Session, []advisory.Key) (lock, unlock func() error)
	}{{"LockMany", manyKeys, many}, {"Lock-per-key", perKeyKeys, perKey}} {
		b.Run(fmt.Sprintf("%s-%d", way.name, way.n), func(b *testing.B) {
			var counter queryCounter
			pool := newPool(b, 4, func(c *pgxpool.Config) { c.ConnConfig.Tracer = &counter })

			// Client memory per held lock, on a fresh Session.
			s, err := advisory.NewSession(ctx, pool)
			if err != nil {
				b.Fatal(err)
			}
			lock, unlock := way.funcs(s, keys[:way.n])
			before := heapAlloc()
			if err := lock(); err != nil {
				b.Fatal(err)
			}
			perLock := float64(int64(heapAlloc())-int64(before)) / float64(way.n)
			if err := unlock(); err != nil {
				b.Fatal(err)
			}

			samples := make([]time.Duration, 0, b.N)
			counter.n.Store(0)
			var lockStatements int64
			b.ResetTimer()
			for range b.N {
				start := time.Now()
				n0 := counter.n.Load()
				if err := lock(); err != nil {
					b.Fatal(err)
				}
				samples = append(samples, time.Since(start))
				lockStatements += counter.n.Load() - n0
				if err := unlock(); err != nil {
					b.Fatal(err)
				}
			}
			b.StopTimer()
			statements := counter.n.Load() // not counting Close's
			if err := s.Close(ctx); err != nil {
				b.Fatal(err)
			}
			if len(samples) > 0 {
				reportPercentiles(b, samples)
				b.ReportMetric(float64(lockStatements)/float64(b.N), "lock-round-trips")
				b.ReportMetric(float64(statements)/float64(b.N), "round-trips/op")
			}
			b.ReportMetric(perLock, "B/held-lock")
		})
	}
}

// heapAlloc returns the live heap after a full collection.
func heapAlloc() uint64 {
	var m runtime.MemStats
	runtime.GC()
	runtime.GC()
	runtime.ReadMemStats(&m)
	return m.HeapAlloc
}
