package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"slices"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/seed0ad592b7/advisory"
)

// statusTimeout bounds one reading of the locks: "pglock status", or one
// frame of --watch.
const statusTimeout = 30 * time.Second

const statusAbout = `Shows every advisory lock of the database, held or awaited, or those of
one key, and who blocks whom: each waiter is listed under the session that
blocks it (pg_blocking_pids), so a chain reads as a tree. One line a
session: its pid, the key it WAITS FOR and for how long (WAITING), the keys
it HOLDS and for how long (HELD), when it CONNECTED, its client address and
application_name. A session holding more than 3 keys shows their count and
range ("8000 locks int64:1 … int64:8000"); --keys lists every key, one a
line. It reads pg_locks and pg_stat_activity; it never tries to lock.

A key another tool locks while it migrates this database is labelled with
the tool, as "pglock key --tool" names it: goose (default lock id), migrate
(golang-migrate, public.schema_migrations), rails, sqlx-migrate.

HELD is since the grant and WAITING since the wait began, for the sessions
of package advisory (pglock run, and programs using the package): their
health checks and wait slices write those times into the statement text
that pg_stat_activity shows. For other clients the times are PostgreSQL's,
marked with "*": WAITING since pg_locks.waitstart, and HELD since the
session last changed state (PostgreSQL records no grant time; the grant
was no later if the session is idle), with CONNECTED the other bound. So is
a session of package advisory just after an uncontended grant, until its
first health check. Durations are measured by the server's clock.

A waiter using package advisory waits in short slices (shorter than the
server's deadlock_timeout) and between two slices leaves the server's queue
for a moment: a reading taken then misses it, or shows it waiting with no
blocker (at the top level). The next reading shows it again.

--watch [DUR] redraws the screen every DUR (default 1s, like watch(1))
until interrupted (Ctrl-C: exit status 0). When stdout is not a terminal it
prints each reading after a header line with the time, followed by a blank
line, and no escape codes; with --json, one JSON array a line. A reading
that fails is shown and the next one reconnects.

--slots N with a key shows the semaphore of N slots on that key (as
"pglock run --slots N" and advisory.AcquireSemaphore take it) as one group:
each slot, its key and who holds it (or "free"), then the sessions waiting
for a slot (a waiter waits on one slot after another, so no slot is named
for it). With --json, one object: the key, its slots, each with its
holders (as the elements below), and the waiters.

--json prints a JSON array for scripts: one element a lock row, holders
and waiters, times in RFC 3339 (null unknown), blocked_by the pids that
block a waiter ([] for a holder), held_seconds or waiting_seconds, and
since_source: "advisory" for a true time, "postgresql" for PostgreSQL's.
`

func cmdStatus(args []string, stdout, stderr io.Writer) int {
	c := newCommand("status",
		"pglock status [--key NAME | --id N | --pair A,B] [--slots N] [--keys] [--json] [--watch [DUR]] [--dsn DSN]",
		statusAbout)
	kf := addKeyFlags(c.fs, "show only")
	dsn := addDSNFlag(c.fs, "connection string `DSN` (default: DATABASE_URL, else the PG* environment)")
	asJSON := c.fs.Bool("json", false, "print JSON instead of a table")
	allKeys := c.fs.Bool("keys", false, "list every key a session holds, one a line")
	var slots slotsFlag
	c.fs.Var(&slots, "slots", "show the semaphore of `N` slots on the key: its slots, their holders and its waiters")
	watch := &watchFlag{}
	c.fs.Var(watch, "watch", "redraw the status every `[DUR]` (default 1s, at least 100ms) until interrupted")
	if code := parseStatus(c, watch, args, stdout, stderr); code >= 0 {
		return code
	}
	if msg := kf.check(slots > 0); msg != "" {
		return c.usageError(stderr, msg)
	}
	cn := connFrom(*dsn)
	cfg, err := cn.connConfig("pglock status")
	if err != nil {
		fmt.Fprintln(stderr, "pglock: "+err.Error())
		return exitFailure
	}
	src := &statusSource{cn: cn, cfg: cfg}
	defer src.close()
	v := &statusView{json: *asJSON, keys: *allKeys}
	if len(kf.given) == 1 {
		src.key, v.what = &kf.key, kf.describe()
		if kf.given[0] == "--key" {
			v.name = kf.name
		}
	}
	if slots > 0 {
		v.slots, v.sem = advisory.SemaphoreKeys(kf.key, int(slots)), kf.key
		src.key, src.keys = nil, v.slots
	}
	if watch.set {
		return watchStatus(src, v, watch.every, stdout, stderr)
	}
	ctx, cancel := context.WithTimeout(context.Background(), statusTimeout)
	defer cancel()
	snap, err := src.read(ctx)
	if err == nil {
		err = v.write(stdout, snap)
	}
	if err != nil {
		fmt.Fprintln(stderr, "pglock: "+oneLine(cn.redact(err.Error())))
		return exitFailure
	}
	return exitOK
}

