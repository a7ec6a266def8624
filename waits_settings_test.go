package advisory

// DoTx and wait slices under server settings and edge cases: a
// configuration reload during a DoTx, a full lock table at its try, a
// deadline swept across a wait, one-millisecond slices, and every form of
// a slice's report. Each test was written for a defect (it failed on
// 3323909).

import (
	"context"
	"errors"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/seed0ad592b7/advisory/internal/pgtest"
)

// privateEnv starts a server of the test's own (ALTER SYSTEM and reloads
// must not reach the shared one) and returns an env on it.
func privateEnv(t *testing.T, settings map[string]string) (*env, *pgtest.Server) {
	t.Helper()
	srv, err := pgtest.Start(context.Background(), pgtest.Options{Private: true, Settings: settings})
	must(t, err)
	t.Cleanup(func() { must(t, srv.Stop()) })
	return newEnvOn(t, srv), srv
}

// reloadDefaultReadOnly sets default_transaction_read_only in
// postgresql.auto.conf and reloads the configuration, then awaits a new
// session that sees it: the postmaster has then signalled every backend.
func (e *env) reloadDefaultReadOnly(v string) {
	e.t.Helper()
	_, err := e.adminConn().Exec(e.ctx, "ALTER SYSTEM SET default_transaction_read_only = "+v)
	must(e.t, err)
	_, err = e.adminConn().Exec(e.ctx, "SELECT pg_reload_conf()")
	must(e.t, err)
	e.eventually("a new session sees default_transaction_read_only = "+v, func(c *pgx.Conn) (bool, error) {
		fresh, err := pgx.Connect(e.ctx, e.dsn)
		if err != nil {
			return false, err
		}
		defer fresh.Close(e.ctx)
		var got string
		err = fresh.QueryRow(e.ctx, "SHOW default_transaction_read_only").Scan(&got)
		return got == v, err
	})
}

// A false "acquired", fixed in a88a326. A
// configuration reload that changes default_transaction_read_only (ALTER
// SYSTEM SET ... + pg_reload_conf(), the usual way to put a cluster in or
// out of read-only maintenance) is applied by an idle pooled backend when
// its next message arrives, and the change is reported (ParameterStatus)
// in the reply to that message. When that message was DoTx's BEGIN and
// the try did not get the key, pgx saw the setting change, beginLocked
// took it for the flip, and DoTx ran fn while another session held the
// key, in both directions. The fix: the BEGIN sets the setting to a value
// only the try decides, relative to the value pgx last saw (beginTrySQL),
// so no reload, proxy or leaked setting can produce a false flip.
func TestDoTxAcquiredDespiteReload(t *testing.T) {
	e, _ := privateEnv(t, nil)
	holder := e.conn()
	key := StringKey("settings-reload")
	if !e.tryFromKeep(holder, key) {
		t.Fatal("key not free")
	}
	pool := e.pool(func(c *pgxpool.Config) { c.MaxConns = 1 })
	other := map[string]string{"on": "off", "off": "on"}
	for _, v := range []string{"on", "off"} {
		for name, opts := range map[string][]Option{"NoWait": {NoWait()}, "WaitTimeout": {WaitTimeout(50 * time.Millisecond)}} {
			// The pool's idle connection has applied and reported the
			// other value; then the configuration changes to v.
			e.reloadDefaultReadOnly(other[v])
			_, err := pool.Exec(e.ctx, "SELECT 1")
			must(t, err)
			e.reloadDefaultReadOnly(v)
			ran, err := DoTx(e.ctx, pool, key, func(ctx context.Context, tx pgx.Tx) error {
				t.Errorf("reload to %s, %s: fn ran while another session holds the key", v, name)
				return nil
			}, opts...)
			if ran || (err != nil && !errors.Is(err, ErrTimeout)) {
				t.Errorf("reload to %s, %s: DoTx on a key another session holds = %v, %v; want false", v, name, ran, err)
			}
		}
	}
	_, err := holder.Exec(e.ctx, unlockSQL[ModeExclusive][key.space-1], key.args()...)
	must(t, err)
}

