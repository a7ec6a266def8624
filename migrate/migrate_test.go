package advisorymigrate_test

import (
	"database/sql"
	"errors"
	"fmt"
	"net/url"
	"os"
	"strings"
	"testing"
	"testing/fstest"

	"github.com/golang-migrate/migrate/v4"
	"github.com/golang-migrate/migrate/v4/source/iofs"

	"github.com/seed0ad592b7/advisory"
	"github.com/seed0ad592b7/advisory/compat"
	"github.com/seed0ad592b7/advisory/internal/migrationtest"
	"github.com/seed0ad592b7/advisory/internal/pgtest"
)

// The tests migrate a real PostgreSQL (migrationtest.RunMain), each in a
// database of its own; instances that must be killed are child processes
// of the test binary (TestInstance).
var server *pgtest.Server

func TestMain(m *testing.M) { os.Exit(migrationtest.RunMain(m, &server)) }

// migrations are the test's: a table, made in one implicit transaction
// that records which backend ran it in runs (a table the test made) and
// sleeps for sleep seconds (so that a test can find it running, or kill it
// mid-statement), then an index built concurrently.
func migrations(sleep string) fstest.MapFS {
	return fstest.MapFS{
		"1_items.up.sql":    {Data: []byte(migrationtest.ItemsSQL(sleep))},
		"2_items_id.up.sql": {Data: []byte(migrationtest.IndexSQL)},
	}
}

// keys are the two keys golang-migrate's pgx/v5 driver locks in the
// database dsn names, with the default schema and table: as WithInstance
// spells the database, and as migrate.New and the CLI do.
func keys(t *testing.T, dsn string) (api, cli advisory.Key) {
	t.Helper()
	u, err := url.Parse(dsn)
	if err != nil {
		t.Fatal(err)
	}
	name := strings.TrimPrefix(u.Path, "/")
	return compat.GolangMigrate(name, "public", "schema_migrations"), compat.GolangMigrate("/"+name, "public", "schema_migrations")
}

// migratePlain runs golang-migrate without a guard: through its Go API
// (WithInstance, on an ordinary *sql.DB) or as its CLI does (migrate.New
// with a database URL).
func migratePlain(dsn, how string, fsys fstest.MapFS) (applied bool, err error) {
	var m *migrate.Migrate
	switch how {
	case "api":
		db, err := sql.Open("pgx", dsn)
		if err != nil {
			return false, err
		}
		if m, err = newMigrate(db, fsys); err != nil {
			return false, errors.Join(err, db.Close())
		}
	case "cli":
		src, err := iofs.New(fsys, ".")
		if err != nil {
			return false, err
		}
		if m, err = migrate.NewWithSourceInstance("iofs", src, "pgx5"+strings.TrimPrefix(dsn, "postgres")); err != nil {
			return false, err
		}
	default:
		return false, fmt.Errorf("unknown plain instance %q", how)
	}
	err = m.Up()
	applied = err == nil
	if errors.Is(err, migrate.ErrNoChange) {
		err = nil
	}
	srcErr, dbErr := m.Close()
	return applied, errors.Join(err, srcErr, dbErr)
}

// TestInstance is not a test: it is one instance, run by the tests below
// as a child process (migrationtest.Start), migrating with the recipe;
// SLEEP says how long migration 1 sleeps.
func TestInstance(t *testing.T) {
	if os.Getenv(migrationtest.EnvRole) == "" {
		return // run as a test of its own: nothing to do
	}
	ctx := migrationtest.Context(t)
	applied, err := migrateGuarded(ctx, os.Getenv(migrationtest.EnvDSN), migrations(os.Getenv("SLEEP")))
	migrationtest.Report(os.Stdout, "applied", applied)
	if err != nil {
		t.Fatal(err)
	}
}

