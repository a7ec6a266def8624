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
// unlockLastSQL does the same for a session's last hold when the session ends, and resets the
// keep-alives in the same statement (a second column).
var unlockSQL, unlockLastSQL [2][2]string

// firstTrySQL[mode][space-1] is the first statement of a lock on a session
// that holds nothing: it tries the key once and, only if it got it, sets the
// keep-alives in the same statement. Columns: got, the text of the last
// keep-alive set (NULL when not got), deadlock_timeout in milliseconds (to
// size wait slices; 0 when got: dtIfNotGot), and, for a waiting lock that did not get the key,
// whether the session holds any lock (holdsAnySQL: then its wait must be
// one server-side wait that the deadlock detector sees, not slices) and
// whether PL/pgSQL can be used (plpgsqlSQL: slices need it), and the
// backends that hold the key (keyHoldersSQL: sliceOneSQL's handler waits on
// in place once they change); NULL otherwise. Arguments: the key, then the four keep-alive values
// (keepaliveArgs). An uncontended lock is this one round trip; a contended
// one goes on with wait slices (sliceSQL).
var firstTrySQL [2][2]string

// tryDtSQL[mode][space-1] is firstTrySQL for a session whose keep-alives are
// set already (it held a lock before): the same columns, nothing set.
var tryDtSQL [2][2]string

// waitTrySQL[mode][space-1] is tryDtSQL for a lock that waits if the try
// fails: it also asks holdsAnySQL then.
var waitTrySQL [2][2]string

// waitFirstTrySQL[mode][space-1] is firstTrySQL for a lock that waits if
// the try fails: it sets the keep-alives whatever the try's outcome, so
// that the wait's slices need not, and a grant after a wait costs no more
// than the lock itself; and it asks holdsAnySQL when the try failed. The
// same columns and arguments.
var waitFirstTrySQL [2][2]string

// dtIfNotGot is the third column of firstTrySQL and its variants: the
// server's deadlock_timeout in milliseconds when the try failed (the wait's
// slices are sized from it), and 0 when it got the key: reading and
// converting the setting is a measurable share of an uncontended cycle's
// server time (BENCHMARKS.md, "Contended in one process"), spent for
// nothing when nothing waits.
const dtIfNotGot = "CASE WHEN t.got THEN 0 ELSE " + deadlockTimeoutSQL + " END"

// txFirstTrySQL[mode][space-1] is the first statement of LockTx: a try,
// deadlock_timeout in milliseconds, and, only when the try failed, whether
// the transaction holds any lock (holdsAnySQL: then its wait must be one
// server-side wait that the deadlock detector sees, not slices) and
// whether PL/pgSQL can be used (plpgsqlSQL: a slice that cannot would
// abort the caller's transaction).
var txFirstTrySQL [2][2]string

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
				if sc == int(scopeTx) {
					txFirstTrySQL[m][sp] = fmt.Sprintf("SELECT t.got, %s, CASE WHEN NOT t.got THEN EXISTS (%s) END, "+
						"CASE WHEN NOT t.got THEN %s END "+
						"FROM (SELECT pg_try_advisory_xact_lock%s(%s) AS got OFFSET 0) AS t", deadlockTimeoutSQL, holdsAnySQL, plpgsqlSQL, shared, params[0])
				}
				if sc == int(scopeSession) {
					n := strings.Count(params[0], "$")
					ka := keepaliveSetExpr(numberedParams(n + 1))
					try := func(kaExpr, ask string) string {
						return fmt.Sprintf("SELECT t.got, %s, %s, %s FROM (SELECT pg_try_advisory_lock%s(%s) AS got OFFSET 0) AS t",
							kaExpr, dtIfNotGot, ask, shared, params[0])
					}
					askIfMissed := "CASE WHEN NOT t.got THEN EXISTS (" + holdsAnySQL + ") END, CASE WHEN NOT t.got THEN " + plpgsqlSQL + " END, " +
						"CASE WHEN NOT t.got THEN " + keyHoldersSQL[sp] + " END"
					firstTrySQL[m][sp] = try("CASE WHEN t.got THEN "+ka+" END", "NULL::bool, NULL::bool, NULL::int4[]")
					tryDtSQL[m][sp] = try("NULL::text", "NULL::bool, NULL::bool, NULL::int4[]")
					waitTrySQL[m][sp] = try("NULL::text", askIfMissed)
					waitFirstTrySQL[m][sp] = try(ka, askIfMissed)
				}
			}
		}
	}
}