// Checked, sound (kept as a regression guard): a BEGIN whose try fails
// with 53200 (the lock table is full) is ErrTooManyLocks with the hint, the
// *pgconn.PgError reachable, fn does not run, and the connection left in
// the failed transaction is not reused.
func TestDoTxTooManyLocksInTry(t *testing.T) {
	e, _ := privateEnv(t, map[string]string{"max_locks_per_transaction": "10", "max_connections": "10"})
	pool := e.pool(func(c *pgxpool.Config) { c.MaxConns = 1 })
	_, err := pool.Exec(e.ctx, "SELECT 1") // the pool's connection exists before the table is full
	must(t, err)
	filler := e.conn()
	for i := 0; ; i++ {
		if _, err := filler.Exec(e.ctx, "SELECT pg_advisory_lock(3, $1)", int32(i)); err != nil {
			var pgErr *pgconn.PgError
			if !errors.As(err, &pgErr) || pgErr.Code != "53200" {
				t.Fatalf("filling the lock table: %v", err)
			}
			break
		}
	}
	for _, opts := range [][]Option{{NoWait()}, nil} {
		ran, err := DoTx(e.ctx, pool, StringKey("settings-full"), func(context.Context, pgx.Tx) error {
			t.Error("fn ran")
			return nil
		}, opts...)
		var pgErr *pgconn.PgError
		if ran || !errors.Is(err, ErrTooManyLocks) || !errors.As(err, &pgErr) ||
			!strings.Contains(err.Error(), "max_locks_per_transaction") {
			t.Errorf("DoTx on a full lock table (%d options) = %v, %v; want ErrTooManyLocks with the hint", len(opts), ran, err)
		}
	}
	_, err = filler.Exec(e.ctx, "SELECT pg_advisory_unlock_all()")
	must(t, err)
}

// Checked, sound (kept as a guard): a ctx that ends at any moment of a
// DoTx (a sweep of deadlines across the BEGIN with its try, fn and the
// COMMIT) never runs fn without the key, and no connection goes back to
// the pool with the flip on, on the server or in pgx's view.
func TestDoTxDeadlineSweep(t *testing.T) {
	e := newEnv(t)
	pool := e.pool(func(c *pgxpool.Config) { c.MaxConns = 2 })
	checker := e.conn()
	key := StringKey("settings-sweep")
	var ran, failed int
	for i := range 300 {
		ctx, cancel := context.WithTimeout(e.ctx, time.Duration(i%60)*50*time.Microsecond)
		ok, err := DoTx(ctx, pool, key, func(ctx context.Context, tx pgx.Tx) error {
			if e.tryFrom(checker, key) {
				t.Error("fn runs while the key is free")
			}
			return nil
		}, NoWait())
		cancel()
		if ok {
			ran++
		}
		if err != nil {
			failed++
		}
		conn, err := pool.Acquire(e.ctx)
		must(t, err)
		var dro string
		must(t, conn.QueryRow(e.ctx, "SHOW default_transaction_read_only").Scan(&dro))
		if ps := conn.Conn().PgConn().ParameterStatus("default_transaction_read_only"); dro != "off" || ps != "off" {
			t.Errorf("round %d: a pooled connection has default_transaction_read_only %q (pgx's view %q)", i, dro, ps)
		}
		conn.Release()
	}
	t.Logf("fn ran %d times, %d DoTx failed", ran, failed)
}

// Checked, sound (kept as a guard): LockMany waits of 1 ms slices
// (deadlock_timeout 2 ms), many grants landing as a slice ends, on
// overlapping key sets (ints and pairs, shared and exclusive): at most one
// exclusive holder of a key at a time, every wait served, the server log
// free of ERROR and WARNING, nothing left behind.
func TestLockManyOneMsSlices(t *testing.T) {
	e := newEnv(t)
	checkLog := noErrorLogged(t)
	pool := e.pool(deadlockTimeout("2ms", 10))
	a, b, c := Int64Key(18001), PairKey(18, 2), Int64Key(18003)
	sets := [][]Key{{a, b}, {b, c}, {a, c}, {a, b, c}}
	var holding [3]atomic.Int32
	idx := map[Key]int{a: 0, b: 1, c: 2}
	var wg sync.WaitGroup
	for w := range 6 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			s, err := NewSession(e.ctx, pool)
			if err != nil {
				t.Error(err)
				return
			}
			defer s.Close(e.ctx)
			for r := range 40 {
				keys := sets[(w+r)%len(sets)]
				ok, err := s.LockMany(e.ctx, keys)
				if err != nil || !ok {
					t.Errorf("worker %d round %d: LockMany = %v, %v", w, r, ok, err)
					return
				}
				for _, k := range keys {
					if holding[idx[k]].Add(1) != 1 {
						t.Errorf("two exclusive holders of %v", k)
					}
				}
				for _, k := range keys {
					holding[idx[k]].Add(-1)
				}
				if err := s.UnlockMany(e.ctx, keys); err != nil {
					t.Errorf("UnlockMany: %v", err)
					return
				}
			}
		}()
	}
	wg.Wait()
	checkLog()
}

