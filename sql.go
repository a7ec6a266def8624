package advisory

import (
	"fmt"
	"strconv"
	"strings"
	"time"
)

// Every statement the library sends is in this file.
//
// Lock statements come from one table indexed by scope (session or
// transaction), mode (exclusive or shared), wait (try, wait, or wait bounded
// by a server-side lock_timeout) and key space (one bigint or two int4).
// Key arguments always come last: $1 for Int64Key, $1, $2 for PairKey; a
// bounded wait puts the lock_timeout text first and shifts the key.

// scope is the lifetime of a lock on the server.
type scope int

const (
	scopeSession scope = iota // held until unlocked or the session ends
	scopeTx                   // held until the transaction ends
)

// wait is how a lock statement waits for a lock held elsewhere.
type wait int

const (
	waitTry     wait = iota // pg_try_*: never waits, returns a boolean
	waitForever             // pg_advisory_*lock: waits on the server, returns void
	waitBounded             // as waitForever, under a lock_timeout set for this statement only
)

// boundedLockSQL runs LOCKCALL with lock_timeout set to $1 for the statement
// and restores the previous value afterwards, so a bounded wait never changes
// the session's or the transaction's own lock_timeout. Each level is an
// OFFSET 0 subquery, which PostgreSQL neither flattens nor reorders, so the
// order is fixed: read the old value, set the bound, lock, restore. A lock
// that fails aborts the statement, and set_config(..., true) is then undone
// with it.
const boundedLockSQL = `SELECT set_config('lock_timeout', locked.old, true) FROM (` +
	`SELECT bound.old, %s AS lock FROM (` +
	`SELECT saved.old, set_config('lock_timeout', $1, true) AS new FROM (` +
	`SELECT current_setting('lock_timeout') AS old OFFSET 0) AS saved OFFSET 0) AS bound OFFSET 0) AS locked`

// lockSQL[scope][mode][wait][space-1] is the statement that takes a lock.
var lockSQL [2][2][3][2]string

// unlockSQL[mode][space-1] releases one session-level hold and returns the
// boolean PostgreSQL reports (false, with a WARNING, when it was not held).
// unlockLastSQL does the same for a session's last hold, and resets the
// keep-alives in the same statement (a second column).
var unlockSQL, unlockLastSQL [2][2]string

// firstTrySQL[mode][space-1] is the first statement of a lock on a session
// that holds nothing: it tries the key once and, only if it got it, sets the
// keep-alives in the same statement. Columns: got, the text of the last
// keep-alive set (NULL when not got). Arguments: the key, then the four
// keep-alive values (keepaliveArgs). An uncontended lock is this one round
// trip; a contended one goes on with wait slices (sliceSQL).
var firstTrySQL [2][2]string

func init() {
	for sc, xact := range []string{scopeSession: "", scopeTx: "xact_"} {
		for m, shared := range []string{ModeExclusive: "", ModeShared: "_shared"} {
			// Key parameters: alone, and after a bounded wait's $1.
			for sp, params := range [][2]string{{"$1", "$2"}, {"$1, $2", "$2, $3"}} {
				lockSQL[sc][m][waitTry][sp] = fmt.Sprintf("SELECT pg_try_advisory_%slock%s(%s)", xact, shared, params[0])
				lockSQL[sc][m][waitForever][sp] = fmt.Sprintf("SELECT pg_advisory_%slock%s(%s)", xact, shared, params[0])
				lockSQL[sc][m][waitBounded][sp] = fmt.Sprintf(boundedLockSQL, fmt.Sprintf("pg_advisory_%slock%s(%s)", xact, shared, params[1]))
				unlockSQL[m][sp] = fmt.Sprintf("SELECT pg_advisory_unlock%s(%s)", shared, params[0])
				unlockLastSQL[m][sp] = unlockSQL[m][sp] + ", " + keepaliveResetSQL
				if sc == int(scopeSession) {
					n := strings.Count(params[0], "$")
					firstTrySQL[m][sp] = fmt.Sprintf("SELECT t.got, CASE WHEN t.got THEN %s END FROM (SELECT pg_try_advisory_lock%s(%s) AS got OFFSET 0) AS t",
						keepaliveSetExpr(numberedParams(n+1)), shared, params[0])
				}
			}
		}
	}
}

