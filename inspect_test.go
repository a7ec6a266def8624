package advisory

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

// The types Holders is documented to take.
var (
	_ Querier = (*pgx.Conn)(nil)
	_ Querier = (*pgxpool.Pool)(nil)
	_ Querier = (*pgxpool.Conn)(nil)
	_ Querier = pgx.Tx(nil)
)

// namedConn returns a plain connection with the given application_name,
// one of the test's connections (see env.keep).
func (e *env) namedConn(app string) *pgx.Conn {
	e.t.Helper()
	cfg, err := pgx.ParseConfig(e.dsn)
	must(e.t, err)
	cfg.RuntimeParams["application_name"] = app
	c, err := pgx.ConnectConfig(e.ctx, cfg)
	must(e.t, err)
	e.keep(c)
	return c
}

func backendPID(t *testing.T, c *pgx.Conn) int32 {
	t.Helper()
	return int32(c.PgConn().PID())
}

func TestHoldersHolderAndWaiter(t *testing.T) {
	e := newEnv(t)
	key := Int64Key(-7_000_000_000_123)
	holder, waiter := e.namedConn("inspect-holder"), e.namedConn("inspect-waiter")
	before := time.Now()
	_, err := holder.Exec(e.ctx, `SELECT pg_advisory_lock($1)`, int64(-7_000_000_000_123))
	must(t, err)

	waited := make(chan error, 1)
	go func() {
		_, err := waiter.Exec(e.ctx, `SELECT pg_advisory_lock($1)`, int64(-7_000_000_000_123))
		waited <- err
	}()
	e.awaitWaiters(1)

	hs, err := Holders(e.ctx, e.conn(), key)
	must(t, err)
	if len(hs) != 2 {
		t.Fatalf("Holders = %+v, want a holder and a waiter", hs)
	}
	h, w := hs[0], hs[1]
	if h.PID != backendPID(t, holder) || !h.Granted || h.Mode != ModeExclusive || h.Key != key ||
		h.ApplicationName != "inspect-holder" || h.ClientAddr != "127.0.0.1" || h.State != "idle" {
		t.Errorf("holder = %+v, want pid %d, granted, exclusive, %s, inspect-holder from 127.0.0.1, idle",
			h, backendPID(t, holder), key)
	}
	if w.PID != backendPID(t, waiter) || w.Granted || w.Mode != ModeExclusive || w.Key != key ||
		w.ApplicationName != "inspect-waiter" || w.State != "active" {
		t.Errorf("waiter = %+v, want pid %d, waiting, exclusive, %s, inspect-waiter, active",
			w, backendPID(t, waiter), key)
	}
	now := time.Now()
	for _, x := range hs {
		// Server and test share a clock: the window is the test's own
		// span, which load only widens; the second of slack absorbs
		// rounding, it is not a bound on how fast anything runs.
		if x.Since.Before(before.Add(-time.Second)) || x.Since.After(now.Add(time.Second)) {
			t.Errorf("pid %d: Since = %v, want between %v and %v", x.PID, x.Since, before, now)
		}
		if x.BackendStart.IsZero() || x.BackendStart.After(x.Since) {
			t.Errorf("pid %d: BackendStart = %v, want set and not after Since %v", x.PID, x.BackendStart, x.Since)
		}
	}
	if !h.Since.Before(w.Since) && !h.Since.Equal(w.Since) {
		t.Errorf("holder's Since %v is after the waiter's %v", h.Since, w.Since)
	}

	_, err = holder.Exec(e.ctx, `SELECT pg_advisory_unlock($1)`, int64(-7_000_000_000_123))
	must(t, err)
	must(t, <-waited)
	hs, err = Holders(e.ctx, e.conn(), key)
	must(t, err)
	if len(hs) != 1 || hs[0].PID != backendPID(t, waiter) || !hs[0].Granted {
		t.Errorf("after the hand-off Holders = %+v, want the former waiter as the one holder", hs)
	}
	_, err = waiter.Exec(e.ctx, `SELECT pg_advisory_unlock($1)`, int64(-7_000_000_000_123))
	must(t, err)
}

