package advisory

import (
	"context"
	"fmt"
	"os"
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

// env is one test's view of the server: a context, pools made for it, and
// the checks that run when it ends.
type env struct {
	t     *testing.T
	ctx   context.Context
	dsn   string
	admin *pgx.Conn // for the test's own queries about the server; see adminConn
}

// newEnv starts a test on the shared server. When the test ends it checks,
// in this order: that no pool made with env.pool has a connection still
// acquired; that no advisory lock is left on the server's database (awaited:
// a closed connection's backend ends a moment after the close); and that no
// goroutine is left (goleak).
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
	t.Cleanup(func() { goleak.VerifyNone(t) })
	ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
	t.Cleanup(cancel)
	e := &env{t: t, ctx: ctx, dsn: dsn}
	t.Cleanup(e.checkNoLocks)
	return e
}

// pool returns a pool on the test's server, closed when the test ends after
// checking it has no connection acquired.
func (e *env) pool(mods ...func(*pgxpool.Config)) *pgxpool.Pool {
	e.t.Helper()
	cfg, err := pgxpool.ParseConfig(e.dsn)
	if err != nil {
		e.t.Fatal(err)
	}
	for _, mod := range mods {
		mod(cfg)
	}
	pool, err := pgxpool.NewWithConfig(e.ctx, cfg)
	if err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(func() {
		if n := awaitReleased(pool); n != 0 {
			e.t.Errorf("pool has %d connections still acquired at the end of the test", n)
		}
		pool.Close()
	})
	return pool
}

// awaitReleased returns the pool's acquired connection count once it is
// zero, or after testTimeout. A connection the library closed is handed back
// at once but leaves the acquired count only when pgxpool has destroyed it,
// in the background, a moment later (SPEC §2); a connection still held
// never leaves it.
func awaitReleased(pool *pgxpool.Pool) int32 {
	deadline := time.Now().Add(testTimeout)
	for {
		n := pool.Stat().AcquiredConns()
		if n == 0 || time.Now().After(deadline) {
			return n
		}
		time.Sleep(time.Millisecond) // pgxpool offers nothing to wait on
	}
}

// conn returns a plain connection, closed when the test ends.
func (e *env) conn() *pgx.Conn {
	e.t.Helper()
	c, err := pgx.Connect(e.ctx, e.dsn)
	if err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(func() { c.Close(context.Background()) })
	return c
}

// advisoryRowsSQL counts the advisory lock rows (granted or waiting) of the
// current database.
const advisoryRowsSQL = `SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'
	AND database = (SELECT oid FROM pg_database WHERE datname = current_database())`

func (e *env) checkNoLocks() {
	var n int
	e.eventually("no advisory lock left on the server", func(c *pgx.Conn) (bool, error) {
		err := c.QueryRow(context.Background(), advisoryRowsSQL).Scan(&n)
		return n == 0, err
	})
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