// Keep-alive settings bound how long the server keeps a silent client's
// session, and so its locks (see keepaliveArgs): TCP keep-alives for an idle
// connection, and tcp_user_timeout for data the client never acknowledges
// (PostgreSQL 12 or later). They are in force exactly while a session holds
// a lock: the statement that takes a session's first hold sets them, in the
// same transaction as the grant (so a failed lock never leaves them half
// set), and the statement that releases its last hold resets them to the
// connection's defaults, so a connection goes back to the pool as the pool
// lent it.
var keepaliveNames = [...]string{"tcp_keepalives_idle", "tcp_keepalives_interval", "tcp_keepalives_count", "tcp_user_timeout"}

// keepaliveSetExpr is a text expression that sets the keep-alives, session
// wide, to the values given as SQL expressions (parameters or literals).
func keepaliveSetExpr(values [4]string) string {
	var b strings.Builder
	for i, name := range keepaliveNames {
		if i > 0 {
			b.WriteString(" || ")
		}
		fmt.Fprintf(&b, "set_config('%s', %s, false)", name, values[i])
	}
	return b.String()
}

// keepaliveResetSQL is a text expression that resets the keep-alives to the
// connection's defaults (set_config with a NULL value is RESET): the values
// of its startup packet, role or database, or the server's. A keep-alive the
// host SET on the connection itself after connecting is reset too.
var keepaliveResetSQL = keepaliveSetExpr([4]string{"NULL", "NULL", "NULL", "NULL"})

// unlockAllSQL releases every session-level advisory lock of the session and
// resets the keep-alives.
var unlockAllSQL = `SELECT pg_advisory_unlock_all(), ` + keepaliveResetSQL

// heldSQL reports whether this session holds a key in a mode, granted. It is
// how an ambiguous error from a lock statement (a cancel or lock_timeout that
// may have arrived just after the grant) is resolved.
// Arguments: classid, objid, objsubid, pg_locks mode name.
const heldSQL = `SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_locks ` +
	`WHERE locktype = 'advisory' AND pid = pg_backend_pid() AND granted ` +
	`AND classid::int8 = $1 AND objid::int8 = $2 AND objsubid = $3 AND mode = $4)`

// numberedParams returns the four parameter references $first..$first+3.
func numberedParams(first int) (p [4]string) {
	for i := range p {
		p[i] = "$" + strconv.Itoa(first+i)
	}
	return p
}

// lockTimeoutText formats a wait bound for lock_timeout. The server rounds to
// milliseconds and treats 0 as "no timeout", so the bound is rounded up to at
// least one millisecond.
func lockTimeoutText(d time.Duration) string {
	ms := (d + time.Millisecond - 1) / time.Millisecond
	if ms < 1 {
		ms = 1
	}
	return fmt.Sprintf("%dms", ms)
}

// lockStatement returns the SQL and arguments that lock key.
func lockStatement(sc scope, m Mode, w wait, key Key, bound time.Duration) (string, []any) {
	sql := lockSQL[sc][m][w][key.space-1]
	if w == waitBounded {
		return sql, append([]any{lockTimeoutText(bound)}, key.args()...)
	}
	return sql, key.args()
}