// N instances start at once: exactly one migrates (CREATE INDEX
// CONCURRENTLY included) on the session that holds the key, the others wait
// and then find nothing to do; no waiter holds a snapshot for as long as
// deadlock_timeout.
func TestInstancesAtOnce(t *testing.T) {
	dsn, c := migrationtest.Prepare(t, server)
	key, _ := keys(t, dsn)
	const n = 4
	applied, waiters := migrationtest.AtOnce(t, c, key, dsn, n)
	if applied["true"] != 1 || applied["false"] != n-1 {
		t.Errorf("instances that applied migrations: %v; want one true and %d false", applied, n-1)
	}
	migrationtest.CheckMigrated(t, c)
	waiters.Check(t, c)
}

// The migrating instance is killed (SIGKILL) in the middle of its
// migration's statement: until the dead instance's backend has ended, it
// holds the key and nobody else holds it; the next instance then finds the
// version dirty (golang-migrate's own guard against a half-run migration)
// and migrates nothing. (The dead instance's statement ran to its end on
// the server; one implicit transaction, it committed then.)
func TestKilledMigrator(t *testing.T) {
	dsn, c := migrationtest.Prepare(t, server)
	// migrate's own lock takes only the api spelling: a migration running on
	// a backend that holds the cli spelling runs on the recipe's session.
	_, key := keys(t, dsn)
	dead, b := migrationtest.KillMigrator(t, server, c, key, dsn)
	if err := b.Wait(t); err == nil || !strings.Contains(b.Output(), "Dirty database version 1") {
		t.Errorf("the next instance: %v; want golang-migrate's dirty version error; output:\n%s", err, b.Output())
	}
	// The dead instance's statement (one implicit transaction) may have
	// committed as it ended, after its client was gone; nobody else ran it.
	if pids := migrationtest.Runners(t, c); len(pids) > 1 || len(pids) == 1 && pids[0] != dead {
		t.Errorf("migration 1 committed by backends %v; want at most the dead instance's %d", pids, dead)
	}
}

// Guarded and plain instances (golang-migrate's Go API and its CLI's way)
// exclude each other, both ways: whichever comes second waits on the
// server, then finds nothing to do. A guarded waiter leaves a plain
// migrator's CREATE INDEX CONCURRENTLY alone.
func TestExcludesPlain(t *testing.T) {
	for _, how := range []string{"api", "cli"} {
		for _, plainFirst := range []bool{true, false} {
			t.Run(fmt.Sprintf("%s/plain-first=%v", how, plainFirst), func(t *testing.T) {
				dsn, c := migrationtest.Prepare(t, server)
				api, cli := keys(t, dsn)
				key := map[string]advisory.Key{"api": api, "cli": cli}[how]
				ctx := migrationtest.Context(t)
				type result struct {
					applied bool
					err     error
				}
				fsys := migrations("1.5")
				start := func(plain bool) <-chan result {
					ch := make(chan result, 1)
					go func() {
						var r result
						if plain {
							r.applied, r.err = migratePlain(dsn, how, fsys)
						} else {
							r.applied, r.err = migrateGuarded(ctx, dsn, fsys)
						}
						ch <- r
					}()
					return ch
				}
				if !plainFirst {
					// A plain instance waits in one pg_advisory_lock, holding
					// a snapshot, so a CREATE INDEX CONCURRENTLY of the
					// guarded migrator would fail with "deadlock detected"
					// (golang-migrate #960; no guard can change another
					// program's wait): exclusion only, without the index.
					fsys = migrations("1.5")
					delete(fsys, "2_items_id.up.sql")
				}
				firstDone := start(plainFirst)
				first := migrationtest.AwaitSleeping(t, c, key, 0)
				secondDone := start(!plainFirst)
				migrationtest.AwaitWaiting(t, c, key, first)
				r1, r2 := <-firstDone, <-secondDone
				if r1.err != nil || r2.err != nil || !r1.applied || r2.applied {
					t.Errorf("first: applied %v, %v; second: applied %v, %v; want the first applying, the second finding nothing, no errors", r1.applied, r1.err, r2.applied, r2.err)
				}
				if pids := migrationtest.Runners(t, c); len(pids) != 1 || pids[0] != first {
					t.Errorf("migration 1 committed by backends %v; want only the first instance's %d", pids, first)
				}
			})
		}
	}
}

