package compat

import (
	"hash/crc32"
	"strings"

	"github.com/seed0ad592b7/advisory"
)

// GolangMigrate is the key the golang-migrate v4 "postgres" and "pgx/v5"
// drivers lock while migrating (Lock: SELECT pg_advisory_lock($1)). The
// formula is GenerateAdvisoryLockId in database/util.go of
// github.com/golang-migrate/migrate/v4 v4.20.1: the CRC-32 (IEEE) of
// schema + "\x00" + table + "\x00" + database, times 1486364155, wrapped to
// a uint32, sent as a decimal string the server reads as a bigint. The key is
// Int64Key of that uint32: never negative, classid always 0.
//
// The arguments are the driver's Config.DatabaseName, its migrations schema
// and its migrations table (defaults "public" under the default search_path,
// and "schema_migrations"). Mind DatabaseName: WithInstance with an empty
// DatabaseName fills in current_database() ("app"), but Open, as
// migrate.New and the migrate CLI call it, sets it to the URL's path, with
// its leading slash ("/app" for postgres://host/app). The two lock different
// keys; pass the one the other program uses. With x-migrations-table-quoted,
// pass the schema and table names without their quotes, as the driver does.
func GolangMigrate(database, schema, table string) advisory.Key {
	const salt = 1486364155 // advisoryLockIDSalt
	sum := crc32.ChecksumIEEE([]byte(strings.Join([]string{schema, table, database}, "\x00")))
	return advisory.NameKey(advisory.Int64Key(int64(sum*salt)), "golang-migrate "+database+" "+schema+"."+table)
}

// Goose is the key pressly/goose v3's Postgres session locker locks by
// default (SELECT pg_try_advisory_lock($1), retried every 5 s):
// DefaultLockID = 4097083626 in lock/session_locker_options.go of
// github.com/pressly/goose/v3 v3.29.0, the CRC-32 of "goose". It is the same
// in every database; a goose configured WithLockID locks advisory.Int64Key of
// that id instead.
func Goose() advisory.Key {
	return advisory.NameKey(advisory.Int64Key(4097083626), "goose")
}

// Rails is the key ActiveRecord's migrator locks while it migrates database,
// as SELECT current_database() returns it. The formula is
// generate_migrator_advisory_lock_id in activerecord/lib/active_record/
// migration.rb (the migrator has locked since Rails 5.0; read in stored 5.x
// and 6.x versions of the file, unchanged in main but for reading the
// connection's current_database): MIGRATOR_SALT (2053462845) times
// Zlib.crc32(current_database). The product is a Ruby Integer, at most
// 2053462845 × (2³²−1) < 2⁶³, so the PostgreSQL adapter's get_advisory_lock
// accepts it (it raises beyond 63 bits) and sends it as a literal to
// pg_try_advisory_lock: a non-negative bigint. Rails does not wait: a second
// migrator fails at once with ConcurrentMigrationError.
func Rails(database string) advisory.Key {
	const salt = 2053462845 // MIGRATOR_SALT
	return advisory.NameKey(advisory.Int64Key(int64(salt*uint64(crc32.ChecksumIEEE([]byte(database))))), "rails "+database)
}

// SQLxMigrate is the key Rust sqlx's PostgreSQL migrator locks while it
// migrates database, as SELECT current_database() returns it
// (Migrate::lock: SELECT pg_advisory_lock($1)). The formula is
// generate_lock_id in sqlx-postgres/src/migrate.rs, read at launchbadge/sqlx
// main (on the way to 0.9): 0x3d32ad9e times the CRC-32 (CRC_32_ISO_HDLC,
// the IEEE one) of the name, as an i64. The product is below 2⁶² and never
// negative. The lock covers the whole database, whatever migrations table or
// schema sqlx is configured with.
func SQLxMigrate(database string) advisory.Key {
	const factor = 0x3d32ad9e
	return advisory.NameKey(advisory.Int64Key(factor*int64(crc32.ChecksumIEEE([]byte(database)))), "sqlx-migrate "+database)
}
