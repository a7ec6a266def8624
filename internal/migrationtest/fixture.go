package migrationtest

import (
	"context"
	"testing"
)

// ItemsSQL is migration 1 of both tools' test migrations: it creates the
// table items, records which backend ran it in runs (Prepare makes that
// table; Runners reads it), and then sleeps for sleep seconds, so that a
// test can find it running (AwaitSleeping) or kill it mid-statement. Each
// statement ends its own line, as goose's parser wants; golang-migrate
// sends the whole text as one implicit transaction.
func ItemsSQL(sleep string) string {
	return "CREATE TABLE items (id int);\nINSERT INTO runs VALUES (pg_backend_pid());\nSELECT pg_sleep(" + sleep + ");\n"
}

// IndexSQL is migration 2: the index CheckMigrated looks for, built
// concurrently, so it must run outside a transaction and waits for every
// other transaction of the database, a waiting instance's included.
const IndexSQL = "CREATE INDEX CONCURRENTLY items_id ON items (id);\n"

// Context returns a context bounded by Timeout, cancelled when the test
// ends.
func Context(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(t.Context(), Timeout)
	t.Cleanup(cancel)
	return ctx
}
