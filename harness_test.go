package advisory

import (
	"context"
	"fmt"
	"os"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"go.uber.org/goleak"

	"github.com/seed0ad592b7/advisory/internal/pgtest"
)

// server is the PostgreSQL every test in the package uses (SPEC §8).
var server *pgtest.Server

func TestMain(m *testing.M) {
	if spec := os.Getenv(envFairChild); spec != "" {
		os.Exit(fairChild(spec)) // a process of TestCohortFairAcrossProcesses
	}
	os.Exit(pgtest.RunMain(m, pgtest.Options{}, func(s *pgtest.Server) {
		server = s
		os.Setenv("DATABASE_URL", s.DSN) // where the examples (example_test.go) connect, as a program would
	}))
}

// testTimeout bounds every wait in a test, so a broken promise fails the test
// instead of hanging it. It is generous: go test runs packages in parallel
// (internal/mutexcheck and internal/pgtest start servers and processes of
// their own) on machines whose CPU is shared, and a test that opens a
// connection per round can take several times its unloaded duration.
const testTimeout = 60 * time.Second

// env is one test's view of the server: a context, the pools and
// connections made for it, and the checks that run when it ends.
type env struct {
	t     *testing.T
	ctx   context.Context
	dsn   string
	admin *pgx.Conn // for the test's own queries about the server; see adminConn

	mu    sync.Mutex
	pools []*testPool
	conns []*pgx.Conn
	owned *pgtest.Owned // what the test owns, closed after the checks, last first
}

// testPool is a pool made by env.pool, with every connection it holds open
// (added on connect, removed when the pool closes it).
type testPool struct {
	*pgxpool.Pool
	mu    sync.Mutex
	conns map[*pgx.Conn]struct{}
}

// newEnv starts a test on the shared server. When the test ends
// (pgtest.CheckAtEnd), while every pool and connection the test made is
// still open, it checks that no
// pool has a connection still acquired and that no advisory lock is left on
// the server's database; then it closes them, and checks that no goroutine
// is left (goleak). So a lock leaked onto an idle pooled connection, or
// left on one of the test's own connections, is reported: closing them
// first would free it unseen (harness_probe_test.go proves the checks
// fail).
//
// A check never hangs the package: after a test that already failed it
// waits only briefly, and what the test still holds is closed by force
// (its sessions ended with ReleaseAll, its connections' sockets closed), so
// the tests after it still run.
func newEnv(t *testing.T) *env {
	return newEnvOn(t, server)
}

func newEnvOn(t *testing.T, srv *pgtest.Server) *env {
	t.Helper()
	return newEnvDSN(t, srv.DSN)
}

// newEnvDSN is newEnv on the server dsn reaches; with a multi-host dsn the
// checks at the end look at whichever server it reaches then.
func newEnvDSN(t *testing.T, dsn string) *env {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
	e := &env{t: t, ctx: ctx, dsn: dsn}
	e.owned = pgtest.CheckAtEnd(t, pgtest.EndCheck{
		DSN:   dsn,
		Open:  e.open,
		Free:  e.free,
		Grace: testTimeout,
		Key: func(classid, objid uint32, objsubid int16) string {
			key, _ := KeyFromLockRow(classid, objid, objsubid)
			return key.String()
		},
		Goroutines: func() error { return goleak.Find(goleak.IgnoreAnyFunction(pgtest.AbandonedClose)) },
	})
	e.own(cancel) // closed last
	return e
}

// own registers a closer, run after the end-of-test checks.
func (e *env) own(close func()) { e.owned.Own(close) }

// pool returns a pool on the test's server. When the test ends, before it
// is closed, it must have no connection acquired (checked by the end-of-test check).
func (e *env) pool(mods ...func(*pgxpool.Config)) *pgxpool.Pool {
	e.t.Helper()
	cfg, err := pgxpool.ParseConfig(e.dsn)
	if err != nil {
		e.t.Fatal(err)
	}
	for _, mod := range mods {
		mod(cfg)
	}
	tp := &testPool{conns: make(map[*pgx.Conn]struct{})}
	afterConnect, beforeClose := cfg.AfterConnect, cfg.BeforeClose
	cfg.AfterConnect = func(ctx context.Context, c *pgx.Conn) error {
		tp.mu.Lock()
		tp.conns[c] = struct{}{}
		tp.mu.Unlock()
		if afterConnect != nil {
			return afterConnect(ctx, c)
		}
		return nil
	}
	cfg.BeforeClose = func(c *pgx.Conn) {
		tp.mu.Lock()
		delete(tp.conns, c)
		tp.mu.Unlock()
		if beforeClose != nil {
			beforeClose(c)
		}
	}
	pool, err := pgxpool.NewWithConfig(e.ctx, cfg)
	if err != nil {
		e.t.Fatal(err)
	}
	tp.Pool = pool
	e.mu.Lock()
	e.pools = append(e.pools, tp)
	e.mu.Unlock()
	e.own(func() { pgtest.ClosePool(e.t, tp.Pool) })
	return pool
}

