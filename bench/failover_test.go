package bench

import (
	"context"
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/seed0ad592b7/advisory"
)

const failoverKey = 4_000

// BenchmarkFailover: two candidates for one key. Per op the leader's
// backend is terminated (pg_terminate_backend) at t0, once the other
// candidate waits on the server. p50-ns and p99-ns are of t1−t0, where t1 is
// when the new leader starts. ns/op counts the set-up of each op and means
// nothing. Subjects:
//   - raw-pgx, the floor: the waiter is a *pgx.Conn blocked in
//     pg_advisory_lock; t1 is when that statement returns.
//   - advisory-lead: two advisory.Lead candidates (default options); t1 is
//     when the new leader's fn starts. stepdown-p50-ns and stepdown-p99-ns
//     are of the moment the old leader's fn context is cancelled (bounded
//     by the health interval, 1 s by default).
func BenchmarkFailover(b *testing.B) {
	b.Run("raw-pgx", failoverRaw)
	b.Run("advisory-lead", failoverLead)
}

func failoverRaw(b *testing.B) {
	ctx := context.Background()
	monitor := newConn(b)
	connect := func() *pgx.Conn {
		c, err := pgx.Connect(ctx, dsn)
		if err != nil {
			b.Fatal(err)
		}
		return c
	}
	holder := connect()
	defer func() { holder.Close(ctx) }()
	if _, err := holder.Exec(ctx, "SELECT pg_advisory_lock($1)", int64(failoverKey)); err != nil {
		b.Fatal(err)
	}
	samples := make([]time.Duration, 0, b.N)
	b.ResetTimer()
	for range b.N {
		waiter := connect()
		granted := make(chan error, 1)
		go func() {
			_, err := waiter.Exec(ctx, "SELECT pg_advisory_lock($1)", int64(failoverKey))
			granted <- err
		}()
		awaitWaiter(b, monitor)
		t0 := time.Now()
		if _, err := monitor.Exec(ctx, "SELECT pg_terminate_backend($1)", holder.PgConn().PID()); err != nil {
			b.Fatal(err)
		}
		err := <-granted
		samples = append(samples, time.Since(t0))
		if err != nil {
			b.Fatal(err)
		}
		holder.Close(ctx)
		holder = waiter
	}
	b.StopTimer()
	reportPercentiles(b, samples)
}

func failoverLead(b *testing.B) {
	pool := newPool(b, 8)
	warm(b, pool, 4)
	monitor := newConn(b)
	key := advisory.Int64Key(failoverKey)
	type term struct {
		at      time.Time
		stepped chan time.Time // receives when the term's fn context ends
	}
	elected := make(chan term, 2)
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	errs := make([]error, 2)
	for i := range 2 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = advisory.Lead(ctx, pool, key, func(leaderCtx context.Context) error {
				t := term{at: time.Now(), stepped: make(chan time.Time, 1)}
				elected <- t
				<-leaderCtx.Done()
				t.stepped <- time.Now()
				return nil
			})
		}()
	}
	defer func() {
		cancel()
		wg.Wait()
		for _, err := range errs {
			if err != nil && !errors.Is(err, context.Canceled) {
				b.Error(err)
			}
		}
	}()

	leader := <-elected
	failover := make([]time.Duration, 0, b.N)
	stepdown := make([]time.Duration, 0, b.N)
	b.ResetTimer()
	for range b.N {
		awaitWaiter(b, monitor)
		var pid uint32
		if err := monitor.QueryRow(ctx, `SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted
			AND classid = 0 AND objid = $1 AND objsubid = 1`, int64(failoverKey)).Scan(&pid); err != nil {
			b.Fatal(err)
		}
		t0 := time.Now()
		if _, err := monitor.Exec(ctx, "SELECT pg_terminate_backend($1)", pid); err != nil {
			b.Fatal(err)
		}
		next := <-elected
		failover = append(failover, next.at.Sub(t0))
		stepdown = append(stepdown, (<-leader.stepped).Sub(t0))
		leader = next
	}
	b.StopTimer()
	reportPercentiles(b, failover)
	reportPercentilesAs(b, stepdown, "stepdown-")
}
