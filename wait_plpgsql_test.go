package advisory

import (
	"context"
	"errors"
	"strings"
	"testing"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

// Wait slices are DO blocks, which need USAGE on PL/pgSQL. For a role
// without it every contended wait failed at once with 42501 (uncontended
// locks worked, so it showed in production, not in tests). Each waiting
// entry point now falls back to one server-side wait, gets the key when
// the holder lets go, and says so through the tracer: once for a Session,
// at each LockTx and DoTx. The others ask whether PL/pgSQL can be used
// with their first try; LockMany, which has none, learns it from its first
// slice's error, logged once per Session.
func TestWaitsWithoutPLpgSQL(t *testing.T) {
	e, srv := privateEnv(t, nil)
	logged := errorsLogged(t, srv)
	admin := e.adminConn()
	for _, sql := range []string{
		"CREATE ROLE no_plpgsql LOGIN",
		"REVOKE USAGE ON LANGUAGE plpgsql FROM PUBLIC",
	} {
		_, err := admin.Exec(e.ctx, sql)
		must(t, err)
	}
	var rec recorder
	pool := e.pool(func(c *pgxpool.Config) {
		c.ConnConfig.User = "no_plpgsql"
		c.MaxConns = 4
	})
	key := StringKey("no-plpgsql")
	traced := WithTracer(&rec)
	for _, c := range []struct {
		name string
		sem  bool
		wait func() error
	}{
		{"Acquire", false, func() error {
			l, err := Acquire(e.ctx, pool, key, traced)
			if err == nil {
				err = l.Release(e.ctx)
			}
			return err
		}},
		{"Session.LockMany", false, func() error {
			s, err := NewSession(e.ctx, pool, traced)
			if err != nil {
				return err
			}
			defer s.Close(e.ctx)
			if ok, err := s.LockMany(e.ctx, []Key{Int64Key(5), key}); err != nil || !ok {
				return errors.Join(errors.New("not acquired"), err)
			}
			return s.Close(e.ctx)
		}},
		{"AcquireSemaphore", true, func() error {
			l, err := AcquireSemaphore(e.ctx, pool, key, 1, traced)
			if err == nil {
				err = l.Release(e.ctx)
			}
			return err
		}},
		{"LockTx", false, func() error {
			tx, err := pool.Begin(e.ctx)
			if err != nil {
				return err
			}
			defer tx.Rollback(e.ctx)
			if ok, err := LockTx(e.ctx, tx, key, traced); err != nil || !ok {
				return errors.Join(errors.New("not acquired"), err)
			}
			return tx.Commit(e.ctx)
		}},
		{"DoTx", false, func() error {
			ran, err := DoTx(e.ctx, pool, key, func(context.Context, pgx.Tx) error { return nil }, traced)
			if err == nil && !ran {
				err = errors.New("fn did not run")
			}
			return err
		}},
	} {
		holdKey := key
		if c.sem {
			holdKey = SemaphoreKeys(key, 1)[0]
		}
		holder := e.conn()
		_, err := holder.Exec(e.ctx, lockSQL[scopeSession][ModeExclusive][waitForever][holdKey.space-1], holdKey.args()...)
		must(t, err)
		rec.take()
		done := make(chan error, 1)
		go func() { done <- c.wait() }()
		e.awaitWaiters(1)
		_, err = holder.Exec(e.ctx, unlockSQL[ModeExclusive][holdKey.space-1], holdKey.args()...)
		must(t, err)
		if err := <-done; err != nil {
			t.Errorf("%s without USAGE on PL/pgSQL: %v", c.name, err)
		}
		said := 0
		for _, ev := range rec.take() {
			if ev.what == "wait-end" && ev.wait.NoSlices == NoSlicesPLpgSQL {
				said++
			}
		}
		if said != 1 {
			t.Errorf("%s: the tracer said %d times that the wait could not be sliced; want once", c.name, said)
		}
	}
	lines := logged()
	if len(lines) != 1 || !strings.Contains(lines[0], "permission denied for language plpgsql") {
		t.Errorf("server log: %q; want one permission error (LockMany's first slice)", lines)
	}
}
