package advisory

import (
	"context"
	"testing"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/seed0ad592b7/advisory/internal/pgtest"
)

// The hot path's cost in allocations, uncontended, against the test
// server: run with -benchmem. The numbers are for comparing a change
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

// Acquire and Release of a free key: two round trips, one connection from
// the pool and back.
func BenchmarkUncontendedAcquireRelease(b *testing.B) {
	pool := benchPool(b)
	ctx := context.Background()
	key := StringKey("bench-acquire")
	b.ReportAllocs()
	for b.Loop() {
		lock, err := Acquire(ctx, pool, key)
		if err != nil || !lock.Acquired() {
			b.Fatalf("Acquire = %v, %v", lock, err)
		}
		if err := lock.Release(ctx); err != nil {
			b.Fatal(err)
		}
	}
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
	b.ReportAllocs()
	for b.Loop() {
		if ok, err := s.Lock(ctx, key); err != nil || !ok {
			b.Fatalf("Lock = %v, %v", ok, err)
		}
		if err := s.Unlock(ctx, key); err != nil {
			b.Fatal(err)
		}
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
	b.ReportAllocs()
	for b.Loop() {
		lock, err := Acquire(ctx, pool, key, opts...)
		if err != nil || !lock.Acquired() {
			b.Fatalf("Acquire = %v, %v", lock, err)
		}
		if err := lock.Release(ctx); err != nil {
			b.Fatal(err)
		}
	}
}
