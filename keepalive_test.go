package advisory

import (
	"context"
	"errors"
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

// keepalivesWanted is what a lock's connection must show while it holds a
// lock with the default health interval.
func keepalivesWanted() (want keepalives) {
	for i, v := range keepaliveArgs(DefaultHealthInterval) {
		want[i] = v.(string)
	}
	return want
}

// sessionKeepalives reads the keep-alives of s's own connection.
func sessionKeepalives(t *testing.T, e *env, s *Session) (got keepalives) {
	t.Helper()
	must(t, s.WithConn(e.ctx, func(c *pgx.Conn) error {
		got = showKeepalives(t, e.ctx, c)
		return nil
	}))
	return got
}

// SPEC §4: "The settings are in force on every connection that holds a
// lock". A Session whose WithConn ran before its first Lock (rawUsed) takes
// that lock with lockMore, which sets no keep-alives: the lock is held with
// the pool's tcp_user_timeout (0) and keep-alives, so after a silent cut
// the server keeps it for the kernel's defaults (about two hours).
func TestKeepalivesLockAfterWithConn(t *testing.T) {
	e := newEnv(t)
	pool := e.pool(func(c *pgxpool.Config) { c.MaxConns = 2 })
	lent := showKeepalives(t, e.ctx, pool)
	for _, many := range []bool{false, true} {
		s, err := NewSession(e.ctx, pool)
		must(t, err)
		must(t, s.WithConn(e.ctx, func(c *pgx.Conn) error {
			_, err := c.Exec(e.ctx, "SELECT 1") // fenced work that takes no lock
			return err
		}))
		if many {
			_, err = s.LockMany(e.ctx, []Key{Int64Key(11), PairKey(1, 1)})
		} else {
			_, err = s.Lock(e.ctx, Int64Key(11))
		}
		must(t, err)
		if got := sessionKeepalives(t, e, s); got != keepalivesWanted() {
			t.Errorf("many=%v: keep-alives while a lock is held after WithConn = %v; want %v", many, got, keepalivesWanted())
		}
		must(t, s.Close(e.ctx))
		if got := showKeepalives(t, e.ctx, pool); got != lent {
			t.Errorf("many=%v: the pool's connection came back with %v; lent with %v", many, got, lent)
		}
	}
}

// SPEC §4: "a connection goes back to the pool as the pool gave it". A host
// that sets keep-alives on its connections in the startup packet
// (RuntimeParams, or the connection string) gets them back after a lock.
// (One set with SET after connecting, in AfterConnect, is reset to the
// startup value: the documented limit of the release's RESET, doc.go.)
func TestKeepalivesHostSettingsKept(t *testing.T) {
	e := newEnv(t)
	pool := e.pool(func(c *pgxpool.Config) {
		c.MaxConns = 1
		c.ConnConfig.RuntimeParams["tcp_keepalives_idle"] = "30"
		c.ConnConfig.RuntimeParams["tcp_user_timeout"] = "9000"
	})
	lent := showKeepalives(t, e.ctx, pool)
	if lent[0] != "30" || lent[3] != "9000" {
		t.Fatalf("the pool lent %v; the host set idle 30, user timeout 9000", lent)
	}
	l, err := Acquire(e.ctx, pool, StringKey("host-keepalives"))
	must(t, err)
	must(t, l.Release(e.ctx))
	if got := showKeepalives(t, e.ctx, pool); got != lent {
		t.Errorf("after Acquire and Release the pool's connection has %v; the pool lent it with %v", got, lent)
	}
}

// The pool's one connection comes back as lent, with no lock, after a wait
// cancelled mid-slice, and after ReleaseAll ends a Session holding keys in
// both modes plus a lock its WithConn callback took.
func TestKeepalivesCancelAndReleaseAll(t *testing.T) {
	e := newEnv(t)
	pool := e.pool(func(c *pgxpool.Config) {
		c.ConnConfig.RuntimeParams["deadlock_timeout"] = "40ms"
		c.MaxConns = 1
	})
	lent := showKeepalives(t, e.ctx, pool)
	key := StringKey("cancel-mid-slice")
	holder, err := Acquire(e.ctx, e.pool(), key)
	must(t, err)
	ctx, cancel := context.WithCancel(e.ctx)
	done := make(chan error, 1)
	go func() {
		_, err := Acquire(ctx, pool, key)
		done <- err
	}()
	awaitSlices(e, 2)
	cancel()
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Errorf("Acquire cancelled mid-slice: %v; want context.Canceled", err)
	}
	must(t, holder.Release(e.ctx))
	if got := showKeepalives(t, e.ctx, pool); got != lent {
		t.Errorf("after a cancelled wait: %v; lent %v", got, lent)
	}

	s, err := NewSession(e.ctx, pool)
	must(t, err)
	_, err = s.LockMany(e.ctx, []Key{Int64Key(-5), PairKey(-1, -2)})
	must(t, err)
	_, err = s.LockMany(e.ctx, []Key{Int64Key(-5), Int64Key(6)}, Shared())
	must(t, err)
	must(t, s.WithConn(e.ctx, func(c *pgx.Conn) error {
		_, err := c.Exec(e.ctx, "SELECT pg_advisory_lock(77)")
		return err
	}))
	must(t, ReleaseAll(e.ctx, pool))
	if got := showKeepalives(t, e.ctx, pool); got != lent {
		t.Errorf("after ReleaseAll: %v; lent %v", got, lent)
	}
}
