package pgtest

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"go.uber.org/goleak"
)

// recorder is a testing.TB that keeps what it is told to report and the
// clean-ups it is given, so a test can run CheckAtEnd's checks and read
// their verdict.
type recorder struct {
	testing.TB
	mu       sync.Mutex
	reports  []string
	cleanups []func()
}

func (r *recorder) Helper() {}

func (r *recorder) Errorf(format string, args ...any) { r.Error(fmt.Sprintf(format, args...)) }

func (r *recorder) Error(args ...any) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.reports = append(r.reports, fmt.Sprint(args...))
}

func (r *recorder) Failed() bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.reports) > 0
}

func (r *recorder) Cleanup(f func()) { r.cleanups = append(r.cleanups, f) }

// end runs the clean-ups, last first (as testing does), and returns the
// reports.
func (r *recorder) end() string {
	for i := len(r.cleanups) - 1; i >= 0; i-- {
		r.cleanups[i]()
	}
	return strings.Join(r.reports, "\n")
}

// CheckAtEnd reports each kind of leak, while the test's connections are
// still open, and nothing for a test that leaves nothing behind.
func TestCheckAtEnd(t *testing.T) {
	defer goleak.VerifyNone(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	// check runs CheckAtEnd, with grace, on a test that opened a pool and
	// a connection and did leak to them; leak returns how to give back a
	// connection it left acquired. It returns what was reported.
	check := func(grace time.Duration, leak func(*pgxpool.Pool, *pgx.Conn) (release func())) string {
		t.Helper()
		pool, err := pgxpool.New(ctx, shared.DSN)
		if err != nil {
			t.Fatal(err)
		}
		conn := connect(t, shared.DSN)
		release := leak(pool, conn)
		r := &recorder{TB: t}
		owned := CheckAtEnd(r, EndCheck{
			DSN: shared.DSN,
			Open: func() Open {
				return Open{Pools: []*pgxpool.Pool{pool}, PIDs: map[uint32]string{conn.PgConn().PID(): "the test's connection"}}
			},
			Free: func(acquired []*pgxpool.Pool) {
				if len(acquired) > 0 {
					release()
				}
			},
			Grace:      grace,
			Goroutines: func() error { return goleak.Find() },
		})
		owned.Own(pool.Close)
		owned.Own(func() { conn.Close(context.Background()) })
		return r.end()
	}
	t.Run("clean", func(t *testing.T) {
		got := check(time.Second, func(_ *pgxpool.Pool, conn *pgx.Conn) func() {
			mustExec(t, ctx, conn, "SELECT pg_advisory_lock(1)")
			mustExec(t, ctx, conn, "SELECT pg_advisory_unlock(1)")
			return nil
		})
		if got != "" {
			t.Errorf("a test that left nothing: reported %q", got)
		}
	})
	t.Run("lock of a closed connection awaited", func(t *testing.T) {
		// A generous grace: the backend's end is awaited, not timed.
		got := check(30*time.Second, func(*pgxpool.Pool, *pgx.Conn) func() {
			c := connect(t, shared.DSN)
			mustExec(t, ctx, c, "SELECT pg_advisory_lock(2)")
			c.Close(ctx) // its backend ends a moment later, freeing the lock
			return nil
		})
		if got != "" {
			t.Errorf("a lock freed as its closed connection's backend ends: reported %q", got)
		}
	})
	t.Run("leaks", func(t *testing.T) {
		got := check(time.Second, func(pool *pgxpool.Pool, conn *pgx.Conn) func() {
			idle, err := pool.Acquire(ctx)
			if err != nil {
				t.Fatal(err)
			}
			mustExec(t, ctx, idle.Conn(), "SELECT pg_advisory_lock(3)")
			idle.Release() // back in the pool, still holding the lock
			held, err := pool.Acquire(ctx)
			if err != nil {
				t.Fatal(err)
			}
			mustExec(t, ctx, conn, "SELECT pg_advisory_lock_shared(4)")
			return held.Release
		})
		for _, want := range []string{
			"pool has 1 connections still acquired",
			"advisory lock left on the server",
			"key (classid 0, objid 3, objsubid 1) ExclusiveLock (granted true) held by pid",
			"key (classid 0, objid 4, objsubid 1) ShareLock (granted true) held by pid",
			"the test's connection",
		} {
			if !strings.Contains(got, want) {
				t.Errorf("the leaks' report lacks %q:\n%s", want, got)
			}
		}
	})
	t.Run("goroutine", func(t *testing.T) {
		stop := make(chan struct{})
		got := check(time.Second, func(*pgxpool.Pool, *pgx.Conn) func() {
			go func() { <-stop }()
			return nil
		})
		close(stop)
		if !strings.Contains(got, "found unexpected goroutines") {
			t.Errorf("a goroutine left running: reported %q", got)
		}
	})
}

func mustExec(t *testing.T, ctx context.Context, c *pgx.Conn, sql string) {
	t.Helper()
	if _, err := c.Exec(ctx, sql); err != nil {
		t.Fatal(err)
	}
}
