package advisory

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"testing"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

// advisoryRow is one advisory pg_locks row of the test database.
type advisoryRow struct {
	PID     uint32
	Key     Key
	Mode    string
	Granted bool
}

// advisoryRows returns every advisory pg_locks row of the test database.
func (e *env) advisoryRows() []advisoryRow {
	e.t.Helper()
	c := e.conn()
	defer c.Close(e.ctx)
	rows, err := c.Query(e.ctx, `SELECT pid, classid::int8, objid::int8, objsubid, mode, granted FROM pg_locks
		WHERE locktype = 'advisory' AND database = (SELECT oid FROM pg_database WHERE datname = current_database())`)
	if err != nil {
		e.t.Fatal(err)
	}
	var out []advisoryRow
	var r advisoryRow
	var classid, objid int64
	var objsubid int16
	_, err = pgx.ForEachRow(rows, []any{&r.PID, &classid, &objid, &objsubid, &r.Mode, &r.Granted}, func() error {
		var err error
		r.Key, err = KeyFromLockRow(uint32(classid), uint32(objid), objsubid)
		out = append(out, r)
		return err
	})
	if err != nil {
		e.t.Fatal(err)
	}
	return out
}

// grantedExcept returns the keys granted to backends other than pid, in
// canonical order, and the keys they wait for.
func (e *env) grantedExcept(pid uint32) (granted, waiting []Key) {
	e.t.Helper()
	for _, r := range e.advisoryRows() {
		switch {
		case r.PID == pid:
		case r.Granted:
			granted = append(granted, r.Key)
		default:
			waiting = append(waiting, r.Key)
		}
	}
	slices.SortFunc(granted, compareKeys)
	return granted, waiting
}

// session opens a Session that is closed when the test ends, even after a
// failed assertion (the pool's clean-up waits for every connection).
func (e *env) session(pool *pgxpool.Pool) *Session {
	e.t.Helper()
	s, err := NewSession(e.ctx, pool)
	if err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(func() { _ = s.Close(context.Background()) })
	return s
}

// roundTrips counts the statements a pool sends, a batch (which Session
// sends for its first lock, with its keep-alive settings) as one.
type roundTrips struct{ queryCounter }

func (r *roundTrips) TraceBatchStart(ctx context.Context, _ *pgx.Conn, _ pgx.TraceBatchStartData) context.Context {
	r.n.Add(1)
	return ctx
}

func (r *roundTrips) TraceBatchQuery(context.Context, *pgx.Conn, pgx.TraceBatchQueryData) {}
func (r *roundTrips) TraceBatchEnd(context.Context, *pgx.Conn, pgx.TraceBatchEndData)     {}

// mixedKeys returns n distinct keys of both spaces, with negative values,
// in no particular order, and the same keys in canonical order.
func mixedKeys(n int) (keys, canonical []Key) {
	for i := range n {
		switch i % 3 {
		case 0:
			keys = append(keys, Int64Key(int64(i)*7919-int64(n)*1000))
		case 1:
			keys = append(keys, PairKey(int32(n-i), int32(-i)))
		default:
			keys = append(keys, StringKey(fmt.Sprint("k", i)))
		}
	}
	canonical = slices.Clone(keys)
	slices.SortFunc(canonical, compareKeys)
	return keys, canonical
}

// LockMany takes its keys on the server in canonical order, each exactly
// once: while it waits for a key held elsewhere, the session holds exactly
// the keys before it; after UnlockMany releases each key once, the server
// holds none (a key taken twice would still be held).
func TestLockManyOrderOnce(t *testing.T) {
	e := newEnv(t)
	pool := e.pool()
	blocker := e.conn()
	blockerPID := blocker.PgConn().PID()
	keys, canonical := mixedKeys(30)
	for _, mid := range []int{0, 1, 10, 29} { // int64 keys, then pair keys, then the last
		s := e.session(pool)
		busy := canonical[mid]
		_, err := blocker.Exec(e.ctx, lockSQL[scopeSession][ModeExclusive][waitForever][busy.space-1], busy.args()...)
		must(t, err)

		dup := append(slices.Clone(keys), keys[3], keys[7]) // duplicates collapse
		done := make(chan error, 1)
		go func() {
			ok, err := s.LockMany(e.ctx, dup)
			if err == nil && !ok {
				err = errors.New("LockMany returned false while waiting")
			}
			done <- err
		}()
		e.awaitWaiters(1)
		granted, waiting := e.grantedExcept(blockerPID)
		if !slices.Equal(granted, canonical[:mid]) || !slices.Equal(waiting, []Key{busy}) {
			t.Errorf("busy key %d: while waiting, session holds %v and waits for %v; want %v and %v",
				mid, granted, waiting, canonical[:mid], busy)
		}
		_, err = blocker.Exec(e.ctx, unlockSQL[ModeExclusive][busy.space-1], busy.args()...)
		must(t, err)
		must(t, <-done)
		if granted, _ := e.grantedExcept(blockerPID); !slices.Equal(granted, canonical) {
			t.Errorf("after LockMany the session holds %d keys; want the %d", len(granted), len(canonical))
		}
		if held := s.Held(); len(held) != len(canonical) || held[0].Count != 1 {
			t.Errorf("Held() = %d holds (first %+v); want %d, once each", len(held), held[0], len(canonical))
		}
		must(t, s.UnlockMany(e.ctx, keys))
		if granted, _ := e.grantedExcept(blockerPID); len(granted) != 0 {
			t.Errorf("after one UnlockMany the server still holds %v: a key was locked twice", granted)
		}
		if held := s.Held(); len(held) != 0 {
			t.Errorf("Held() after UnlockMany = %+v", held)
		}
		must(t, s.Close(e.ctx))
	}
}