// free ends what holds the acquired connections of pools (reported by
// the end-of-test check): the library's sessions on each pool
// (ReleaseAll), and failing that the sockets of its connections, so that a
// statement stuck on one fails and its holder can give it back.
func (e *env) free(pools []*pgxpool.Pool) {
	for _, pool := range pools {
		ctx, cancel := context.WithTimeout(context.Background(), pgtest.FailedGrace)
		_ = ReleaseAll(ctx, pool)
		cancel()
		if pgtest.AwaitReleased(pool, pgtest.FailedGrace) == 0 {
			continue
		}
		for _, p := range e.pools {
			if p.Pool != pool {
				continue
			}
			p.mu.Lock()
			for c := range p.conns {
				_ = c.PgConn().Conn().Close() // net.Conn.Close is safe while another goroutine uses it
			}
			p.mu.Unlock()
		}
	}
}

// awaitAcquired waits until pool has want connections acquired, failing
// the test after testTimeout. A connection the library closes leaves the
// count a moment after it was handed back (see pgtest.AwaitReleased).
func awaitAcquired(t testing.TB, pool *pgxpool.Pool, want int32) {
	t.Helper()
	var n int32
	defer func() {
		if t.Failed() {
			t.Logf("the pool had %d connections acquired", n)
		}
	}()
	pgtest.Await(t, fmt.Sprintf("%d connections acquired from the pool", want), testTimeout, func() (bool, error) {
		n = pool.Stat().AcquiredConns()
		return n == want, nil
	})
}

// conn returns a plain connection, closed after the end-of-test checks: a
// lock the test leaves on it is reported.
func (e *env) conn() *pgx.Conn {
	e.t.Helper()
	c, err := pgx.Connect(e.ctx, e.dsn)
	if err != nil {
		e.t.Fatal(err)
	}
	e.keep(c)
	return c
}

// keep makes c one of the test's connections: a lock left on it is
// reported when the test ends, and it is closed after that check.
func (e *env) keep(c *pgx.Conn) {
	e.mu.Lock()
	e.conns = append(e.conns, c)
	e.mu.Unlock()
	e.own(func() { c.Close(context.Background()) })
}

// open returns what the test still has open, for the end-of-test check:
// its pools, and the backends of its open connections, named (a lock one
// of them holds cannot go away by waiting).
func (e *env) open() pgtest.Open {
	e.mu.Lock()
	defer e.mu.Unlock()
	open := pgtest.Open{PIDs: make(map[uint32]string)}
	for i, p := range e.pools {
		open.Pools = append(open.Pools, p.Pool)
		p.mu.Lock()
		for c := range p.conns {
			open.PIDs[c.PgConn().PID()] = fmt.Sprintf("a connection of the test's pool #%d", i+1)
		}
		p.mu.Unlock()
	}
	for _, c := range e.conns {
		if !c.IsClosed() {
			open.PIDs[c.PgConn().PID()] = "a connection the test opened with env.conn"
		}
	}
	return open
}

// eventually awaits a server state: it runs cond on a fresh connection until
// it returns true, failing the test, saying what it awaited, if that does
// not happen within notHung.
func (e *env) eventually(what string, cond func(*pgx.Conn) (bool, error)) {
	e.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), notHung)
	defer cancel()
	c, err := pgx.Connect(ctx, e.dsn)
	if err != nil {
		e.t.Fatalf("%s: %v", what, err)
	}
	defer c.Close(context.Background())
	pgtest.Await(e.t, what+" (on the server)", notHung, func() (bool, error) { return cond(c) })
}

// lockRows returns the advisory pg_locks rows for key: pid, mode, granted.
type lockRow struct {
	PID     uint32
	Mode    string
	Granted bool
}

