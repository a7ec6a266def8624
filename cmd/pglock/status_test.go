package main

import (
	"encoding/json"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/jackc/pgx/v5"

	"github.com/seed0ad592b7/advisory"
	"github.com/seed0ad592b7/advisory/compat"
)

// statusRow is one line of the status table as a person reads it.
type statusRow struct {
	tree   string // what the PID column draws before the pid: "", "└─ ", "   ├─ "...
	pid    int32  // 0 on a line that only continues the HOLDS of the line above
	cells  map[string]string
	source string
}

// statusColumns are the table's column titles, in order.
var statusColumns = []string{"PID", "WAITS FOR", "WAITING", "HOLDS", "HELD", "CONNECTED", "CLIENT", "APPLICATION"}

// readStatusTable reads the table of "pglock status" from text (its output, or
// a terminal's screen): the cells of each line below the title line, cut
// where the titles start. It returns nil if there is no title line with
// every column.
func readStatusTable(t *testing.T, text string) []statusRow {
	t.Helper()
	lines := strings.Split(text, "\n")
	title := slices.IndexFunc(lines, func(l string) bool { return strings.HasPrefix(l, "PID ") })
	if title < 0 {
		return nil
	}
	var starts []int
	for _, c := range statusColumns {
		i := strings.Index(lines[title], c)
		if i < 0 {
			return nil // a screen too narrow to show every column
		}
		starts = append(starts, i) // the title line is ASCII: a byte offset is a column
	}
	var rows []statusRow
	for _, l := range lines[title+1:] {
		r := []rune(l)
		if strings.TrimSpace(l) == "" {
			break
		}
		row := statusRow{cells: map[string]string{}, source: l}
		for i, c := range statusColumns {
			from, to := min(starts[i], len(r)), len(r)
			if i+1 < len(starts) {
				to = min(starts[i+1], len(r))
			}
			row.cells[c] = strings.TrimSpace(string(r[from:to]))
		}
		raw := strings.TrimRight(string(r[:min(starts[1], len(r))]), " ")
		digits := strings.TrimRight(raw, "0123456789")
		row.tree = digits
		if digits != raw {
			n, err := strconv.ParseInt(raw[len(digits):], 10, 32)
			if err != nil {
				t.Fatalf("line %q: bad pid %q", l, raw[len(digits):])
			}
			row.pid = int32(n)
		}
		rows = append(rows, row)
	}
	return rows
}

// showsTree reports whether rows show each want line, in order, as
// consecutive lines: the tree drawn before the pid, and the cells given.
func showsTree(rows []statusRow, want []statusRow) bool {
	for i := range rows {
		if i+len(want) > len(rows) {
			return false
		}
		ok := true
		for j, w := range want {
			got := rows[i+j]
			ok = ok && got.pid == w.pid && got.tree == w.tree
			for c, v := range w.cells {
				ok = ok && got.cells[c] == v
			}
		}
		if ok {
			return true
		}
	}
	return false
}

// lockIn starts a pg_advisory_lock of key on c, whose result comes on the
// returned channel.
func (e *env) lockIn(c *pgx.Conn, key advisory.Key) chan error {
	e.t.Helper()
	v, ok := key.Int64()
	if !ok {
		e.t.Fatalf("lockIn takes an int64 key, not %s", key)
	}
	done := make(chan error, 1)
	go func() {
		_, err := c.Exec(e.ctx, "SELECT pg_advisory_lock($1::int8)", v)
		done <- err
	}()
	return done
}

// statusJSON runs pglock status --json with args and parses its output.
func (e *env) statusJSON(args ...string) []holderJSON {
	e.t.Helper()
	p := e.pglock(nil, append([]string{"status", e.dsnArg(), "--json"}, args...)...)
	e.want(p, 0)
	var got []holderJSON
	if err := json.Unmarshal(p.stdout.Bytes(), &got); err != nil {
		e.t.Fatalf("--json output does not parse: %v\n%s", err, p.stdout.String())
	}
	return got
}

func pidOf(c *pgx.Conn) int32 { return int32(c.PgConn().PID()) }