// DoTx (txlock.go) waits outside fn's transaction. Its try and each of its
// wait slices run in a transaction of their own, begun by the same
// message, so that the message that finds the key free or granted leaves
// that transaction open, holding the key: the try is txTryFmt, a slice
// ends the previous message's transaction and begins its own
// (txWaitSliceFmt, around sliceTxSQL), and the waiting transaction is
// ended by a plain ROLLBACK when the wait ends without the key. Each
// reports in a row: whether its transaction holds the key (and, for the
// try, deadlock_timeout in milliseconds and plpgsqlSQL). Between two messages the
// waiting transaction holds no snapshot (READ COMMITTED takes one per
// statement), so a CREATE INDEX CONCURRENTLY waits for it for one slice
// at most: the next message ends it.
//
// txBridgeFmt then hands the key to fn's transaction in one message, so
// that fn's snapshot is taken after the grant at any isolation level: a
// session-level hold of the key (granted at once: the waiting transaction
// holds it) outlives the waiting transaction's COMMIT, fn's transaction
// begins (%[3]s: its BEGIN, with the caller's TxOptions), takes the key
// (at once: the session holds it) and lets the session-level hold go. It
// is sent as pgx's BeginQuery, so fn gets a pgx.Tx; one message, so
// PgBouncer in transaction mode keeps it on one server connection.
// Arguments: function suffix, key literals.
const (
	txTryFmt = "BEGIN; SELECT t.got, " + deadlockTimeoutSQL + ", CASE WHEN NOT t.got THEN " + plpgsqlSQL + " END " +
		"FROM (SELECT pg_try_advisory_xact_lock%[1]s(%[2]s) AS got OFFSET 0) AS t"
	txWaitSliceFmt = "ROLLBACK; BEGIN; %s"
	txBridgeFmt    = "SELECT pg_advisory_lock%[1]s(%[2]s); COMMIT; %[3]s; " +
		"SELECT pg_advisory_unlock%[1]s(%[2]s) FROM (SELECT pg_advisory_xact_lock%[1]s(%[2]s) OFFSET 0) AS t"
)

// txTrySQL is DoTx's try of key in mode m.
func txTrySQL(key Key, m Mode) string {
	return fmt.Sprintf(txTryFmt, m.sqlSuffix(), keyLiterals(key))
}

// txWaitSliceSQL is one slice of ms milliseconds of DoTx's wait for key in mode m.
func txWaitSliceSQL(key Key, m Mode, ms int64) string {
	return fmt.Sprintf(txWaitSliceFmt, txSliceSQL(key, m, ms))
}

// txBridgeSQL hands key, in mode m, to the transaction begin begins.
func txBridgeSQL(key Key, m Mode, begin string) string {
	return fmt.Sprintf(txBridgeFmt, m.sqlSuffix(), keyLiterals(key), begin)
}

// Keep-alive settings bound how long the server keeps a silent client's
// session, and so its locks (see keepaliveArgs): TCP keep-alives for an idle
// connection, and tcp_user_timeout for data the client never acknowledges
// (PostgreSQL 12 or later). They are in force from a session's first hold
// until the session ends: the statement that takes its first hold sets
// them, in the same transaction as the grant (so a failed lock never leaves
// them half set), and the statement that ends the session (a Lock's unlock,
// Close's) resets them to the connection's defaults, so a connection goes
// back to the pool as the pool lent it. A Session that locks and unlocks
// over and over sets them once.
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

