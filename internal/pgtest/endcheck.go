package pgtest

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

// EndCheck is the end-of-test check of a test on a server: no pool
// connection still acquired and no advisory lock left in the database,
// looked at while the test's connections are still open (closing them
// first would free a leaked lock unseen); then, once what the test owns is
// closed, no goroutine left, and no more epoll descriptors than at the
// test's start (each health watcher on Linux has one).
type EndCheck struct {
	// DSN reaches the database to look at.
	DSN string
	// Open returns, when the test ends, what it still has open.
	Open func() Open
	// Free, if set, runs after the lock check, before what the test owns
	// is closed, with the pools found with a connection still acquired
	// (already reported): it must end what holds those connections, or
	// closing such a pool blocks.
	Free func(acquired []*pgxpool.Pool)
	// Grace bounds the wait for a pool to settle and for a closed
	// connection's backend to end; FailedGrace once the test has failed.
	Grace time.Duration
	// Key names a lock's key, from its pg_locks row, in the report; nil
	// reports the row's numbers.
	Key func(classid, objid uint32, objsubid int16) string
	// Goroutines, if set, runs once what the test owns is closed, and
	// returns an error that describes the goroutines the test left
	// running, if any (goleak.Find: pgtest does not import goleak, which
	// the modules that use it need not require).
	Goroutines func() error
}

// Open is what a test still has open when its end-of-test check runs.
type Open struct {
	// Pools must each have no connection acquired.
	Pools []*pgxpool.Pool
	// PIDs names the backends of the connections the test has open,
	// its pools' included: a lock one of them holds cannot go away by
	// waiting, so it is reported at once.
	PIDs map[uint32]string
	// Running counts the test's processes still running: while one runs,
	// any lock left is reported at once.
	Running int
}

// FailedGrace is how long the end-of-test check waits for a state after
// the test already failed: it may have stopped with a lock held, and
// waiting the full grace for that would only delay the tests after it.
const FailedGrace = 2 * time.Second

// Owned is what a test owns, closed after its end-of-test check, last
// registered first. Its methods are safe for concurrent use.
type Owned struct {
	mu      sync.Mutex
	closers []func()
}

// Own registers close, run after the end-of-test check.
func (o *Owned) Own(close func()) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.closers = append(o.closers, close)
}

func (o *Owned) closeAll() {
	o.mu.Lock()
	closers := o.closers
	o.mu.Unlock()
	for i := len(closers) - 1; i >= 0; i-- {
		closers[i]()
	}
}

// CheckAtEnd registers c on t, to run when the test ends, after the
// clean-ups t registers later (they run first), and returns what will be
// closed after the check. Every leak is reported with t.Errorf, never
// t.Fatal, so what the test owns is always closed and one failure cannot
// hang the tests after it. A check that cannot reach the server fails the
// test too.
func CheckAtEnd(t testing.TB, c EndCheck) *Owned {
	t.Helper()
	owned := new(Owned)
	epolls := epollsOpen()
	t.Cleanup(func() {
		if c.Goroutines == nil {
			return
		}
		if err := c.Goroutines(); err != nil {
			t.Error(err)
		}
		if n := epollsOpen(); n > epolls {
			t.Errorf("%d epoll descriptors open at the end of the test, %d at its start: "+
				"a health watcher's readiness was not closed", n, epolls)
		}
	})
	t.Cleanup(func() {
		var acquired []*pgxpool.Pool
		defer func() {
			if c.Free != nil {
				c.Free(acquired)
			}
			owned.closeAll()
		}()
		grace := c.Grace
		if t.Failed() {
			grace = min(grace, FailedGrace)
		}
		open := c.Open()
		for _, p := range open.Pools {
			if n := AwaitReleased(p, grace); n != 0 {
				t.Errorf("pool has %d connections still acquired at the end of the test", n)
				acquired = append(acquired, p)
			}
		}
		if t.Failed() {
			grace = min(grace, FailedGrace)
		}
		checkNoLocks(t, c, open, grace)
	})
	return owned
}

// AwaitReleased returns pool's acquired connection count once it is
// zero, or after grace. A connection closed while acquired is handed back
// at once but leaves the count only when pgxpool has destroyed it, in the
// background, a moment later; a connection still held never leaves it.
func AwaitReleased(pool *pgxpool.Pool, grace time.Duration) int32 {
	deadline := time.Now().Add(grace)
	for {
		n := pool.Stat().AcquiredConns()
		if n == 0 || time.Now().After(deadline) {
			return n
		}
		time.Sleep(time.Millisecond) // polling: pgxpool offers nothing to wait on
	}
}

// locksLeftSQL lists the advisory locks of the current database.
const locksLeftSQL = `SELECT coalesce(l.pid, 0), l.classid::int8, l.objid::int8, l.objsubid, l.mode, l.granted,
		coalesce(a.application_name, '')
	FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid
	WHERE l.locktype = 'advisory' AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
	ORDER BY 1, 2, 3, 4, 5`

