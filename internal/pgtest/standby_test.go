package pgtest

import (
	"context"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"go.uber.org/goleak"
)

// startLocalPrivate starts a server from local binaries, stopped when the
// test ends.
func startLocalPrivate(t *testing.T) *Server {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	s, err := Start(ctx, Options{Local: true})
	if err != nil {
		t.Fatal(err)
	}
	if s.Source() != SourceLocal {
		t.Fatalf("Options.Local gave a %s server", s.Source())
	}
	t.Cleanup(func() {
		if err := s.Stop(); err != nil {
			t.Error(err)
		}
	})
	return s
}

func queryBool(t *testing.T, conn *pgx.Conn, sql string) bool {
	t.Helper()
	var v bool
	if err := conn.QueryRow(context.Background(), sql).Scan(&v); err != nil {
		t.Fatal(err)
	}
	return v
}

// A standby streams the primary's writes and refuses its own; once the
// primary is halted and the standby promoted it takes writes, keeps what
// was replicated, and FailoverDSN reaches it.
func TestStandbyPromote(t *testing.T) {
	defer goleak.VerifyNone(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	primary := startLocalPrivate(t)
	begin := time.Now()
	standby, err := primary.StartStandby(ctx)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := standby.Stop(); err != nil {
			t.Error(err)
		}
	})
	t.Logf("StartStandby took %v", time.Since(begin))
	if standby.Port == primary.Port || standby.Source() != SourceLocal {
		t.Fatalf("standby %s on port %d, primary on %d", standby.Source(), standby.Port, primary.Port)
	}

	p := connect(t, primary.DSN)
	if _, err := p.Exec(ctx, "CREATE TABLE replicated AS SELECT 42 AS x"); err != nil {
		t.Fatal(err)
	}
	var lsn string
	if err := p.QueryRow(ctx, "SELECT pg_current_wal_lsn()::text").Scan(&lsn); err != nil {
		t.Fatal(err)
	}
	s := connect(t, standby.DSN)
	if !queryBool(t, s, "SELECT pg_is_in_recovery()") {
		t.Error("the standby is not in recovery")
	}
	Await(t, "the standby replaying the primary's write", time.Minute, func() (bool, error) {
		return queryBool(t, s, "SELECT pg_last_wal_replay_lsn() >= '"+lsn+"'::pg_lsn"), nil
	})
	if _, err := s.Exec(ctx, "CREATE TABLE refused (x int)"); err == nil {
		t.Error("the standby accepted a write")
	}
	if got := FailoverDSN(primary, standby); !strings.Contains(got, "target_session_attrs=read-write") {
		t.Errorf("FailoverDSN = %q", got)
	}
	viaFailover := connect(t, FailoverDSN(standby, primary)) // the standby first: skipped
	if queryBool(t, viaFailover, "SELECT pg_is_in_recovery()") {
		t.Error("FailoverDSN reached the standby")
	}

	if err := primary.Halt(ctx, ShutdownImmediate); err != nil {
		t.Fatal(err)
	}
	if !portRefuses(primary.Port) {
		t.Error("the halted primary still accepts connections")
	}
	if err := primary.Halt(ctx, ShutdownImmediate); err != nil {
		t.Errorf("second Halt: %v", err)
	}
	begin = time.Now()
	if err := standby.Promote(ctx); err != nil {
		t.Fatal(err)
	}
	t.Logf("Promote took %v", time.Since(begin))
	after := connect(t, FailoverDSN(primary, standby))
	if queryBool(t, after, "SELECT pg_is_in_recovery()") {
		t.Error("the promoted standby is still in recovery")
	}
	var x int
	if err := after.QueryRow(ctx, "SELECT x FROM replicated").Scan(&x); err != nil || x != 42 {
		t.Errorf("replicated row on the promoted standby: %d, %v", x, err)
	}
	if _, err := after.Exec(ctx, "CREATE TABLE accepted (x int)"); err != nil {
		t.Errorf("the promoted standby refuses a write: %v", err)
	}
	if err := standby.Promote(ctx); err == nil {
		t.Error("promoting a primary succeeded")
	}
}

// Halt keeps the data directory, so Restart brings the server back with
// its data; a fast halt ends open sessions. Halt refuses unknown modes and
// servers it does not run.
func TestHalt(t *testing.T) {
	defer goleak.VerifyNone(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	s := startLocalPrivate(t)
	before := connect(t, s.DSN)
	if _, err := before.Exec(ctx, "CREATE TABLE kept (x int)"); err != nil {
		t.Fatal(err)
	}
	if err := s.Halt(ctx, "sudden"); err == nil {
		t.Error("Halt accepted an unknown mode")
	}
	if err := s.Halt(ctx, ShutdownFast); err != nil {
		t.Fatal(err)
	}
	if _, err := before.Exec(ctx, "SELECT 1"); err == nil {
		t.Error("a session survived a fast halt")
	}
	if !portRefuses(s.Port) {
		t.Error("the halted server still accepts connections")
	}
	if _, err := os.Stat(s.local.dataDir()); err != nil {
		t.Errorf("Halt removed the data directory: %v", err)
	}
	if err := s.Restart(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := connect(t, s.DSN).Exec(ctx, "SELECT * FROM kept"); err != nil {
		t.Errorf("data lost across Halt and Restart: %v", err)
	}
	if err := s.Stop(); err != nil {
		t.Fatal(err)
	}
	for name, err := range map[string]error{
		"Halt after Stop":      s.Halt(ctx, ShutdownFast),
		"Halt of a dsn server": (&Server{source: SourceDSN}).Halt(ctx, ShutdownFast),
		"StartStandby after Stop": func() error {
			_, err := s.StartStandby(ctx)
			return err
		}(),
		"Promote after Stop": s.Promote(ctx),
	} {
		if err == nil {
			t.Errorf("%s succeeded", name)
		} else {
			t.Logf("%s: %v", name, err)
		}
	}
}