func (e *env) lockRows(key Key) []lockRow {
	e.t.Helper()
	classid, objid, objsubid := key.LockRow()
	rows, err := e.adminConn().Query(e.ctx, `SELECT pid, mode, granted FROM pg_locks WHERE locktype = 'advisory'
		AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
		AND classid::int8 = $1 AND objid::int8 = $2 AND objsubid = $3 ORDER BY pid, mode`,
		int64(classid), int64(objid), objsubid)
	if err != nil {
		e.t.Fatal(err)
	}
	out, err := pgx.CollectRows(rows, pgx.RowToStructByPos[lockRow])
	if err != nil {
		e.t.Fatal(err)
	}
	return out
}

// acquire acquires key from pool (Acquire), stopping the test if it
// cannot.
func (e *env) acquire(pool *pgxpool.Pool, key Key) *Lock {
	e.t.Helper()
	l, err := Acquire(e.ctx, pool, key)
	if err != nil {
		e.t.Fatalf("Acquire %v: %v", key, err)
	}
	return l
}

// begin begins a transaction on a connection from pool, rolled back when
// the test ends (before the end-of-test checks) unless it ended before.
func (e *env) begin(pool *pgxpool.Pool) pgx.Tx {
	e.t.Helper()
	tx, err := pool.Begin(e.ctx)
	if err != nil {
		e.t.Fatalf("begin: %v", err)
	}
	e.t.Cleanup(func() { _ = tx.Rollback(e.ctx) })
	return tx
}

// table makes a table of the test's own on the admin connection: it drops
// any table of that name, runs create, and drops the table again when the
// test ends, before the end-of-test checks. A statement that fails stops
// the test.
func (e *env) table(name string, create ...string) {
	e.t.Helper()
	admin := e.adminConn()
	for _, sql := range append([]string{"DROP TABLE IF EXISTS " + name}, create...) {
		if _, err := admin.Exec(e.ctx, sql); err != nil {
			e.t.Fatalf("making table %s: %v", name, err)
		}
	}
	e.t.Cleanup(func() {
		// Bounded: a transaction the test left open on the table would
		// block the drop until the connection closes, after this.
		ctx, cancel := context.WithTimeout(context.Background(), pgtest.FailedGrace)
		defer cancel()
		_, _ = admin.Exec(ctx, "DROP TABLE IF EXISTS "+name)
	})
}

// adminConn is one plain connection for the test's questions to the server,
// opened on first use.
func (e *env) adminConn() *pgx.Conn {
	if e.admin == nil {
		e.admin = e.conn()
	}
	return e.admin
}

// awaitWaiter waits until n backends wait on an advisory lock of this
// database, as the server sees it.
func (e *env) awaitWaiters(n int) {
	e.t.Helper()
	e.eventually(fmt.Sprintf("%d backends waiting on an advisory lock", n), func(c *pgx.Conn) (bool, error) {
		var got int
		err := c.QueryRow(context.Background(), `SELECT count(*) FROM pg_stat_activity
			WHERE wait_event_type = 'Lock' AND wait_event = 'advisory' AND datname = current_database()`).Scan(&got)
		return got == n, err
	})
}

// tryFrom reports whether a plain connection can take key at once (and
// releases it again if it could).
func (e *env) tryFrom(c *pgx.Conn, key Key) bool {
	e.t.Helper()
	var ok bool
	if err := c.QueryRow(e.ctx, lockSQL[scopeSession][ModeExclusive][waitTry][key.space-1], key.args()...).Scan(&ok); err != nil {
		e.t.Fatal(err)
	}
	if ok {
		if _, err := c.Exec(e.ctx, unlockSQL[ModeExclusive][key.space-1], key.args()...); err != nil {
			e.t.Fatal(err)
		}
	}
	return ok
}

// queryCounter is a pgx tracer that counts the statements a pool sends.
type queryCounter struct{ n atomic.Int64 }

func (q *queryCounter) TraceQueryStart(ctx context.Context, _ *pgx.Conn, _ pgx.TraceQueryStartData) context.Context {
	q.n.Add(1)
	return ctx
}

func (q *queryCounter) TraceQueryEnd(context.Context, *pgx.Conn, pgx.TraceQueryEndData) {}

// mustNotErr fails the test on err.
func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

// receive awaits a value on ch, failing the test after notHung.
func receive[T any](e *env, ch <-chan T, what string) T {
	e.t.Helper()
	select {
	case v := <-ch:
		return v
	case <-time.After(notHung):
		e.t.Fatalf("not done after %v: %s", notHung, what)
		panic("unreachable")
	}
}
