package advisory

import (
	"fmt"
	"strings"
	"time"
)

// What another process reads: the query behind Holders and pglock
// status, and the markers the library writes into its own statements for
// it. The other statements are in the other sql*.go files (sql.go lists
// them).

// holdersSQL lists advisory lock rows of the current database, granted and
// waiting, joined with the activity of the backend that holds or awaits
// each: pid, classid, objid, objsubid, mode, granted, application_name,
// client address, state, since, backend_start, query_start, and the
// library's marker (markerLineSQL). since is pg_locks.waitstart
// for a waiter (PostgreSQL 14 or later; it can be NULL for a moment after
// the wait begins, when the statement's query_start stands in) and the
// backend's state_change for a holder (PostgreSQL records no grant time).
// %s is an extra WHERE condition: "" for every key, or holdersKeyFilter.
const holdersSQL = `SELECT COALESCE(l.pid, 0), l.classid::int8, l.objid::int8, l.objsubid, l.mode, l.granted, ` +
	`COALESCE(a.application_name, ''), COALESCE(host(a.client_addr), ''), COALESCE(a.state, ''), ` +
	`CASE WHEN l.granted THEN a.state_change ELSE COALESCE(l.waitstart, a.query_start) END, a.backend_start, ` +
	`a.query_start, ` + markerLineSQL + ` ` +
	`FROM pg_catalog.pg_locks l LEFT JOIN pg_catalog.pg_stat_activity a ON a.pid = l.pid ` +
	`WHERE l.locktype = 'advisory' ` +
	`AND l.database = (SELECT oid FROM pg_catalog.pg_database WHERE datname = current_database())%s ` +
	`ORDER BY l.objsubid, l.classid, l.objid, l.granted DESC, 10, 1, 5`

// markerLineSQL is the first line of the session's statement when it is a
// library's marker, else NULL: only that line leaves the server.
const markerLineSQL = `CASE WHEN starts_with(a.query, '` + markerPrefix + `') THEN split_part(a.query, E'\n', 1) END`

// holdersKeyFilter narrows holdersSQL to one key.
// Arguments: classid, objid, objsubid.
const holdersKeyFilter = ` AND l.classid::int8 = $1 AND l.objid::int8 = $2 AND l.objsubid = $3`

var (
	holdersOneSQL = fmt.Sprintf(holdersSQL, holdersKeyFilter)
	holdersAllSQL = fmt.Sprintf(holdersSQL, "")
)

// Markers (SPEC §7: true times in pglock status). PostgreSQL records no
// grant time, and a sliced wait's pg_locks.waitstart is the start of its
// slice, so the library writes its sessions' times where another process
// can read them: in the text of its own statements, which
// pg_stat_activity.query shows (the current statement of an active
// session, the last one of an idle session). Costs no round trip: the
// health check's ping (an empty query, as pgconn's Ping sends) is the held
// marker itself, and each wait slice's message begins with the wait
// marker. Each carries how long the hold or the wait had lasted when the
// statement was sent, measured by the client's monotonic clock, so a
// reader computes the start from the server's own query_start, whatever
// the two clocks say; the wall-clock time that follows is for people.
// holdersSQL reads the marker back (markerLineSQL).
const (
	markerPrefix  = "-- advisory: "
	markerHeld    = markerPrefix + "held for "    // the health check's ping
	markerWaiting = markerPrefix + "waiting for " // a wait slice's first line
)

// pingSQL is the health check of a session that holds nothing the
// library recorded (a WithConn that took its own locks): pgconn's Ping.
const pingSQL = "-- ping"

// heldPingSQL is the health check of a session that has held locks since
// since, d ago.
func heldPingSQL(d time.Duration, since time.Time) string {
	return marker(markerHeld, d, since)
}

// waitMarkerSQL is the first line of a wait slice's message, for a wait
// that began at since, d ago.
func waitMarkerSQL(d time.Duration, since time.Time) string {
	return marker(markerWaiting, d, since) + "\n"
}

// marker is "PREFIX 5.123s (since 2026-12-06T15:48:30.678Z)".
func marker(prefix string, d time.Duration, since time.Time) string {
	return prefix + max(d, 0).Round(time.Millisecond).String() + " (since " + since.UTC().Format(time.RFC3339Nano) + ")"
}

// parseMarker reads a marker line: held (true) or waiting, and for how long
// when its statement began. ok is false for any other text.
func parseMarker(line string) (held bool, d time.Duration, ok bool) {
	rest, held := strings.CutPrefix(line, markerHeld)
	if !held {
		if rest, ok = strings.CutPrefix(line, markerWaiting); !ok {
			return false, 0, false
		}
	}
	text, _, found := strings.Cut(rest, " (since ")
	if !found {
		return false, 0, false
	}
	d, err := time.ParseDuration(text)
	if err != nil || d < 0 {
		return false, 0, false
	}
	return held, d, true
}
