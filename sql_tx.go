package advisory

import (
	"fmt"
	"strings"

	"github.com/jackc/pgx/v5"
)

// The statements of transaction locks: LockTx's first try (its waits and
// bounded waits are in sql.go's table, its slices in sql_waits.go), and
// DoTx's waiting transaction and hand-over. The other statements are in the
// other sql*.go files (sql.go lists them).

// txFirstTrySQL[mode][space-1] is the first statement of LockTx: a try,
// deadlock_timeout in milliseconds, and, only when the try failed, whether
// the transaction holds any lock (holdsAnySQL: then its wait must be one
// server-side wait that the deadlock detector sees, not slices) and
// whether PL/pgSQL can be used (plpgsqlSQL: a slice that cannot would
// abort the caller's transaction).
var txFirstTrySQL [2][2]string

func init() {
	for m, shared := range []string{ModeExclusive: "", ModeShared: "_shared"} {
		for sp, key := range []string{"$1", "$1, $2"} {
			txFirstTrySQL[m][sp] = fmt.Sprintf("SELECT t.got, %s, CASE WHEN NOT t.got THEN EXISTS (%s) END, "+
				"CASE WHEN NOT t.got THEN %s END "+
				"FROM (SELECT pg_try_advisory_xact_lock%s(%s) AS got OFFSET 0) AS t", deadlockTimeoutSQL, holdsAnySQL, plpgsqlSQL, shared, key)
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
	txWaitSliceFmt = txRestartSQL + "; %s"
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

// rollbackSQL ends DoTx's waiting transaction when its wait ends without
// the key, and the transaction a WithConn callback left open.
const rollbackSQL = "ROLLBACK"

// txRestartSQL ends DoTx's waiting transaction and begins the next one, for
// a wait where slices cannot run (no PL/pgSQL): it then waits in one
// statement, as LockTx does.
const txRestartSQL = "ROLLBACK; BEGIN"

// beginSQLOf is the BEGIN statement for o, as pgx would send it.
func beginSQLOf(o pgx.TxOptions) string {
	if o.BeginQuery != "" {
		return o.BeginQuery
	}
	var b strings.Builder
	b.WriteString("BEGIN")
	if o.IsoLevel != "" {
		b.WriteString(" ISOLATION LEVEL " + string(o.IsoLevel))
	}
	if o.AccessMode != "" {
		b.WriteString(" " + string(o.AccessMode))
	}
	if o.DeferrableMode != "" {
		b.WriteString(" " + string(o.DeferrableMode))
	}
	return b.String()
}
