package advisorymigrate_test

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"testing/fstest"

	"github.com/golang-migrate/migrate/v4"
	pgxv5 "github.com/golang-migrate/migrate/v4/database/pgx/v5"
	"github.com/golang-migrate/migrate/v4/source/iofs"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/stdlib"

	"github.com/seed0ad592b7/advisory"
	"github.com/seed0ad592b7/advisory/compat"
)

// migrateGuarded runs migrate up from fsys on dsn under an advisory guard
// (the recipe in the package documentation). It returns whether this
// instance applied anything.
func migrateGuarded(ctx context.Context, dsn string, fsys fs.FS) (applied bool, err error) {
	// 1. A *sql.DB of exactly one connection: every Conn is the same session.
	db, err := openOne(dsn)
	if err != nil {
		return false, err
	}
	defer db.Close()

	// 2. Take migrate's key on it, waiting in slices (no snapshot held).
	s, err := guard(ctx, db)
	if err != nil {
		return false, err
	}

	// 3. migrate takes the same connection: its own lock is granted at once.
	m, err := newMigrate(db, fsys)
	if err != nil {
		return false, errors.Join(err, s.Close(ctx))
	}
	err = m.Up()
	applied = err == nil
	if errors.Is(err, migrate.ErrNoChange) {
		err = nil
	}
	// 4. Release on the same session (idle now), then close migrate and db.
	releaseErr := s.Close(ctx)
	srcErr, dbErr := m.Close()
	return applied, errors.Join(err, releaseErr, srcErr, dbErr)
}

// openOne opens a *sql.DB of exactly one connection that never expires.
func openOne(dsn string) (*sql.DB, error) {
	db, err := sql.Open("pgx", dsn)
	if err != nil {
		return nil, err
	}
	db.SetMaxOpenConns(1)
	db.SetMaxIdleConns(1)
	db.SetConnMaxLifetime(0)
	db.SetConnMaxIdleTime(0)
	return db, nil
}

// guard takes the keys golang-migrate locks on db's one connection, in
// slices, and returns the Session holding them on it.
func guard(ctx context.Context, db *sql.DB) (s *advisory.Session, err error) {
	conn, err := db.Conn(ctx)
	if err != nil {
		return nil, err
	}
	err = conn.Raw(func(dc any) error {
		pc := dc.(*stdlib.Conn).Conn()
		var name string
		if err := pc.QueryRow(ctx, "SELECT current_database()").Scan(&name); err != nil {
			return err
		}
		keys := []advisory.Key{
			compat.GolangMigrate(name, "public", pgxv5.DefaultMigrationsTable),     // WithInstance's spelling
			compat.GolangMigrate("/"+name, "public", pgxv5.DefaultMigrationsTable), // the CLI's and migrate.New's
		}
		if s, err = advisory.NewConnSession(pc); err != nil {
			return err
		}
		_, err := s.LockMany(ctx, keys)
		return err
	})
	if closeErr := conn.Close(); err == nil {
		err = closeErr
	}
	if err != nil {
		if s != nil {
			err = errors.Join(err, s.Close(ctx))
		}
		return nil, err
	}
	return s, nil
}

// newMigrate is golang-migrate on db (its pgx/v5 driver) with fsys's
// migrations.
func newMigrate(db *sql.DB, fsys fs.FS) (*migrate.Migrate, error) {
	drv, err := pgxv5.WithInstance(db, &pgxv5.Config{})
	if err != nil {
		return nil, err
	}
	src, err := iofs.New(fsys, ".")
	if err != nil {
		return nil, err
	}
	return migrate.NewWithInstance("iofs", src, "pgx5", drv)
}

// Instances of a service run golang-migrate at start-up, guarded: exactly
// one migrates (a CREATE INDEX CONCURRENTLY included); the others wait,
// without holding a snapshot that would block it, then find nothing to do.
func Example_guardedMigrate() {
	ctx := context.Background()
	dsn := os.Getenv("DATABASE_URL")
	fsys := fstest.MapFS{
		"1_accounts.up.sql":       {Data: []byte("CREATE TABLE accounts (id bigint PRIMARY KEY, email text)")},
		"2_accounts_email.up.sql": {Data: []byte("CREATE INDEX CONCURRENTLY accounts_email ON accounts (email)")},
	}
	for i := range 2 { // in production: one call per instance, at once
		applied, err := migrateGuarded(ctx, dsn, fsys)
		fmt.Printf("instance %d: applied %v, error %v\n", i, applied, err)
	}

	c, err := pgx.Connect(ctx, dsn)
	if err != nil {
		fmt.Println(err)
		return
	}
	defer c.Close(ctx)
	var valid bool
	err = c.QueryRow(ctx, "SELECT indisvalid FROM pg_index WHERE indexrelid = 'accounts_email'::regclass").Scan(&valid)
	fmt.Println("index valid:", valid, err)
	_, err = c.Exec(ctx, "DROP TABLE accounts, schema_migrations")
	fmt.Println("cleaned up:", err == nil)
	// Output:
	// instance 0: applied true, error <nil>
	// instance 1: applied false, error <nil>
	// index valid: true <nil>
	// cleaned up: true
}
