package advisory

import (
	"fmt"
	"strings"
)

// The statements of semaphores: the try of the slots, and a waiting
// acquire's slices. The other statements are in the other sql*.go files
// (sql.go lists them).

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