// parseStatus parses status's args as command.parse does, taking the
// optional DUR right after --watch ("--watch 2s" as well as "--watch=2s").
func parseStatus(c *command, watch *watchFlag, args []string, stdout, stderr io.Writer) int {
	if code := c.parse(args, stdout, stderr); code >= 0 {
		return code
	}
	rest := c.fs.Args()
	if at := len(args) - len(rest); watch.set && len(rest) > 0 && at > 0 &&
		(args[at-1] == "--watch" || args[at-1] == "-watch") {
		if _, err := parseDuration(rest[0]); err == nil {
			if err := watch.Set(rest[0]); err != nil {
				return c.usageError(stderr, "invalid value "+fmt.Sprintf("%q", rest[0])+" for flag --watch: "+err.Error())
			}
			if code := c.parse(rest[1:], stdout, stderr); code >= 0 {
				return code
			}
		}
	}
	if c.fs.NArg() > 0 {
		return c.usageError(stderr, fmt.Sprintf("unexpected argument %q", c.fs.Arg(0)))
	}
	return -1
}

// statusSQL reads what a reading needs besides the lock rows: the
// database's name (for the labels of other tools' keys), the server's clock
// (durations do not depend on the client's clock) and, as a JSON object,
// pg_blocking_pids of each waiting pid in $1.
const statusSQL = `SELECT current_database(), clock_timestamp(), ` +
	`COALESCE((SELECT json_object_agg(p, pg_blocking_pids(p)) FROM unnest($1::int4[]) AS p), '{}')`

// snapshot is one reading of the advisory locks.
type snapshot struct {
	rows      []advisory.Holder       // as advisory.AllHolders or Holders orders them
	blockedBy map[int32][]int32       // a waiting pid: the pids that block it
	tools     map[advisory.Key]string // keys of other tools: the tool
	now       time.Time               // the server's clock, just after rows were read
}

// statusSource reads snapshots over one connection, made when first needed
// and again after a reading failed.
type statusSource struct {
	cn   *conn
	cfg  *pgx.ConnConfig
	key  *advisory.Key  // nil: every key, or keys
	keys []advisory.Key // a semaphore's slots (--slots); nil: key, or every key
	db   *pgx.Conn
}

// read takes a snapshot. On failure it closes the connection, so that the
// next read connects again, and returns a one-line error without secrets.
func (s *statusSource) read(ctx context.Context) (*snapshot, error) {
	if s.db == nil {
		db, err := pgx.ConnectConfig(ctx, s.cfg)
		if err != nil {
			return nil, s.cn.connectError(s.cfg, err)
		}
		s.db = db
	}
	snap, err := s.query(ctx)
	if err != nil {
		s.close()
		return nil, s.cn.errorf("%v", err)
	}
	return snap, nil
}

func (s *statusSource) query(ctx context.Context) (*snapshot, error) {
	var (
		snap = &snapshot{}
		err  error
	)
	if s.key != nil {
		snap.rows, err = advisory.Holders(ctx, s.db, *s.key)
	} else {
		snap.rows, err = advisory.AllHolders(ctx, s.db)
	}
	if err != nil {
		return nil, err
	}
	if s.keys != nil {
		snap.rows = slices.DeleteFunc(snap.rows, func(h advisory.Holder) bool { return !slices.Contains(s.keys, h.Key) })
	}
	waiting := []int32{}
	for _, h := range snap.rows {
		if !h.Granted && !slices.Contains(waiting, h.PID) {
			waiting = append(waiting, h.PID)
		}
	}
	var database string
	if err := s.db.QueryRow(ctx, statusSQL, waiting).Scan(&database, &snap.now, &snap.blockedBy); err != nil {
		return nil, fmt.Errorf("reading pg_blocking_pids: %w", err)
	}
	snap.tools = knownToolKeys(database)
	return snap, nil
}

// close closes the connection, if any.
func (s *statusSource) close() {
	if s.db != nil {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		_ = s.db.Close(ctx)
		s.db = nil
	}
}

// statusView is how a snapshot is shown.
type statusView struct {
	json  bool
	keys  bool           // --keys: every held key on its own line
	what  string         // the key of --key, --id or --pair as messages name it; "" for every key
	name  string         // the NAME of --key
	slots []advisory.Key // --slots: the semaphore's slot keys, in slot order; nil: no semaphore
	sem   advisory.Key   // --slots: the semaphore's key
}