func TestHoldersPairKeyShared(t *testing.T) {
	e := newEnv(t)
	key := PairKey(-5, 9)
	a, b := e.conn(), e.conn()
	for _, c := range []*pgx.Conn{a, b} {
		_, err := c.Exec(e.ctx, `SELECT pg_advisory_lock_shared($1::int4, $2::int4)`, int32(-5), int32(9))
		must(t, err)
	}
	pool := e.pool()
	hs, err := Holders(e.ctx, pool, key)
	must(t, err)
	if len(hs) != 2 {
		t.Fatalf("Holders = %+v, want two shared holders", hs)
	}
	pids := map[int32]bool{}
	for _, h := range hs {
		if !h.Granted || h.Mode != ModeShared || h.Key != key {
			t.Errorf("holder %+v: want granted, shared, %s", h, key)
		}
		pids[h.PID] = true
	}
	if !pids[backendPID(t, a)] || !pids[backendPID(t, b)] {
		t.Errorf("Holders pids = %v, want %d and %d", pids, backendPID(t, a), backendPID(t, b))
	}

	// The int64 key with the same classid and objid is another lock.
	classid, objid, _ := key.LockRow()
	same := Int64Key(int64(uint64(classid)<<32 | uint64(objid)))
	hs, err = Holders(e.ctx, pool, same)
	must(t, err)
	if len(hs) != 0 {
		t.Errorf("Holders(%s) = %+v, want none: the int64 space is separate", same, hs)
	}

	// Through a transaction too.
	tx, err := pool.Begin(e.ctx)
	must(t, err)
	all, err := AllHolders(e.ctx, tx)
	must(t, err)
	must(t, tx.Rollback(e.ctx))
	if len(all) != 2 || all[0].Key != key || all[1].Key != key {
		t.Errorf("AllHolders = %+v, want the two shared holds of %s", all, key)
	}

	for _, c := range []*pgx.Conn{a, b} {
		_, err := c.Exec(e.ctx, `SELECT pg_advisory_unlock_shared($1::int4, $2::int4)`, int32(-5), int32(9))
		must(t, err)
	}
}

func TestHoldersOfAcquire(t *testing.T) {
	e := newEnv(t)
	pool := e.pool(func(c *pgxpool.Config) { c.ConnConfig.RuntimeParams["application_name"] = "inspect-acquire" })
	k1, k2 := StringKey("inspect/one"), PairKey(1, 2)
	l1, err := Acquire(e.ctx, pool, k1)
	must(t, err)
	l2, err := Acquire(e.ctx, pool, k2, Shared())
	must(t, err)
	s, err := NewSession(e.ctx, pool)
	must(t, err)
	_, err = s.Lock(e.ctx, k1, Shared(), NoWait()) // busy: not held, nothing reported
	must(t, err)

	all, err := AllHolders(e.ctx, pool)
	must(t, err)
	if len(all) != 2 {
		t.Fatalf("AllHolders = %+v, want two holds", all)
	}
	// int64 keys sort before pair keys.
	if all[0].Key != k1 || all[0].Mode != ModeExclusive || all[1].Key != k2 || all[1].Mode != ModeShared {
		t.Errorf("AllHolders = %+v, want %s exclusive then %s shared", all, k1, k2)
	}
	for _, h := range all {
		if h.ApplicationName != "inspect-acquire" || !h.Granted {
			t.Errorf("hold %+v: want granted, inspect-acquire", h)
		}
	}
	must(t, s.Close(e.ctx))
	must(t, l1.Release(e.ctx))
	must(t, l2.Release(e.ctx))
	all, err = AllHolders(e.ctx, pool)
	must(t, err)
	if len(all) != 0 {
		t.Errorf("AllHolders after Release = %+v, want none", all)
	}
}

func TestHoldersInvalid(t *testing.T) {
	e := newEnv(t)
	counter := &queryCounter{}
	pool := e.pool(func(c *pgxpool.Config) { c.ConnConfig.Tracer = counter })
	if _, err := Holders(e.ctx, pool, Key{}); !errors.Is(err, ErrInvalidKey) {
		t.Errorf("Holders(zero Key) = %v, want ErrInvalidKey", err)
	}
	if n := counter.n.Load(); n != 0 {
		t.Errorf("Holders(zero Key) sent %d statements, want none", n)
	}
	if _, err := Holders(e.ctx, nil, Int64Key(1)); err == nil {
		t.Error("Holders(nil Querier) succeeded")
	}
	if _, err := AllHolders(e.ctx, nil); err == nil {
		t.Error("AllHolders(nil Querier) succeeded")
	}
	ctx, cancel := context.WithCancel(e.ctx)
	cancel()
	if _, err := AllHolders(ctx, pool); !errors.Is(err, context.Canceled) {
		t.Errorf("AllHolders(cancelled ctx) = %v, want context.Canceled", err)
	}
}

