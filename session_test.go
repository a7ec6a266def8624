package advisory

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/seed0ad592b7/advisory/internal/pgtest"
)

// Session holds are re-entrant with PostgreSQL's counts; shared and
// exclusive holds are separate; ErrNotHeld for what is not held; Close
// releases everything.
func TestSessionHolds(t *testing.T) {
	e := newEnv(t)
	pool := e.pool()
	other := e.conn()
	s, err := NewSession(e.ctx, pool)
	must(t, err)
	k1, k2 := StringKey("a"), PairKey(1, 1)

	for range 2 {
		ok, err := s.Lock(e.ctx, k1)
		if err != nil || !ok {
			t.Fatalf("Lock = %v, %v", ok, err)
		}
	}
	if held := s.Held(); len(held) != 1 || held[0] != (Hold{Key: k1, Mode: ModeExclusive, Count: 2}) {
		t.Errorf("Held() = %+v; want k1 exclusive twice", held)
	}
	if rows := e.lockRows(k1); len(rows) != 1 {
		t.Errorf("server rows for a key locked twice = %+v; want one", rows)
	}
	must(t, s.Unlock(e.ctx, k1))
	if e.tryFrom(other, k1) {
		t.Error("k1 free after one Unlock of two Locks")
	}
	must(t, s.Unlock(e.ctx, k1))
	if !e.tryFrom(other, k1) {
		t.Error("k1 still held after the second Unlock")
	}
	if err := s.Unlock(e.ctx, k1); !errors.Is(err, ErrNotHeld) {
		t.Errorf("third Unlock = %v; want ErrNotHeld", err)
	}

	// Shared and exclusive side by side on one key.
	_, err = s.Lock(e.ctx, k2)
	must(t, err)
	_, err = s.Lock(e.ctx, k2, Shared())
	must(t, err)
	want := []Hold{{k2, ModeExclusive, 1}, {k2, ModeShared, 1}}
	if held := s.Held(); fmt.Sprint(held) != fmt.Sprint(want) {
		t.Errorf("Held() = %+v; want %+v", held, want)
	}
	if rows := e.lockRows(k2); len(rows) != 2 {
		t.Errorf("server rows = %+v; want an exclusive and a shared one", rows)
	}
	if err := s.Unlock(e.ctx, k1, Shared()); !errors.Is(err, ErrNotHeld) {
		t.Errorf("Unlock(Shared) of a key never held = %v; want ErrNotHeld", err)
	}
	must(t, s.Unlock(e.ctx, k2, Shared()))
	if rows := e.lockRows(k2); len(rows) != 1 || rows[0].Mode != "ExclusiveLock" {
		t.Errorf("after Unlock(Shared) rows = %+v; want the exclusive one", rows)
	}
	_, err = s.Lock(e.ctx, k1, Shared())
	must(t, err)

	must(t, s.Close(e.ctx))
	if len(s.Held()) != 0 {
		t.Errorf("Held() after Close = %+v", s.Held())
	}
	if !e.tryFrom(other, k1) || !e.tryFrom(other, k2) {
		t.Error("Close left a lock held")
	}
	select {
	case <-s.Done():
	default:
		t.Error("Done() not closed after Close")
	}
	must(t, s.Close(e.ctx))
	if _, err := s.Lock(e.ctx, k1); !errors.Is(err, ErrClosed) {
		t.Errorf("Lock after Close = %v; want ErrClosed", err)
	}
}

// A deadlock fails one of the two waits with ErrDeadlock; the victim keeps
// what it already held.
func TestDeadlock(t *testing.T) {
	e := newEnv(t)
	pool := e.pool()
	a, err := NewSession(e.ctx, pool)
	must(t, err)
	defer a.Close(e.ctx)
	b, err := NewSession(e.ctx, pool)
	must(t, err)
	defer b.Close(e.ctx)
	k1, k2 := Int64Key(1), Int64Key(2)
	_, err = a.Lock(e.ctx, k1)
	must(t, err)
	_, err = b.Lock(e.ctx, k2)
	must(t, err)

	type result struct {
		s     *Session
		first Key
		err   error
	}
	results := make(chan result, 2)
	go func() {
		_, err := a.Lock(e.ctx, k2)
		results <- result{a, k1, err}
	}()
	e.awaitWaiters(1)
	go func() {
		_, err := b.Lock(e.ctx, k1)
		results <- result{b, k2, err}
	}()
	var victim result
	select {
	case victim = <-results:
	case <-time.After(notHung):
		t.Fatalf("neither wait ended %v after the cycle closed: the server did not detect the deadlock (a wait it cannot see?)", notHung)
	}
	if !errors.Is(victim.err, ErrDeadlock) {
		t.Fatalf("first wait to end: err = %v; want ErrDeadlock", victim.err)
	}
	var pgErr *pgconn.PgError
	if !errors.As(victim.err, &pgErr) || pgErr.Code != "40P01" {
		t.Errorf("deadlock error does not carry the 40P01 PgError: %v", victim.err)
	}
	if held := victim.s.Held(); len(held) != 1 || held[0].Key != victim.first {
		t.Errorf("victim's holds = %+v; want its first key kept", held)
	}
	if rows := e.lockRows(victim.first); len(rows) != 2 || !rows[0].Granted && !rows[1].Granted {
		t.Errorf("victim's first key on the server: %+v; want it granted, and the survivor waiting", rows)
	}
	must(t, victim.s.Close(e.ctx)) // the survivor's wait ends
	if survivor := <-results; survivor.err != nil {
		t.Errorf("the survivor's wait failed: %v", survivor.err)
	}
}

