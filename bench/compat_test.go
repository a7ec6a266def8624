package bench

import (
	"context"
	"database/sql"
	"net"
	"net/url"
	"strconv"
	"testing"
	"time"

	"github.com/golang-migrate/migrate/v4/database"
	migratepgx "github.com/golang-migrate/migrate/v4/database/pgx/v5"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	gooselock "github.com/pressly/goose/v3/lock"

	"github.com/seed0ad592b7/advisory"
	"github.com/seed0ad592b7/advisory/compat"
)

// TestCompatFormulas compares package compat with the tools' own functions.
func TestCompatFormulas(t *testing.T) {
	for _, c := range [][3]string{
		{"postgres", "public", "schema_migrations"},
		{"/postgres", "public", "schema_migrations"},
		{"app_production", "billing", "migrations"},
		{"", "", ""},
		{"ünïcødé ✓", "s", "t\x00u"},
	} {
		id, err := database.GenerateAdvisoryLockId(c[0], c[1], c[2])
		if err != nil {
			t.Fatal(err)
		}
		want, err := strconv.ParseInt(id, 10, 64)
		if err != nil {
			t.Fatalf("GenerateAdvisoryLockId%q = %q: %v", c, id, err)
		}
		if got := compat.GolangMigrate(c[0], c[1], c[2]); got != advisory.Int64Key(want) {
			t.Errorf("compat.GolangMigrate%q = %s, golang-migrate says %s", c, got, id)
		}
	}
	if got, want := compat.Goose(), advisory.Int64Key(gooselock.DefaultLockID); got != want {
		t.Errorf("compat.Goose() = %s, goose's DefaultLockID is %s", got, want)
	}
}

// TestCompatToolsLockTheKey runs the tools' own lock code against the server
// and checks that the one advisory lock it takes is compat's key: the
// golang-migrate pgx/v5 driver opened both ways (WithInstance hashes
// current_database(), Open the URL's path with its slash) and goose's
// default session locker.
func TestCompatToolsLockTheKey(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	monitor, err := pgx.Connect(ctx, dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer monitor.Close(context.Background())
	pool, err := pgxpool.New(ctx, dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		if n := pool.Stat().AcquiredConns(); n != 0 {
			t.Errorf("%d pool connections still acquired", n)
		}
		pool.Close()
	}()
	cfg := monitor.Config()
	var current string
	if err := monitor.QueryRow(ctx, "SELECT current_database()").Scan(&current); err != nil {
		t.Fatal(err)
	}
	// The table golang-migrate creates is dropped again at the end.
	defer func() {
		if _, err := monitor.Exec(context.Background(), "DROP TABLE IF EXISTS public.schema_migrations"); err != nil {
			t.Error(err)
		}
	}()

	db, err := sql.Open("pgx", dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()

	// WithInstance, as a Go program embedding golang-migrate does.
	inst, err := migratepgx.WithInstance(db, &migratepgx.Config{})
	if err != nil {
		t.Fatal(err)
	}
	expectLockedBy(ctx, t, monitor, pool, "migrate WithInstance", inst.Lock, inst.Unlock,
		compat.GolangMigrate(current, "public", "schema_migrations"))
	if err := inst.Close(); err != nil { // closes db as well
		t.Fatal(err)
	}

	// Open with a URL, as migrate.New and the migrate CLI do.
	u := url.URL{Scheme: "pgx5", User: url.UserPassword(cfg.User, cfg.Password),
		Host: net.JoinHostPort(cfg.Host, strconv.Itoa(int(cfg.Port))), Path: "/" + cfg.Database, RawQuery: "sslmode=disable"}
	opened, err := (&migratepgx.Postgres{}).Open(u.String())
	if err != nil {
		t.Fatal(err)
	}
	defer opened.Close()
	expectLockedBy(ctx, t, monitor, pool, "migrate Open(URL)", opened.Lock, opened.Unlock,
		compat.GolangMigrate("/"+cfg.Database, "public", "schema_migrations"))

	// goose's session locker with its defaults.
	gdb, err := sql.Open("pgx", dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer gdb.Close()
	gconn, err := gdb.Conn(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer gconn.Close()
	locker, err := gooselock.NewPostgresSessionLocker()
	if err != nil {
		t.Fatal(err)
	}
	expectLockedBy(ctx, t, monitor, pool, "goose",
		func() error { return locker.SessionLock(ctx, gconn) },
		func() error { return locker.SessionUnlock(ctx, gconn) },
		compat.Goose())
}

// expectLockedBy calls lock, checks that the server then shows exactly one
// advisory lock, granted, whose pg_locks row is want's, and that
// advisory.Acquire cannot take want; then calls unlock and checks that no
// advisory lock is left.
func expectLockedBy(ctx context.Context, t *testing.T, monitor *pgx.Conn, pool *pgxpool.Pool, tool string, lock, unlock func() error, want advisory.Key) {
	t.Helper()
	if err := lock(); err != nil {
		t.Fatalf("%s: lock: %v", tool, err)
	}
	var classid, objid uint32
	var objsubid int16
	err := monitor.QueryRow(ctx, `SELECT classid::int8, objid::int8, objsubid FROM pg_locks
		WHERE locktype = 'advisory' AND granted
		AND database = (SELECT oid FROM pg_database WHERE datname = current_database())`).Scan(&classid, &objid, &objsubid)
	if err != nil {
		t.Fatalf("%s: its one advisory lock row: %v", tool, err)
	}
	wc, wo, ws := want.LockRow()
	t.Logf("%s locks classid=%d objid=%d objsubid=%d; compat says %s", tool, classid, objid, objsubid, want)
	if classid != wc || objid != wo || objsubid != ws {
		t.Errorf("%s locks classid=%d objid=%d objsubid=%d, compat's %s is %d %d %d", tool, classid, objid, objsubid, want, wc, wo, ws)
	}
	if hs, err := advisory.Holders(ctx, monitor, want); err != nil || len(hs) != 1 || !hs[0].Granted {
		t.Errorf("%s: advisory.Holders(%s) = %+v, %v; want the tool's one session", tool, want, hs, err)
	}
	l, err := advisory.Acquire(ctx, pool, want, advisory.NoWait())
	if err != nil {
		t.Fatalf("%s: advisory.Acquire(%s): %v", tool, want, err)
	}
	if l.Acquired() {
		t.Errorf("%s: advisory.Acquire(%s) succeeded while the tool held its lock", tool, want)
		if err := l.Release(ctx); err != nil {
			t.Fatal(err)
		}
	}
	if err := unlock(); err != nil {
		t.Fatalf("%s: unlock: %v", tool, err)
	}
	if hs, err := advisory.AllHolders(ctx, monitor); err != nil || len(hs) != 0 {
		t.Errorf("%s: advisory locks left after its unlock: %+v, %v", tool, hs, err)
	}
}
