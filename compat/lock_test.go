package compat

import (
	"context"
	"fmt"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"go.uber.org/goleak"

	"github.com/seed0ad592b7/advisory"
	"github.com/seed0ad592b7/advisory/internal/pgtest"
)

// dsn is the throw-away PostgreSQL the tests lock keys on (SPEC §8).
var dsn string

func TestMain(m *testing.M) {
	os.Exit(pgtest.RunMain(m, pgtest.Options{}, func(s *pgtest.Server) { dsn = s.DSN }))
}

// toolStatement is the statement a tool sends to take its lock, with the
// value vectors.py computed (not the Go key) and the tool's way of passing
// it: a literal for the Ruby gems and psycopg's client-side interpolation, a
// bound int8 for sqlx and goose, a string the server reads as a bigint for
// golang-migrate.
type toolStatement struct {
	tool string
	sql  string
	args []any
	key  advisory.Key // what compat says the tool locks
}

func toolStatements(v vector) []toolStatement {
	return []toolStatement{
		{"golang-migrate", fmt.Sprintf("SELECT pg_advisory_lock('%d')", v.migrate), nil, GolangMigrate(v.name, "public", "schema_migrations")},
		{"goose", "SELECT pg_try_advisory_lock($1)", []any{int64(4097083626)}, Goose()},
		{"rails", fmt.Sprintf("SELECT pg_try_advisory_lock(%d)", v.rails), nil, Rails(v.name)},
		{"with_advisory_lock", fmt.Sprintf("SELECT pg_try_advisory_lock(%d,%d) AS t0 /* name */", v.walMinus7[0], v.walMinus7[1]), nil, WithAdvisoryLock(v.name, -7)},
		{"sqlx", "SELECT pg_advisory_lock($1)", []any{v.sqlx}, SQLx(v.name)},
		{"sqlx-migrate", "SELECT pg_advisory_lock($1)", []any{v.sqlxMigrate}, SQLxMigrate(v.name)},
		{"django-pglocks", fmt.Sprintf("SELECT pg_advisory_lock(%d)", v.django), nil, DjangoPglocks(v.name)},
	}
}

// TestToolStatementsLockTheKey takes each tool's lock the way the tool does
// and checks, on the server, that it is the lock compat names: its pg_locks
// row is the key's LockRow, advisory.Acquire cannot take the key while the
// tool holds it, and the tool's statement (as a try) cannot take it while
// advisory holds it.
func TestToolStatementsLockTheKey(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	pool, tool := openChecked(t, ctx)

	for _, v := range vectors {
		for _, s := range toolStatements(v) {
			what := fmt.Sprintf("%s, name %.20q", s.tool, v.name)
			if _, err := tool.Exec(ctx, s.sql, s.args...); err != nil {
				t.Fatalf("%s: %s: %v", what, s.sql, err)
			}
			var classid, objid uint32
			var objsubid int16
			err := tool.QueryRow(ctx, `SELECT classid::int8, objid::int8, objsubid FROM pg_locks
				WHERE locktype = 'advisory' AND pid = pg_backend_pid() AND granted`).Scan(&classid, &objid, &objsubid)
			if err != nil {
				t.Fatalf("%s: the tool's own lock row: %v", what, err)
			}
			wc, wo, ws := s.key.LockRow()
			if classid != wc || objid != wo || objsubid != ws {
				t.Errorf("%s: the tool's statement locks classid=%d objid=%d objsubid=%d; compat's key %s has %d %d %d",
					what, classid, objid, objsubid, s.key, wc, wo, ws)
			}
			if k, err := advisory.KeyFromLockRow(classid, objid, objsubid); err != nil || k != s.key {
				t.Errorf("%s: KeyFromLockRow of the tool's row = %s, %v; want %s", what, k, err, s.key)
			}

			lock, err := advisory.Acquire(ctx, pool, s.key, advisory.NoWait())
			if err != nil {
				t.Fatalf("%s: %v", what, err)
			}
			if lock.Acquired() {
				t.Errorf("%s: advisory.Acquire(%s) succeeded while the tool held its lock", what, s.key)
				if err := lock.Release(ctx); err != nil {
					t.Fatal(err)
				}
			}
			if _, err := tool.Exec(ctx, "SELECT pg_advisory_unlock_all()"); err != nil {
				t.Fatal(err)
			}

			lock, err = advisory.Acquire(ctx, pool, s.key, advisory.NoWait())
			if err != nil || !lock.Acquired() {
				t.Fatalf("%s: advisory.Acquire(%s) of the free key: acquired %v, %v", what, s.key, lock.Acquired(), err)
			}
			try := strings.Replace(s.sql, "pg_advisory_lock(", "pg_try_advisory_lock(", 1)
			var got bool
			if err := tool.QueryRow(ctx, try, s.args...).Scan(&got); err != nil {
				t.Fatalf("%s: %s: %v", what, try, err)
			}
			if got {
				t.Errorf("%s: the tool's %s took the lock advisory holds as %s", what, try, s.key)
				if _, err := tool.Exec(ctx, "SELECT pg_advisory_unlock_all()"); err != nil {
					t.Fatal(err)
				}
			}
			if err := lock.Release(ctx); err != nil {
				t.Fatalf("%s: Release: %v", what, err)
			}
		}
	}
}

// checkAtEnd checks, when the test ends and before it closes them, that
// pool has no connection acquired and that no advisory lock is left in the
// database (a lock on tool's connection is reported at once); then that
// no goroutine is left.
// openChecked opens a pool and a plain connection (the tool's) on the test
// server, both checked and closed when the test ends (checkAtEnd).
func openChecked(t *testing.T, ctx context.Context) (*pgxpool.Pool, *pgx.Conn) {
	t.Helper()
	pool, err := pgxpool.New(ctx, dsn)
	if err != nil {
		t.Fatal(err)
	}
	tool, err := pgx.Connect(ctx, dsn)
	if err != nil {
		pool.Close()
		t.Fatal(err)
	}
	checkAtEnd(t, pool, tool)
	return pool, tool
}

func checkAtEnd(t *testing.T, pool *pgxpool.Pool, tool *pgx.Conn) {
	owned := pgtest.CheckAtEnd(t, pgtest.EndCheck{
		DSN: dsn,
		Open: func() pgtest.Open {
			return pgtest.Open{Pools: []*pgxpool.Pool{pool}, PIDs: map[uint32]string{tool.PgConn().PID(): "the tool's connection"}}
		},
		Grace: 10 * time.Second,
		Key: func(classid, objid uint32, objsubid int16) string {
			key, _ := advisory.KeyFromLockRow(classid, objid, objsubid)
			return key.String()
		},
		Goroutines: func() error { return goleak.Find(goleak.IgnoreAnyFunction(pgtest.AbandonedClose)) },
	})
	owned.Own(func() { pgtest.ClosePool(t, pool) })
	owned.Own(func() { tool.Close(context.Background()) })
}
