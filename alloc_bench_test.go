package advisory

import (
	"context"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/seed0ad592b7/advisory/internal/pgtest"
)

// The hot path's cost in allocations and in CPU, uncontended, against the
// test server: run with -benchmem. cpu-ns/op is the CPU time the test
// process (the client: pgx, the pool and the library, not the server)
// spent per op, user and system. It also counts the Go runtime's spinning
// for work after each wake-up, so it too moves with the round-trip time:
// compare subjects measured in one run. The numbers are for comparing a change
// before and after (the tracer hook adds none when no tracer is set), never
// a pass/fail bound: allocations in pgx vary with its version.
//
//	go test -run '^$' -bench 'Uncontended' -benchmem .

// benchPool is a pool on the test server for one benchmark, closed (after
// checking that nothing is left acquired) when it ends.
func benchPool(b *testing.B) *pgxpool.Pool {
	b.Helper()
	pool, err := pgxpool.New(context.Background(), server.DSN)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() {
		if n := pgtest.AwaitReleased(pool, pgtest.FailedGrace); n != 0 {
			b.Errorf("%d connections still acquired", n)
		}
		pool.Close()
	})
	return pool
}

// processCPU is the CPU time this process has used, user and system, and
// how often its threads gave up their CPU to wait (voluntary context
// switches: a thread parked in the scheduler, the network poller or a
// futex, as each wake-up of an idle thread ends in).
func processCPU(b *testing.B) (time.Duration, int64) {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		b.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano()), ru.Nvcsw
}

// loopCPU runs op b.N times (b.Loop) and reports its CPU time per op as
// cpu-ns/op, and its voluntary context switches per op as waits/op: the
// client's own wake-ups, which on a small machine take CPU from the server
// too.
func loopCPU(b *testing.B, op func()) {
	b.ReportAllocs()
	var cpu time.Duration
	var waits int64
	started := false
	for b.Loop() {
		if !started { // b.Loop resets the timer at its first call
			started = true
			cpu, waits = processCPU(b)
		}
		op()
	}
	cpuEnd, waitsEnd := processCPU(b)
	b.ReportMetric(float64(cpuEnd-cpu)/float64(b.N), "cpu-ns/op")
	b.ReportMetric(float64(waitsEnd-waits)/float64(b.N), "waits/op")
}

// Acquire and Release of a free key: two round trips, one connection from
// the pool and back.
func BenchmarkUncontendedAcquireRelease(b *testing.B) {
	pool := benchPool(b)
	ctx := context.Background()
	key := StringKey("bench-acquire")
	loopCPU(b, func() {
		lock, err := Acquire(ctx, pool, key)
		if err != nil || !lock.Acquired() {
			b.Fatalf("Acquire = %v, %v", lock, err)
		}
		if err := lock.Release(ctx); err != nil {
			b.Fatal(err)
		}
	})
}

// Lock and Unlock of a free key on one Session.
func BenchmarkUncontendedSessionLockUnlock(b *testing.B) {
	pool := benchPool(b)
	ctx := context.Background()
	key := StringKey("bench-session")
	s, err := NewSession(ctx, pool)
	if err != nil {
		b.Fatal(err)
	}
	defer func() {
		if err := s.Close(ctx); err != nil {
			b.Error(err)
		}
	}()
	loopCPU(b, func() {
		if ok, err := s.Lock(ctx, key); err != nil || !ok {
			b.Fatalf("Lock = %v, %v", ok, err)
		}
		if err := s.Unlock(ctx, key); err != nil {
			b.Fatal(err)
		}
	})
}

// Acquire's floor: raw pgx taking a pool connection, pg_advisory_lock,
// pg_advisory_unlock (its boolean checked), the connection back.
func BenchmarkUncontendedRawPgx(b *testing.B) {
	pool := benchPool(b)
	ctx := context.Background()
	key := StringKey("bench-raw")
	loopCPU(b, func() {
		c, err := pool.Acquire(ctx)
		if err != nil {
			b.Fatal(err)
		}
		defer c.Release()
		rawLockUnlock(ctx, b, c, key)
	})
}

// Session's floor: raw pgx's pg_advisory_lock and pg_advisory_unlock on
// one connection kept for the whole benchmark, as a Session keeps its own.
func BenchmarkUncontendedRawPgxConn(b *testing.B) {
	pool := benchPool(b)
	ctx := context.Background()
	key := StringKey("bench-raw-conn")
	c, err := pool.Acquire(ctx)
	if err != nil {
		b.Fatal(err)
	}
	defer c.Release()
	loopCPU(b, func() { rawLockUnlock(ctx, b, c, key) })
}

// rawLockUnlock takes and releases key on c with raw pgx, checking the
// boolean pg_advisory_unlock returns.
func rawLockUnlock(ctx context.Context, b *testing.B, c *pgxpool.Conn, key Key) {
	if _, err := c.Exec(ctx, "SELECT pg_advisory_lock($1)", key.args()...); err != nil {
		b.Fatal(err)
	}
	var ok bool
	if err := c.QueryRow(ctx, "SELECT pg_advisory_unlock($1)", key.args()...).Scan(&ok); err != nil || !ok {
		b.Fatalf("pg_advisory_unlock = %v, %v", ok, err)
	}
}

// nopTracer traces waits and holds and does nothing with them: the cost of
// the hooks themselves when a tracer is set.
type nopTracer struct{}

func (nopTracer) TraceWaitStart(ctx context.Context, _ TraceWaitStartData) context.Context {
	return ctx
}
func (nopTracer) TraceWaitEnd(context.Context, TraceWaitEndData) {}
func (nopTracer) TraceHoldStart(ctx context.Context, _ TraceHoldStartData) context.Context {
	return ctx
}
func (nopTracer) TraceHoldEnd(context.Context, TraceHoldEndData) {}

// Acquire and Release of a free key, traced by a tracer that does nothing.
func BenchmarkUncontendedAcquireReleaseTraced(b *testing.B) {
	pool := benchPool(b)
	ctx := context.Background()
	key := StringKey("bench-acquire-traced")
	opts := []Option{WithTracer(nopTracer{})}
	loopCPU(b, func() {
		lock, err := Acquire(ctx, pool, key, opts...)
		if err != nil || !lock.Acquired() {
			b.Fatalf("Acquire = %v, %v", lock, err)
		}
		if err := lock.Release(ctx); err != nil {
			b.Fatal(err)
		}
	})
}