func TestStatus(t *testing.T) {
	e := newEnv(t)
	key := advisory.StringKey("status")
	v, _ := key.Int64()
	holder := e.hold(key, false)
	waiter := e.conn()
	waited := e.lockIn(waiter, key)
	e.awaitHolders(key, 1, 1)
	holderPID, waiterPID := pidOf(holder), pidOf(waiter)

	// The table: the holder, and under it the waiter.
	want := []statusRow{
		{pid: holderPID, cells: map[string]string{"WAITS FOR": "-", "WAITING": "-", "HOLDS": key.String(), "CLIENT": "127.0.0.1"}},
		{pid: waiterPID, tree: "└─ ", cells: map[string]string{"WAITS FOR": key.String(), "HOLDS": "-", "HELD": "-", "CLIENT": "127.0.0.1"}},
	}
	for _, args := range [][]string{{"--key", "status"}, {"--id", strconv.FormatInt(v, 10)}, {}} {
		p := e.pglock(nil, append([]string{"status", e.dsnArg()}, args...)...)
		e.want(p, 0)
		if rows := readStatusTable(t, p.stdout.String()); !showsTree(rows, want) {
			t.Errorf("pglock status %q:\n%s\nwant the holder %d and under it the waiter %d", args, p.stdout.String(), holderPID, waiterPID)
		}
	}

	// --json says the same.
	got := e.statusJSON("--key", "status")
	classid, objid, objsubid := key.LockRow()
	if len(got) != 2 || got[0].PID != holderPID || !got[0].Granted || got[1].PID != waiterPID || got[1].Granted {
		t.Fatalf("--json = %+v, want the holder %d then the waiter %d", got, holderPID, waiterPID)
	}
	for _, h := range got {
		if h.Key != key.String() || h.Name != "status" || h.Int64 == nil || *h.Int64 != v ||
			h.ClassID != classid || h.ObjID != objid || h.ObjSubID != objsubid ||
			h.Mode != "exclusive" || h.Since == nil || h.BackendStart == nil || h.ClientAddr != "127.0.0.1" {
			t.Errorf("--json element %+v does not describe key %q (%s) held from 127.0.0.1", h, "status", key)
		}
	}
	if h := got[0]; len(h.BlockedBy) != 0 || h.HeldSeconds == nil || h.WaitingSeconds != nil {
		t.Errorf("--json holder %+v: want blocked_by [], held_seconds and no waiting_seconds", h)
	}
	if h := got[1]; !slices.Equal(h.BlockedBy, []int32{holderPID}) || h.WaitingSeconds == nil || h.HeldSeconds != nil {
		t.Errorf("--json waiter %+v: want blocked_by [%d], waiting_seconds and no held_seconds", h, holderPID)
	}

	e.unlockAll(holder)
	if err := <-waited; err != nil {
		t.Fatal(err)
	}
	e.unlockAll(waiter)

	// Nothing held: a sentence, and an empty JSON array.
	p := e.pglock(nil, "status", e.dsnArg(), "--pair", "3,4")
	e.want(p, 0)
	if !strings.Contains(p.stdout.String(), "no session holds or waits for pair:3,4") {
		t.Errorf("status of a free key: %q", p.stdout.String())
	}
	e.await("no advisory lock left", func() (bool, error) {
		p = e.pglock(nil, "status", e.dsnArg(), "--json")
		return strings.TrimSpace(p.stdout.String()) == "[]", nil
	})
}

// TestStatusChain: A holds k1; B holds k2 and waits for k1; C waits for
// k2. The table draws A, B under A, C under B; --json names each waiter's
// blocker.
func TestStatusChain(t *testing.T) {
	e := newEnv(t)
	k1, k2 := advisory.StringKey("chain-1"), advisory.StringKey("chain-2")
	a := e.hold(k1, false)
	b := e.hold(k2, false)
	c := e.conn()
	bWaited := e.lockIn(b, k1)
	cWaited := e.lockIn(c, k2)
	e.awaitHolders(k1, 1, 1)
	e.awaitHolders(k2, 1, 1)
	pa, pb, pc := pidOf(a), pidOf(b), pidOf(c)

	p := e.pglock(nil, "status", e.dsnArg())
	e.want(p, 0)
	want := []statusRow{
		{pid: pa, cells: map[string]string{"WAITS FOR": "-", "HOLDS": k1.String()}},
		{pid: pb, tree: "└─ ", cells: map[string]string{"WAITS FOR": k1.String(), "HOLDS": k2.String()}},
		{pid: pc, tree: "   └─ ", cells: map[string]string{"WAITS FOR": k2.String(), "HOLDS": "-"}},
	}
	if rows := readStatusTable(t, p.stdout.String()); len(rows) != 3 || !showsTree(rows, want) {
		t.Errorf("pglock status:\n%s\nwant %d, under it %d, under that %d", p.stdout.String(), pa, pb, pc)
	}

	blockedBy := map[int32][]int32{}
	for _, h := range e.statusJSON() {
		if !h.Granted {
			blockedBy[h.PID] = h.BlockedBy
		}
	}
	if !slices.Equal(blockedBy[pb], []int32{pa}) || !slices.Equal(blockedBy[pc], []int32{pb}) || len(blockedBy) != 2 {
		t.Errorf("--json blocked_by = %v, want %d: [%d], %d: [%d]", blockedBy, pb, pa, pc, pb)
	}

	e.unlockAll(a)
	if err := <-bWaited; err != nil {
		t.Fatal(err)
	}
	e.unlockAll(b)
	if err := <-cWaited; err != nil {
		t.Fatal(err)
	}
	e.unlockAll(c)
}

