package advisory

import (
	"context"
	"errors"
	"strings"
	"testing"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
)

// A waiter whose connection is lost (its backend terminated) never held the
// lock (SPEC §4): its error does not match ErrLockLost, which says mutual
// exclusion may have been broken; it says the connection was lost while
// waiting, names the key and what to do, keeps the server's error reachable,
// and the tracer reports a failed wait ("error"), not a lost one. For
// Acquire (one key) and AcquireSemaphore (its slots).
func TestWaiterLostConnectionIsNotALostLock(t *testing.T) {
	e := newEnv(t)
	holder := e.conn()
	for _, tc := range []struct {
		name    string
		key     Key   // the key the call is for, named in its error
		waitsOn Key   // a key the server shows it waiting on
		busy    []Key // what the holder takes first
		call    func(ctx context.Context, pool *pgxpool.Pool, key Key, opts ...Option) error
	}{
		{"Acquire", StringKey("waiter-lost"), StringKey("waiter-lost"), []Key{StringKey("waiter-lost")},
			func(ctx context.Context, pool *pgxpool.Pool, key Key, opts ...Option) error {
				_, err := Acquire(ctx, pool, key, opts...)
				return err
			}},
		{"AcquireSemaphore", StringKey("waiter-lost-sem"), SemaphoreKeys(StringKey("waiter-lost-sem"), 1)[0], SemaphoreKeys(StringKey("waiter-lost-sem"), 1),
			func(ctx context.Context, pool *pgxpool.Pool, key Key, opts ...Option) error {
				_, err := AcquireSemaphore(ctx, pool, key, 1, opts...)
				return err
			}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			for _, k := range tc.busy {
				_, err := holder.Exec(e.ctx, "SELECT pg_advisory_lock($1)", mustInt64(k))
				must(t, err)
			}
			defer func() {
				_, err := holder.Exec(e.ctx, "SELECT pg_advisory_unlock_all()")
				must(t, err)
			}()
			rec := &recorder{}
			done := make(chan error, 1)
			go func() { done <- tc.call(e.ctx, e.pool(), tc.key, WithTracer(rec)) }()
			e.awaitWaiters(1)
			e.terminate(e.waiterPID(tc.waitsOn))
			err := receive(e, done, "the waiter whose backend was terminated to return")
			if err == nil || errors.Is(err, ErrLockLost) {
				t.Fatalf("a waiter whose backend was terminated returned %v; want an error that does not match ErrLockLost", err)
			}
			msg := err.Error()
			for _, want := range []string{tc.key.String(), "lost while waiting", "never held", "call again"} {
				if !strings.Contains(msg, want) {
					t.Errorf("the lost waiter's error %q does not say %q", msg, want)
				}
			}
			if strings.Contains(msg, ErrLockLost.Error()) || strings.Contains(msg, "\n") {
				t.Errorf("the lost waiter's error %q says the lock was lost, or spans lines", msg)
			}
			var pgErr *pgconn.PgError
			if !errors.As(err, &pgErr) || pgErr.Code != "57P01" {
				t.Errorf("the lost waiter's error %v does not carry the server's 57P01 (admin_shutdown)", err)
			}
			var outcomes []WaitOutcome
			for _, ev := range rec.take() {
				if ev.what == "wait-end" {
					outcomes = append(outcomes, ev.wait.Outcome())
				}
			}
			if len(outcomes) != 1 || outcomes[0] != OutcomeError {
				t.Errorf("traced wait outcomes %v; want one %q", outcomes, OutcomeError)
			}
		})
	}
}

// A Lead standby whose connection is lost (as at a server restart)
// campaigns again, and the slog tracer never says a lock was lost: a
// standby held nothing.
func TestLeadStandbyLostConnectionLogsNoLoss(t *testing.T) {
	e := newEnv(t)
	holder := e.conn()
	key := StringKey("standby-lost")
	_, err := holder.Exec(e.ctx, "SELECT pg_advisory_lock($1)", mustInt64(key))
	must(t, err)
	var logs capturedLog
	ctx, cancel := context.WithCancel(e.ctx)
	done := make(chan error, 1)
	go func() {
		done <- Lead(ctx, e.pool(), key, func(context.Context) error { return errors.New("the standby led") },
			WithTracer(SlogTracer(logs.logger())))
	}()
	e.awaitWaiters(1)
	first := e.waiterPID(key)
	e.terminate(first)
	e.eventually("the standby campaigns again on a new connection", func(c *pgx.Conn) (bool, error) {
		var n int
		err := c.QueryRow(e.ctx, `SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted AND pid <> $1`,
			int64(first)).Scan(&n)
		return n == 1, err
	})
	cancel()
	if err := receive(e, done, "Lead to return when its ctx ends"); !errors.Is(err, context.Canceled) {
		t.Errorf("Lead = %v; want context.Canceled", err)
	}
	_, err = holder.Exec(e.ctx, "SELECT pg_advisory_unlock_all()")
	must(t, err)
	recs, text := logs.take(t)
	if strings.Contains(text, ErrLockLost.Error()) || strings.Contains(text, `"outcome":"lost"`) {
		t.Errorf("the standby's log says a lock was lost:\n%s", text)
	}
	failed := 0
	for _, r := range recs {
		if (r["msg"] == "advisory lock wait ended" || r["msg"] == "advisory lock waits failing") && r["outcome"] == OutcomeError.String() {
			failed++
		}
	}
	if failed == 0 {
		t.Errorf("the standby's log shows no failed wait:\n%s", text)
	}
}
