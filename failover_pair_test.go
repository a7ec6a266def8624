package advisory

import (
	"context"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/seed0ad592b7/advisory/internal/pgtest"
)

// startFailoverPair starts a primary and a streaming standby of it on
// loopback, both stopped when the test ends, and returns them with the
// multi-host DSN a client uses (target_session_attrs=read-write).
// Replication is synchronous, so a write the client saw committed is on the
// standby; it holds a table fenced(writer, seq) for the writers' rows.
func startFailoverPair(t *testing.T) (primary, standby *pgtest.Server, dsn string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
	defer cancel()
	begin := time.Now()
	primary, err := pgtest.Start(ctx, pgtest.Options{Local: true})
	must(t, err)
	t.Cleanup(func() { must(t, primary.Stop()) })
	standby, err = primary.StartStandby(ctx)
	must(t, err)
	t.Cleanup(func() { must(t, standby.Stop()) })

	conn, err := pgx.Connect(ctx, primary.DSN)
	must(t, err)
	defer conn.Close(context.Background())
	for _, sql := range []string{
		"ALTER SYSTEM SET synchronous_standby_names = '*'",
		"SELECT pg_reload_conf()",
		"CREATE TABLE fenced (writer text, seq int, PRIMARY KEY (writer, seq))",
	} {
		_, err := conn.Exec(ctx, sql)
		must(t, err)
	}
	pgtest.Await(t, "the standby synchronous", testTimeout, func() (sync bool, err error) {
		err = conn.QueryRow(ctx, "SELECT count(*) = 1 FROM pg_stat_replication WHERE sync_state = 'sync'").Scan(&sync)
		return sync, err
	})
	t.Logf("primary (port %d) and synchronous standby (port %d) ready in %v", primary.Port, standby.Port,
		time.Since(begin).Round(time.Millisecond))
	return primary, standby, pgtest.FailoverDSN(primary, standby)
}