// keepaliveSetSQL sets the keep-alives (arguments: keepaliveArgs), for a
// session about to run a WithConn callback, which may take locks of its own.
var keepaliveSetSQL = `SELECT ` + keepaliveSetExpr(numberedParams(1))

// keepaliveResetOnlySQL resets the keep-alives of a session that ends
// holding nothing.
var keepaliveResetOnlySQL = `SELECT ` + keepaliveResetSQL

// unlockAllSQL releases every session-level advisory lock of the session and
// resets the keep-alives.
var unlockAllSQL = `SELECT pg_advisory_unlock_all(), ` + keepaliveResetSQL

// keyHoldersSQL[space-1] lists the backends that hold the key given as the
// lock functions' arguments ($1, or $1, $2), granted, in pid order: the
// pg_locks row of the key computed from them (keys.go's table).
var keyHoldersSQL = [2]string{
	holdersOfSQL("1", "($1 >> 32) & 4294967295", "$1 & 4294967295"),
	holdersOfSQL("2", "$1::int8 & 4294967295", "$2::int8 & 4294967295"),
}

// holdersOfSQL lists the granted holders of the advisory lock row
// (classid, objid, objsubid), SQL expressions, in pid order.
func holdersOfSQL(objsubid, classid, objid string) string {
	return `ARRAY(SELECT pid FROM pg_catalog.pg_lock_status() WHERE locktype = 'advisory' AND granted AND objsubid = ` + objsubid +
		` AND classid::int8 = ` + classid + ` AND objid::int8 = ` + objid + ` ORDER BY pid)`
}

// plpgsqlSQL says whether this session can run the DO blocks of wait
// slices: PL/pgSQL is installed and the role has USAGE on it. Where it
// cannot, waits are one server-side wait (the package documentation, "What
// waiting costs the server").
const plpgsqlSQL = `EXISTS (SELECT FROM pg_catalog.pg_language WHERE lanname = 'plpgsql' AND has_language_privilege(oid, 'USAGE'))`

// noPLpgSQL reports whether err is a wait slice's failure to run its DO
// block: PL/pgSQL is not installed (42704) or the role lacks USAGE on it
// (42501). Nothing ran, and nothing is held.
func noPLpgSQL(err error) bool {
	code := sqlState(err)
	return code == "42501" || code == "42704"
}

// dropLateGrantSQL drops what a wait slice left to end on its own got just
// as its caller gave up: the session held nothing before the wait.
const dropLateGrantSQL = `SELECT pg_advisory_unlock_all()`

// holdsAnySQL finds whether this backend holds any lock through which it
// could be part of a deadlock cycle: any granted lock but its own virtual
// transaction id and the catalog reads that a statement (this one
// included: parsing it may read pg_proc) takes for itself. So an advisory
// lock (session or transaction), a row it updated (its transaction id), a
// table it read or altered all count. It reads the function behind
// pg_locks, not the view, whose own relation lock would count.
const holdsAnySQL = `SELECT FROM pg_catalog.pg_lock_status() AS l WHERE l.pid = pg_backend_pid() AND l.granted ` +
	`AND l.locktype <> 'virtualxid' AND NOT (l.locktype = 'relation' AND l.mode = 'AccessShareLock' AND l.relation < 16384)`

// holdsAnyOnlySQL asks holdsAnySQL alone, for a LockMany on a Session that
// holds nothing of its own but whose WithConn ran.
const holdsAnyOnlySQL = `SELECT EXISTS (` + holdsAnySQL + `)`

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
// least one millisecond; lock_timeout is an int of milliseconds, so a bound
// beyond maxSettingMs (about 24.8 days) is clamped to it: the wait then ends
// a little early, with ErrTimeout, instead of failing at once with "invalid
// value for parameter".
func lockTimeoutText(d time.Duration) string {
	ms := (d + time.Millisecond - 1) / time.Millisecond
	return fmt.Sprintf("%dms", min(max(ms, 1), maxSettingMs))
}