// Keys already held in the mode only get their counts raised, without SQL;
// UnlockMany lowers counts and unlocks only the last holds; UnlockMany of a
// key not held is ErrNotHeld and changes nothing.
func TestLockManyCounts(t *testing.T) {
	e := newEnv(t)
	var counter roundTrips
	pool := e.pool(func(c *pgxpool.Config) { c.ConnConfig.Tracer = &counter })
	s := e.session(pool)
	a, b, c, d := Int64Key(1), PairKey(1, 2), StringKey("c"), Int64Key(-4)

	_, err := s.Lock(e.ctx, a)
	must(t, err)
	_, err = s.Lock(e.ctx, b, Shared()) // another mode: not a hold for exclusive LockMany
	must(t, err)
	counter.n.Store(0)
	ok, err := s.LockMany(e.ctx, []Key{c, b, a, c})
	if err != nil || !ok {
		t.Fatalf("LockMany = %v, %v", ok, err)
	}
	if n := counter.n.Swap(0); n != 1 {
		t.Errorf("LockMany of two new keys and one held sent %d statements; want 1", n)
	}
	want := []Hold{{a, ModeExclusive, 2}, {c, ModeExclusive, 1}, {b, ModeExclusive, 1}, {b, ModeShared, 1}}
	// (c's hash has a high half above a's 0, so c sorts after a.)
	if held := s.Held(); fmt.Sprint(held) != fmt.Sprint(want) {
		t.Errorf("Held() = %v; want %v", held, want)
	}
	ok, err = s.LockMany(e.ctx, []Key{a, c}) // a 2 → 3, c 1 → 2
	if err != nil || !ok {
		t.Fatalf("LockMany of held keys = %v, %v", ok, err)
	}
	if n := counter.n.Swap(0); n != 0 {
		t.Errorf("LockMany of held keys sent %d statements; want none", n)
	}
	if ok, err := s.LockMany(e.ctx, nil); err != nil || !ok {
		t.Errorf("LockMany(nil) = %v, %v; want true, nil", ok, err)
	}

	before := s.Held()
	for _, keys := range [][]Key{{a, d}, {b, c, a, Int64Key(99)}} {
		if err := s.UnlockMany(e.ctx, keys); !errors.Is(err, ErrNotHeld) {
			t.Errorf("UnlockMany(%v) = %v; want ErrNotHeld", keys, err)
		}
	}
	if err := s.UnlockMany(e.ctx, []Key{b}, Shared()); err != nil {
		t.Errorf("UnlockMany(Shared) of the shared hold = %v", err)
	}
	if err := s.UnlockMany(e.ctx, []Key{b}, Shared()); !errors.Is(err, ErrNotHeld) {
		t.Errorf("second UnlockMany(Shared) = %v; want ErrNotHeld", err)
	}
	if held := s.Held(); fmt.Sprint(held) != fmt.Sprint(before[:3]) {
		t.Errorf("after refused UnlockMany, Held() = %v; want %v", held, before[:3])
	}
	counter.n.Store(0)
	must(t, s.UnlockMany(e.ctx, []Key{a, c, c})) // a 3 → 2, c 2 → 1
	if n := counter.n.Swap(0); n != 0 {
		t.Errorf("UnlockMany of keys held more than once sent %d statements; want none", n)
	}
	must(t, s.UnlockMany(e.ctx, []Key{c, a})) // a 2 → 1, c 1 → 0
	if n := counter.n.Swap(0); n != 1 {
		t.Errorf("UnlockMany sent %d statements; want 1", n)
	}
	if held := s.Held(); fmt.Sprint(held) != fmt.Sprint([]Hold{{a, ModeExclusive, 1}, {b, ModeExclusive, 1}}) {
		t.Errorf("Held() = %v; want a and b once", held)
	}
	if rows := e.lockRows(c); len(rows) != 0 {
		t.Errorf("c still held on the server: %+v", rows)
	}
	if rows := e.lockRows(a); len(rows) != 1 {
		t.Errorf("a (count 1 left) rows = %+v; want one", rows)
	}
	must(t, s.UnlockMany(e.ctx, []Key{a, b}))
	if n := counter.n.Load(); n != 1 {
		t.Errorf("UnlockMany sent %d statements; want 1", n)
	}

	if _, err := s.LockMany(e.ctx, []Key{a, {}}); !errors.Is(err, ErrInvalidKey) {
		t.Errorf("LockMany with the zero Key = %v; want ErrInvalidKey", err)
	}
	if err := s.UnlockMany(e.ctx, []Key{{}}); !errors.Is(err, ErrInvalidKey) {
		t.Errorf("UnlockMany with the zero Key = %v; want ErrInvalidKey", err)
	}
	must(t, s.Close(e.ctx))
	if _, err := s.LockMany(e.ctx, []Key{a}); !errors.Is(err, ErrClosed) {
		t.Errorf("LockMany after Close = %v; want ErrClosed", err)
	}
}