// activityOf reads pid's pg_stat_activity: state and state_change.
func (e *env) activityOf(c *pgx.Conn, pid int32) (state string, stateChange time.Time, err error) {
	err = c.QueryRow(e.ctx, `SELECT state, state_change FROM pg_stat_activity WHERE pid = $1`, pid).Scan(&state, &stateChange)
	return
}

// Holders shows the true times of this package's sessions: a hold since its
// grant across the health checks that came since, and a wait since it began
// across its slices; another client's times are PostgreSQL's, and say so.
func TestHoldersTrueTimes(t *testing.T) {
	e := newEnv(t)
	pool := e.pool()
	key := StringKey("true-times")
	beforeHold := time.Now()
	holder, err := Acquire(e.ctx, pool, key, HealthInterval(100*time.Millisecond))
	must(t, err)
	granted := time.Now()
	holderPID := int32(lockPID(t, e.ctx, holder))

	// Await a health check that came well after the grant: state_change,
	// PostgreSQL's proxy for a grant time, is then far from the grant.
	e.eventually("a health check of the hold 500ms after its grant", func(c *pgx.Conn) (bool, error) {
		state, changed, err := e.activityOf(c, holderPID)
		return state == "idle" && changed.Sub(granted) > 500*time.Millisecond, err
	})

	beforeWait := time.Now()
	type result struct {
		l   *Lock
		err error
	}
	waited := make(chan result, 1)
	go func() {
		l, err := Acquire(e.ctx, pool, key)
		waited <- result{l, err}
	}()
	// Await a slice that began well after the wait: pg_locks.waitstart is
	// then far from the wait's start.
	var waiterPID int32
	e.eventually("a wait slice 700ms after the wait began", func(c *pgx.Conn) (bool, error) {
		var started time.Time
		err := c.QueryRow(e.ctx, `SELECT l.pid, l.waitstart FROM pg_locks l WHERE l.locktype = 'advisory' AND NOT l.granted
			AND l.waitstart IS NOT NULL`).Scan(&waiterPID, &started)
		if errors.Is(err, pgx.ErrNoRows) {
			return false, nil
		}
		return err == nil && started.Sub(beforeWait) > 700*time.Millisecond, err
	})

	other := e.namedConn("true-times-other")
	otherKey := Int64Key(-7_000_000_000_321)
	_, err = other.Exec(e.ctx, `SELECT pg_advisory_lock($1)`, int64(-7_000_000_000_321))
	must(t, err)

	hs, err := Holders(e.ctx, e.conn(), key)
	must(t, err)
	if len(hs) != 2 || hs[0].PID != holderPID || hs[1].PID != waiterPID {
		t.Fatalf("Holders = %+v; want the holder %d, then the waiter %d", hs, holderPID, waiterPID)
	}
	// The bounds: the client's clock around the grant or the wait's start,
	// with what a busy machine may add between measuring a duration and
	// sending it.
	const slack = 250 * time.Millisecond
	if h := hs[0]; !h.SinceExact || h.Since.Before(beforeHold.Add(-slack)) || h.Since.After(granted.Add(slack)) {
		t.Errorf("holder: Since %v (exact %v); want the grant, between %v and %v", h.Since, h.SinceExact, beforeHold, granted)
	}
	if w := hs[1]; !w.SinceExact || w.Since.Before(beforeWait.Add(-slack)) || w.Since.After(beforeWait.Add(slack)) {
		t.Errorf("waiter: Since %v (exact %v); want the wait's start, about %v", w.Since, w.SinceExact, beforeWait)
	}
	hs, err = Holders(e.ctx, e.conn(), otherKey)
	must(t, err)
	if len(hs) != 1 || hs[0].SinceExact || hs[0].Since.IsZero() {
		t.Errorf("another client's hold: %+v; want PostgreSQL's time, not marked exact", hs)
	}
	_, err = other.Exec(e.ctx, `SELECT pg_advisory_unlock_all()`)
	must(t, err)

	// The waiter gets the key from the slice under way: until its first
	// health check its last statement is that slice, and it went idle at
	// the grant.
	released := time.Now()
	must(t, holder.Release(e.ctx))
	r := <-waited
	must(t, r.err)
	got := time.Now()
	hs, err = Holders(e.ctx, e.conn(), key)
	must(t, err)
	if len(hs) != 1 || !hs[0].SinceExact || hs[0].Since.Before(released.Add(-slack)) || hs[0].Since.After(got.Add(slack)) {
		t.Errorf("the waiter, granted: %+v; want Since the grant, between %v and %v, exact", hs, released, got)
	}
	must(t, r.l.Release(e.ctx))
}
