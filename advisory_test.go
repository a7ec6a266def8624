package advisory

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

// Each key kind produces exactly the pg_locks row of SPEC §1, read from a
// second connection, and the row reads back as the key.
func TestKeyLockRowOnServer(t *testing.T) {
	e := newEnv(t)
	pool := e.pool()
	c := e.conn()
	for _, key := range []Key{Int64Key(42), Int64Key(-5), PairKey(-3, 9), StringKey("migrations"), StringKey("")} {
		lock := e.acquire(pool, key)
		var classid, objid uint32
		var objsubid int16
		var mode string
		err := c.QueryRow(e.ctx, `SELECT classid::int8, objid::int8, objsubid, mode FROM pg_locks
			WHERE locktype = 'advisory' AND granted AND database = (SELECT oid FROM pg_database WHERE datname = current_database())`).
			Scan(&classid, &objid, &objsubid, &mode)
		must(t, err)
		wc, wo, ws := key.LockRow()
		if classid != wc || objid != wo || objsubid != ws || mode != "ExclusiveLock" {
			t.Errorf("%s: pg_locks row %d,%d,%d %s; want %d,%d,%d ExclusiveLock", key, classid, objid, objsubid, mode, wc, wo, ws)
		}
		if back, err := KeyFromLockRow(classid, objid, objsubid); err != nil || back != key {
			t.Errorf("%s: KeyFromLockRow(row) = %v, %v", key, back, err)
		}
		must(t, lock.Release(e.ctx))
	}
	// The int64 key space is the one PostgreSQL's own bigint functions use:
	// a lock taken by SQL with the hash is the StringKey lock.
	if _, err := c.Exec(e.ctx, "SELECT pg_advisory_lock($1)", int64(0x23f88320627775ab)); err != nil {
		t.Fatal(err)
	}
	lock, err := Acquire(e.ctx, pool, StringKey("migrations"), NoWait())
	must(t, err)
	if lock.Acquired() {
		t.Error("StringKey(\"migrations\") was acquired while SQL held pg_advisory_lock(0x23f88320627775ab)")
	}
	must(t, lock.Release(e.ctx))
	if _, err := c.Exec(e.ctx, "SELECT pg_advisory_unlock_all()"); err != nil {
		t.Fatal(err)
	}
}

// Exclusive blocks exclusive, shared admits shared, shared and exclusive
// exclude each other: between two pools, and against a plain connection
// calling the SQL functions directly.
func TestModesExclude(t *testing.T) {
	e := newEnv(t)
	poolA, poolB := e.pool(), e.pool()
	c := e.conn()
	for _, key := range []Key{Int64Key(7), PairKey(7, 8)} {
		for _, tc := range []struct {
			first, second []Option
			compatible    bool
		}{
			{nil, nil, false},
			{[]Option{Shared()}, []Option{Shared()}, true},
			{[]Option{Shared()}, nil, false},
			{nil, []Option{Shared()}, false},
		} {
			a, err := Acquire(e.ctx, poolA, key, tc.first...)
			must(t, err)
			b, err := Acquire(e.ctx, poolB, key, append(tc.second, NoWait())...)
			must(t, err)
			if !a.Acquired() || b.Acquired() != tc.compatible {
				t.Errorf("%s: first acquired %v, second acquired %v; want true, %v", key, a.Acquired(), b.Acquired(), tc.compatible)
			}
			must(t, b.Release(e.ctx))
			must(t, a.Release(e.ctx))
		}

		// The plain connection holds it: we cannot take it, in either mode.
		args := key.args()
		if _, err := c.Exec(e.ctx, lockSQL[scopeSession][ModeExclusive][waitForever][key.space-1], args...); err != nil {
			t.Fatal(err)
		}
		for _, opts := range [][]Option{{NoWait()}, {NoWait(), Shared()}} {
			l, err := Acquire(e.ctx, poolA, key, opts...)
			must(t, err)
			if l.Acquired() {
				t.Errorf("%s: acquired while a plain connection holds it", key)
			}
		}
		if _, err := c.Exec(e.ctx, unlockSQL[ModeExclusive][key.space-1], args...); err != nil {
			t.Fatal(err)
		}
		// We hold it: the plain connection cannot take it.
		l, err := Acquire(e.ctx, poolA, key)
		must(t, err)
		if e.tryFrom(c, key) {
			t.Errorf("%s: a plain connection took it while we held it", key)
		}
		must(t, l.Release(e.ctx))
		if !e.tryFrom(c, key) {
			t.Errorf("%s: not free after Release", key)
		}
	}
}

