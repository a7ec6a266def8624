package advisory

import (
	"context"
	"errors"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

// Which waits are sliced and which are one server-side wait (SPEC §2a): a
// wait that can be part of a deadlock cycle is one server-side wait, and
// the library asks the server whether it can be, never a flag of its own.

// A transaction that updated a row and then waits in LockTx for a key whose
// holder waits for that row is part of a cycle through a row lock. The
// holder's only deadlock check ran before the LockTx began to wait, so only
// the LockTx's own check can break the cycle: LockTx must wait in one
// server-side wait, and one of the two gets ErrDeadlock within a few
// deadlock_timeouts. Sliced, it waited until its bound.
func TestLockTxDeadlockThroughRowLock(t *testing.T) {
	e := newEnv(t)
	pool := e.pool(deadlockTimeout("100ms", 4))
	e.table("wait_cycle_rows",
		"CREATE TABLE wait_cycle_rows (id int PRIMARY KEY, n int)",
		"INSERT INTO wait_cycle_rows VALUES (1, 0)",
	)
	key := StringKey("wait-cycle-row")

	txA, txB := e.begin(pool), e.begin(pool)
	_, err := txA.Exec(e.ctx, "UPDATE wait_cycle_rows SET n = n + 1 WHERE id = 1")
	must(t, err)
	if ok, err := LockTx(e.ctx, txB, key); err != nil || !ok {
		t.Fatalf("B's LockTx on a free key = %v, %v", ok, err)
	}
	bDone := make(chan error, 1)
	go func() {
		_, err := txB.Exec(e.ctx, "UPDATE wait_cycle_rows SET n = n + 1 WHERE id = 1")
		bDone <- err
	}()
	// B waits for A's row, and its one deadlock check has run (and found
	// no cycle: A did not wait yet).
	e.eventually("B waited for A's row longer than its deadlock check", func(c *pgx.Conn) (bool, error) {
		var n int
		err := c.QueryRow(context.Background(), `SELECT count(*) FROM pg_locks
			WHERE locktype = 'transactionid' AND NOT granted AND waitstart < now() - interval '300ms'`).Scan(&n)
		return n == 1, err
	})

	const bound = 5 * time.Second // 50 deadlock_timeouts
	_, aErr := LockTx(e.ctx, txA, key, WaitTimeout(bound))
	if aErr != nil {
		_ = txA.Rollback(e.ctx) // lets B go on
	}
	var bErr error
	select {
	case bErr = <-bDone:
	case <-time.After(bound):
		t.Fatalf("B's UPDATE still waits %v after A's LockTx returned %v", bound, aErr)
	}
	if !errors.Is(aErr, ErrDeadlock) && !errors.Is(bErr, ErrDeadlock) && sqlState(bErr) != codeDeadlock {
		t.Errorf("a cycle through a row lock and a LockTx key: A's LockTx = %v, B's UPDATE = %v; want one deadlock (40P01)", aErr, bErr)
	}
}

// waitsSliced starts wait (a call that waits for a held key and returns
// at its bound), awaits the backend pid waiting on an advisory lock, and
// reports whether it waits in a slice (the DO block of sliceOneSQL or
// sliceManySQL) rather than one statement; then it awaits wait's return.
func waitsSliced(e *env, pid uint32, wait func() error) bool {
	e.t.Helper()
	done := make(chan error, 1)
	go func() { done <- wait() }()
	var query string
	e.eventually("the session waits on an advisory lock", func(c *pgx.Conn) (bool, error) {
		err := c.QueryRow(context.Background(), `SELECT COALESCE((SELECT query FROM pg_stat_activity
			WHERE pid = $1 AND wait_event_type = 'Lock' AND wait_event = 'advisory'), '')`, pid).Scan(&query)
		return query != "", err
	})
	if err := <-done; !errors.Is(err, ErrTimeout) {
		e.t.Errorf("a wait for a held key returned %v; want ErrTimeout", err)
	}
	return strings.Contains(query, "DO $advisory$")
}

// A WithConn that took no lock does not turn slicing off: the Session's
// next contended Lock and LockMany still wait in slices. A WithConn that
// took a lock of its own makes the next contended Lock one server-side
// wait (the session can be part of a cycle), as the server says.
func TestSessionWaitChoiceAsksServer(t *testing.T) {
	e := newEnv(t)
	pool := e.pool(deadlockTimeout("100ms", 4))
	key := StringKey("wait-choice")
	holder := e.conn()
	if !e.tryFrom(holder, key) {
		t.Fatal("key not free")
	}
	_, err := holder.Exec(e.ctx, lockSQL[scopeSession][ModeExclusive][waitTry][key.space-1], key.args()...)
	must(t, err)
	defer holder.Exec(context.Background(), unlockSQL[ModeExclusive][key.space-1], key.args()...)

	s, err := NewSession(e.ctx, pool)
	must(t, err)
	defer s.Close(e.ctx)
	var pid uint32
	must(t, s.WithConn(e.ctx, func(c *pgx.Conn) error {
		pid = c.PgConn().PID()
		_, err := c.Exec(e.ctx, "SELECT 1")
		return err
	}))
	const bound = 400 * time.Millisecond
	if !waitsSliced(e, pid, func() error { _, err := s.Lock(e.ctx, key, WaitTimeout(bound)); return err }) {
		t.Errorf("after a WithConn that took no lock, a contended Lock waits in one statement; want slices")
	}
	if !waitsSliced(e, pid, func() error { _, err := s.LockMany(e.ctx, []Key{Int64Key(7), key}, WaitTimeout(bound)); return err }) {
		t.Errorf("after a WithConn that took no lock, a contended LockMany waits in one statement; want slices")
	}

	other := StringKey("wait-choice-raw")
	must(t, s.WithConn(e.ctx, func(c *pgx.Conn) error {
		_, err := c.Exec(e.ctx, lockSQL[scopeSession][ModeExclusive][waitForever][other.space-1], other.args()...)
		return err
	}))
	if waitsSliced(e, pid, func() error { _, err := s.Lock(e.ctx, key, WaitTimeout(bound)); return err }) {
		t.Errorf("a Session holding a lock its WithConn took waits in slices; want one server-side wait")
	}
	if waitsSliced(e, pid, func() error { _, err := s.LockMany(e.ctx, []Key{Int64Key(7), key}, WaitTimeout(bound)); return err }) {
		t.Errorf("a Session holding a lock its WithConn took waits in slices in LockMany; want one server-side wait")
	}
	must(t, s.WithConn(e.ctx, func(c *pgx.Conn) error {
		_, err := c.Exec(e.ctx, unlockSQL[ModeExclusive][other.space-1], other.args()...)
		return err
	}))
}

// Bounds beyond server limits: what lock_timeout and the keep-alive settings can express
// (int milliseconds, about 24.8 days; the kernel's 32767 s for TCP
// keep-alive times) are clamped, never a server error or a log line.
func TestBoundsBeyondServerLimits(t *testing.T) {
	e := newEnv(t)
	checkLog := noErrorLogged(t)
	pool := e.pool(func(c *pgxpool.Config) { c.MaxConns = 4 })
	const day = 24 * time.Hour

	lock, err := Acquire(e.ctx, pool, StringKey("bounds-health"), HealthInterval(7*day))
	if err != nil {
		t.Errorf("Acquire with HealthInterval(7 days) on a free key: %v", err)
	} else {
		must(t, lock.Release(e.ctx))
	}

	s, err := NewSession(e.ctx, pool)
	must(t, err)
	defer s.Close(e.ctx)
	_, err = s.Lock(e.ctx, StringKey("bounds-first"))
	must(t, err)
	noDeadline := context.WithoutCancel(e.ctx) // the test's ctx has a deadline, which would be the bound
	// A Session that holds a lock waits in one statement, under lock_timeout.
	if ok, err := s.Lock(noDeadline, StringKey("bounds-second"), WaitTimeout(25*day)); err != nil || !ok {
		t.Errorf("Session.Lock with WaitTimeout(25 days) on a free key = %v, %v", ok, err)
	}
	if ok, err := s.LockMany(noDeadline, []Key{Int64Key(3), Int64Key(4)}, WaitTimeout(25*day)); err != nil || !ok {
		t.Errorf("Session.LockMany with WaitTimeout(25 days) on free keys = %v, %v", ok, err)
	}
	must(t, s.Close(e.ctx))
	checkLog()
}

// A sliced waiter is not starved by waiters that wait in one statement
// (another program's pg_advisory_lock, a Session that holds locks): three
// such holders take turns, 300 ms each, going back to the server's queue
// at once; each slice of a sliced waiter left the queue and joined it
// again at its tail, behind them, and Acquire timed out every time. A
// waiter that sees the key change hands during a slice now waits on in
// place. The bound is 5 s, the wait needs about 0.6 s.
func TestSlicedWaiterNotStarvedByOneStatementWaiters(t *testing.T) {
	e := newEnv(t)
	pool := e.pool(deadlockTimeout("1s", 2))
	key := StringKey("starve")
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for range 3 {
		c := e.conn()
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				if _, err := c.Exec(e.ctx, lockSQL[scopeSession][ModeExclusive][waitForever][key.space-1], key.args()...); err != nil {
					t.Error(err)
					return
				}
				time.Sleep(300 * time.Millisecond) // the holder's work
				if _, err := c.Exec(e.ctx, unlockSQL[ModeExclusive][key.space-1], key.args()...); err != nil {
					t.Error(err)
					return
				}
			}
		}()
	}
	e.awaitWaiters(2) // one holds, two wait in one statement
	const bound = 5 * time.Second
	lock, err := Acquire(e.ctx, pool, key, WaitTimeout(bound))
	close(stop)
	if err != nil {
		t.Errorf("Acquire behind three one-statement waiters taking turns, bound %v: %v", bound, err)
	} else {
		must(t, lock.Release(e.ctx))
	}
	wg.Wait()
}
