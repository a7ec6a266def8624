package migrationtest

import (
	"context"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/seed0ad592b7/advisory"
	"github.com/seed0ad592b7/advisory/internal/pgtest"
)

// The scenarios both modules run (instances at once, a migrator killed
// mid-statement) and the checks on their outcome: the waiters' snapshots,
// the migrations committed.

// AtOnce starts n instances at once (the test TestInstance, role
// "guarded", migration 1 sleeping 1.5 s), samples the waiters for key until
// they have all exited, fails t for any that failed, and returns how many
// reported each "applied" result, and what the sampling saw.
func AtOnce(t *testing.T, c *pgx.Conn, key advisory.Key, dsn string, n int) (applied map[string]int, w Waiters) {
	t.Helper()
	children := make([]*Child, n)
	for i := range children {
		children[i] = Start(t, "TestInstance", "guarded", dsn, "SLEEP=1.5")
	}
	w = SampleWaiters(t, c, key, func() {
		for _, ch := range children {
			_ = ch.Wait(t)
		}
	})
	applied = map[string]int{}
	for i, ch := range children {
		if err := ch.Wait(t); err != nil {
			t.Errorf("instance %d: %v; output:\n%s", i, err, ch.Output())
		}
		applied[ch.Result("applied")]++
	}
	return applied, w
}

// KillMigrator starts a guarded instance (TestInstance) whose migration 1
// sleeps 3 s, and a second one once the first migrates holding key; it
// kills the first with SIGKILL mid-statement once the second waits, and
// follows the dead backend to its end (AwaitDeadBackend). It returns the
// dead instance's backend and the second instance, still running.
func KillMigrator(t *testing.T, srv *pgtest.Server, c *pgx.Conn, key advisory.Key, dsn string) (dead uint32, next *Child) {
	t.Helper()
	a := Start(t, "TestInstance", "guarded", dsn, "SLEEP=3")
	dead = AwaitSleeping(t, c, key, 0)
	next = Start(t, "TestInstance", "guarded", dsn, "SLEEP=0")
	AwaitWaiting(t, c, key, dead)
	if err := a.Cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	_ = a.Wait(t)
	AwaitDeadBackend(t, srv, c, key, dead)
	return dead, next
}

// Waiters is what sampling saw of the instances waiting for a key.
type Waiters struct {
	Samples int           // looks at a waiting backend
	Longest time.Duration // the longest a waiter's statement held a snapshot
}

// SampleWaiters looks at the waiters for key every 10 ms until wait returns.
func SampleWaiters(t *testing.T, c *pgx.Conn, key advisory.Key, wait func()) Waiters {
	t.Helper()
	done := make(chan struct{})
	go func() {
		defer close(done)
		wait()
	}()
	var w Waiters
	for sampling := true; sampling; {
		select {
		case <-done:
			sampling = false
		case <-time.After(10 * time.Millisecond): // sampling the server
		}
		backends, err := Activity(context.Background(), c, key)
		if err != nil {
			t.Fatal(err)
		}
		for _, b := range backends {
			if b.WaitLock {
				w.Samples++
				if b.XminAge != nil {
					w.Longest = max(w.Longest, *b.XminAge)
				}
			}
		}
	}
	return w
}

// Check fails t unless waiters were seen, none of them holding a snapshot
// for as long as the server's deadlock_timeout (waits are sliced).
func (w Waiters) Check(t *testing.T, c *pgx.Conn) {
	t.Helper()
	var ms int64
	if err := c.QueryRow(context.Background(), "SELECT setting::int8 FROM pg_settings WHERE name = 'deadlock_timeout'").Scan(&ms); err != nil {
		t.Fatal(err)
	}
	dt := time.Duration(ms) * time.Millisecond
	if w.Samples == 0 {
		t.Error("no instance was ever seen waiting on the server: the test proved nothing about waiters")
	}
	if w.Longest >= dt {
		t.Errorf("a waiter held a snapshot for %v; want less than deadlock_timeout (%v): waits are sliced", w.Longest, dt)
	}
	t.Logf("%d samples of waiting instances; the longest a waiter's statement held a snapshot: %v (deadlock_timeout %v)", w.Samples, w.Longest, dt)
}

// Runners returns the backends that ran the first migration and committed
// (the migrations write pg_backend_pid() to the table runs).
func Runners(t *testing.T, c *pgx.Conn) []uint32 {
	t.Helper()
	rows, err := c.Query(context.Background(), "SELECT pid FROM runs")
	if err != nil {
		t.Fatal(err)
	}
	pids, err := pgx.CollectRows(rows, pgx.RowTo[uint32])
	if err != nil {
		t.Fatal(err)
	}
	return pids
}

// CheckMigrated fails t unless the first migration committed exactly once
// and the index the second builds concurrently (items_id) is valid.
func CheckMigrated(t *testing.T, c *pgx.Conn) {
	t.Helper()
	if pids := Runners(t, c); len(pids) != 1 {
		t.Errorf("the first migration committed in backends %v; want exactly one", pids)
	}
	var valid bool
	err := c.QueryRow(context.Background(), "SELECT indisvalid FROM pg_index WHERE indexrelid = 'items_id'::regclass").Scan(&valid)
	if err != nil || !valid {
		t.Errorf("the concurrently built index: valid %v, %v; want a valid index", valid, err)
	}
}