// maxSettingMs is the largest value of a setting counted in int
// milliseconds (lock_timeout, tcp_user_timeout).
const maxSettingMs = 1<<31 - 1

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
// parameters, so the keys and the slice's length (integers) are formatted
// into its text, and it is sent with the simple protocol, never prepared. A
// second statement in the same message reports whether the slice got its
// keys. A DO block is compiled each time it runs, so the blocks are kept to
// the few statements they need: each costs the server about 0.1 ms.
//
// Session scope, one key (sliceOneSQL) or many (sliceManySQL, all or
// nothing, in canonical order): the message is SET LOCAL lock_timeout to
// the slice's length, the DO block, and SHOW lock_timeout, which reports
// the outcome: lock_timeout's transaction-local value ends with the
// message's implicit transaction, and the handler sets it to 0 when the
// slice did not get its keys (a rolled-back subtransaction restores the
// SET LOCAL value, never 0). When the slice ends, the handler keeps a lock
// granted just as it ended (read from pg_locks: the session held nothing
// before) and, for many keys, releases the keys of an incomplete slice
// (pg_advisory_unlock_all). The handler's statement is run with EXECUTE, so
// that it is parsed only in a slice that does not get its keys, not each
// time the block is compiled. The block sets the keep-alives, when the session has
// not set them yet, before it waits, in the subtransaction that a timeout
// rolls back, so they are in force exactly when the keys are held and
// nothing runs between the grant and the end of the block. Measured on the
// server (PostgreSQL 15, a loop of EXECUTEs): this one-key block costs
// 20–26 µs against 50–57 µs for the block that set lock_timeout itself and
// reported with a SELECT, and SHOW costs 4 µs against 10 µs. (Reading
// pg_locks in the report would cost about 0.2 ms on every hand-off.)
//
// Transaction scope (sliceTxSQL), one key: a transaction lock granted just
// as the slice ended is released with the handler's rolled-back
// subtransaction. The report is one more try of the key
// (pg_try_advisory_xact_lock), true exactly when the transaction then holds
// it: granted in the slice (re-entry), or free at that moment. lock_timeout
// is restored inside the block (set_config(..., true) would otherwise last as
// long as the caller's transaction).

// sliceCap is the longest slice, whatever the server's deadlock_timeout.
const sliceCap = time.Second

// deadlockTimeoutSQL is the server's deadlock_timeout in milliseconds; it
// comes with a wait's first try, to size the slices that may follow.
const deadlockTimeoutSQL = `(extract(epoch FROM current_setting('deadlock_timeout')::interval) * 1000)::int8`

// sliceMessageSQL is a session slice's message: lock_timeout for the wait
// (a length in milliseconds, %d, at least 1) until the message ends, the
// DO block (%s), and the report, "0" when the slice did not get its keys
// (see sliceReport). A DO block returns no rows, so the report travels in
// lock_timeout, which the message sets anyway. Plainer reports cost more
// server time per slice (PostgreSQL 15, measured in EXECUTE loops against
// this SHOW): SET LOCAL of a variable of our own plus SHOW about 5 µs, and
// it leaves a placeholder setting on the host's connection; PERFORM
// set_config inside the block about 30 µs; reading a pg_locks row about
// 130 µs. A semaphore's slot position travels the same way.
const sliceMessageSQL = "SET LOCAL lock_timeout = '%dms';\n%s;\nSHOW lock_timeout"

// sliceMissedSQL flags a session slice as a failure.
const sliceMissedSQL = `set_config('lock_timeout', '0', true)`