// Many-key statements, for Session.LockMany and Session.UnlockMany. The keys
// come as three arrays, already in canonical order: $1 int8[] holds the
// Int64Key space, $2 and $3 int4[] the two halves of the PairKey space. A
// bounded wait puts the lock_timeout text first and shifts them by one.
//
// Each statement calls the lock function exactly once per key, in array
// order: unnest yields rows in array order, UNION ALL runs its branches in
// order (the advisory functions are parallel restricted, so no parallel
// plan reorders them), and the volatile call sits in the target list of
// its branch, which PostgreSQL neither pushes a filter into nor evaluates
// twice. lockmany_test.go checks the order and the count on the server.
const (
	// manyWaitSQL takes every key, waiting for each in turn, and returns
	// how many it took. A failure aborts the statement, but the session
	// locks taken before it stay held.
	manyWaitSQL = `SELECT count(*) FROM (` +
		`SELECT pg_advisory_lock%[1]s(k) FROM unnest(%[2]s::int8[]) AS k%[5]s ` +
		`UNION ALL ` +
		`SELECT pg_advisory_lock%[1]s(a, b) FROM unnest(%[3]s::int4[], %[4]s::int4[]) AS u(a, b)%[5]s) AS locked`

	// manyTrySQL tries the keys in order and stops at the first one held
	// elsewhere: it returns that key's 1-based position, or no row when it
	// took them all. The keys before that position are then held.
	manyTrySQL = `SELECT i FROM (` +
		`SELECT i, pg_try_advisory_lock%[1]s(k) AS ok FROM unnest($1::int8[]) WITH ORDINALITY AS u(k, i) ` +
		`UNION ALL ` +
		`SELECT cardinality($1::int8[]) + i, pg_try_advisory_lock%[1]s(a, b) FROM unnest($2::int4[], $3::int4[]) WITH ORDINALITY AS u(a, b, i)` +
		`) AS tried WHERE NOT ok LIMIT 1`

	// manyBoundedSQL runs a manyWaitSQL with lock_timeout set to $1 for the
	// statement (so for each key's wait), in the same fixed order as
	// boundedLockSQL: the count is a subquery correlated with the level
	// that sets the bound, so it runs after it.
	manyBoundedSQL = `SELECT set_config('lock_timeout', locked.old, true), locked.n FROM (` +
		`SELECT bound.old, (%s) AS n FROM (` +
		`SELECT saved.old, set_config('lock_timeout', $1, true) AS new FROM (` +
		`SELECT current_setting('lock_timeout') AS old OFFSET 0) AS saved OFFSET 0) AS bound OFFSET 0) AS locked`

	// manyUnlockSQL releases one session-level hold of every key and
	// returns how many of them the server did not hold.
	manyUnlockSQL = `SELECT count(*) FILTER (WHERE NOT ok) FROM (` +
		`SELECT pg_advisory_unlock%[1]s(k) AS ok FROM unnest($1::int8[]) AS k ` +
		`UNION ALL ` +
		`SELECT pg_advisory_unlock%[1]s(a, b) FROM unnest($2::int4[], $3::int4[]) AS u(a, b)) AS unlocked`
)

// lockManySQL[mode][wait] takes many keys; unlockManySQL[mode] releases
// them. manyFirstTrySQL is the NoWait form for a session that holds nothing:
// it returns one row, the position of the first busy key or NULL when it
// took them all, and then also sets the keep-alives (arguments $4..$7).
// unlockManyLastSQL releases a session's last holds and resets the
// keep-alives (a second column).
var (
	lockManySQL       [2][3]string
	unlockManySQL     [2]string
	manyFirstTrySQL   [2]string
	unlockManyLastSQL [2]string
)

func init() {
	for m, shared := range []string{ModeExclusive: "", ModeShared: "_shared"} {
		lockManySQL[m][waitTry] = fmt.Sprintf(manyTrySQL, shared)
		lockManySQL[m][waitForever] = fmt.Sprintf(manyWaitSQL, shared, "$1", "$2", "$3", "")
		lockManySQL[m][waitBounded] = fmt.Sprintf(manyBoundedSQL,
			fmt.Sprintf(manyWaitSQL, shared, "$2", "$3", "$4", " WHERE bound.new IS NOT NULL"))
		unlockManySQL[m] = fmt.Sprintf(manyUnlockSQL, shared)
		manyFirstTrySQL[m] = fmt.Sprintf("SELECT t.failed, CASE WHEN t.failed IS NULL THEN %s END FROM (SELECT (%s) AS failed OFFSET 0) AS t",
			keepaliveSetExpr(numberedParams(4)), lockManySQL[m][waitTry])
		unlockManyLastSQL[m] = fmt.Sprintf("SELECT u.n, %s FROM (%s OFFSET 0) AS u(n)", keepaliveResetSQL, unlockManySQL[m])
	}
}

// heldInModeSQL lists the keys this session holds, granted, in one mode:
// classid, objid, objsubid. It resolves a failed LockMany, which may have
// taken some of its keys before it failed. Argument: pg_locks mode name.
//
// It must work when the server's lock table is full (a LockMany that failed
// with 53200 still holds thousands of keys), so it takes no lock in the
// shared lock table: it reads the function behind pg_locks, and has no
// database filter, which would read the shared catalog pg_database and
// need such a lock (a session's advisory locks are all in its own
// database anyway).
const heldInModeSQL = `SELECT classid::int8, objid::int8, objsubid FROM pg_catalog.pg_lock_status() ` +
	`WHERE locktype = 'advisory' AND pid = pg_backend_pid() AND granted AND mode = $1`

