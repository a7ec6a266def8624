// Package migrationtest holds what the migration-guard tests of the goose
// and migrate modules share: a database per test, instances run as child
// processes of the test binary, and the server-side views they assert on
// (who holds the key, what the waiters cost, what the server logged).
package migrationtest

import (
	"context"
	"fmt"
	"net/url"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/seed0ad592b7/advisory/internal/pgtest"
)

// This file holds the server and a test's database; child.go the child
// processes, activity.go what the server shows of them, scenarios.go the
// scenarios both modules run and the checks on their outcome.

// Options is the server the migration tests need: local binaries (the
// SIGKILL tests read the server log), each log line naming its backend.
var Options = pgtest.Options{Local: true, Settings: map[string]string{
	"log_line_prefix":    "%m [%p] ",
	"log_disconnections": "on",
}}

// RunMain runs a migration module's tests on a server started by
// pgtest.RunMain with Options, stored in *server, and with DATABASE_URL
// pointing at it (where the examples connect, as a program would). A child
// process (EnvRole set) runs its one test without a server of its own.
func RunMain(m *testing.M, server **pgtest.Server) int {
	if os.Getenv(EnvRole) != "" {
		return m.Run()
	}
	return pgtest.RunMain(m, Options, func(s *pgtest.Server) {
		*server = s
		os.Setenv("DATABASE_URL", s.DSN)
	})
}

// EnvRole names the role a child process of the test binary plays; EnvDSN
// the database it migrates.
const (
	EnvRole = "MIGRATIONTEST_ROLE"
	EnvDSN  = "MIGRATIONTEST_DSN"
)

// Timeout bounds every wait of a test, so a broken promise fails it.
const Timeout = 90 * time.Second

// NewDatabase creates a database of its own for the test on srv and returns
// a DSN for it; at the end of the test it checks that no advisory lock is
// left there, then drops it. Advisory locks are per database, so tests on
// different databases do not see each other's keys.
func NewDatabase(t *testing.T, srv *pgtest.Server) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), Timeout)
	defer cancel()
	name := strings.ToLower(strings.NewReplacer("/", "_", " ", "_").Replace(t.Name()))
	admin, err := pgx.Connect(ctx, srv.DSN)
	if err != nil {
		t.Fatal(err)
	}
	defer admin.Close(ctx)
	if _, err := admin.Exec(ctx, "DROP DATABASE IF EXISTS "+pgx.Identifier{name}.Sanitize()+" WITH (FORCE)"); err != nil {
		t.Fatal(err)
	}
	if _, err := admin.Exec(ctx, "CREATE DATABASE "+pgx.Identifier{name}.Sanitize()); err != nil {
		t.Fatal(err)
	}
	u, err := url.Parse(srv.DSN)
	if err != nil {
		t.Fatal(err)
	}
	u.Path = "/" + name
	dsn := u.String()
	t.Cleanup(func() { // after the lock check below
		ctx, cancel := context.WithTimeout(context.Background(), Timeout)
		defer cancel()
		admin, err := pgx.Connect(ctx, srv.DSN)
		if err != nil {
			t.Error(err)
			return
		}
		defer admin.Close(ctx)
		if _, err := admin.Exec(ctx, "DROP DATABASE "+pgx.Identifier{name}.Sanitize()+" WITH (FORCE)"); err != nil {
			t.Error(err)
		}
	})
	// No advisory lock left in the database once the test's connections
	// and instances are gone (a session that ended may take a moment to
	// leave): the end-of-test check every package shares.
	pgtest.CheckAtEnd(t, pgtest.EndCheck{DSN: dsn, Open: func() pgtest.Open { return pgtest.Open{} }, Grace: Timeout})
	return dsn
}

// Prepare makes a database of its own for the test (NewDatabase) with the
// table runs the migrations write to, and returns its DSN and a
// connection to it, closed when the test ends.
func Prepare(t *testing.T, srv *pgtest.Server) (string, *pgx.Conn) {
	t.Helper()
	dsn := NewDatabase(t, srv)
	ctx, cancel := context.WithTimeout(context.Background(), Timeout)
	defer cancel()
	c, err := pgx.Connect(ctx, dsn)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close(context.Background()) })
	if _, err := c.Exec(ctx, "CREATE TABLE runs (pid int)"); err != nil {
		t.Fatal(err)
	}
	return dsn, c
}

// LogLines returns the server log's lines written by backend pid (the log
// line prefix names it).
func LogLines(t *testing.T, srv *pgtest.Server, pid uint32) []string {
	t.Helper()
	log, err := srv.Log()
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	tag := fmt.Sprintf("[%d] ", pid)
	for _, line := range strings.Split(log, "\n") {
		if strings.Contains(line, tag) {
			out = append(out, line)
		}
	}
	return out
}
