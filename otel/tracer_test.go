package advisoryotel

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/attribute"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"go.opentelemetry.io/otel/sdk/metric/metricdata"

	"github.com/seed0ad592b7/advisory"
	"github.com/seed0ad592b7/advisory/internal/pgtest"
)

// The tests lock against a real PostgreSQL, started by the advisory
// module's internal/pgtest (importable here: this module's path is inside
// the tree that internal/ belongs to, as for the bench module).
var server *pgtest.Server

func TestMain(m *testing.M) {
	os.Exit(pgtest.RunMain(m, pgtest.Options{}, func(s *pgtest.Server) { server = s }))
}

// testTimeout bounds every wait of a test, so a broken promise fails it
// instead of hanging it; generous for a shared, busy machine.
const testTimeout = 60 * time.Second

// setup returns a context, a pool on the test server, and a ManualReader
// behind a Tracer made with opts. When the test ends it checks that the
// pool has no connection acquired and the server no advisory lock.
func setup(t *testing.T, opts ...Option) (context.Context, *pgxpool.Pool, *sdkmetric.ManualReader, advisory.Option) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
	t.Cleanup(cancel)
	pool, err := pgxpool.New(ctx, server.DSN)
	if err != nil {
		t.Fatal(err)
	}
	owned := pgtest.CheckAtEnd(t, pgtest.EndCheck{
		DSN:   server.DSN,
		Open:  func() pgtest.Open { return pgtest.Open{Pools: []*pgxpool.Pool{pool}} },
		Grace: 10 * time.Second,
	})
	owned.Own(pool.Close)
	reader := sdkmetric.NewManualReader()
	tr, err := NewTracer(sdkmetric.NewMeterProvider(sdkmetric.WithReader(reader)), opts...)
	if err != nil {
		t.Fatal(err)
	}
	return ctx, pool, reader, advisory.WithTracer(tr)
}

// metrics is one collection from the reader.
type metrics struct{ rm metricdata.ResourceMetrics }

func collect(t *testing.T, ctx context.Context, reader *sdkmetric.ManualReader) metrics {
	t.Helper()
	var m metrics
	if err := reader.Collect(ctx, &m.rm); err != nil {
		t.Fatal(err)
	}
	return m
}

// points returns the attribute sets and values (a sum's value, a
// histogram's count) of metric name's data points that have every
// attribute in want ("key=value" each).
func (m metrics) points(name string, want ...string) (sets []attribute.Set, values []int64) {
	match := func(set attribute.Set) bool {
		for _, kv := range want {
			k, v, _ := strings.Cut(kv, "=")
			if got, ok := set.Value(attribute.Key(k)); !ok || got.AsString() != v {
				return false
			}
		}
		return true
	}
	for _, sm := range m.rm.ScopeMetrics {
		for _, mt := range sm.Metrics {
			if mt.Name != name {
				continue
			}
			switch data := mt.Data.(type) {
			case metricdata.Sum[int64]:
				for _, p := range data.DataPoints {
					if match(p.Attributes) {
						sets, values = append(sets, p.Attributes), append(values, p.Value)
					}
				}
			case metricdata.Histogram[float64]:
				for _, p := range data.DataPoints {
					if match(p.Attributes) {
						sets, values = append(sets, p.Attributes), append(values, int64(p.Count))
					}
				}
			}
		}
	}
	return sets, values
}

// value is the sum of the values of metric name's points that match want.
func (m metrics) value(name string, want ...string) int64 {
	_, values := m.points(name, want...)
	var n int64
	for _, v := range values {
		n += v
	}
	return n
}

// expect checks metric name's total over the points that match want.
func (m metrics) expect(t *testing.T, value int64, name string, want ...string) {
	t.Helper()
	if got := m.value(name, want...); got != value {
		t.Errorf("%s%v = %d; want %d", name, want, got, value)
	}
}

// awaitMetric collects until metric name's points that match want add up
// to value: a state of the library, awaited.
func awaitMetric(t *testing.T, ctx context.Context, reader *sdkmetric.ManualReader, value int64, name string, want ...string) {
	t.Helper()
	pgtest.Await(t, fmt.Sprintf("%s%v reaching %d", name, want, value), testTimeout, func() (bool, error) {
		return collect(t, ctx, reader).value(name, want...) == value, nil
	})
}

// awaitDone waits for a lock's end, failing the test if ctx ends first.
func awaitDone(t *testing.T, ctx context.Context, done <-chan struct{}) {
	t.Helper()
	select {
	case <-done:
	case <-ctx.Done():
		t.Fatal("the lock's Done channel never closed")
	}
}

