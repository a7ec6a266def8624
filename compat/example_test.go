package compat_test

import (
	"context"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/seed0ad592b7/advisory"
	"github.com/seed0ad592b7/advisory/compat"
)

// Wait until no golang-migrate run, started by the migrate CLI on database
// "app", is migrating; then let the lock go at once.
func ExampleGolangMigrate() {
	ctx := context.Background()
	pool, err := pgxpool.New(ctx, "postgres://localhost/app")
	if err != nil {
		panic(err)
	}
	defer pool.Close()
	// The migrate CLI (and migrate.New) hash the URL's path, "/app";
	// a program using WithInstance hashes current_database(), "app".
	key := compat.GolangMigrate("/app", "public", "schema_migrations")
	lock, err := advisory.Acquire(ctx, pool, key, advisory.Shared(), advisory.WaitTimeout(10*time.Minute))
	if err != nil {
		panic(err) // advisory.ErrTimeout: still migrating after 10 minutes
	}
	// No migration runs now; one may start as soon as this is released.
	if err := lock.Release(ctx); err != nil {
		panic(err)
	}
}