// sliceOneSQL: one key. Arguments: function suffix, key arguments,
// classid, objid, objsubid, the holders the wait began behind (pids,
// comma-separated: from the first try's keyHoldersSQL), and how long to
// wait on in place, in milliseconds (inPlaceSlices slices, at most the
// rest of the bound). The session's keep-alives are set already, by the
// try before the wait (waitFirstTrySQL).
//
// The handler keeps a grant that landed just as the slice ended and, when
// the key has changed hands since the wait began (its holders are not
// those it began behind), waits on in place, in one server-side wait of up
// to inPlaceSlices slices: each slice leaves the server's queue and joins
// it again at its tail, so waiters that wait in one statement (other
// programs' pg_advisory_lock, a Session holding locks) would be served
// before it every time; a key that changes hands is held briefly, so the
// snapshot this wait holds costs little, while a standby behind a
// long-lived leader (whose holder never changes) keeps slicing. The
// handler is one EXECUTE'd DO block, parsed only when a slice ends without
// the key (it reads pg_lock_status once, about 0.1 ms). A grant in that
// wait sets lock_timeout to 1 ms, so that the report says got.
const sliceOneSQL = `DO $advisory$BEGIN
	PERFORM pg_advisory_lock%[1]s(%[2]s);
EXCEPTION WHEN lock_not_available THEN
	EXECUTE $h$DO $w$DECLARE
	held int4[] := ARRAY(SELECT pid FROM pg_catalog.pg_lock_status() WHERE locktype = 'advisory' AND granted ` +
	`AND classid::int8 = %[3]d AND objid::int8 = %[4]d AND objsubid = %[5]d ORDER BY pid);
BEGIN
	IF pg_backend_pid() = ANY (held) THEN
		RETURN;
	ELSIF held = '{%[6]s}' THEN
		PERFORM ` + sliceMissedSQL + `;
		RETURN;
	END IF;
	PERFORM set_config('lock_timeout', '%[7]dms', true);
	PERFORM pg_advisory_lock%[1]s(%[2]s);
	PERFORM set_config('lock_timeout', '1ms', true);
EXCEPTION WHEN lock_not_available THEN
	PERFORM CASE WHEN EXISTS (SELECT FROM pg_catalog.pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid() AND granted ` +
	`AND classid::int8 = %[3]d AND objid::int8 = %[4]d AND objsubid = %[5]d) THEN '' ELSE ` + sliceMissedSQL + ` END;
END$w$$h$;
END$advisory$`

// sliceManySQL: many keys, each waited for with lock_timeout set to what is
// left of the slice ending at dl (LockMany has no first try to learn
// deadlock_timeout from, so the block reads it). Arguments: int8 keys, int4
// first halves, int4 second halves (comma-separated), slice ms, function
// suffix, key count, keep-alive expression.
var sliceManySQL = `DO $advisory$DECLARE
	ints int8[] := '{%[1]s}';
	as_ int4[] := '{%[2]s}';
	bs int4[] := '{%[3]s}';
	dl timestamptz := clock_timestamp() + make_interval(secs => least(%[4]d, greatest(1, ` + deadlockTimeoutSQL + ` / 2)) / 1000.0);
	k int8;
	i int;
BEGIN
	PERFORM %[7]s;
	FOREACH k IN ARRAY ints LOOP
		PERFORM set_config('lock_timeout', greatest(1, ceil(extract(epoch FROM dl - clock_timestamp()) * 1000))::int8 || 'ms', true);
		PERFORM pg_advisory_lock%[5]s(k);
	END LOOP;
	FOR i IN 1 .. cardinality(as_) LOOP
		PERFORM set_config('lock_timeout', greatest(1, ceil(extract(epoch FROM dl - clock_timestamp()) * 1000))::int8 || 'ms', true);
		PERFORM pg_advisory_lock%[5]s(as_[i], bs[i]);
	END LOOP;
EXCEPTION WHEN lock_not_available THEN
	IF (SELECT count(*) FROM pg_catalog.pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid() AND granted) = %[6]d THEN
		PERFORM %[7]s;
	ELSE
		PERFORM pg_advisory_unlock_all(), ` + sliceMissedSQL + `;
	END IF;
END$advisory$`

