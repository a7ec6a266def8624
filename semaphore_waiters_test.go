package advisory

import (
	"context"
	"errors"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

// holdAll takes every slot of the semaphore with NoWait, one Lock each; the
// slots are tried in order, so lock i holds slot i.
func holdAll(t *testing.T, e *env, pool *pgxpool.Pool, key Key, n int) []*Lock {
	t.Helper()
	locks := make([]*Lock, n)
	for i := range locks {
		l, err := AcquireSemaphore(e.ctx, pool, key, n, NoWait())
		must(t, err)
		if want := SemaphoreKeys(key, n)[i]; l.Key() != want {
			t.Fatalf("NoWait acquire %d took %v; want slot %d, the first free one (%v)", i, l.Key(), i, want)
		}
		locks[i] = l
	}
	t.Cleanup(func() {
		for _, l := range locks {
			_ = l.Release(context.Background())
		}
	})
	return locks
}

// waiter starts an AcquireSemaphore that waits without a bound, and
// returns the channel its Lock comes on: nil if it failed (a test error).
func waiter(t *testing.T, e *env, pool *pgxpool.Pool, key Key, n int) <-chan *Lock {
	got := make(chan *Lock, 1)
	go func() {
		l, err := AcquireSemaphore(e.ctx, pool, key, n)
		if err != nil {
			t.Error(err)
		}
		got <- l
	}()
	return got
}

// waitedSlot returns the slot a waiter is queued on, as pg_locks shows it,
// and whether there is one now (a waiter is between two slices for a
// moment).
func waitedSlot(e *env) (Key, bool) {
	for _, r := range e.advisoryRows() {
		if !r.Granted {
			return r.Key, true
		}
	}
	return Key{}, false
}

// A waiter takes a freed slot: the one it is queued on at once, and one it
// is not queued on within about a slice (logged, not asserted).
func TestSemaphoreFreedSlotTaken(t *testing.T) {
	e := newEnv(t)
	pool := e.pool(deadlockTimeout("400ms", 6)) // slices of 200 ms
	key := StringKey("sem-freed")
	const n = 3
	holders := holdAll(t, e, pool, key, n)

	for _, queued := range []bool{true, false} {
		got := waiter(t, e, pool, key, n)
		var waited Key
		e.eventually("the waiter queued on a slot", func(*pgx.Conn) (bool, error) {
			var ok bool
			waited, ok = waitedSlot(e)
			return ok, nil
		})
		i := slices.IndexFunc(holders, func(l *Lock) bool { return (l.Key() == waited) == queued })
		freed := holders[i].Key()
		start := time.Now()
		must(t, holders[i].Release(e.ctx))
		l := <-got
		if l == nil {
			t.FailNow() // the waiter failed
		}
		t.Logf("queued on the freed slot: %v; taken after %v (slices of 200 ms)", queued, time.Since(start))
		if l.Key() != freed {
			t.Errorf("the waiter took %v; want the freed slot %v", l.Key(), freed)
		}
		holders[i] = l
	}
}

// The slot of a holder whose backend is terminated is free at once: a
// waiter takes it, and, with no waiter, a NoWait acquire does as soon as
// the server has ended the backend. The holder sees ErrLockLost.
func TestSemaphoreKilledHolder(t *testing.T) {
	e := newEnv(t)
	pool := e.pool(deadlockTimeout("400ms", 6))
	key := StringKey("sem-killed")
	const n = 2
	holders := holdAll(t, e, pool, key, n)
	kill := func(l *Lock) {
		t.Helper()
		var pid uint32
		must(t, l.WithConn(e.ctx, func(c *pgx.Conn) error {
			pid = c.PgConn().PID()
			return nil
		}))
		var ok bool
		must(t, e.adminConn().QueryRow(e.ctx, "SELECT pg_terminate_backend($1)", pid).Scan(&ok))
		if !ok {
			t.Fatalf("pg_terminate_backend(%d) = false", pid)
		}
	}
	checkLost := func(l *Lock) {
		t.Helper()
		<-l.Done()
		if !errors.Is(l.Err(), ErrLockLost) {
			t.Errorf("Err() of a killed holder = %v; want ErrLockLost", l.Err())
		}
		if err := l.Release(e.ctx); !errors.Is(err, ErrLockLost) {
			t.Errorf("Release of a killed holder = %v; want ErrLockLost", err)
		}
	}

	got := waiter(t, e, pool, key, n)
	e.awaitWaiters(1)
	kill(holders[0])
	l := <-got
	if l == nil {
		t.FailNow() // the waiter failed
	}
	if l.Key() != holders[0].Key() {
		t.Errorf("the waiter took %v; want the killed holder's slot %v", l.Key(), holders[0].Key())
	}
	checkLost(holders[0])
	holders[0] = l

	killed := holders[1].Key()
	kill(holders[1])
	e.eventually("the killed holder's slot free on the server", func(c *pgx.Conn) (bool, error) {
		var n int
		err := c.QueryRow(e.ctx, slotCountSQL, slotInts([]Key{killed})).Scan(&n, nil, nil)
		return n == 0, err
	})
	l, err := AcquireSemaphore(e.ctx, pool, key, n, NoWait())
	must(t, err)
	if l.Key() != killed {
		t.Errorf("NoWait took %v (acquired %v); want the killed holder's slot %v", l.Key(), l.Acquired(), killed)
	}
	checkLost(holders[1])
	holders[1] = l
}

// A wait that is cancelled, or reaches its WaitTimeout or ctx's deadline,
// leaves nothing behind on the server and returns the right error (naming
// the semaphore); the timed-out waits write no ERROR to the server log.
func TestSemaphoreCancelAndTimeout(t *testing.T) {
	e := newEnv(t)
	pool := e.pool(deadlockTimeout("100ms", 6))
	key := StringKey("sem-cancel")
	const n = 2
	holders := holdAll(t, e, pool, key, n)
	checkNothingLeft := func(what string) {
		t.Helper()
		// A cancelled wait returns at once and leaves its slice to end on
		// its own (SPEC §2a): the server's queue empties within one slice.
		e.awaitWaiters(0)
		rows := e.advisoryRows()
		if len(rows) != n {
			t.Errorf("%s: pg_locks rows %+v; want the %d holders' only", what, rows, n)
		}
		for _, r := range rows {
			if !r.Granted || !slices.ContainsFunc(holders, func(l *Lock) bool { return l.Key() == r.Key }) {
				t.Errorf("%s: pg_locks row %+v; want the holders' only", what, r)
			}
		}
	}
	checkErr := func(what string, err error) {
		t.Helper()
		var e *Error
		if !errors.As(err, &e) || e.Op != "semaphore" || e.Key != key || !strings.Contains(err.Error(), key.String()) {
			t.Errorf("%s: error %v does not name the semaphore %v", what, err, key)
		}
	}

	ctx, cancel := context.WithCancel(e.ctx)
	done := make(chan error, 1)
	go func() {
		_, err := AcquireSemaphore(ctx, pool, key, n)
		done <- err
	}()
	e.awaitWaiters(1)
	cancel()
	err := <-done
	if !errors.Is(err, context.Canceled) || errors.Is(err, ErrLockLost) {
		t.Errorf("cancelled wait = %v; want context.Canceled", err)
	}
	checkErr("cancelled", err)
	checkNothingLeft("cancelled")

	checkLog := noErrorLogged(t) // a cancel is logged; the end of a slice is not

	_, err = AcquireSemaphore(e.ctx, pool, key, n, WaitTimeout(300*time.Millisecond))
	if !errors.Is(err, ErrTimeout) || errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("WaitTimeout wait = %v; want ErrTimeout only", err)
	}
	checkErr("WaitTimeout", err)
	checkNothingLeft("WaitTimeout")

	ctx, cancel = context.WithTimeout(e.ctx, 500*time.Millisecond)
	_, err = AcquireSemaphore(ctx, pool, key, n)
	cancel()
	if !errors.Is(err, ErrTimeout) || !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("wait to ctx's deadline = %v; want ErrTimeout and DeadlineExceeded", err)
	}
	checkErr("deadline", err)
	checkNothingLeft("deadline")

	checkLog()
}