// checkNoLocks fails t if an advisory lock is left in c.DSN's database.
// A lock of a backend in open.PIDs, or any lock while open.Running, is
// reported at once; a lock of another backend (a closed connection's
// backend ends a moment after the close) is awaited for grace.
func checkNoLocks(t testing.TB, c EndCheck, open Open, grace time.Duration) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), grace+FailedGrace)
	defer cancel()
	conn, err := pgx.Connect(ctx, c.DSN)
	if err != nil {
		t.Errorf("no advisory lock left on the server: cannot check: %v", err)
		return
	}
	defer conn.Close(context.Background())
	deadline := time.Now().Add(grace)
	for {
		left, settled, err := locksLeft(ctx, conn, c, open)
		if err != nil {
			t.Errorf("no advisory lock left on the server: cannot check: %v", err)
			return
		}
		if len(left) == 0 {
			return
		}
		if settled || time.Now().After(deadline) {
			still := ""
			if open.Running > 0 {
				still = fmt.Sprintf(" (%d processes of the test still running)", open.Running)
			}
			t.Errorf("advisory lock left on the server at the end of the test%s:\n  %s", still, strings.Join(left, "\n  "))
			return
		}
		time.Sleep(2 * time.Millisecond) // polling a server state: pg_locks offers nothing to wait on
	}
}

// locksLeft describes the advisory locks of the database, and reports
// whether waiting cannot make them go away.
func locksLeft(ctx context.Context, conn *pgx.Conn, c EndCheck, open Open) (left []string, settled bool, err error) {
	rows, err := conn.Query(ctx, locksLeftSQL)
	if err != nil {
		return nil, false, err
	}
	var (
		pid            uint32
		classid, objid int64
		objsubid       int16
		mode, app      string
		granted        bool
	)
	settled = open.Running > 0
	_, err = pgx.ForEachRow(rows, []any{&pid, &classid, &objid, &objsubid, &mode, &granted, &app}, func() error {
		key := fmt.Sprintf("key (classid %d, objid %d, objsubid %d)", classid, objid, objsubid)
		if c.Key != nil {
			key = c.Key(uint32(classid), uint32(objid), objsubid)
		}
		who, isOpen := open.PIDs[pid]
		switch {
		case isOpen:
			settled = true
		case open.Running > 0:
			who = "a backend of none of the test's open connections (a process of the test's may hold it)"
		default:
			who = "a backend whose connection the test closed"
		}
		left = append(left, fmt.Sprintf("%s %s (granted %v) held by pid %d %q, %s", key, mode, granted, pid, app, who))
		return nil
	})
	return left, settled, err
}

// AbandonedClose is the goroutine ClosePool leaves behind when it gives up;
// a goroutine check should ignore it (goleak.IgnoreAnyFunction), as the
// test that left the connection acquired has been reported already.
const AbandonedClose = "github.com/seed0ad592b7/advisory/internal/pgtest.ClosePool.func1"

// ClosePool closes pool, giving up after FailedGrace, and failing t, if
// Close still blocks then: a pool with a connection the test never gave
// back blocks Close for ever, and the tests after it must still run.
func ClosePool(t testing.TB, pool *pgxpool.Pool) {
	done := make(chan struct{})
	go func() {
		defer close(done)
		pool.Close()
	}()
	select {
	case <-done:
	case <-time.After(FailedGrace):
		t.Errorf("pool.Close blocks: the test still holds an acquired connection; abandoned so the next tests run")
	}
}

// RunChild runs test (a top-level test name) again in a child process of
// this test binary, with env=1 in its environment and dsn as the server
// (EnvDSN), bounded by timeout, and returns its combined output and exit
// error. A harness probe uses it: the child leaks on purpose, and the
// parent checks that the end-of-test checks reported it and that the tests
// after it still ran.
func RunChild(ctx context.Context, test, env, dsn string, timeout time.Duration) (string, error) {
	cmd := exec.CommandContext(ctx, os.Args[0], "-test.run=^"+test+"$", "-test.count=1", "-test.v",
		"-test.timeout="+timeout.String())
	cmd.Env = append(os.Environ(), env+"=1", EnvDSN+"="+dsn)
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// epollsOpen counts the process's epoll descriptors. It makes sure Go's
// poller has its own first, so that a count taken before the first network
// use is not one short.
func epollsOpen() int {
	if r, w, err := os.Pipe(); err == nil { // a pipe is registered with Go's poller
		r.Close()
		w.Close()
	}
	fds, _ := os.ReadDir("/proc/self/fd")
	n := 0
	for _, fd := range fds {
		if target, err := os.Readlink("/proc/self/fd/" + fd.Name()); err == nil && target == "anon_inode:[eventpoll]" {
			n++
		}
	}
	return n
}