// sliceTxSQL: one key, transaction scope. Arguments: slice ms, function
// suffix, key arguments.
const sliceTxSQL = `DO $advisory$DECLARE
	old text := current_setting('lock_timeout');
BEGIN
	PERFORM set_config('lock_timeout', '%[1]dms', true);
	PERFORM pg_advisory_xact_lock%[2]s(%[3]s);
	PERFORM set_config('lock_timeout', old, true);
EXCEPTION WHEN lock_not_available THEN
END$advisory$;
SELECT pg_try_advisory_xact_lock%[2]s(%[3]s)`

// sliceLen is the length of the next slice, in whole milliseconds: half of
// the server's deadlock_timeout (dtMs; unknown when 0), at most sliceCap and
// at most left (when left > 0), at least 1.
func sliceLen(dtMs int64, left time.Duration) int64 {
	d := sliceCap
	if dtMs > 0 {
		d = min(d, time.Duration(dtMs)*time.Millisecond/2)
	}
	if left > 0 {
		d = min(d, left)
	}
	return max(1, int64((d+time.Millisecond-1)/time.Millisecond))
}

// keyLiterals returns a key's arguments as SQL text, for a DO block.
func keyLiterals(key Key) string {
	if a, b, ok := key.Pair(); ok {
		return strconv.Itoa(int(a)) + ", " + strconv.Itoa(int(b))
	}
	v, _ := key.Int64()
	return strconv.FormatInt(v, 10)
}

// keepaliveLiterals is keepaliveSetExpr of keepalive (keepaliveArgs), as
// literals, for a DO block; for nil (the keep-alives are set already), an
// empty text that sets nothing.
func keepaliveLiterals(keepalive []any) string {
	if keepalive == nil {
		return "''"
	}
	var values [4]string
	for i, v := range keepalive {
		values[i] = "'" + v.(string) + "'" // digits only: keepaliveArgs
	}
	return keepaliveSetExpr(values)
}

// oneSliceSQL is one slice of ms milliseconds of a session-scope wait for
// key in mode m, begun behind holders, waiting on in place for up to
// restMs: see sliceOneSQL.
func oneSliceSQL(key Key, m Mode, ms int64, holders []int32, restMs int64) string {
	classid, objid, objsubid := key.LockRow()
	pids := make([]string, len(holders))
	for i, p := range holders {
		pids[i] = strconv.Itoa(int(p))
	}
	return fmt.Sprintf(sliceMessageSQL, ms, fmt.Sprintf(sliceOneSQL, m.sqlSuffix(), keyLiterals(key), classid, objid, objsubid,
		strings.Join(pids, ","), min(max(restMs, 1), maxSettingMs)))
}

// manySliceSQL is one slice of a session-scope wait for keys (in canonical
// order) in mode m.
func manySliceSQL(keys []Key, m Mode, ms int64, keepalive []any) string {
	var ints, as, bs []string
	for _, k := range keys {
		if a, b, ok := k.Pair(); ok {
			as, bs = append(as, strconv.Itoa(int(a))), append(bs, strconv.Itoa(int(b)))
			continue
		}
		v, _ := k.Int64()
		ints = append(ints, strconv.FormatInt(v, 10))
	}
	return fmt.Sprintf(sliceMessageSQL, ms, fmt.Sprintf(sliceManySQL, strings.Join(ints, ","), strings.Join(as, ","), strings.Join(bs, ","),
		ms, m.sqlSuffix(), len(keys), keepaliveLiterals(keepalive)))
}

// txSliceSQL is one slice of a transaction-scope wait for key in mode m.
func txSliceSQL(key Key, m Mode, ms int64) string {
	return fmt.Sprintf(sliceTxSQL, ms, m.sqlSuffix(), keyLiterals(key))
}

// Semaphores (semaphore.go). A semaphore of size n is n slot keys, all in
// the Int64Key space, passed in slot order as one int8[] (a parameter, or
// an array literal in a DO block). Slots are taken exclusively, one per
// session, by a session that holds nothing else.

