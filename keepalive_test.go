package advisory

import (
	"context"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

// keepaliveShowSQL reads the four keep-alive settings of a session.
const keepaliveShowSQL = `SELECT current_setting('tcp_keepalives_idle'), current_setting('tcp_keepalives_interval'),
	current_setting('tcp_keepalives_count'), current_setting('tcp_user_timeout')`

type keepalives [4]string

func showKeepalives(t *testing.T, ctx context.Context, q interface {
	QueryRow(context.Context, string, ...any) pgx.Row
}) (k keepalives) {
	t.Helper()
	must(t, q.QueryRow(ctx, keepaliveShowSQL).Scan(&k[0], &k[1], &k[2], &k[3]))
	return k
}

// A connection goes back to the pool as the pool lent it: after every way a
// session can end or give up its last hold, the pool's one connection has
// the keep-alive settings it had before (SPEC §4). While a lock is held,
// the keep-alives are in force, even when the first lock on the connection
// failed (issue 10, defects 1 and 9).
func TestKeepalivesOnlyWhileHeld(t *testing.T) {
	e := newEnv(t)
	pool := e.pool(func(c *pgxpool.Config) { c.MaxConns = 1 })
	busy := StringKey("keepalive-busy")
	other := e.pool()
	holder, err := Acquire(e.ctx, other, busy)
	must(t, err)
	defer func() { _ = holder.Release(e.ctx) }()

	lent := showKeepalives(t, e.ctx, pool)
	want := keepalives{}
	for i, v := range keepaliveArgs(DefaultHealthInterval) {
		want[i] = v.(string)
	}
	checkHeld := func(name string, s *Session) {
		t.Helper()
		var got keepalives
		must(t, s.WithConn(e.ctx, func(c *pgx.Conn) error {
			got = showKeepalives(t, e.ctx, c)
			return nil
		}))
		if got != want {
			t.Errorf("%s: keep-alives while held = %v; want %v", name, got, want)
		}
	}
	checkLent := func(name string) {
		t.Helper()
		if got := showKeepalives(t, e.ctx, pool); got != lent {
			t.Errorf("%s: the pool's connection has keep-alives %v afterwards; the pool lent it with %v", name, got, lent)
		}
	}

	// Defect 9 alone: on a fresh connection, a lock and its release.
	l, err := Acquire(e.ctx, pool, StringKey("keepalive-0"))
	must(t, err)
	checkHeld("Acquire", l.s)
	must(t, l.Release(e.ctx))
	checkLent("the first Acquire and Release")

	// A first lock that fails (its wait timed out), then a lock on the same
	// connection: the settings are in force while that one is held.
	if _, err := Acquire(e.ctx, pool, busy, WaitTimeout(50*time.Millisecond)); err == nil {
		t.Fatal("Acquire of a held key succeeded")
	}
	checkLent("a wait that timed out")
	if _, err := Acquire(e.ctx, pool, busy, NoWait()); err != nil {
		t.Fatal(err)
	}
	checkLent("a NoWait that found the key busy")

	// A lock granted during a wait slice (the key busy at first), then a
	// lock granted in a LockMany slice.
	got := make(chan *Lock, 1)
	go func() {
		l, err := Acquire(e.ctx, pool, busy)
		if err != nil {
			t.Error(err)
		}
		got <- l
	}()
	e.awaitWaiters(1)
	must(t, holder.Release(e.ctx))
	l = <-got
	if l == nil {
		t.FailNow()
	}
	checkHeld("Acquire granted in a wait slice", l.s)
	must(t, l.Release(e.ctx))
	checkLent("Acquire granted in a wait slice, and Release")
	holder, err = Acquire(e.ctx, other, busy)
	must(t, err)
	gotMany := make(chan *Session, 1)
	go func() {
		s, err := NewSession(e.ctx, pool)
		if err == nil {
			_, err = s.LockMany(e.ctx, []Key{Int64Key(3), busy})
		}
		if err != nil {
			t.Error(err)
		}
		gotMany <- s
	}()
	e.awaitWaiters(1)
	must(t, holder.Release(e.ctx))
	sm := <-gotMany
	checkHeld("LockMany granted in a wait slice", sm)
	must(t, sm.Close(e.ctx))
	checkLent("LockMany granted in a wait slice, and Close")
	holder, err = Acquire(e.ctx, other, busy)
	must(t, err)

	l, err = Acquire(e.ctx, pool, StringKey("keepalive-1"))
	must(t, err)
	checkHeld("Acquire after a failed lock", l.s)
	must(t, l.Release(e.ctx))
	checkLent("Acquire and Release")

	s, err := NewSession(e.ctx, pool)
	must(t, err)
	k := Int64Key(7)
	for i := 0; i < 2; i++ {
		_, err := s.Lock(e.ctx, k)
		must(t, err)
	}
	_, err = s.Lock(e.ctx, k, Shared())
	must(t, err)
	checkHeld("Session.Lock", s)
	must(t, s.Unlock(e.ctx, k))
	must(t, s.Unlock(e.ctx, k))
	checkHeld("Session with one shared hold left", s)
	must(t, s.Unlock(e.ctx, k, Shared()))
	must(t, s.Close(e.ctx))
	checkLent("Session.Unlock of every hold")

	s, err = NewSession(e.ctx, pool)
	must(t, err)
	keys := []Key{Int64Key(1), PairKey(1, 2)}
	_, err = s.LockMany(e.ctx, keys)
	must(t, err)
	checkHeld("LockMany", s)
	must(t, s.UnlockMany(e.ctx, keys))
	must(t, s.Close(e.ctx))
	checkLent("LockMany and UnlockMany")

	s, err = NewSession(e.ctx, pool)
	must(t, err)
	if ok, err := s.LockMany(e.ctx, []Key{Int64Key(1), busy}, NoWait()); ok || err != nil {
		t.Fatalf("LockMany NoWait with a busy key: %v, %v", ok, err)
	}
	_, err = s.LockMany(e.ctx, keys, NoWait())
	must(t, err)
	checkHeld("LockMany NoWait", s)
	must(t, s.Close(e.ctx))
	checkLent("Close with holds")
}
