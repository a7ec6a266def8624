package main

import (
	"fmt"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/seed0ad592b7/advisory"
)

// What an operator sees of two pglock runs, one holding a key and one
// waiting for it: pglock status, another process, shows the true times,
// held since the grant across the holder's health checks and waiting since
// the wait began across the waiter's slices; a plain client's hold shows
// PostgreSQL's time, marked "*" and explained under the table.
func TestStatusTrueTimes(t *testing.T) {
	e := newEnv(t)
	key := advisory.StringKey("true-times")
	marks := filepath.Join(e.dir, "marks")
	a := e.start(nil, "", append([]string{"run", e.dsnArg(), "--key", "true-times", "--"}, marksCmd("A")...)...)
	e.awaitFile(marks, "start A")
	granted := time.Now() // A's job runs: the grant was no later
	b := e.start(nil, "", append([]string{"run", e.dsnArg(), "--key", "true-times", "--"}, marksCmd("B")...)...)
	hs := e.awaitHolders(key, 1, 1)
	holderPID, waiterPID := hs[0].PID, hs[1].PID
	if !hs[0].Granted {
		holderPID, waiterPID = waiterPID, holderPID
	}
	plain := e.hold(advisory.Int64Key(-1717), false)

	// Await what makes PostgreSQL's own times wrong: a health check of A
	// 1.5 s after its grant (state_change, PostgreSQL's proxy for a grant
	// time, is then at most one health interval, 1 s, old), and a slice of
	// B's wait that began 1.5 s after B started (pg_locks.waitstart is then
	// at most one slice, 0.5 s, old).
	c := e.conn()
	e.await("a health check of the holder and a slice of the waiter, 1.5 s on", func() (bool, error) {
		var checked, sliced time.Time
		err := c.QueryRow(e.ctx, `SELECT (SELECT state_change FROM pg_stat_activity WHERE pid = $1 AND state = 'idle'),
			(SELECT waitstart FROM pg_locks WHERE pid = $2 AND NOT granted)`, holderPID, waiterPID).Scan(&checked, &sliced)
		return err == nil && checked.Sub(granted) > 1500*time.Millisecond && sliced.Sub(b.started) > 1500*time.Millisecond, nil
	})

	got := e.statusJSON("--key", "true-times")
	if len(got) != 2 || got[0].PID != holderPID || got[1].PID != waiterPID {
		t.Fatalf("status --json = %+v; want the holder %d and the waiter %d", got, holderPID, waiterPID)
	}
	if h := got[0]; h.SinceSource != "advisory" || h.HeldSeconds == nil || *h.HeldSeconds < 1.4 {
		t.Errorf("the holder, held over 1.5 s: since_source %q, held_seconds %v; want advisory and at least 1.4", h.SinceSource, deref(h.HeldSeconds))
	}
	if w := got[1]; w.SinceSource != "advisory" || w.WaitingSeconds == nil || *w.WaitingSeconds < 1.4 {
		t.Errorf("the waiter, waiting over 1.5 s: since_source %q, waiting_seconds %v; want advisory and at least 1.4", w.SinceSource, deref(w.WaitingSeconds))
	}
	if p := e.statusJSON("--id", "-1717"); len(p) != 1 || p[0].SinceSource != "postgresql" {
		t.Errorf("a plain client's hold: %+v; want since_source postgresql", p)
	}

	// The table says the same: true times plain, PostgreSQL's marked.
	p := e.pglock(nil, "status", e.dsnArg())
	e.want(p, 0)
	out := p.stdout.String()
	cells := map[int32]map[string]string{}
	for _, r := range readStatusTable(t, out) {
		cells[r.pid] = r.cells
	}
	held, waiting := cells[holderPID]["HELD"], cells[waiterPID]["WAITING"]
	plainHeld := cells[int32(plain.PgConn().PID())]["HELD"]
	if d, err := time.ParseDuration(held); err != nil || d < 1400*time.Millisecond {
		t.Errorf("HELD of pglock run's hold is %q; want a true time, at least 1.4s, unmarked:\n%s", held, out)
	}
	if d, err := time.ParseDuration(waiting); err != nil || d < 1400*time.Millisecond {
		t.Errorf("WAITING of pglock run's wait is %q; want a true time, at least 1.4s, unmarked:\n%s", waiting, out)
	}
	if !strings.HasSuffix(plainHeld, "*") || !strings.Contains(out, "* as PostgreSQL records it") {
		t.Errorf("a plain client's HELD is %q; want it marked * and the mark explained:\n%s", plainHeld, out)
	}

	e.unlockAll(plain)
	touch(t, filepath.Join(e.dir, "release-A"))
	e.awaitFile(marks, "start B")
	touch(t, filepath.Join(e.dir, "release-B"))
	e.wait(a)
	e.wait(b)
	e.want(a, 0)
	e.want(b, 0)
}

func deref(f *float64) string {
	if f == nil {
		return "null"
	}
	return fmt.Sprint(*f)
}