// The same false "acquired" through PgBouncer 1.18 in transaction mode:
// the server connection applies the reload when DoTx's BEGIN reaches it,
// and PgBouncer passes the report on to the client that sent the BEGIN.
// Same fix.
func TestDoTxAcquiredDespiteReloadPgBouncer(t *testing.T) {
	e, srv := privateEnv(t, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	b, err := pgtest.StartPgBouncerWith(ctx, srv, pgtest.PgBouncerOptions{Mode: "transaction", PoolSize: 1})
	must(t, err)
	t.Cleanup(func() { must(t, b.Stop()) })
	holder := e.conn()
	key := StringKey("settings-reload-bouncer")
	if !e.tryFromKeep(holder, key) {
		t.Fatal("key not free")
	}
	pool := e.bouncerPool(b, "exec", func(c *pgxpool.Config) { c.MaxConns = 1 })
	_, err = pool.Exec(e.ctx, "SELECT 1") // the server connection exists and is idle
	must(t, err)
	e.reloadDefaultReadOnly("on")
	ran, err := DoTx(e.ctx, pool, key, func(ctx context.Context, tx pgx.Tx) error {
		t.Error("fn ran while another session holds the key")
		return nil
	}, NoWait())
	if ran || err != nil {
		t.Errorf("DoTx through PgBouncer on a key another session holds = %v, %v; want false, nil", ran, err)
	}
	_, err = holder.Exec(e.ctx, unlockSQL[ModeExclusive][key.space-1], key.args()...)
	must(t, err)
}

// Checked, sound (kept as a guard): the session slice's report, read from
// SHOW lock_timeout, for the slice lengths whose SHOW text differs (1ms,
// 999ms, 1000 ms shown as "1s"), one key and many, got and missed, with
// and without the keep-alives; the session holds exactly what the report
// says.
func TestSliceReportFormats(t *testing.T) {
	e := newEnv(t)
	c := e.conn()
	holder := e.conn()
	free, busy := Int64Key(18101), PairKey(18, 102)
	_, err := holder.Exec(e.ctx, "SELECT pg_advisory_lock(18, 102)")
	must(t, err)
	held := func() int {
		var n int
		must(t, c.QueryRow(e.ctx, `SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid() AND granted`).Scan(&n))
		return n
	}
	for _, ms := range []int64{1, 999, 1000} {
		for _, ka := range [][]any{nil, keepaliveArgs(time.Second)} {
			for _, tc := range []struct {
				sql  string
				want bool
			}{
				{oneSliceSQL(free, ModeExclusive, ms, nil, 1), true},
				{oneSliceSQL(busy, ModeExclusive, ms, nil, 1), false},
				{manySliceSQL([]Key{free, busy}, ModeExclusive, ms, ka), false},
				{manySliceSQL([]Key{free}, ModeShared, ms, ka), true},
			} {
				got, err := sliceReport(c.PgConn().Exec(e.ctx, tc.sql).ReadAll())
				if err != nil || (got == 1) != tc.want {
					t.Errorf("%d ms slice (keep-alives %v): report %v, %v; want %v", ms, ka != nil, got, err, tc.want)
				}
				if n := held(); (n == 1) != tc.want || n > 1 {
					t.Errorf("%d ms slice: the session holds %d locks after a report of %v", ms, n, got)
				}
				_, err = c.Exec(e.ctx, "SELECT pg_advisory_unlock_all()")
				must(t, err)
			}
		}
	}
	_, err = holder.Exec(e.ctx, "SELECT pg_advisory_unlock_all()")
	must(t, err)
}

// Checked, sound: the handler's THEN branch (a grant that landed as the
// slice ended), which only a hand-off race reaches through the API, runs
// without error. Reached here by a
// session that already holds the key shared (never the case for a slice,
// whose session holds nothing) asking for it exclusively: the handler
// finds the session's granted row and reports the slice as got.
func TestSliceHandlerGrantedBranch(t *testing.T) {
	e := newEnv(t)
	c := e.conn()
	holder := e.conn()
	key := Int64Key(18201)
	for _, conn := range []*pgx.Conn{c, holder} {
		_, err := conn.Exec(e.ctx, "SELECT pg_advisory_lock_shared(18201)")
		must(t, err)
	}
	got, err := sliceReport(c.PgConn().Exec(e.ctx, oneSliceSQL(key, ModeExclusive, 20, nil, 1)).ReadAll())
	if err != nil || got != 1 {
		t.Errorf("the handler's granted branch reported %v, %v; want 1", got, err)
	}
	for _, conn := range []*pgx.Conn{c, holder} {
		_, err := conn.Exec(e.ctx, "SELECT pg_advisory_unlock_all()")
		must(t, err)
	}
}
