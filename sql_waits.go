package advisory

import (
	"fmt"
	"strconv"
	"strings"
	"time"
)

// The statements of wait slices, session and transaction scope, and of
// what a slice's caller sends when it gives up. The other statements are in
// the other sql*.go files (sql.go lists them).

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

// dropLateGrantSQL drops what a wait slice left to end on its own got just
// as its caller gave up: the session held nothing before the wait.
const dropLateGrantSQL = `SELECT pg_advisory_unlock_all()`
