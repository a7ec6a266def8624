package advisory

import (
	"context"
	"fmt"
	"os"
	"strings"
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

	mu      sync.Mutex
	pools   []*testPool
	conns   []*pgx.Conn
	closers []func() // what the test owns, closed after the checks, last first
}

// testPool is a pool made by env.pool, with every connection it holds open
// (added on connect, removed when the pool closes it).
type testPool struct {
	*pgxpool.Pool
	mu    sync.Mutex
	conns map[*pgx.Conn]struct{}
}

// newEnv starts a test on the shared server. When the test ends, while
// every pool and connection the test made is still open, it checks that no
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
	t.Cleanup(func() { goleak.VerifyNone(t, goleak.IgnoreAnyFunction(abandonedCloseFunc)) })
	ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
	t.Cleanup(cancel)
	e := &env{t: t, ctx: ctx, dsn: dsn}
	t.Cleanup(e.end)
	return e
}

// end runs the end-of-test checks, then closes what the test owns.
func (e *env) end() {
	defer e.closeOwned()
	for _, p := range e.pools {
		e.checkReleased(p)
	}
	e.checkNoLocks()
}

// own registers a closer, run after the end-of-test checks.
func (e *env) own(close func()) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.closers = append(e.closers, close)
}

func (e *env) closeOwned() {
	for i := len(e.closers) - 1; i >= 0; i-- {
		e.closers[i]()
	}
}

// failedGrace is how long the end-of-test checks wait for a state after the
// test already failed: it may have stopped with a lock held, and waiting
// the full testTimeout for that would only delay the tests after it.
const failedGrace = 2 * time.Second

// grace is how long an end-of-test check waits for the server or a pool to
// settle.
func (e *env) grace() time.Duration {
	if e.t.Failed() {
		return failedGrace
	}
	return testTimeout
}

// pool returns a pool on the test's server. When the test ends, before it
// is closed, it must have no connection acquired (checked by env.end).
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
	e.own(func() { e.closePool(tp) })
	return pool
}

