package migrationtest

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/seed0ad592b7/advisory"
	"github.com/seed0ad592b7/advisory/internal/pgtest"
)

// What the server shows of the instances: their backends, what they hold
// or wait for, and the awaits on it.

// Backend is one row of pg_stat_activity, with what it holds or waits for
// on the key.
type Backend struct {
	PID      uint32
	State    string
	Query    string
	Granted  *bool          // its pg_locks row for the key: nil if none
	XminAge  *time.Duration // how long its statement has run, if it holds a snapshot (backend_xmin)
	WaitLock bool           // waits on an advisory lock
}

// Holds reports whether the backend holds the key.
func (b Backend) Holds() bool { return b.Granted != nil && *b.Granted }

// Activity returns the client backends of c's database, with their hold
// of key and, for those holding a snapshot, the age of their running
// statement or transaction (a bound of the snapshot's age).
func Activity(ctx context.Context, c *pgx.Conn, key advisory.Key) ([]Backend, error) {
	classid, objid, objsubid := key.LockRow()
	rows, err := c.Query(ctx, `SELECT a.pid, coalesce(a.state, ''), a.query, l.granted,
			CASE WHEN a.backend_xmin IS NOT NULL THEN clock_timestamp() - coalesce(a.xact_start, a.query_start) END,
			coalesce(a.wait_event_type = 'Lock' AND a.wait_event = 'advisory', false)
		FROM pg_stat_activity a
		LEFT JOIN pg_locks l ON l.pid = a.pid AND l.locktype = 'advisory'
			AND l.classid::int8 = $1 AND l.objid::int8 = $2 AND l.objsubid = $3
		WHERE a.datname = current_database() AND a.backend_type = 'client backend' AND a.pid <> pg_backend_pid()
		ORDER BY a.pid`, int64(classid), int64(objid), objsubid)
	if err != nil {
		return nil, err
	}
	return pgx.CollectRows(rows, func(r pgx.CollectableRow) (Backend, error) {
		var b Backend
		err := r.Scan(&b.PID, &b.State, &b.Query, &b.Granted, &b.XminAge, &b.WaitLock)
		return b, err
	})
}

// await polls Activity until found returns true, failing t with what
// after Timeout.
func await(t *testing.T, c *pgx.Conn, key advisory.Key, what string, found func([]Backend) bool) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), Timeout)
	defer cancel()
	for {
		backends, err := Activity(ctx, c, key)
		if err != nil {
			t.Fatalf("awaiting %s: %v", what, err)
		}
		if found(backends) {
			return
		}
		select {
		case <-ctx.Done():
			t.Fatalf("awaiting %s: not seen within %v", what, Timeout)
		case <-time.After(5 * time.Millisecond): // polling a server state
		}
	}
}

// AwaitSleeping waits until a backend other than not runs a migration's
// pg_sleep, and returns it; t fails if that backend does not hold key (the
// lock and the migration must share a session).
func AwaitSleeping(t *testing.T, c *pgx.Conn, key advisory.Key, not uint32) (pid uint32) {
	t.Helper()
	await(t, c, key, "a migration in pg_sleep", func(backends []Backend) bool {
		for _, b := range backends {
			if b.PID != not && strings.Contains(b.Query, "pg_sleep") && b.State == "active" {
				if !b.Holds() {
					t.Fatalf("backend %d migrates without holding %s: %+v", b.PID, key, backends)
				}
				pid = b.PID
				return true
			}
		}
		return false
	})
	return pid
}

// AwaitWaiting waits until a backend other than holder waits on an
// advisory lock.
func AwaitWaiting(t *testing.T, c *pgx.Conn, key advisory.Key, holder uint32) {
	t.Helper()
	await(t, c, key, "an instance waiting for the key", func(backends []Backend) bool {
		for _, b := range backends {
			if b.PID != holder && b.WaitLock {
				return true
			}
		}
		return false
	})
}

// AwaitDeadBackend follows the backend of a killed migrator (dead) until it
// leaves pg_stat_activity, failing t unless, at every look, it held key
// while its statement ran and no other backend held key while it ran or
// held it. (An exiting backend releases its locks a moment before it
// leaves pg_stat_activity.) It fails t too if the statement was never seen
// running (the test then proved nothing), and logs the dead backend's
// server log lines.
func AwaitDeadBackend(t *testing.T, srv *pgtest.Server, c *pgx.Conn, key advisory.Key, dead uint32) {
	t.Helper()
	outlived := 0 // looks that saw the dead instance's statement still running
	var first, last []Backend
	await(t, c, key, fmt.Sprintf("the end of the killed migrator's backend %d", dead), func(backends []Backend) bool {
		if first == nil {
			first = backends
		}
		alive, busy := false, false
		for _, b := range backends {
			if b.PID != dead {
				continue
			}
			alive = true
			if b.State == "active" {
				if !b.Holds() {
					t.Fatalf("the dead instance's backend %d runs %q without the key: %+v", dead, b.Query, backends)
				}
				outlived++
			}
			busy = b.Holds() || b.State == "active"
			last = backends
		}
		for _, b := range backends {
			if busy && b.PID != dead && b.Holds() {
				t.Fatalf("backend %d holds the key while the dead instance's backend %d still runs or holds it: %+v", b.PID, dead, backends)
			}
		}
		return !alive
	})
	if outlived == 0 {
		t.Error("the dead instance's statement was never seen running after its process died: the test proved nothing")
	}
	t.Logf("pg_stat_activity with the key's pg_locks row, first look after the kill:\n%s\nlast look that saw the dead backend %d:\n%s",
		formatBackends(first), dead, formatBackends(last))
	lines := LogLines(t, srv, dead)
	t.Logf("%d looks saw the dead instance's statement still running after SIGKILL; its backend's server log:\n%s", outlived, strings.Join(lines, "\n"))
	if !strings.Contains(strings.Join(lines, "\n"), "disconnection") {
		t.Errorf("the server log has no disconnection of the dead instance's backend %d", dead)
	}
}

// formatBackends prints backends one a line: pid, state, whether it holds
// or waits for the key, and its query's first line.
func formatBackends(backends []Backend) string {
	var b strings.Builder
	for _, bk := range backends {
		granted := "-"
		if bk.Granted != nil {
			granted = fmt.Sprint(*bk.Granted)
		}
		query, _, _ := strings.Cut(bk.Query, "\n")
		fmt.Fprintf(&b, "  pid %d state %q granted %s waiting %v query %.80q\n", bk.PID, bk.State, granted, bk.WaitLock, query)
	}
	return b.String()
}