// write prints snap: a table, or the JSON array.
func (v *statusView) write(w io.Writer, snap *snapshot) error {
	if v.json {
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		return enc.Encode(v.jsonValue(snap))
	}
	return v.writeTable(w, snap)
}

// jsonValue is what --json prints of snap.
func (v *statusView) jsonValue(snap *snapshot) any {
	if v.slots != nil {
		return v.semaphoreJSON(snap)
	}
	return v.jsonRows(snap)
}

// writeTable prints the sessions as a tree, or a sentence when there is no
// lock.
func (v *statusView) writeTable(w io.Writer, snap *snapshot) error {
	if v.slots != nil {
		return v.writeSemaphore(w, snap)
	}
	if len(snap.rows) == 0 {
		if v.what != "" {
			_, err := fmt.Fprintf(w, "no session holds or waits for %s (for a semaphore on it, add --slots N)\n", v.what)
			return err
		}
		_, err := fmt.Fprintln(w, "no advisory locks held or awaited in this database")
		return err
	}
	if v.name != "" {
		fmt.Fprintf(w, "key %s\n", v.what)
	}
	return writeTree(w, sessionTree(snap), snap, v.keys)
}

// holderJSON is one element of "pglock status --json".
type holderJSON struct {
	Key             string     `json:"key"`            // "int64:N" or "pair:A,B"
	Name            string     `json:"name,omitempty"` // the --key NAME
	Tool            string     `json:"tool,omitempty"` // the tool whose migration lock it is
	Int64           *int64     `json:"int64,omitempty"`
	Pair            []int32    `json:"pair,omitempty"`
	ClassID         uint32     `json:"classid"`
	ObjID           uint32     `json:"objid"`
	ObjSubID        int16      `json:"objsubid"`
	Mode            string     `json:"mode"` // "exclusive" or "shared"
	Granted         bool       `json:"granted"`
	PID             int32      `json:"pid"`
	BlockedBy       []int32    `json:"blocked_by"` // a waiter's pg_blocking_pids; [] for a holder
	ApplicationName string     `json:"application_name"`
	ClientAddr      string     `json:"client_addr"`
	State           string     `json:"state"`
	Since           *time.Time `json:"since"`
	SinceSource     string     `json:"since_source"`              // "advisory": the true time; "postgresql": PostgreSQL's record
	HeldSeconds     *float64   `json:"held_seconds,omitempty"`    // a holder: seconds since Since
	WaitingSeconds  *float64   `json:"waiting_seconds,omitempty"` // a waiter: seconds since Since
	BackendStart    *time.Time `json:"backend_start"`
}

// jsonRows is snap as "pglock status --json" prints it.
func (v *statusView) jsonRows(snap *snapshot) []holderJSON {
	out := make([]holderJSON, 0, len(snap.rows))
	for _, h := range snap.rows {
		classid, objid, objsubid := h.Key.LockRow()
		j := holderJSON{
			Key: h.Key.String(), Name: v.name, Tool: snap.tools[h.Key], ClassID: classid, ObjID: objid, ObjSubID: objsubid,
			Mode: h.Mode.String(), Granted: h.Granted, PID: h.PID, BlockedBy: []int32{},
			ApplicationName: h.ApplicationName, ClientAddr: h.ClientAddr, State: h.State,
			Since: timeOrNil(h.Since), SinceSource: sinceSource(h), BackendStart: timeOrNil(h.BackendStart),
		}
		if v, ok := h.Key.Int64(); ok {
			j.Int64 = &v
		}
		if a, b, ok := h.Key.Pair(); ok {
			j.Pair = []int32{a, b}
		}
		secs := secondsSince(snap.now, h.Since)
		if h.Granted {
			j.HeldSeconds = secs
		} else {
			j.WaitingSeconds = secs
			if pids := snap.blockedBy[h.PID]; pids != nil {
				j.BlockedBy = pids
			}
		}
		out = append(out, j)
	}
	return out
}

// sinceSource says where h.Since comes from, for --json.
func sinceSource(h advisory.Holder) string {
	if h.SinceExact {
		return "advisory"
	}
	return "postgresql"
}

func timeOrNil(t time.Time) *time.Time {
	if t.IsZero() {
		return nil
	}
	return &t
}

// secondsSince is now-t in seconds to the millisecond, nil for an unknown t.
func secondsSince(now, t time.Time) *float64 {
	if t.IsZero() {
		return nil
	}
	s := math.Round(max(now.Sub(t), 0).Seconds()*1000) / 1000
	return &s
}

// age is now-t rounded for people, "-" for an unknown t.
func age(now, t time.Time) string {
	if t.IsZero() {
		return "-"
	}
	d := max(now.Sub(t), 0)
	if d < time.Minute {
		return d.Round(100 * time.Millisecond).String()
	}
	return d.Round(time.Second).String()
}
