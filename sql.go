package advisory

import (
	"fmt"
	"strconv"
	"strings"
	"time"
)

// Every statement the library sends is in the sql*.go files, and in no
// other file:
//
//   - sql.go: a session's lock and unlock statements, the first try of a
//     wait, the keep-alive settings, and what a lock asks the server about
//     its own session (what it holds, who holds the key, whether PL/pgSQL
//     can be used);
//   - sql_waits.go: the wait slices, the short server-side waits a long
//     wait is cut into (SPEC §2a);
//   - sql_many.go: LockMany and UnlockMany;
//   - sql_semaphore.go: a semaphore's slots;
//   - sql_tx.go: LockTx's first try, and DoTx's waiting transaction and
//     hand-over to fn's transaction;
//   - sql_inspect.go: what another process reads: the holders of keys
//     (Holders, pglock status) and the markers in the library's statements.
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
// that holds nothing and has not set its keep-alives: it tries the key once
// and, only if it got it, sets the keep-alives in the same statement.
// Columns: got, the text of the last keep-alive set (NULL when not got).
// Arguments: the key, then the four keep-alive values (keepaliveArgs). On a
// session whose keep-alives are set (it held a lock before) the first
// statement is the plain try (lockSQL). An uncontended lock is this one
// round trip; a contended one goes on with waitTrySQL or waitFirstTrySQL,
// then wait slices (sliceSQL).
var firstTrySQL [2][2]string

// waitTrySQL[mode][space-1] is the second statement of a lock that waits,
// on a session whose keep-alives are set, sent when its first try failed:
// it tries again and, if that fails too, asks what the wait needs. Columns:
// got, NULL, and, when not got, deadlock_timeout in milliseconds (to size
// wait slices: dtIfNotGot), whether the session holds any lock
// (holdsAnySQL: then its wait must be one server-side wait that the
// deadlock detector sees, not slices), whether PL/pgSQL can be used
// (plpgsqlSQL: slices need it), and the backends that hold the key
// (keyHoldersSQL: sliceOneSQL's handler waits on in place once they
// change); 0 or NULL when got. The questions are not part of the first
// try: carried by a statement, they cost the server their start-up even
// when the try gets the key (about a third of an uncontended cycle's
// server time on PostgreSQL 15: bench/ablation_test.go, waittry-sql
// against trydt-sql and try), and most locks get their key at once.
var waitTrySQL [2][2]string

// waitFirstTrySQL[mode][space-1] is waitTrySQL for a session whose first
// try (firstTrySQL) failed and so set no keep-alives: it sets the keep-alives whatever the try's outcome, so
// that the wait's slices need not, and a grant after a wait costs no more
// than the lock itself; and it asks holdsAnySQL when the try failed. The
// same columns and arguments.
var waitFirstTrySQL [2][2]string

// dtIfNotGot is the third column of waitTrySQL and waitFirstTrySQL: the
// server's deadlock_timeout in milliseconds when the try failed (the wait's
// slices are sized from it), and 0 when it got the key: reading and
// converting the setting is a measurable share of an uncontended cycle's
// server time (BENCHMARKS.md, "Where the uncontended cycle's time goes"), spent for
// nothing when nothing waits.
const dtIfNotGot = "CASE WHEN t.got THEN 0 ELSE " + deadlockTimeoutSQL + " END"

// deadlockTimeoutSQL is the server's deadlock_timeout in milliseconds; it
// comes with a wait's first try, to size the slices that may follow.
const deadlockTimeoutSQL = `(extract(epoch FROM current_setting('deadlock_timeout')::interval) * 1000)::int8`

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
					ka := keepaliveSetExpr(numberedParams(n + 1))
					try := func(kaExpr, ask string) string {
						return fmt.Sprintf("SELECT t.got, %s, %s, %s FROM (SELECT pg_try_advisory_lock%s(%s) AS got OFFSET 0) AS t",
							kaExpr, dtIfNotGot, ask, shared, params[0])
					}
					askIfMissed := "CASE WHEN NOT t.got THEN EXISTS (" + holdsAnySQL + ") END, CASE WHEN NOT t.got THEN " + plpgsqlSQL + " END, " +
						"CASE WHEN NOT t.got THEN " + keyHoldersSQL[sp] + " END"
					firstTrySQL[m][sp] = fmt.Sprintf("SELECT t.got, CASE WHEN t.got THEN %s END FROM (SELECT pg_try_advisory_lock%s(%s) AS got OFFSET 0) AS t",
						ka, shared, params[0])
					waitTrySQL[m][sp] = try("NULL::text", askIfMissed)
					waitFirstTrySQL[m][sp] = try(ka, askIfMissed)
				}
			}
		}
	}
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