// The recipe's session is lost during a migration (its backend, which runs
// the migration, is terminated): the migration fails with the session, and
// the recipe's release reports advisory.ErrLockLost.
func TestLockLostDuringMigration(t *testing.T) {
	dsn, c := migrationtest.Prepare(t, server)
	_, key := keys(t, dsn)
	ctx := migrationtest.Context(t)
	done := make(chan error, 1)
	go func() {
		_, err := migrateGuarded(ctx, dsn, migrations("30"))
		done <- err
	}()
	pid := migrationtest.AwaitSleeping(t, c, key, 0)
	var ok bool
	if err := c.QueryRow(ctx, "SELECT pg_terminate_backend($1)", int64(pid)).Scan(&ok); err != nil || !ok {
		t.Fatalf("pg_terminate_backend = %v, %v", ok, err)
	}
	err := <-done
	if !errors.Is(err, advisory.ErrLockLost) {
		t.Errorf("the recipe whose lock was lost = %v; want an error matching advisory.ErrLockLost", err)
	}
	if err == nil || !strings.Contains(err.Error(), "57P01") {
		t.Errorf("the recipe whose lock was lost = %v; want the migration's failure (57P01) in it", err)
	}
	if pids := migrationtest.Runners(t, c); len(pids) != 0 {
		t.Errorf("migration 1 committed by %v; want nothing committed", pids)
	}
}

// The guarded connection breaks between the guard and migrate: database/sql
// then hands migrate a new connection, which does not hold the guard's
// keys. migrate's own lock still excludes other instances there (in one
// unsliced wait), the migration runs, and the release reports
// advisory.ErrLockLost.
func TestGuardLostBeforeMigrate(t *testing.T) {
	dsn, c := migrationtest.Prepare(t, server)
	api, cli := keys(t, dsn)
	ctx := migrationtest.Context(t)
	db, err := openOne(dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	s, err := guard(ctx, db)
	if err != nil {
		t.Fatal(err)
	}
	backends, err := migrationtest.Activity(ctx, c, cli)
	if err != nil {
		t.Fatal(err)
	}
	var guarded uint32
	for _, b := range backends {
		if b.Holds() {
			guarded = b.PID
		}
	}
	var ok bool
	if err := c.QueryRow(ctx, "SELECT pg_terminate_backend($1)", int64(guarded)).Scan(&ok); err != nil || !ok {
		t.Fatalf("pg_terminate_backend(%d) = %v, %v", guarded, ok, err)
	}
	done := make(chan error, 1)
	var m *migrate.Migrate
	go func() {
		var err error
		if m, err = newMigrate(db, migrations("1")); err == nil {
			err = m.Up()
		}
		done <- err
	}()
	migrating := migrationtest.AwaitSleeping(t, c, api, guarded) // migrate's own lock, on a new connection
	backends, err = migrationtest.Activity(ctx, c, cli)
	if err != nil {
		t.Fatal(err)
	}
	for _, b := range backends {
		if b.PID == migrating && b.Holds() {
			t.Errorf("the new connection %d holds the guard's key", migrating)
		}
	}
	if err := <-done; err != nil {
		t.Errorf("migrate on the replaced connection: %v", err)
	}
	if err := s.Close(ctx); !errors.Is(err, advisory.ErrLockLost) {
		t.Errorf("the guard's release after its connection broke = %v; want ErrLockLost", err)
	}
	if m != nil {
		if srcErr, dbErr := m.Close(); srcErr != nil || dbErr != nil {
			t.Errorf("closing migrate: %v, %v", srcErr, dbErr)
		}
	}
}
