package bench

import (
	"context"
	"math/rand/v2"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/seed0ad592b7/advisory"
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
//     pgxpool-naive, raw pgx taking a pool connection per lock as Acquire
//     does, is the floor of a lock on a connection of its own.
//   - handoff: as BenchmarkHandoff, for the subjects that wait on the
//     server; the floor is raw-pgx.
//   - handoff-split: hand-offs between a holder of one kind and a waiter
//     of another (HOLDER_WAITER), raw pgx and Session, to tell what the
//     releasing holder costs from what the woken waiter costs; the floor is
//     raw-pgx_raw-pgx; pgxpool-naive as the holder is the floor for an
//     advisory-acquire holder. As the waiter it waits in one server-side
//     wait, which SPEC §2a rules out: an advisory-acquire waiter's floor is
//     raw-pgx-sliced. The holder holds for 3 ms first, as a real holder
//     would, so that its health watcher watches the connection.
func BenchmarkInterleaved(b *testing.B) {
	ctx := context.Background()
	b.Run("cycle", func(b *testing.B) {
		var names []string
		var runs []func() error
		for i, s := range subjects {
			if s.polls || s.name == "migrate-pgx5" {
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
			if s.polls || s.name == "migrate-pgx5" {
				continue
			}
			names, ones = append(names, s.name), append(ones, newHandoff(b, s, handoffKey+200+int64(i), 0))
		}
		interleave(b, names, func(i int) time.Duration { return ones[i]() })
	})
	b.Run("handoff-split", func(b *testing.B) {
		byName := map[string]subject{}
		for _, s := range subjects {
			byName[s.name] = s
		}
		monitor := newConn(b)
		var names []string
		var ones []func() time.Duration
		for i, p := range [][2]string{{"raw-pgx", "raw-pgx"}, {"advisory-session", "raw-pgx"}, {"raw-pgx", "advisory-session"}, {"advisory-session", "advisory-session"},
			{"advisory-acquire", "raw-pgx"}, {"raw-pgx", "advisory-acquire"}, {"raw-pgx", "raw-pgx-sliced"},
			{"pgxpool-naive", "raw-pgx"}, {"raw-pgx", "pgxpool-naive"}} {
			// Holder and waiter on pools of their own, as in two processes:
			// two Sessions of one pool would queue in the process (SPEC §13).
			key := handoffKey + 300 + int64(i)
			holder, waiter := byName[p[0]].open(b, newPool(b, 4), key), byName[p[1]].open(b, newPool(b, 4), key)
			names = append(names, p[0]+"_"+p[1])
			ones = append(ones, func() time.Duration { return splitHandoff(b, monitor, holder, waiter) })
		}
		interleave(b, names, func(i int) time.Duration { return ones[i]() })
	})
}

// splitHandoff is one hand-off from holder to waiter, which then lets go:
// holder takes the key and holds it for 3 ms, waiter queues, holder
// releases at t0, waiter's lock returns at t1.
func splitHandoff(b *testing.B, monitor *pgx.Conn, holder, waiter client) time.Duration {
	ctx := context.Background()
	if err := holder.lock(ctx); err != nil {
		b.Fatal(err)
	}
	time.Sleep(3 * time.Millisecond) // the scenario: a hold long enough for the health watcher to start watching
	d := handOver(b, holder, waiter, func() { awaitWaiter(b, monitor) })
	if err := waiter.unlock(ctx); err != nil {
		b.Fatal(err)
	}
	return d
}

// BenchmarkContendedInterleaved is BenchmarkContended with the subjects
// measured in turn, as BenchmarkInterleaved does: per op, a block of
// contendedBlock cycles of 16 clients on 4 keys for each subject.
// NAME-p50-ns is a block's time, so NAME-vs-floor is the subject's
// throughput against raw pgx's. ns/op means nothing.
func BenchmarkContendedInterleaved(b *testing.B) {
	var names []string
	var sets [][]client
	var pools []*pgxpool.Pool
	for i, s := range append(subjects, noCohortSubject, noGateSessionSubject) {
		// Each subject keeps 16 connections open for the whole run:
		// raw-pgx-sliced is measured in BenchmarkContended instead.
		if s.polls || s.name == "pgxpool-naive" || s.name == "migrate-pgx5" || s.name == "raw-pgx-sliced" {
			continue
		}
		clients, pool := openContenders(b, s, contendedKey+1000+int64(i*contendedKeys))
		names, sets, pools = append(names, s.name), append(sets, clients), append(pools, pool)
	}
	conns := make([]pinned, len(names))
	interleave(b, names, func(i int) time.Duration {
		stop := conns[i].watch(pools[i])
		elapsed, _ := contend(b, sets[i], contendedBlock)
		stop()
		return elapsed // per block: the ratio of times is the inverse ratio of throughputs
	})
	for i, name := range names {
		if name != "raw-pgx" { // its clients have connections of their own
			b.ReportMetric(float64(conns[i].max), name+"-conns-max")
			b.ReportMetric(conns[i].mean(), name+"-conns-mean")
		}
	}
}

// noCohortSubject is advisory-acquire with NoCohort: every waiter waits
// on the server on a pool connection of its own, as before SPEC §13.
var noCohortSubject = subject{name: "advisory-acquire-nocohort", open: func(_ *testing.B, pool *pgxpool.Pool, key int64) client {
	return &acquireClient{pool: pool, key: advisory.Int64Key(key), opts: []advisory.Option{advisory.NoCohort()}}
}}

// noGateSessionSubject is advisory-session with NoCohort: the Sessions of
// the process do not queue per key in the process (SPEC §13), each waits on
// the server, as Sessions of different processes do.
var noGateSessionSubject = subject{name: "advisory-session-nocohort", open: func(b *testing.B, pool *pgxpool.Pool, key int64) client {
	c := openSession(b, pool, key).(*sessionClient)
	c.opts = []advisory.Option{advisory.NoCohort()}
	return c
}}

// pinned samples how many connections a pool has acquired, every
// millisecond while watched.
type pinned struct {
	max        int32
	sum, count int64
}

func (p *pinned) watch(pool *pgxpool.Pool) (stop func()) {
	done, finished := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(finished)
		t := time.NewTicker(time.Millisecond)
		defer t.Stop()
		for {
			select {
			case <-done:
				return
			case <-t.C:
				n := pool.Stat().AcquiredConns()
				p.max, p.sum, p.count = max(p.max, n), p.sum+int64(n), p.count+1
			}
		}
	}()
	return func() { close(done); <-finished }
}

func (p *pinned) mean() float64 { return float64(p.sum) / float64(max(p.count, 1)) }

// contendedBlock is how many cycles BenchmarkInterleaved/contended runs
// per subject in one op: enough for every client to wait many times.
const contendedBlock = 800

// interleave runs measure(i) for every subject i once per op, in a new
// (seeded) random order each op (and once more first, untimed, to prepare
// statements and open connections), and reports each subject's p50 and its
// ratio to the floor's, names[0].
func interleave(b *testing.B, names []string, measure func(i int) time.Duration) {
	b.Helper()
	for i := range names {
		measure(i)
	}
	samples := make([][]time.Duration, len(names))
	b.ResetTimer()
	order := rand.New(rand.NewPCG(1, 2)) // the same orders in every run
	for range b.N {
		// A new order per op: a subject's time depends on what ran just
		// before it (the server and PgBouncer finishing the previous
		// subject's work on the same cores), so a fixed order would give
		// each subject the same neighbour, and the floor always the last
		// subject's tail.
		for _, i := range order.Perm(len(names)) {
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