// The django-pglocks release bug cannot happen: a lock not acquired holds no
// connection and its Release does not release the other holder.
func TestNoWaitNotAcquired(t *testing.T) {
	e := newEnv(t)
	pool := e.pool()
	holder := e.conn()
	key := StringKey("nightly")
	if _, err := holder.Exec(e.ctx, "SELECT pg_advisory_lock($1)", mustInt64(key)); err != nil {
		t.Fatal(err)
	}
	lock, err := Acquire(e.ctx, pool, key, NoWait())
	if err != nil || lock.Acquired() {
		t.Fatalf("Acquire(NoWait) on a busy key = %v, acquired %v; want nil, false", err, lock.Acquired())
	}
	// Read once, not awaited: SPEC §2 says the connection is already back
	// (handed back clean, which pgxpool counts at once).
	if n := pool.Stat().AcquiredConns(); n != 0 {
		t.Errorf("a lock not acquired keeps %d connections", n)
	}
	select {
	case <-lock.Done():
	default:
		t.Error("Done() of a lock not acquired is not closed")
	}
	if lock.Err() != nil {
		t.Errorf("Err() of a lock not acquired = %v", lock.Err())
	}
	must(t, lock.Release(e.ctx))
	if rows := e.lockRows(key); len(rows) != 1 || rows[0].PID != holder.PgConn().PID() || !rows[0].Granted {
		t.Fatalf("after Release of a lock not acquired, rows = %+v; want the holder's", rows)
	}
	if _, err := holder.Exec(e.ctx, "SELECT pg_advisory_unlock($1)", mustInt64(key)); err != nil {
		t.Fatal(err)
	}

	lock, err = Acquire(e.ctx, pool, key, NoWait())
	if err != nil || !lock.Acquired() {
		t.Fatalf("Acquire(NoWait) on a free key = %v, acquired %v", err, lock.Acquired())
	}
	must(t, lock.Release(e.ctx))
	if !e.tryFrom(holder, key) {
		t.Error("another session cannot take the key right after Release")
	}
}

func mustInt64(k Key) int64 {
	v, ok := k.Int64()
	if !ok {
		panic("not an int64 key: " + k.String())
	}
	return v
}

// A waiter waits on the server, where pg_stat_activity shows it, and returns
// once the holder releases.
func TestWaiterWaitsOnServer(t *testing.T) {
	e := newEnv(t)
	pool := e.pool()
	key := Int64Key(99)
	holder := e.acquire(pool, key)
	got := make(chan *Lock)
	go func() {
		l, err := Acquire(e.ctx, pool, key, NoCohort()) // SPEC §13: else it waits in the process
		if err != nil {
			t.Error(err)
		}
		got <- l
	}()
	e.awaitWaiters(1)
	select {
	case <-got:
		t.Fatal("the waiter returned while the lock was held")
	default:
	}
	must(t, holder.Release(e.ctx))
	l := <-got
	if l == nil || !l.Acquired() {
		t.Fatal("the waiter did not acquire")
	}
	must(t, l.Release(e.ctx))
}

// Release runs even with a cancelled context; a second Release does nothing
// (and in particular does not release someone else's hold).
func TestReleaseCancelledContext(t *testing.T) {
	e := newEnv(t)
	pool := e.pool()
	other := e.conn()
	key := PairKey(3, 4)
	lock := e.acquire(pool, key)
	ctx, cancel := context.WithCancel(e.ctx)
	cancel()
	must(t, lock.Release(ctx))
	select {
	case <-lock.Done():
	default:
		t.Error("Done() not closed after Release")
	}
	if lock.Err() != nil {
		t.Errorf("Err() after Release = %v", lock.Err())
	}
	if _, err := other.Exec(e.ctx, "SELECT pg_advisory_lock(3, 4)"); err != nil {
		t.Fatal(err)
	}
	must(t, lock.Release(e.ctx))
	if rows := e.lockRows(key); len(rows) != 1 || rows[0].PID != other.PgConn().PID() {
		t.Errorf("second Release touched another session's hold: rows %+v", rows)
	}
	if _, err := other.Exec(e.ctx, "SELECT pg_advisory_unlock(3, 4)"); err != nil {
		t.Fatal(err)
	}
}