// Running the server's lock table out gives ErrTooManyLocks with the
// server's hint; the session keeps what it got and releases it on Close.
func TestTooManyLocks(t *testing.T) {
	srv, err := pgtest.Start(context.Background(), pgtest.Options{Settings: map[string]string{
		"max_locks_per_transaction": "10", "max_connections": "10",
	}})
	must(t, err)
	t.Cleanup(func() { must(t, srv.Stop()) })
	e := newEnvOn(t, srv)
	pool := e.pool()
	s, err := NewSession(e.ctx, pool)
	must(t, err)
	var lockErr error
	n := 0
	for ; n < 100_000; n++ {
		if _, lockErr = s.Lock(e.ctx, Int64Key(int64(n))); lockErr != nil {
			break
		}
	}
	if !errors.Is(lockErr, ErrTooManyLocks) {
		t.Fatalf("after %d locks: err = %v; want ErrTooManyLocks", n, lockErr)
	}
	var pgErr *pgconn.PgError
	if !errors.As(lockErr, &pgErr) || pgErr.Code != "53200" || !strings.Contains(lockErr.Error(), "max_locks_per_transaction") {
		t.Errorf("error lacks the 53200 PgError or the hint: %v", lockErr)
	}
	if len(s.Held()) != n {
		t.Errorf("Held() = %d holds; want the %d granted", len(s.Held()), n)
	}
	t.Logf("lock table ran out after %d locks", n)
	must(t, s.Close(e.ctx))
}

// A lock statement that fails after the server granted the lock (a cancel or
// lock_timeout landing between the grant and the statement's end) leaves
// the lock held on the server. The random rounds of TestCancelMidWait rarely
// hit that window, so this drives the resolution directly: the lock is
// granted, the statement "fails" with 57014, and nothing may stay held.
func TestFailedAfterGrantIsReleased(t *testing.T) {
	e := newEnv(t)
	pool := e.pool()
	s, err := NewSession(e.ctx, pool)
	must(t, err)
	key := Int64Key(123)
	_, err = s.Lock(e.ctx, Int64Key(124)) // an earlier hold, which must survive
	must(t, err)
	must(t, s.takeTurn(e.ctx))
	err = s.run(e.ctx, true, func(ctx context.Context, c *pgx.Conn) error {
		_, err := c.Exec(ctx, "SELECT pg_advisory_lock(123)")
		return err
	})
	must(t, err)
	before := grantedThenCancelled.Load()
	cancelled := &pgconn.PgError{Code: codeQueryCanceled, Message: "canceling statement due to user request"}
	err = s.lockFailed(e.ctx, hold{key, ModeExclusive}, true, false, cancelled)
	s.giveTurn()
	if !errors.Is(err, cancelled) || errors.Is(err, ErrLockLost) {
		t.Errorf("lockFailed = %v; want the cancel error, session kept", err)
	}
	if got := grantedThenCancelled.Load() - before; got != 1 {
		t.Errorf("the granted lock was found %d times; want 1", got)
	}
	if rows := e.lockRows(key); len(rows) != 0 {
		t.Errorf("a lock granted before the failure is still held: %+v", rows)
	}
	if held := s.Held(); len(held) != 1 || held[0].Key != Int64Key(124) {
		t.Errorf("Held() = %+v; want the earlier hold only", held)
	}
	must(t, s.Close(e.ctx))
}

// TestSessionStatementArgs: a Session's lock and unlock statements take
// their key's arguments from the session, boxed once for the statements on
// that key that follow (keyArgs); each Lock and Unlock must still reach the
// server with its own key, whatever key and key space came before it.
func TestSessionStatementArgs(t *testing.T) {
	e := newEnv(t)
	s, err := NewSession(e.ctx, e.pool())
	must(t, err)
	other := e.conn()
	a, b, p := StringKey("args-a"), StringKey("args-b"), PairKey(11, 12)
	for _, k := range []Key{a, b, p, a, p, b, b} {
		if ok, err := s.Lock(e.ctx, k); err != nil || !ok {
			t.Fatalf("Lock(%v) = %v, %v", k, ok, err)
		}
		for _, x := range []Key{a, b, p} {
			if held := len(e.lockRows(x)) == 1; held != (x == k) {
				t.Errorf("after Lock(%v): %v held on the server = %v", k, x, held)
			}
		}
		must(t, s.Unlock(e.ctx, k))
		if !e.tryFrom(other, k) {
			t.Errorf("%v still held on the server after its Unlock", k)
		}
	}
	must(t, s.Close(e.ctx))
}
