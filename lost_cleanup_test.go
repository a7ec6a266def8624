package advisory

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
)

// killBackend terminates the backend pid and waits until the server has
// let it go, so the next statement sent on its connection fails.
func (e *env) killBackend(pid uint32) {
	e.t.Helper()
	e.terminate(pid)
	e.eventually("the terminated backend gone", func(c *pgx.Conn) (bool, error) {
		var gone bool
		err := c.QueryRow(e.ctx, "SELECT NOT EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = $1)", int64(pid)).Scan(&gone)
		return gone, err
	})
}

// A clean-up statement that finds the connection lost (the pg_locks check
// after an ambiguous lock failure, for one key or many, and the unlock of a
// NoWait LockMany's keys taken before the busy one) ends the session, and
// the error says so once, on one line, as a lost lock statement's does:
// the session's end reason, which says it again, is not joined to it (red
// before: the sentinel's text twice, across two lines). On a session that
// held locks before, the error matches ErrLockLost (they are gone); on one
// that held nothing, the call was only waiting and never held the lock: its
// error says the connection was lost while waiting, and does not match
// ErrLockLost (SPEC §4).
func TestLostCleanupSaysLostOnce(t *testing.T) {
	e := newEnv(t)
	cancelled := &pgconn.PgError{Code: codeQueryCanceled, Message: "canceling statement due to user request"}
	check := func(what string, heldBefore bool, s *Session, err error) {
		t.Helper()
		msg := fmt.Sprint(err)
		want := errLostWaiting.Error()
		if heldBefore {
			want = ErrLockLost.Error()
		}
		if errors.Is(err, ErrLockLost) != heldBefore || strings.Count(msg, want) != 1 || strings.Contains(msg, "\n") {
			t.Errorf("%s (held before: %v): %q; want %q once, on one line, matching ErrLockLost only if the session held locks before",
				what, heldBefore, msg, want)
		}
		e.awaitDone(s.Done(), what)
		if err := s.Close(e.ctx); !errors.Is(err, ErrLockLost) {
			t.Errorf("%s: Close = %v; want ErrLockLost", what, err)
		}
	}
	pool := e.pool()
	for _, heldBefore := range []bool{false, true} {
		for _, many := range []bool{false, true} {
			s, err := NewSession(e.ctx, pool)
			must(t, err)
			if heldBefore {
				_, err := s.Lock(e.ctx, Int64Key(7))
				must(t, err)
			}
			must(t, s.takeTurn(e.ctx))
			e.killBackend(s.pc.PgConn().PID())
			what := "lockFailed"
			if many {
				what = "lockManyFailed"
				err = s.lockManyFailed("lock_many", Key{}, e.ctx, e.ctx, []Key{Int64Key(5), Int64Key(6)}, ModeExclusive, false, cancelled)
			} else {
				err = s.lockFailed(e.ctx, hold{Int64Key(5), ModeExclusive}, !heldBefore, false, cancelled)
			}
			s.giveTurn()
			check(what, heldBefore, s, err)
		}
	}

	// NoWait LockMany: key 1 is taken, key 2 is busy, and the backend is
	// gone when key 1's unlock is sent.
	hook := &startHook{prefix: "SELECT count(*) FILTER (WHERE NOT ok)"}
	hooked := e.pool(func(c *pgxpool.Config) { c.ConnConfig.Tracer = hook })
	holder, err := Acquire(e.ctx, pool, Int64Key(2))
	must(t, err)
	defer func() { must(t, holder.Release(context.Background())) }()
	s, err := NewSession(e.ctx, hooked)
	must(t, err)
	pid := s.pc.PgConn().PID()
	hook.fn = func() { e.killBackend(pid) }
	hook.armed.Store(true)
	got, err := s.LockMany(e.ctx, []Key{Int64Key(1), Int64Key(2)}, NoWait())
	if got || hook.armed.Load() {
		t.Errorf("LockMany = %v, unlock hook armed %v; want false, the unlock of key 1 sent", got, hook.armed.Load())
	}
	check("NoWait LockMany's unlock", false, s, err)
}