// semaphoreTrySQL tries the slots in order and stops at the first it gets:
// the filter runs as the LIMIT pulls rows from the function scan, one slot
// at a time, so no slot after the one taken is tried (semaphore_test.go
// checks it on the server). If it took a slot it sets the keep-alives in
// the same statement. Columns: the 1-based position of the slot taken, or
// NULL when every slot was busy; the text of the last keep-alive set (NULL
// when none was taken); deadlock_timeout in milliseconds (to size wait
// slices); when none was taken, whether PL/pgSQL can be used (plpgsqlSQL). Arguments: $1 the slot keys, $2..$5 the keep-alives
// (keepaliveArgs). It is all of a NoWait acquire, and the first round trip
// of a waiting one.
var semaphoreTrySQL = `SELECT t.i, CASE WHEN t.i IS NOT NULL THEN ` + keepaliveSetExpr(numberedParams(2)) + ` END, ` + deadlockTimeoutSQL +
	`, CASE WHEN t.i IS NULL THEN ` + plpgsqlSQL + ` END FROM (` +
	`SELECT (SELECT i FROM unnest($1::int8[]) WITH ORDINALITY AS u(k, i) WHERE pg_try_advisory_lock(k) LIMIT 1) AS i OFFSET 0) AS t`

// sliceSemaphoreSQL is one wait slice for a semaphore slot, in the manner
// of sliceOneSQL: it waits for one slot (%[3]d, 1-based; the caller moves
// it on from slice to slice, so waiters spread over the slots and each
// waits on every slot in turn) for the slice's %[2]d ms. When the slice
// ends without the grant, the handler keeps a grant that landed just as it
// ended (read from pg_locks: the session held nothing before) and
// otherwise tries every slot in order, which takes a slot that freed
// during the slice with no waiter queued on it. The statement that gets a
// slot also sets the keep-alives (%[4]s). The outcome reaches the report
// through lock_timeout's transaction-local value, as for sliceOneSQL: the
// 1-based position of the slot taken, in milliseconds, or 0 for none.
// Arguments: the slot keys (comma-separated), slice ms, the slot to wait
// for, the keep-alive expression.
var sliceSemaphoreSQL = `DO $advisory$DECLARE
	slots int8[] := '{%[1]s}';
	i int;
BEGIN
	PERFORM set_config('lock_timeout', '%[2]dms', true);
	PERFORM pg_advisory_lock(slots[%[3]d]);
	PERFORM %[4]s || set_config('lock_timeout', '%[3]dms', true);
EXCEPTION WHEN lock_not_available THEN
	IF EXISTS (SELECT FROM pg_catalog.pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid() AND granted) THEN
		PERFORM %[4]s || set_config('lock_timeout', '%[3]dms', true);
		RETURN;
	END IF;
	FOR i IN 1 .. cardinality(slots) LOOP
		IF pg_try_advisory_lock(slots[i]) THEN
			PERFORM %[4]s || set_config('lock_timeout', i || 'ms', true);
			RETURN;
		END IF;
	END LOOP;
	PERFORM set_config('lock_timeout', '0', true);
END$advisory$;
SELECT (extract(epoch FROM current_setting('lock_timeout')::interval) * 1000)::int8`

// semaphoreSliceSQL is one slice of ms milliseconds of a wait for one of
// slots (Int64Key keys, in slot order), waiting for slots[wait] (0-based),
// and setting the keep-alives keepalive (keepaliveArgs) on success.
func semaphoreSliceSQL(slots []Key, wait int, ms int64, keepalive []any) string {
	ints := make([]string, len(slots))
	for i, k := range slots {
		ints[i] = keyLiterals(k)
	}
	return fmt.Sprintf(sliceSemaphoreSQL, strings.Join(ints, ","), ms, wait+1, keepaliveLiterals(keepalive))
}

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
