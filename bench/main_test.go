package bench

import (
	"context"
	"os"
	"slices"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/seed0ad592b7/advisory/internal/pgtest"
)

// dsn is the server every benchmark uses: a throw-away local PostgreSQL
// with a lock table big enough for 10,000 locks on one session.
var (
	dsn    string
	server *pgtest.Server
)

func TestMain(m *testing.M) {
	if spec := os.Getenv(envProcChild); spec != "" {
		os.Exit(procChild(spec)) // a client process of BenchmarkContendedProcesses
	}
	opts := pgtest.Options{Settings: map[string]string{
		"max_locks_per_transaction": "256",
		"max_connections":           "200", // ContendedInterleaved keeps 16 per subject open
	}}
	os.Exit(pgtest.RunMain(m, opts, func(s *pgtest.Server) { dsn, server = s.DSN, s }))
}

// newPool returns a pool of at most maxConns connections, closed when the
// benchmark ends.
func newPool(b *testing.B, maxConns int32, mods ...func(*pgxpool.Config)) *pgxpool.Pool {
	b.Helper()
	return newPoolOn(b, dsn, maxConns, mods...)
}

// newPoolOn is newPool on the server dsn reaches.
func newPoolOn(b *testing.B, dsn string, maxConns int32, mods ...func(*pgxpool.Config)) *pgxpool.Pool {
	b.Helper()
	cfg, err := pgxpool.ParseConfig(dsn)
	if err != nil {
		b.Fatal(err)
	}
	cfg.MaxConns = maxConns
	for _, mod := range mods {
		mod(cfg)
	}
	pool, err := pgxpool.NewWithConfig(context.Background(), cfg)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(pool.Close)
	return pool
}

// newConn returns a dedicated connection, closed when the benchmark ends.
func newConn(b *testing.B) *pgx.Conn {
	b.Helper()
	return newConnOn(b, dsn)
}

// newConnOn is newConn on the server dsn reaches.
func newConnOn(b *testing.B, dsn string) *pgx.Conn {
	b.Helper()
	c, err := pgx.Connect(context.Background(), dsn)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { c.Close(context.Background()) })
	return c
}

// awaitWaiter returns once a backend waits on an advisory lock, as the
// server sees it, or fails the benchmark after 10 s.
func awaitWaiter(b *testing.B, monitor *pgx.Conn) {
	b.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		var n int
		err := monitor.QueryRow(context.Background(), `SELECT count(*) FROM pg_stat_activity
			WHERE wait_event_type = 'Lock' AND wait_event = 'advisory'`).Scan(&n)
		if err != nil {
			b.Fatal(err)
		}
		if n > 0 {
			return
		}
		if time.Now().After(deadline) {
			b.Fatal("no backend waits on an advisory lock after 10 s")
		}
		time.Sleep(100 * time.Microsecond)
	}
}

// reportPercentiles reports the p50 and p99 of samples as the metrics
// "p50-ns" and "p99-ns".
func reportPercentiles(b *testing.B, samples []time.Duration) {
	b.Helper()
	reportPercentilesAs(b, samples, "")
}

// reportPercentilesAs reports the p50 and p99 of samples as the metrics
// PREFIX+"p50-ns" and PREFIX+"p99-ns".
func reportPercentilesAs(b *testing.B, samples []time.Duration, prefix string) {
	b.Helper()
	if len(samples) == 0 {
		return
	}
	b.ReportMetric(float64(percentile(samples, 0.50).Nanoseconds()), prefix+"p50-ns")
	b.ReportMetric(float64(percentile(samples, 0.99).Nanoseconds()), prefix+"p99-ns")
}

// percentile returns the p-th percentile (0 < p < 1) of samples, which it
// sorts.
func percentile(samples []time.Duration, p float64) time.Duration {
	slices.Sort(samples)
	return samples[min(len(samples)-1, int(p*float64(len(samples))))]
}

// warm opens n connections of pool at once and puts them back idle, so that
// no benchmark counts connection set-up. pgxpool pings a connection idle for
// over a second when it is acquired: that round trip is part of a pool
// user's cost and is left in.
func warm(b *testing.B, pool *pgxpool.Pool, n int) {
	b.Helper()
	conns := make([]*pgxpool.Conn, 0, n)
	for range n {
		c, err := pool.Acquire(context.Background())
		if err != nil {
			b.Fatal(err)
		}
		conns = append(conns, c)
	}
	for _, c := range conns {
		c.Release()
	}
}