// The Tracer's metrics through a real scenario: acquired, busy, timed out,
// a waiter woken by the release, a hold lost with its backend, a TTL, a
// leadership, and a LockMany; no key attribute unless asked for; the
// up-down counters back to zero at the end.
func TestMetrics(t *testing.T) {
	ctx, pool, reader, tr := setup(t)
	key := advisory.StringKey("otel-metrics")

	holder, err := advisory.Acquire(ctx, pool, key, tr)
	if err != nil {
		t.Fatal(err)
	}
	m := collect(t, ctx, reader)
	m.expect(t, 1, "advisory.lock.held", "advisory.entry=Acquire", "advisory.mode=exclusive")
	m.expect(t, 0, "advisory.lock.waiting")

	if l, err := advisory.Acquire(ctx, pool, key, tr, advisory.NoWait()); err != nil || l.Acquired() {
		t.Fatalf("NoWait on a held key = %v, %v", l.Acquired(), err)
	}
	if _, err := advisory.Acquire(ctx, pool, key, tr, advisory.WaitTimeout(50*time.Millisecond)); !errors.Is(err, advisory.ErrTimeout) {
		t.Fatalf("WaitTimeout on a held key = %v; want ErrTimeout", err)
	}
	waiter := make(chan error, 1)
	go func() {
		_, err := advisory.Do(ctx, pool, key, func(context.Context) error { return nil }, tr)
		waiter <- err
	}()
	awaitMetric(t, ctx, reader, 1, "advisory.lock.waiting", "advisory.entry=Do")
	if err := holder.Release(ctx); err != nil {
		t.Fatal(err)
	}
	if err := <-waiter; err != nil {
		t.Fatal(err)
	}

	lost, err := advisory.Acquire(ctx, pool, key, tr, advisory.HealthInterval(50*time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	var pid uint32
	if err := lost.WithConn(ctx, func(c *pgx.Conn) error { pid = c.PgConn().PID(); return nil }); err != nil {
		t.Fatal(err)
	}
	if _, err := pool.Exec(ctx, "SELECT pg_terminate_backend($1)", int64(pid)); err != nil {
		t.Fatal(err)
	}
	awaitDone(t, ctx, lost.Done())
	if err := lost.Release(ctx); !errors.Is(err, advisory.ErrLockLost) {
		t.Errorf("Release after the loss = %v; want ErrLockLost", err)
	}

	ttl, err := advisory.Acquire(ctx, pool, key, tr, advisory.TTL(50*time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	awaitDone(t, ctx, ttl.Done())
	_ = ttl.Release(ctx) // ErrTTLExceeded

	errStop := errors.New("stop leading")
	if err := advisory.Lead(ctx, pool, key, func(context.Context) error { return errStop }, tr); !errors.Is(err, errStop) {
		t.Fatalf("Lead = %v; want fn's error", err)
	}

	s, err := advisory.NewSession(ctx, pool, tr)
	if err != nil {
		t.Fatal(err)
	}
	keys := []advisory.Key{advisory.Int64Key(1), advisory.Int64Key(2), advisory.Int64Key(3)}
	if ok, err := s.LockMany(ctx, keys, advisory.Shared()); !ok || err != nil {
		t.Fatalf("LockMany = %v, %v", ok, err)
	}
	collect(t, ctx, reader).expect(t, 3, "advisory.lock.held", "advisory.entry=Session.LockMany", "advisory.mode=shared")
	if err := s.Close(ctx); err != nil {
		t.Fatal(err)
	}

	m = collect(t, ctx, reader)
	m.expect(t, 3, "advisory.lock.acquired", "advisory.entry=Acquire", "advisory.mode=exclusive") // holder, lost, ttl
	m.expect(t, 1, "advisory.lock.acquired", "advisory.entry=Do")
	m.expect(t, 1, "advisory.lock.acquired", "advisory.entry=Lead")
	m.expect(t, 1, "advisory.lock.acquired", "advisory.entry=Session.LockMany", "advisory.mode=shared")
	m.expect(t, 1, "advisory.lock.not_acquired", "advisory.entry=Acquire", "advisory.outcome=busy")
	m.expect(t, 1, "advisory.lock.not_acquired", "advisory.entry=Acquire", "advisory.outcome=timeout")
	m.expect(t, 2, "advisory.lock.not_acquired")
	m.expect(t, 3, "advisory.lock.wait.duration", "advisory.entry=Acquire", "advisory.outcome=acquired")
	m.expect(t, 1, "advisory.lock.wait.duration", "advisory.entry=Acquire", "advisory.outcome=timeout")
	m.expect(t, 8, "advisory.lock.wait.duration")
	m.expect(t, 1, "advisory.lock.lost", "advisory.entry=Acquire")
	m.expect(t, 1, "advisory.lock.lost")
	m.expect(t, 1, "advisory.lock.hold.duration", "advisory.entry=Acquire", "advisory.end=lost")
	m.expect(t, 1, "advisory.lock.hold.duration", "advisory.entry=Acquire", "advisory.end=ttl")
	m.expect(t, 1, "advisory.lock.hold.duration", "advisory.entry=Acquire", "advisory.end=released")
	m.expect(t, 3, "advisory.lock.hold.duration", "advisory.entry=Session.LockMany", "advisory.end=released")
	m.expect(t, 8, "advisory.lock.hold.duration")
	m.expect(t, 1, "advisory.lead.duration", "advisory.end=released")
	for _, name := range []string{"advisory.lock.waiting", "advisory.lock.held", "advisory.lead.leading"} {
		sets, values := m.points(name)
		if len(sets) == 0 {
			t.Errorf("%s has no data points", name)
		}
		for i, v := range values {
			if v != 0 {
				t.Errorf("%s{%v} = %d at the end; want 0", name, sets[i].Encoded(attribute.DefaultEncoder()), v)
			}
		}
	}
	for _, sm := range m.rm.ScopeMetrics {
		if sm.Scope.Name != meterName {
			t.Errorf("scope %q; want %q", sm.Scope.Name, meterName)
		}
		for _, mt := range sm.Metrics {
			sets, _ := m.points(mt.Name)
			for _, set := range sets {
				if set.HasValue("advisory.key") {
					t.Errorf("%s has the key attribute without WithKeyNames: %v", mt.Name, set.Encoded(attribute.DefaultEncoder()))
				}
			}
		}
	}
}

// WithKeyNames adds the key's name to measurements about one key, and
// only when the name is not empty; a LockMany wait has no key, its holds
// do.
func TestMetricsKeyNames(t *testing.T) {
	named := advisory.StringKey("otel-named")
	ctx, pool, reader, tr := setup(t, WithKeyNames(func(k advisory.Key) string {
		if k == named {
			return "named"
		}
		return ""
	}))
	other := advisory.StringKey("otel-unnamed")
	for _, k := range []advisory.Key{named, other} {
		l, err := advisory.Acquire(ctx, pool, k, tr)
		if err != nil {
			t.Fatal(err)
		}
		if err := l.Release(ctx); err != nil {
			t.Fatal(err)
		}
	}
	s, err := advisory.NewSession(ctx, pool, tr)
	if err != nil {
		t.Fatal(err)
	}
	if ok, err := s.LockMany(ctx, []advisory.Key{named, other}); !ok || err != nil {
		t.Fatalf("LockMany = %v, %v", ok, err)
	}
	if err := s.Close(ctx); err != nil {
		t.Fatal(err)
	}
	m := collect(t, ctx, reader)
	m.expect(t, 1, "advisory.lock.acquired", "advisory.entry=Acquire", "advisory.key=named")
	m.expect(t, 2, "advisory.lock.acquired", "advisory.entry=Acquire")
	m.expect(t, 1, "advisory.lock.hold.duration", "advisory.entry=Acquire", "advisory.key=named")
	m.expect(t, 1, "advisory.lock.hold.duration", "advisory.entry=Session.LockMany", "advisory.key=named")
	m.expect(t, 0, "advisory.lock.acquired", "advisory.entry=Session.LockMany", "advisory.key=named")
	m.expect(t, 1, "advisory.lock.acquired", "advisory.entry=Session.LockMany")
	var keyed []string
	for _, name := range []string{"advisory.lock.acquired", "advisory.lock.hold.duration", "advisory.lock.held", "advisory.lock.waiting"} {
		sets, _ := m.points(name)
		for _, set := range sets {
			if v, ok := set.Value("advisory.key"); ok {
				keyed = append(keyed, fmt.Sprintf("%s:%s", name, v.AsString()))
				if v.AsString() != "named" {
					t.Errorf("%s has advisory.key=%q; want only \"named\"", name, v.AsString())
				}
			}
		}
	}
	if len(keyed) == 0 {
		t.Error("no measurement has advisory.key")
	}
}

// NewTracer(nil) records with the global MeterProvider.
func TestNewTracerGlobal(t *testing.T) {
	ctx := context.Background()
	reader := sdkmetric.NewManualReader()
	before := otel.GetMeterProvider()
	otel.SetMeterProvider(sdkmetric.NewMeterProvider(sdkmetric.WithReader(reader)))
	t.Cleanup(func() { otel.SetMeterProvider(before) })
	tr, err := NewTracer(nil)
	if err != nil {
		t.Fatal(err)
	}
	tr.TraceWaitEnd(ctx, advisory.TraceWaitEndData{
		TraceWaitStartData: advisory.TraceWaitStartData{Entry: advisory.EntryAcquire, Key: advisory.Int64Key(1)},
		Acquired:           true,
		Duration:           time.Millisecond,
	})
	collect(t, ctx, reader).expect(t, 1, "advisory.lock.acquired", "advisory.entry=Acquire", "advisory.mode=exclusive")
}