// TestStatusDeadlock: two sessions wait for each other's key (the server's
// deadlock_timeout raised so that it does not break the cycle). Both show,
// one at the top level marked as in a cycle, the other under it.
func TestStatusDeadlock(t *testing.T) {
	e := newEnv(t)
	k1, k2 := advisory.StringKey("cycle-1"), advisory.StringKey("cycle-2")
	a, b := e.hold(k1, false), e.hold(k2, false)
	for _, c := range []*pgx.Conn{a, b} {
		if _, err := c.Exec(e.ctx, "SET deadlock_timeout = '1h'"); err != nil {
			t.Fatal(err)
		}
	}
	aWaited, bWaited := e.lockIn(a, k2), e.lockIn(b, k1)
	e.awaitHolders(k1, 1, 1)
	e.awaitHolders(k2, 1, 1)
	pa, pb := pidOf(a), pidOf(b)

	p := e.pglock(nil, "status", e.dsnArg())
	e.want(p, 0)
	rows := readStatusTable(t, p.stdout.String())
	want := []statusRow{
		{pid: pa, cells: map[string]string{"WAITS FOR": k2.String() + " (cycle)", "HOLDS": k1.String()}},
		{pid: pb, tree: "└─ ", cells: map[string]string{"WAITS FOR": k1.String(), "HOLDS": k2.String()}},
	}
	if len(rows) != 2 || !showsTree(rows, want) {
		t.Errorf("pglock status:\n%s\nwant %d marked as in a cycle, and %d under it", p.stdout.String(), pa, pb)
	}

	// End the cycle: cancel a's wait, then b gets k1.
	if _, err := e.conn().Exec(e.ctx, "SELECT pg_cancel_backend($1)", pa); err != nil {
		t.Fatal(err)
	}
	if err := <-aWaited; err == nil {
		t.Fatal("a's cancelled wait returned no error")
	}
	e.unlockAll(a)
	if err := <-bWaited; err != nil {
		t.Fatal(err)
	}
	e.unlockAll(b)
}

// TestStatusManyKeys: a session holding 8,000 keys is one line with the
// count and range of its keys; --keys lists them all.
func TestStatusManyKeys(t *testing.T) {
	e := newEnv(t)
	const n = 8000
	c := e.conn()
	if _, err := c.Exec(e.ctx, "SELECT pg_advisory_lock(k) FROM generate_series(1, $1::int8) AS k", n); err != nil {
		t.Fatal(err)
	}
	p := e.pglock(nil, "status", e.dsnArg())
	e.want(p, 0)
	rows := readStatusTable(t, p.stdout.String())
	want := fmt.Sprintf("%d locks int64:1 … int64:%d", n, n)
	if len(rows) != 1 || rows[0].pid != pidOf(c) || rows[0].cells["HOLDS"] != want {
		t.Errorf("pglock status (%d lines):\n%.2000s\nwant one line with HOLDS %q", len(rows), p.stdout.String(), want)
	}

	p = e.pglock(nil, "status", e.dsnArg(), "--keys")
	e.want(p, 0)
	rows = readStatusTable(t, p.stdout.String())
	var holds []string
	for _, r := range rows {
		holds = append(holds, r.cells["HOLDS"])
	}
	if len(rows) != n || rows[0].pid != pidOf(c) || rows[1].pid != 0 {
		t.Fatalf("pglock status --keys: %d lines (the first two: %q, %q), want %d, the first with the pid",
			len(rows), rows[0].source, rows[1].source, n)
	}
	for i, h := range holds {
		if want := advisory.Int64Key(int64(i + 1)).String(); h != want {
			t.Fatalf("pglock status --keys: line %d holds %q, want %q", i+1, h, want)
		}
	}
	e.unlockAll(c)
}