// checkReleased fails the test if p still has a connection acquired once
// the pool has settled. Then it ends what holds them: the library's
// sessions on the pool (ReleaseAll), and the sockets of its connections, so
// that a statement stuck on one fails and its holder can give it back.
func (e *env) checkReleased(p *testPool) {
	n := awaitReleased(p.Pool, e.grace())
	if n == 0 {
		return
	}
	e.t.Errorf("pool has %d connections still acquired at the end of the test", n)
	ctx, cancel := context.WithTimeout(context.Background(), failedGrace)
	defer cancel()
	_ = ReleaseAll(ctx, p.Pool)
	if awaitReleased(p.Pool, failedGrace) == 0 {
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	for c := range p.conns {
		_ = c.PgConn().Conn().Close() // net.Conn.Close is safe while another goroutine uses it
	}
}

// abandonedCloseFunc is the goroutine that closes a pool whose Close blocks
// (a connection the test acquired and never gives back); goleak ignores it,
// as env.end has already reported that connection.
const abandonedCloseFunc = "github.com/seed0ad592b7/advisory.closeInBackground.func1"

// closePool closes p, giving up (and failing the test) if pool.Close still
// blocks after the connections' sockets were closed.
func (e *env) closePool(p *testPool) {
	done := closeInBackground(p.Pool)
	select {
	case <-done:
	case <-time.After(failedGrace):
		e.t.Errorf("pool.Close blocks: the test still holds an acquired connection; abandoned so the next tests run")
	}
}

func closeInBackground(pool *pgxpool.Pool) <-chan struct{} {
	done := make(chan struct{})
	go func() {
		defer close(done)
		pool.Close()
	}()
	return done
}

// awaitReleased returns the pool's acquired connection count once it is
// zero, or after grace. A connection the library closed is handed back
// at once but leaves the acquired count only when pgxpool has destroyed it,
// in the background, a moment later (SPEC §2); a connection still held
// never leaves it.
func awaitReleased(pool *pgxpool.Pool, grace time.Duration) int32 {
	deadline := time.Now().Add(grace)
	for {
		n := pool.Stat().AcquiredConns()
		if n == 0 || time.Now().After(deadline) {
			return n
		}
		time.Sleep(time.Millisecond) // pgxpool offers nothing to wait on
	}
}

// awaitAcquired waits until pool has want connections acquired, failing
// the test after testTimeout. A connection the library closes leaves the
// count a moment after it was handed back (see awaitReleased).
func awaitAcquired(t testing.TB, pool *pgxpool.Pool, want int32) {
	t.Helper()
	deadline := time.Now().Add(testTimeout)
	for {
		n := pool.Stat().AcquiredConns()
		if n == want {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("pool has %d connections acquired; want %d", n, want)
		}
		time.Sleep(time.Millisecond) // pgxpool offers nothing to wait on
	}
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

// openPIDs returns the backend pids of the connections the test still has
// open, naming each: a lock one of them holds cannot go away by waiting.
func (e *env) openPIDs() map[uint32]string {
	pids := make(map[uint32]string)
	for i, p := range e.pools {
		p.mu.Lock()
		for c := range p.conns {
			pids[c.PgConn().PID()] = fmt.Sprintf("a connection of the test's pool #%d", i+1)
		}
		p.mu.Unlock()
	}
	for _, c := range e.conns {
		if !c.IsClosed() {
			pids[c.PgConn().PID()] = "a connection the test opened with env.conn"
		}
	}
	return pids
}

// lockLeftSQL lists the advisory lock rows of the current database: pid,
// key row, mode, granted.
const lockLeftSQL = `SELECT pid, classid::int8, objid::int8, objsubid, mode, granted FROM pg_locks
	WHERE locktype = 'advisory' AND database = (SELECT oid FROM pg_database WHERE datname = current_database())`

// checkNoLocks fails the test if an advisory lock is left on the server. A
// lock held by a connection the test still has open is reported at once; a
// lock of any other backend is awaited (a closed connection's backend ends
// a moment after the close) for e.grace(). It never stops the test, so the
// test's connections are closed after it.
func (e *env) checkNoLocks() {
	e.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), e.grace()+failedGrace)
	defer cancel()
	c, err := pgx.Connect(ctx, e.dsn)
	if err != nil {
		e.t.Errorf("no advisory lock left on the server: cannot check: %v", err)
		return
	}
	defer c.Close(context.Background())
	open := e.openPIDs()
	deadline := time.Now().Add(e.grace())
	for {
		var left []string
		settled := true
		rows, err := c.Query(ctx, lockLeftSQL)
		if err != nil {
			e.t.Errorf("no advisory lock left on the server: cannot check: %v", err)
			return
		}
		var (
			pid            uint32
			classid, objid int64
			objsubid       int16
			mode           string
			granted        bool
		)
		_, err = pgx.ForEachRow(rows, []any{&pid, &classid, &objid, &objsubid, &mode, &granted}, func() error {
			key, _ := KeyFromLockRow(uint32(classid), uint32(objid), objsubid)
			who, isOpen := open[pid]
			if !isOpen {
				who, settled = "a backend whose connection the test closed", false
			}
			left = append(left, fmt.Sprintf("%s %s (granted %v) held by pid %d, %s", key, mode, granted, pid, who))
			return nil
		})
		if err != nil {
			e.t.Errorf("no advisory lock left on the server: cannot check: %v", err)
			return
		}
		if len(left) == 0 {
			return
		}
		if settled || time.Now().After(deadline) {
			e.t.Errorf("advisory lock left on the server at the end of the test:\n  %s", strings.Join(left, "\n  "))
			return
		}
		time.Sleep(2 * time.Millisecond) // polling a server state
	}
}

// eventually awaits a server state: it runs cond on a fresh connection until
// it returns true, failing the test if that does not happen within
// testTimeout.
func (e *env) eventually(what string, cond func(*pgx.Conn) (bool, error)) {
	e.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
	defer cancel()
	c, err := pgx.Connect(ctx, e.dsn)
	if err != nil {
		e.t.Fatalf("%s: %v", what, err)
	}
	defer c.Close(context.Background())
	for {
		ok, err := cond(c)
		if err != nil {
			e.t.Fatalf("%s: %v", what, err)
		}
		if ok {
			return
		}
		select {
		case <-ctx.Done():
			e.t.Fatalf("timed out waiting for: %s", what)
		case <-time.After(2 * time.Millisecond):
		}
	}
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
