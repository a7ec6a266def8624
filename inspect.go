package advisory

import (
	"cmp"
	"context"
	"fmt"
	"slices"
	"time"

	"github.com/jackc/pgx/v5"
)

// Querier runs a query. *pgx.Conn, *pgxpool.Pool, *pgxpool.Conn and pgx.Tx
// satisfy it.
type Querier interface {
	Query(ctx context.Context, sql string, args ...any) (pgx.Rows, error)
}

// Holder is one session's hold of, or wait for, an advisory lock, as the
// server reports it in pg_locks joined with pg_stat_activity. A session that
// holds a key both shared and exclusively appears twice, once per mode.
//
// The pg_stat_activity columns (ApplicationName, ClientAddr, State, Since
// for a holder, BackendStart) are empty or zero when the server does not
// show them to the querying role: another role's sessions need the
// pg_read_all_stats privilege (or superuser).
type Holder struct {
	// PID is the holding or waiting backend's process id, as
	// pg_backend_pid() returns it there and pg_terminate_backend takes it;
	// 0 for a lock held by a prepared transaction.
	PID int32
	// Key is the lock.
	Key Key
	// Mode is ModeExclusive or ModeShared.
	Mode Mode
	// Granted is true for a holder, false for a session waiting for the lock.
	Granted bool
	// ApplicationName is the session's application_name.
	ApplicationName string
	// ClientAddr is the client's IP address; "" for a unix-socket
	// connection or when not shown.
	ClientAddr string
	// State is pg_stat_activity.state: "active", "idle", "idle in
	// transaction", ...
	State string
	// Since is, for a waiter, when its wait began; for a holder, since
	// when it holds. Zero when not shown.
	//
	// For a session of this package (SinceExact) it is the true time: its
	// health check and its wait slices carry how long the hold or the wait
	// has lasted in their statement text, which pg_stat_activity shows, so
	// a hold shows the time since the grant whatever health checks came
	// since, and a wait the time since it began whatever slices came since.
	// (For a Session holding several keys, since it began holding without
	// a break; the grant itself when its last statement was the lock.)
	//
	// Otherwise it is what PostgreSQL records. For a waiter,
	// pg_locks.waitstart (for the first moments of a wait, when its
	// statement began). For a holder PostgreSQL records no grant time, and
	// Since is the best available proxy: the session's state_change, that
	// is when its last statement ended if it is idle (the lock was granted
	// no later than that), or when its current statement began if it is
	// active (the statement may have taken the lock later); BackendStart is
	// then the other bound.
	Since time.Time
	// SinceExact is true when Since is the true grant or wait start that a
	// session of this package reported, false when it is PostgreSQL's
	// record.
	SinceExact bool
	// BackendStart is when the session connected: no lock it holds was
	// granted earlier. Zero when not shown.
	BackendStart time.Time
}

// Holders returns the sessions that hold or wait for key in the current
// database, holders first, each group ordered by Since, then PID and Mode. It only reads
// pg_locks and pg_stat_activity (never by trying to lock) and so sees every
// session's locks, including locks taken outside this package.
//
// It returns an error matching ErrInvalidKey for the zero Key (sending no
// SQL), and the query's error, wrapped in an *Error, when it fails. The
// result is a snapshot: locks can change as soon as it is taken. Since for
// a waiter needs PostgreSQL 14 or later (pg_locks.waitstart); the query
// fails on older servers.
func Holders(ctx context.Context, q Querier, key Key) ([]Holder, error) {
	if !key.Valid() {
		return nil, invalidKey("holders")
	}
	if q == nil {
		return nil, errorf("holders %s: nil Querier", key)
	}
	classid, objid, objsubid := key.LockRow()
	hs, err := queryHolders(ctx, q, holdersOneSQL, int64(classid), int64(objid), objsubid)
	if err != nil {
		return nil, keyError("holders", key, nil, err)
	}
	return hs, nil
}

// AllHolders returns every advisory lock hold and wait in the current
// database, ordered by key as pg_locks stores it (int64 keys first, then
// pair keys; within a space by classid, then objid, as unsigned numbers),
// then holders before waiters, then Since, PID and Mode. Errors and caveats
// are those of Holders.
func AllHolders(ctx context.Context, q Querier) ([]Holder, error) {
	if q == nil {
		return nil, errorf("all_holders: nil Querier")
	}
	hs, err := queryHolders(ctx, q, holdersAllSQL)
	if err != nil {
		return nil, &Error{Op: "all_holders", Err: err}
	}
	return hs, nil
}

// queryHolders runs one of the holders statements and reads its rows.
func queryHolders(ctx context.Context, q Querier, sql string, args ...any) ([]Holder, error) {
	rows, err := q.Query(ctx, sql, args...)
	if err != nil {
		return nil, err
	}
	hs, err := pgx.CollectRows(rows, scanHolder)
	if err != nil {
		return nil, err
	}
	// The true times may reorder holders and waiters of a key.
	slices.SortStableFunc(hs, func(a, b Holder) int {
		ac, ao, as := a.Key.LockRow()
		bc, bo, bs := b.Key.LockRow()
		return cmp.Or(cmp.Compare(as, bs), cmp.Compare(ac, bc), cmp.Compare(ao, bo),
			-compareBool(a.Granted, b.Granted), a.Since.Compare(b.Since), cmp.Compare(a.PID, b.PID), cmp.Compare(a.Mode, b.Mode))
	})
	return hs, nil
}

// compareBool orders false before true.
func compareBool(a, b bool) int {
	switch {
	case a == b:
		return 0
	case a:
		return 1
	}
	return -1
}

// scanHolder reads one row of holdersSQL.
func scanHolder(row pgx.CollectableRow) (Holder, error) {
	var (
		h              Holder
		classid, objid int64
		objsubid       int16
		mode           string
		since, start   *time.Time
		queryStart     *time.Time
		markerLine     *string
	)
	err := row.Scan(&h.PID, &classid, &objid, &objsubid, &mode, &h.Granted,
		&h.ApplicationName, &h.ClientAddr, &h.State, &since, &start, &queryStart, &markerLine)
	if err != nil {
		return Holder{}, err
	}
	if h.Key, err = KeyFromLockRow(uint32(classid), uint32(objid), objsubid); err != nil {
		return Holder{}, err
	}
	switch mode {
	case ModeExclusive.lockMode():
		h.Mode = ModeExclusive
	case ModeShared.lockMode():
		h.Mode = ModeShared
	default:
		return Holder{}, fmt.Errorf("pg_locks mode %q is not an advisory lock mode", mode)
	}
	if since != nil {
		h.Since = *since
	}
	if start != nil {
		h.BackendStart = *start
	}
	if markerLine != nil && queryStart != nil {
		h.trueSince(*markerLine, *queryStart)
	}
	return h, nil
}

// trueSince sets Since to the true time a session of this package reported
// in the first line of its statement (see Since), when that line is a
// marker that applies to h; queryStart is when that statement began.
func (h *Holder) trueSince(line string, queryStart time.Time) {
	held, d, ok := parseMarker(line)
	switch {
	case !ok:
	case h.Granted && held, !h.Granted && !held && h.State == "active":
		// A health check of the hold, or a slice of the wait in flight.
		h.Since, h.SinceExact = queryStart.Add(-d), true
	case h.Granted && !held && h.State == "idle":
		// The session's last statement was the slice that got the lock:
		// it went idle at the grant (Since is state_change).
		h.SinceExact = true
	}
}