// While every slot is held and waiters wait, rows that die are removable
// by VACUUM after at most one slice: no waiter keeps an old snapshot.
func TestSemaphoreWaitersDoNotHoldBackVacuum(t *testing.T) {
	e := newEnv(t)
	pool := e.pool(deadlockTimeout("200ms", 8))
	key := StringKey("sem-vacuum")
	const n, waiters = 2, 3
	holdAll(t, e, pool, key, n)

	ctx, cancel := context.WithCancel(e.ctx)
	var wg sync.WaitGroup
	for range waiters {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if _, err := AcquireSemaphore(ctx, pool, key, n, NoCohort()); !errors.Is(err, context.Canceled) { // each on the server (SPEC §13)
				t.Errorf("waiter: %v; want context.Canceled", err)
			}
		}()
	}
	defer wg.Wait()
	defer cancel()
	e.awaitWaiters(waiters)

	if kept := deadRowsKept(t, e, "sem_vacuum"); kept != 0 {
		t.Errorf("VACUUM left %d dead rows not yet removable while %d waiters waited; want 0", kept, waiters)
	}
	var granted, waiting int64
	must(t, e.adminConn().QueryRow(e.ctx, slotCountSQL, slotInts(SemaphoreKeys(key, n))).Scan(&granted, &waiting, nil))
	if granted != n {
		t.Errorf("%d slots granted while the waiters waited; want %d", granted, n)
	}
}

// No waiter starves: eight workers contend for two slots with holds longer
// than a slice, so most waits last several slices, and every worker is
// served again and again (how evenly is logged).
func TestSemaphoreNoStarvation(t *testing.T) {
	e := newEnv(t)
	const n, workers = 2, 8
	pool := e.pool(deadlockTimeout("20ms", workers+2)) // slices of 10 ms
	key := StringKey("sem-fairness")
	contend(t, workers, n, func(fn func(context.Context) error) (bool, error) {
		return DoSemaphore(e.ctx, pool, key, n, fn)
	})
}