// TestStatusLabelsToolKeys holds the migration locks of goose, golang-migrate
// (opened both ways), Rails and sqlx for the test's database, and one of
// another database: status labels the first five with their tool, in the
// table and in --json, and not the last.
func TestStatusLabelsToolKeys(t *testing.T) {
	e := newEnv(t)
	var database string
	if err := e.conn().QueryRow(e.ctx, "SELECT current_database()").Scan(&database); err != nil {
		t.Fatal(err)
	}
	labels := map[advisory.Key]string{
		compat.Goose(): "goose",
		compat.GolangMigrate(database, "public", "schema_migrations"):     "migrate",
		compat.GolangMigrate("/"+database, "public", "schema_migrations"): "migrate",
		compat.Rails(database):       "rails",
		compat.SQLxMigrate(database): "sqlx-migrate",
		compat.Rails("other"):        "",
	}
	holder := e.conn()
	for key := range labels {
		v, _ := key.Int64()
		if _, err := holder.Exec(e.ctx, "SELECT pg_advisory_lock($1::int8)", v); err != nil {
			t.Fatal(err)
		}
	}

	for _, args := range [][]string{{}, {"--keys"}} {
		p := e.pglock(nil, append([]string{"status", e.dsnArg()}, args...)...)
		e.want(p, 0)
		var shown []string
		for _, r := range readStatusTable(t, p.stdout.String()) {
			shown = append(shown, strings.Split(r.cells["HOLDS"], ", ")...)
		}
		for key, tool := range labels {
			want := key.String()
			if tool != "" {
				want += " (" + tool + ")"
			}
			if !slices.Contains(shown, want) {
				t.Errorf("pglock status %q:\n%s\nwant HOLDS to show %q", args, p.stdout.String(), want)
			}
		}
	}

	got := e.statusJSON()
	if len(got) != len(labels) {
		t.Fatalf("--json has %d elements, want %d: %+v", len(got), len(labels), got)
	}
	for _, h := range got {
		key, err := advisory.KeyFromLockRow(h.ClassID, h.ObjID, h.ObjSubID)
		if tool, ok := labels[key]; err != nil || !ok || h.Tool != tool {
			t.Errorf("--json element %+v: tool %q, want %q", h, h.Tool, tool)
		}
	}
	e.unlockAll(holder)
}

func TestStatusShowsRun(t *testing.T) {
	e := newEnv(t)
	p := e.start(nil, "", append([]string{"run", e.dsnArg(), "--pair", "-1,2", "--shared", "--"}, marksCmd("A")...)...)
	e.awaitFile(e.dir+"/marks", "start A")
	s := e.pglock([]string{"DATABASE_URL=" + e.dsn}, "status", "--json")
	e.want(s, 0)
	var got []holderJSON
	if err := json.Unmarshal(s.stdout.Bytes(), &got); err != nil {
		t.Fatal(err)
	}
	if len(got) != 1 || got[0].Key != "pair:-1,2" || len(got[0].Pair) != 2 || got[0].Pair[0] != -1 || got[0].Pair[1] != 2 ||
		got[0].Mode != "shared" || got[0].ApplicationName != "pglock run: sh" {
		t.Errorf("status --json = %+v, want pglock run's shared hold of pair:-1,2", got)
	}
	s = e.pglock(nil, "status", e.dsnArg())
	e.want(s, 0)
	if rows := readStatusTable(t, s.stdout.String()); len(rows) != 1 || rows[0].cells["HOLDS"] != "pair:-1,2 shared" {
		t.Errorf("pglock status:\n%s\nwant one line, HOLDS pair:-1,2 shared", s.stdout.String())
	}
	touch(t, e.dir+"/release-A")
	e.wait(p)
	e.want(p, 0)
}

func TestStatusUsage(t *testing.T) {
	e := newEnv(t)
	for _, args := range [][]string{
		{"--watch", "50ms"},
		{"--watch=0"},
		{"--watch", "soon"},
		{"--watch", "2s", "extra"},
		{"--key", "k", "2s"},
	} {
		p := e.pglock(nil, append([]string{"status"}, args...)...)
		e.want(p, exitUsage)
		if !strings.Contains(p.stderr.String(), "Usage") || p.stdout.Len() != 0 {
			t.Errorf("pglock status %q: stdout %q, stderr %q; want a usage message on stderr", args, p.stdout.String(), p.stderr.String())
		}
	}
}