// With NoWait, LockMany is all or nothing: a busy key anywhere in the set
// leaves nothing new held, keeps the earlier holds, and is not an error.
func TestLockManyNoWait(t *testing.T) {
	e := newEnv(t)
	var counter roundTrips
	pool := e.pool(func(c *pgxpool.Config) { c.ConnConfig.Tracer = &counter })
	blocker := e.conn()
	blockerPID := blocker.PgConn().PID()
	s := e.session(pool)
	earlier := PairKey(-1, -1)
	_, err := s.Lock(e.ctx, earlier)
	must(t, err)
	keys, canonical := mixedKeys(12)
	for _, mode := range []Option{nil, Shared()} {
		for _, busy := range []int{0, 5, 11} {
			key := canonical[busy]
			_, err = blocker.Exec(e.ctx, lockSQL[scopeSession][ModeExclusive][waitForever][key.space-1], key.args()...)
			must(t, err)
			counter.n.Store(0)
			ok, err := s.LockMany(e.ctx, keys, NoWait(), mode)
			if err != nil || ok {
				t.Errorf("LockMany(NoWait) with key %d busy = %v, %v; want false, nil", busy, ok, err)
			}
			if n, want := counter.n.Load(), min(busy, 1)+1; n != int64(want) {
				t.Errorf("key %d busy: %d statements; want %d", busy, n, want)
			}
			if granted, _ := e.grantedExcept(blockerPID); !slices.Equal(granted, []Key{earlier}) {
				t.Errorf("key %d busy: the session holds %v; want only the earlier hold", busy, granted)
			}
			if held := s.Held(); len(held) != 1 || held[0] != (Hold{earlier, ModeExclusive, 1}) {
				t.Errorf("Held() = %+v; want the earlier hold only", held)
			}
			_, err = blocker.Exec(e.ctx, unlockSQL[ModeExclusive][key.space-1], key.args()...)
			must(t, err)
		}
		ok, err := s.LockMany(e.ctx, keys, NoWait(), mode)
		if err != nil || !ok {
			t.Fatalf("LockMany(NoWait) with all keys free = %v, %v", ok, err)
		}
		if granted, _ := e.grantedExcept(blockerPID); len(granted) != len(keys)+1 {
			t.Errorf("the session holds %d keys; want %d", len(granted), len(keys)+1)
		}
		must(t, s.UnlockMany(e.ctx, keys, mode))
	}
	must(t, s.Close(e.ctx))
}

// A session whose only holds come from LockMany is set up and watched like
// one that used Lock: its keep-alives are set with the first LockMany, and
// the loss of its connection ends it.
func TestLockManyWatched(t *testing.T) {
	e := newEnv(t)
	pool := e.pool()
	s := e.session(pool)
	keys := []Key{Int64Key(5), PairKey(5, 5)}
	if ok, err := s.LockMany(e.ctx, keys); err != nil || !ok {
		t.Fatalf("LockMany = %v, %v", ok, err)
	}
	var userTimeout string
	var pid uint32
	must(t, s.WithConn(e.ctx, func(c *pgx.Conn) error {
		pid = c.PgConn().PID()
		return c.QueryRow(e.ctx, "SHOW tcp_user_timeout").Scan(&userTimeout)
	}))
	if userTimeout == "0" {
		t.Errorf("tcp_user_timeout after the first LockMany = %q; want it set", userTimeout)
	}
	e.terminate(pid)
	e.awaitDone(s.Done(), "session holding LockMany keys")
	if err := s.Close(e.ctx); !errors.Is(err, ErrLockLost) {
		t.Errorf("Close after the loss = %v; want ErrLockLost", err)
	}
	// The pool destroys the closed connection in the background.
	awaitAcquired(t, pool, 0)
}