// manyArgs returns the key arrays of the many-key statements for keys in
// canonical order: never nil, so an empty space is an empty array, not NULL.
func manyArgs(keys []Key) []any {
	ints, as, bs := []int64{}, []int32{}, []int32{}
	for _, k := range keys {
		if a, b, ok := k.Pair(); ok {
			as, bs = append(as, a), append(bs, b)
			continue
		}
		v, _ := k.Int64()
		ints = append(ints, v)
	}
	return []any{ints, as, bs}
}

// holdersSQL lists advisory lock rows of the current database, granted and
// waiting, joined with the activity of the backend that holds or awaits
// each: pid, classid, objid, objsubid, mode, granted, application_name,
// client address, state, since, backend_start. since is pg_locks.waitstart
// for a waiter (PostgreSQL 14 or later; it can be NULL for a moment after
// the wait begins, when the statement's query_start stands in) and the
// backend's state_change for a holder (PostgreSQL records no grant time).
// %s is an extra WHERE condition: "" for every key, or holdersKeyFilter.
const holdersSQL = `SELECT COALESCE(l.pid, 0), l.classid::int8, l.objid::int8, l.objsubid, l.mode, l.granted, ` +
	`COALESCE(a.application_name, ''), COALESCE(host(a.client_addr), ''), COALESCE(a.state, ''), ` +
	`CASE WHEN l.granted THEN a.state_change ELSE COALESCE(l.waitstart, a.query_start) END, a.backend_start ` +
	`FROM pg_catalog.pg_locks l LEFT JOIN pg_catalog.pg_stat_activity a ON a.pid = l.pid ` +
	`WHERE l.locktype = 'advisory' ` +
	`AND l.database = (SELECT oid FROM pg_catalog.pg_database WHERE datname = current_database())%s ` +
	`ORDER BY l.objsubid, l.classid, l.objid, l.granted DESC, 10, 1, 5`

// holdersKeyFilter narrows holdersSQL to one key.
// Arguments: classid, objid, objsubid.
const holdersKeyFilter = ` AND l.classid::int8 = $1 AND l.objid::int8 = $2 AND l.objsubid = $3`

var (
	holdersOneSQL = fmt.Sprintf(holdersSQL, holdersKeyFilter)
	holdersAllSQL = fmt.Sprintf(holdersSQL, "")
)

// Wait slices (SPEC §2a). A session blocked in pg_advisory_lock holds a
// snapshot for its whole wait, which holds back VACUUM and makes CREATE
// INDEX CONCURRENTLY wait for the waiter. So a wait on a session that holds
// nothing is a sequence of slices: each is one round trip that waits on the
// server for at most half of the server's deadlock_timeout (at most
// sliceCap, and at most the time left of the caller's bound), then lets the
// snapshot go.
//
// A slice must end without an error: a lock_timeout error would be written
// to the server log (two lines a second for every waiting standby) and would
// abort the caller's transaction. So the wait runs in a PL/pgSQL DO block
// whose exception handler catches lock_not_available; a DO block takes no
// parameters, so the keys (integers) are formatted into its text, and it is
// sent with the simple protocol, never prepared. A second statement in the
// same message reports, from the server's own lock table, what the slice
// left held.
//
// Session scope (sliceSessionSQL), for one key or many: the keys are taken
// in canonical order, all or nothing. When the slice ends before it has
// them all, the handler releases what it took (pg_advisory_unlock_all: the
// session held nothing before) unless the last key was granted just as the
// slice ended, in which case every key is held and the slice counts as a
// success. On success the keep-alives are set in the same statement. The
// report is the number of advisory locks the session holds: all the keys,
// or none.
//
// Transaction scope (sliceTxSQL), one key: the handler's subtransaction
// releases a transaction lock granted just as the slice ended, so the handler
// tries the key once more, taking it if it is still free. lock_timeout is
// restored inside the block (set_config(..., true) would otherwise last as
// long as the caller's transaction). The report is whether the transaction
// holds the key.

// sliceCap is the longest slice, whatever the server's deadlock_timeout.
const sliceCap = time.Second

// sliceMsSQL is the length of a slice in milliseconds, at most %d (sliceCap
// or the time left of the caller's bound): half of deadlock_timeout, at
// least 1.
const sliceMsSQL = `least(%d, greatest(1, extract(epoch FROM current_setting('deadlock_timeout')::interval) * 500))`

