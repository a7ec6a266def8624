package advisory

import (
	"fmt"
)

// The statements of Session.LockMany and Session.UnlockMany, but for
// LockMany's wait slices (sql_waits.go). The other statements are in the
// other sql*.go files (sql.go lists them).

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