// Do runs fn only when acquired, and releases after a panic, which goes on.
func TestDo(t *testing.T) {
	e := newEnv(t)
	pool := e.pool()
	holder := e.conn()
	key := StringKey("do")
	if _, err := holder.Exec(e.ctx, "SELECT pg_advisory_lock($1)", mustInt64(key)); err != nil {
		t.Fatal(err)
	}
	ran := false
	acquired, err := Do(e.ctx, pool, key, func(context.Context) error { ran = true; return nil }, NoWait())
	if acquired || ran || err != nil {
		t.Errorf("Do on a busy key: acquired %v, ran %v, err %v", acquired, ran, err)
	}
	if _, err := holder.Exec(e.ctx, "SELECT pg_advisory_unlock($1)", mustInt64(key)); err != nil {
		t.Fatal(err)
	}

	fnErr := errors.New("fn failed")
	acquired, err = Do(e.ctx, pool, key, func(ctx context.Context) error {
		if e.tryFrom(holder, key) {
			t.Error("fn runs without the lock")
		}
		return fnErr
	})
	if !acquired || !errors.Is(err, fnErr) {
		t.Errorf("Do: acquired %v, err %v; want true and fn's error", acquired, err)
	}

	func() {
		defer func() {
			if r := recover(); r != "boom" {
				t.Errorf("recovered %v; want the panic to go on", r)
			}
		}()
		_, _ = Do(e.ctx, pool, key, func(context.Context) error { panic("boom") })
	}()
	if !e.tryFrom(holder, key) {
		t.Error("the lock is still held after fn panicked")
	}
}

// Invalid input fails before any SQL is sent or any connection taken.
func TestInvalidInput(t *testing.T) {
	e := newEnv(t)
	var counter queryCounter
	pool := e.pool(func(c *pgxpool.Config) { c.ConnConfig.Tracer = &counter })
	if _, err := Acquire(e.ctx, pool, Key{}); !errors.Is(err, ErrInvalidKey) {
		t.Errorf("Acquire(Key{}) = %v; want ErrInvalidKey", err)
	}
	if _, err := Do(e.ctx, pool, Key{}, func(context.Context) error { return nil }); !errors.Is(err, ErrInvalidKey) {
		t.Errorf("Do(Key{}) = %v; want ErrInvalidKey", err)
	}
	if _, err := DoTx(e.ctx, pool, Key{}, func(context.Context, pgx.Tx) error { return nil }); !errors.Is(err, ErrInvalidKey) {
		t.Errorf("DoTx(Key{}) = %v; want ErrInvalidKey", err)
	}
	for _, opt := range []Option{WaitTimeout(-time.Second), TTL(0), TTL(-1), HealthInterval(0)} {
		if _, err := Acquire(e.ctx, pool, Int64Key(1), opt); err == nil {
			t.Error("Acquire with an invalid option succeeded")
		}
	}
	if _, err := Acquire(e.ctx, nil, Int64Key(1)); err == nil {
		t.Error("Acquire(nil pool) succeeded")
	}
	if n := counter.n.Load(); n != 0 {
		t.Errorf("%d statements were sent for invalid input", n)
	}
	if n := pool.Stat().AcquireCount(); n != 0 {
		t.Errorf("%d connections were taken for invalid input", n)
	}

	s, err := NewSession(e.ctx, pool)
	must(t, err)
	if _, err := s.Lock(e.ctx, Key{}); !errors.Is(err, ErrInvalidKey) {
		t.Errorf("Session.Lock(Key{}) = %v", err)
	}
	if err := s.Unlock(e.ctx, Key{}); !errors.Is(err, ErrInvalidKey) {
		t.Errorf("Session.Unlock(Key{}) = %v", err)
	}
	if n := counter.n.Load(); n != 0 {
		t.Errorf("%d statements were sent for invalid keys", n)
	}
	must(t, s.Close(e.ctx))
}
