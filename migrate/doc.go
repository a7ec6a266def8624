// Package advisorymigrate is the recipe for running golang-migrate v4 under
// a github.com/seed0ad592b7/advisory guard; it has no API of its own. It is
// a module apart so that neither the advisory module nor the goose adapter
// depends on golang-migrate; its Example and tests are the recipe, run
// against a real PostgreSQL.
//
// golang-migrate's postgres and pgx/v5 drivers lock with one
// SELECT pg_advisory_lock on a connection they take from the *sql.DB and
// never expose. That wait holds a snapshot for as long as it lasts, so a
// waiting instance blocks the migrator's CREATE INDEX CONCURRENTLY, and the
// migrator deadlocks with its waiters (golang-migrate #960). The recipe:
//
//  1. Open a *sql.DB of exactly one connection (pgx's stdlib driver;
//     SetMaxOpenConns(1), SetMaxIdleConns(1), no lifetime or idle expiry),
//     so that every Conn it hands out is that one session.
//  2. On it (sql.Conn.Raw), take the key migrate locks with
//     advisory.NewConnSession and LockMany, waiting in slices: both
//     spellings of the database name (compat.GolangMigrate(db, …) for a
//     driver made by WithInstance, compat.GolangMigrate("/"+db, …) for the
//     migrate CLI and migrate.New), so that plain instances of either kind
//     are excluded. Give the connection back.
//  3. pgxv5.WithInstance(db, …) takes the same connection; migrate's own
//     pg_advisory_lock then runs on the session that already holds the key,
//     is granted at once (session locks are re-entrant), and its
//     migrations run on the locked session, so a killed migrator keeps the
//     key until its statement has ended on the server.
//  4. After Up, release the key on that session (it is idle: migrate's
//     driver holds the *sql.Conn but runs nothing), then close migrate.
//
// database/sql hands back the same connection as long as it is healthy: a
// connection whose statement failed with a broken connection is replaced
// by a new one, which does not hold the key. migrate's own lock still
// excludes other instances then (an unsliced wait), and the release in
// step 4 reports an error matching advisory.ErrLockLost. Step 4 uses the
// *pgx.Conn outside sql.Conn.Raw; that is safe only because nothing else
// uses the *sql.DB meanwhile: keep the *sql.DB private to the recipe.
package advisorymigrate