// sliceLeftSQL sets lock_timeout to what is left of the slice ending at dl.
const sliceLeftSQL = `PERFORM set_config('lock_timeout', greatest(1, ceil(extract(epoch FROM dl - clock_timestamp()) * 1000))::int8 || 'ms', true);`

// heldCountSQL counts the advisory locks the session holds, granted.
const heldCountSQL = `SELECT count(*) FROM pg_catalog.pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid() AND granted`

var sliceSessionSQL = `DO $advisory$DECLARE
	ints int8[] := '{%[1]s}';
	as_ int4[] := '{%[2]s}';
	bs int4[] := '{%[3]s}';
	dl timestamptz := clock_timestamp() + make_interval(secs => ` + strings.Replace(sliceMsSQL, "%d", "%[4]d", 1) + ` / 1000.0);
	k int8;
	i int;
BEGIN
	BEGIN
		FOREACH k IN ARRAY ints LOOP
			` + sliceLeftSQL + `
			PERFORM pg_advisory_lock%[5]s(k);
		END LOOP;
		FOR i IN 1 .. cardinality(as_) LOOP
			` + sliceLeftSQL + `
			PERFORM pg_advisory_lock%[5]s(as_[i], bs[i]);
		END LOOP;
	EXCEPTION WHEN lock_not_available THEN
		IF (` + heldCountSQL + `) < %[6]d THEN
			PERFORM pg_advisory_unlock_all();
			RETURN;
		END IF;
	END;
	PERFORM %[7]s;
END$advisory$;
` + heldCountSQL

var sliceTxSQL = `DO $advisory$DECLARE
	old text := current_setting('lock_timeout');
BEGIN
	BEGIN
		PERFORM set_config('lock_timeout', ` + strings.Replace(sliceMsSQL, "%d", "%[1]d", 1) + `::int8 || 'ms', true);
		PERFORM pg_advisory_xact_lock%[2]s(%[3]s);
		PERFORM set_config('lock_timeout', old, true);
	EXCEPTION WHEN lock_not_available THEN
		PERFORM pg_try_advisory_xact_lock%[2]s(%[3]s);
	END;
END$advisory$;
SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid() AND granted ` +
	`AND classid::int8 = %[4]d AND objid::int8 = %[5]d AND objsubid = %[6]d AND mode = '%[7]s')`

// sliceMs is the %d of sliceMsSQL: sliceCap, or less if the caller's bound
// leaves less (left > 0), in whole milliseconds, at least 1.
func sliceMs(left time.Duration) int64 {
	d := sliceCap
	if left > 0 && left < d {
		d = left
	}
	return max(1, int64((d+time.Millisecond-1)/time.Millisecond))
}

// sessionSliceSQL is one slice of a session-scope wait for keys (in
// canonical order) in mode m, setting the keep-alives keepalive
// (keepaliveArgs) on success.
func sessionSliceSQL(keys []Key, m Mode, left time.Duration, keepalive []any) string {
	var ints, as, bs []string
	for _, k := range keys {
		if a, b, ok := k.Pair(); ok {
			as, bs = append(as, strconv.Itoa(int(a))), append(bs, strconv.Itoa(int(b)))
			continue
		}
		v, _ := k.Int64()
		ints = append(ints, strconv.FormatInt(v, 10))
	}
	var values [4]string
	for i, v := range keepalive {
		values[i] = "'" + v.(string) + "'" // digits only: keepaliveArgs
	}
	return fmt.Sprintf(sliceSessionSQL, strings.Join(ints, ","), strings.Join(as, ","), strings.Join(bs, ","),
		sliceMs(left), m.sqlSuffix(), len(keys), keepaliveSetExpr(values))
}

// txSliceSQL is one slice of a transaction-scope wait for key in mode m.
func txSliceSQL(key Key, m Mode, left time.Duration) string {
	var args string
	if a, b, ok := key.Pair(); ok {
		args = strconv.Itoa(int(a)) + ", " + strconv.Itoa(int(b))
	} else {
		v, _ := key.Int64()
		args = strconv.FormatInt(v, 10)
	}
	classid, objid, objsubid := key.LockRow()
	return fmt.Sprintf(sliceTxSQL, sliceMs(left), m.sqlSuffix(), args, classid, objid, objsubid, m.lockMode())
}
