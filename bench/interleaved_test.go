package bench

import (
	"context"
	"strings"
	"testing"
	"time"
)

// BenchmarkInterleaved measures the subjects in turn, one sample of each per
// op, so that every subject and its floor see the same machine: on a
// shared or virtual machine the speed drifts several times over between
// (and within) runs, and subjects measured one after the other are not
// comparable. Per subject it reports NAME-p50-ns and NAME-vs-floor, the
// floor's p50 over the subject's (1.00 is the floor; lower is slower).
// ns/op means nothing.
//   - cycle: one uncontended lock+unlock (or transaction lock) cycle; the
//     floor is raw-pgx (lock and unlock on one *pgx.Conn, two round trips).
//   - handoff: as BenchmarkHandoff, for the subjects that wait on the
//     server; the floor is raw-pgx.
func BenchmarkInterleaved(b *testing.B) {
	ctx := context.Background()
	b.Run("cycle", func(b *testing.B) {
		var names []string
		var runs []func() error
		for i, s := range subjects {
			if s.polls || s.name == "pgxpool-naive" || s.name == "migrate-pgx5" {
				continue
			}
			c := s.open(b, newPool(b, 4), cycleKey+int64(i))
			names, runs = append(names, s.name), append(runs, func() error { return cycle(ctx, c) })
		}
		for _, s := range txCycleSubjects()[1:] { // [0] is raw-pgx again
			names, runs = append(names, s.name), append(runs, s.open(b))
		}
		interleave(b, names, func(i int) time.Duration {
			start := time.Now()
			if err := runs[i](); err != nil {
				b.Fatal(err)
			}
			return time.Since(start)
		})
	})
	b.Run("handoff", func(b *testing.B) {
		var names []string
		var ones []func() time.Duration
		for i, s := range subjects {
			if s.polls || s.name == "pgxpool-naive" || s.name == "migrate-pgx5" {
				continue
			}
			names, ones = append(names, s.name), append(ones, newHandoff(b, s, handoffKey+200+int64(i), 0))
		}
		interleave(b, names, func(i int) time.Duration { return ones[i]() })
	})
}

// interleave runs measure(i) for every subject i once per op (once more
// first, untimed, to prepare statements and open connections), and
// reports each subject's p50 and its ratio to the floor's, names[0].
func interleave(b *testing.B, names []string, measure func(i int) time.Duration) {
	b.Helper()
	for i := range names {
		measure(i)
	}
	samples := make([][]time.Duration, len(names))
	b.ResetTimer()
	for range b.N {
		for i := range names {
			samples[i] = append(samples[i], measure(i))
		}
	}
	b.StopTimer()
	p50 := func(s []time.Duration) float64 { return float64(percentile(s, 0.50).Nanoseconds()) }
	floor := p50(samples[0])
	for i, name := range names {
		unit := strings.ReplaceAll(name, "/", ".")
		b.ReportMetric(p50(samples[i]), unit+"-p50-ns")
		b.ReportMetric(floor/p50(samples[i]), unit+"-vs-floor")
	}
}
