package pgtest

import (
	"context"
	"os"
	"testing"
	"time"

	"go.uber.org/goleak"
)

// StartPgBouncer runs pgbouncer in front of the shared server: a statement
// through it reaches the server, transaction pooling is in force (two
// clients share one server session with a pool of one), and Stop ends the
// process, frees the port and removes its directory.
func TestPgBouncer(t *testing.T) {
	defer goleak.VerifyNone(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if _, err := StartPgBouncer(ctx, shared, "bogus"); err == nil {
		t.Error("StartPgBouncer accepted pool mode \"bogus\"")
	}
	b, err := StartPgBouncerWith(ctx, shared, PgBouncerOptions{Mode: "transaction", PoolSize: 1})
	if err != nil {
		t.Fatal(err)
	}
	defer b.Stop()
	a := connect(t, b.DSN+"&default_query_exec_mode=simple_protocol")
	c := connect(t, b.DSN+"&default_query_exec_mode=simple_protocol")
	var pidA, pidC int
	if err := a.QueryRow(ctx, "SELECT pg_backend_pid()").Scan(&pidA); err != nil {
		t.Fatalf("%v\npgbouncer log:\n%s", err, b.Log(20))
	}
	if err := c.QueryRow(ctx, "SELECT pg_backend_pid()").Scan(&pidC); err != nil {
		t.Fatal(err)
	}
	if pidA != pidC {
		t.Errorf("two clients through a pool of one server connection ran on backends %d and %d", pidA, pidC)
	}
	if got := show(t, a, "server_version"); got == "" {
		t.Error("no server_version through pgbouncer")
	}
	_ = a.Close(ctx)
	_ = c.Close(ctx)
	if err := b.Stop(); err != nil {
		t.Fatal(err)
	}
	if err := b.Stop(); err != nil {
		t.Errorf("second Stop: %v", err)
	}
	if !portRefuses(b.Port) {
		t.Errorf("port %d still accepts connections after Stop", b.Port)
	}
	if _, err := os.Stat(b.dir); !os.IsNotExist(err) {
		t.Errorf("%s still exists after Stop: %v", b.dir, err)
	}
}
