// Package compat returns the advisory.Key that other tools lock, so that a Go
// program sharing a database with them can wait for their migrations, keep
// its own work out of their way (advisory.Acquire on the same key), or tell
// an operator what a row of pg_locks is (advisory.KeyFromLockRow, then ==).
//
//	// Wait until no "migrate -database postgres://host/app up" is running
//	// (the CLI hashes the URL's path, "/app"; see GolangMigrate).
//	lock, err := advisory.Acquire(ctx, pool, compat.GolangMigrate("/app", "public", "schema_migrations"))
//
// Each function reproduces the tool's own formula, read from the file and
// version its doc comment cites, and is pinned by test vectors: for
// golang-migrate and goose against the tools' own Go code (module bench),
// for the others against an independent implementation
// (compat/testdata/vectors.py) and the tools' documented examples. Each key
// was also locked on a real PostgreSQL with the statement the tool sends, and
// its pg_locks row compared with Key.LockRow.
//
// Each returned key is named for this process's errors, traces and log lines
// (advisory.NameKey): "goose", "golang-migrate DATABASE SCHEMA.TABLE",
// "rails DATABASE", "sqlx-migrate DATABASE", "sqlx NAME",
// "with_advisory_lock NAME", "django-pglocks NAME".
//
// The functions compute; they never connect, never fail, and take names as
// bytes: a Go string is hashed as it is, which is the UTF-8 encoding the
// tools hash for text. A tool's key changes when the tool changes its
// formula; the citations say which versions were checked.
//
// Holding another tool's key with this package is holding that tool's lock:
// the tool then waits (golang-migrate, sqlx), polls (goose), or fails at
// once (Rails raises ConcurrentMigrationError) until it is released.
package compat
