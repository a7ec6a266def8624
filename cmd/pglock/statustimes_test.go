package main

import (
	"encoding/json"
	"fmt"
	"path/filepath"
	"slices"
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

	// A reading taken between two of the waiter's slices misses it: read
	// again.
	var got []holderJSON
	e.await("status --json showing the holder and the waiter", func() (bool, error) {
		got = e.statusJSON("--key", "true-times")
		return len(got) == 2, nil
	})
	if got[0].PID != holderPID || got[1].PID != waiterPID {
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
	var out string
	cells := map[int32]map[string]string{}
	e.await("status showing the holder and the waiter", func() (bool, error) {
		p := e.pglock(nil, "status", e.dsnArg())
		e.want(p, 0)
		out = p.stdout.String()
		clear(cells)
		for _, r := range readStatusTable(t, out) {
			cells[r.pid] = r.cells
		}
		return cells[holderPID] != nil && cells[waiterPID] != nil, nil
	})
	held, waiting := cells[holderPID]["HELD"], cells[waiterPID]["WAITING"]
	plainHeld := cells[int32(plain.PgConn().PID())]["HELD"]
	if d, err := time.ParseDuration(held); err != nil || d < 1400*time.Millisecond {
		t.Errorf("HELD of pglock run's hold is %q; want a true time, at least 1.4s, unmarked:\n%s", held, out)
	}
	if d, err := time.ParseDuration(waiting); err != nil || d < 1400*time.Millisecond {
		t.Errorf("WAITING of pglock run's wait is %q; want a true time, at least 1.4s, unmarked:\n%s", waiting, out)
	}
	if !strings.HasSuffix(plainHeld, "*") || !strings.Contains(out, "* PostgreSQL's time: ") {
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

// pglock status --slots N shows a semaphore as one group: three pglock
// runs on a semaphore of two, two holding a slot and one waiting, read by
// pglock status as an operator would, in the table and in --json.
func TestStatusSemaphore(t *testing.T) {
	e := newEnv(t)
	slots := advisory.SemaphoreKeys(advisory.StringKey("sem-status"), 2)
	var runs []*proc
	for _, name := range []string{"A", "B", "C"} {
		runs = append(runs, e.start(nil, "", append([]string{"run", e.dsnArg(), "--key", "sem-status", "--slots", "2", "--"}, marksCmd(name)...)...))
	}
	holders := map[int]int32{} // slot: the pid holding it
	c := e.conn()
	e.await("two slots held and a waiter", func() (bool, error) {
		waiting := 0
		for i, k := range slots {
			hs, err := advisory.Holders(e.ctx, c, k)
			if err != nil {
				return false, err
			}
			for _, h := range hs {
				if h.Granted {
					holders[i] = h.PID
				} else {
					waiting++
				}
			}
		}
		return len(holders) == 2 && waiting > 0, nil
	})

	// A reading taken between two of the waiter's slices misses it: read
	// again.
	var out string
	e.await("pglock status --slots 3 naming the semaphore and counting 2 held, 1 waiting", func() (bool, error) {
		p := e.pglock(nil, "status", e.dsnArg(), "--key", "sem-status", "--slots", "3")
		e.want(p, 0)
		out = p.stdout.String()
		return strings.HasPrefix(out, `semaphore "sem-status" (`+advisory.StringKey("sem-status").String()+`): 3 slots, 2 held, 1 waiting`), nil
	})
	third := advisory.SemaphoreKeys(advisory.StringKey("sem-status"), 3)[2]
	for i, pid := range holders {
		if !hasLine(out, fmt.Sprintf("%d", i), slots[i].String(), fmt.Sprintf("%d", pid)) {
			t.Errorf("no line for slot %d (%s) held by %d:\n%s", i, slots[i], pid, out)
		}
	}
	if !hasLine(out, "2", third.String(), "free") || !hasLine(out, "-", "waits", "for", "a", "slot") {
		t.Errorf("want slot 2 free and a line for the waiter:\n%s", out)
	}

	var sem semaphoreJSON
	e.await("pglock status --slots 2 --json showing the waiter", func() (bool, error) {
		p := e.pglock(nil, "status", e.dsnArg(), "--key", "sem-status", "--slots", "2", "--json")
		e.want(p, 0)
		sem = semaphoreJSON{}
		if err := json.Unmarshal(p.stdout.Bytes(), &sem); err != nil {
			return false, fmt.Errorf("--slots --json does not parse: %v\n%s", err, p.stdout.String())
		}
		return len(sem.Waiters) == 1, nil
	})
	if sem.Name != "sem-status" || sem.Size != 2 || len(sem.Slots) != 2 || len(sem.Waiters) != 1 || sem.Waiters[0].Granted {
		t.Fatalf("--slots --json = %+v; want 2 slots and 1 waiter", sem)
	}
	for i, s := range sem.Slots {
		if s.Slot != i || s.Key != slots[i].String() || len(s.Holders) != 1 || s.Holders[0].PID != holders[i] || !s.Holders[0].Granted {
			t.Errorf("--slots --json slot %d = %+v; want %s held by %d", i, s, slots[i], holders[i])
		}
	}

	// The semaphore's own key is not locked: without --slots, status says
	// so and suggests --slots.
	p := e.pglock(nil, "status", e.dsnArg(), "--key", "sem-status")
	e.want(p, 0)
	if !strings.Contains(p.stdout.String(), "add --slots N") {
		t.Errorf("status of a semaphore's key without --slots: %q; want the hint", p.stdout.String())
	}
	p = e.pglock(nil, "status", e.dsnArg(), "--slots", "2")
	e.want(p, exitUsage)

	for _, name := range []string{"A", "B", "C"} {
		touch(t, filepath.Join(e.dir, "release-"+name))
	}
	for _, r := range runs {
		e.wait(r)
		e.want(r, 0)
	}
}

// hasLine reports whether a line of out has the fields want, in order, as
// its first fields.
func hasLine(out string, want ...string) bool {
	for l := range strings.Lines(out) {
		f := strings.Fields(l)
		if len(f) >= len(want) && slices.Equal(f[:len(want)], want) {
			return true
		}
	}
	return false
}

// What a person sees in a terminal: pglock status --watch --slots 2 on a
// semaphore of three pglock runs redraws the group in place, and the
// waiter's WAITING keeps growing past its slices (a true time, unmarked),
// where PostgreSQL's own time would start over with every slice.
func TestStatusWatchSemaphoreInTerminal(t *testing.T) {
	e := newEnv(t)
	m := newTmux(e)
	m.status("--key tmux-sem --slots 2 --watch 200ms")
	m.awaitScreen("the empty semaphore", func(s string) bool {
		return strings.Contains(s, `semaphore "tmux-sem" (`) && strings.Contains(s, "2 slots, 0 held, 0 waiting")
	})
	var runs []*proc
	for _, name := range []string{"A", "B", "C"} {
		runs = append(runs, e.start(nil, "", append([]string{"run", e.dsnArg(), "--key", "tmux-sem", "--slots", "2", "--"}, marksCmd(name)...)...))
	}
	s := m.awaitScreen("two slots held and a waiter who has waited 1.5s", func(s string) bool {
		if !strings.Contains(s, "2 slots, 2 held, 1 waiting") {
			return false
		}
		for l := range strings.Lines(s) {
			// "-  waits for a slot  PID  -  WAITING  ..."
			if f := strings.Fields(l); len(f) > 7 && f[1] == "waits" {
				d, err := time.ParseDuration(f[7])
				return err == nil && d >= 1500*time.Millisecond
			}
		}
		return false
	})
	if strings.Count(s, "semaphore ") != 1 || strings.Contains(s, "*") {
		t.Errorf("want one group, redrawn in place, with true times only (no *):\n%s", s)
	}
	m.run("send-keys", "-t", "status", "C-c")
	m.awaitScreen("pglock exited", func(string) bool {
		dead := strings.Fields(m.run("display-message", "-p", "-t", "status", "#{pane_dead}"))
		return len(dead) > 0 && dead[0] == "1"
	})
	for _, name := range []string{"A", "B", "C"} {
		touch(t, filepath.Join(e.dir, "release-"+name))
	}
	for _, r := range runs {
		e.wait(r)
		e.want(r, 0)
	}
}
