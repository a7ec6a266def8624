package bench

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgproto3"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/seed0ad592b7/advisory"
	"github.com/seed0ad592b7/advisory/internal/pgtest"
)

const txCycleKey = 4_000

// cycleSubject is one way of taking and ending an uncontended lock: open
// prepares it (its connection, its pool) and returns one cycle.
type cycleSubject struct {
	name string
	open func(b *testing.B) func() error
}

// The BEGINs of the raw transaction subjects: the try's outcome in the
// command tag (SELECT 1 or SELECT 0), or reported as DoTx's BEGIN reports
// it (beginTrySQL: a local flip of default_transaction_read_only, 'off' to
// 'on' when the try got the key).
var (
	tagBegin  = fmt.Sprintf("BEGIN; SELECT 1 WHERE pg_try_advisory_xact_lock(%d)", txCycleKey)
	flipBegin = fmt.Sprintf("BEGIN; SELECT set_config('default_transaction_read_only', "+
		"CASE WHEN pg_try_advisory_xact_lock(%d) THEN 'on' ELSE 'off' END, true)", txCycleKey)
)

// rawBeginTx is a raw pgx transaction subject: a pool connection, begin as
// BeginTx's BeginQuery, run by begun, which says whether the try got the
// key; COMMIT; the connection back.
func rawBeginTx(begin string, begun func(*pgxpool.Conn, pgx.TxOptions) (pgx.Tx, bool, error)) func(b *testing.B) func() error {
	ctx := context.Background()
	return func(b *testing.B) func() error {
		pool := newPoolOn(b, dsn, 4)
		warm(b, pool, 1)
		opts := pgx.TxOptions{BeginQuery: begin}
		return func() error {
			c, err := pool.Acquire(ctx)
			if err != nil {
				return err
			}
			defer c.Release()
			tx, got, err := begun(c, opts)
			if err != nil {
				return err
			}
			if !got {
				return errors.New("the BEGIN's try did not get the key")
			}
			return tx.Commit(ctx)
		}
	}
}

// txCycleSubjects, the floor first:
//   - raw-pgx-session: the floor, as BenchmarkCycle/raw-pgx.
//   - raw-pgx-xact: BEGIN, pg_advisory_xact_lock, COMMIT on one *pgx.Conn
//     (three round trips: what pool.Begin + LockTx + Commit costs at best).
//   - raw-pgx-pool-xact2: what DoTx does at best with raw pgx: a
//     connection from a pool, "BEGIN; SELECT 1 WHERE
//     pg_try_advisory_xact_lock(k)" in one message, whose command tag
//     (SELECT 1 or SELECT 0) says whether the try got the key, COMMIT, the
//     connection back. Against raw-pgx-session, the cost of the pool and of
//     a transaction's two statements. Exec returns the tag; BeginTx drops it.
//   - raw-pgx-pool-begintx: what DoTx sends, with raw pgx: as
//     raw-pgx-pool-xact2, through pgx's BeginTx, with the second statement
//     reporting the try's outcome as DoTx's does (beginTrySQL: a flip of
//     default_transaction_read_only, which the server reports, and reports
//     again when COMMIT undoes it). Against raw-pgx-pool-xact2, the cost of
//     learning the outcome through BeginTx rather than from the tag.
//   - raw-pgx-pool-begintx-noflip: as raw-pgx-pool-begintx with
//     raw-pgx-pool-xact2's BEGIN (the try's outcome is not learnt), so that
//     the gap between raw-pgx-pool-xact2 and raw-pgx-pool-begintx splits
//     into the cost of going through BeginTx and Commit (this one against
//     raw-pgx-pool-xact2) and the cost of the flip and its two reports
//     (raw-pgx-pool-begintx against this one).
//   - raw-pgx-pool-begintx-trace: as raw-pgx-pool-begintx-noflip, learning
//     the try's outcome from the BEGIN's command tag through the one
//     per-connection hook that sees it inside BeginTx: pgproto3's message
//     trace (PgConn().Frontend().Trace), set for the BEGIN and removed
//     after it. Against raw-pgx-pool-begintx, whether that channel is
//     cheaper than the flip. (A library could not use it as is: it would
//     replace a trace the host set, which pgx offers no way to read back.)
//   - advisory-dotx: DoTx with an empty fn.
//   - pgbouncer/raw-pgx-xact2: through PgBouncer in transaction mode, the
//     two-round-trip floor for a transaction lock: "BEGIN;
//     SELECT pg_advisory_xact_lock(k)" in one message, then COMMIT.
//   - pgbouncer/advisory-dotx: DoTx through PgBouncer (exec mode).
func txCycleSubjects() []cycleSubject {
	ctx := context.Background()
	key := advisory.Int64Key(txCycleKey)
	dotx := func(b *testing.B, dsn string) func() error {
		pool := newPoolOn(b, dsn, 4)
		warm(b, pool, 1)
		noop := func(context.Context, pgx.Tx) error { return nil }
		return func() error { _, err := advisory.DoTx(ctx, pool, key, noop); return err }
	}
	return []cycleSubject{
		{"raw-pgx-session", func(b *testing.B) func() error {
			c := &rawClient{c: newConn(b), key: txCycleKey}
			return func() error { return cycle(ctx, c) }
		}},
		{"raw-pgx-xact", func(b *testing.B) func() error {
			c := newConn(b)
			return func() error {
				tx, err := c.Begin(ctx)
				if err != nil {
					return err
				}
				if _, err := tx.Exec(ctx, "SELECT pg_advisory_xact_lock($1)", int64(txCycleKey)); err != nil {
					return err
				}
				return tx.Commit(ctx)
			}
		}},
		{"raw-pgx-pool-xact2", func(b *testing.B) func() error {
			pool := newPoolOn(b, dsn, 4)
			warm(b, pool, 1)
			return func() error {
				c, err := pool.Acquire(ctx)
				if err != nil {
					return err
				}
				defer c.Release()
				tag, err := c.Exec(ctx, tagBegin)
				if err != nil {
					return err
				}
				if tag.RowsAffected() != 1 {
					return errors.New("the BEGIN's try did not get the key")
				}
				_, err = c.Exec(ctx, "COMMIT")
				return err
			}
		}},
		{"raw-pgx-pool-begintx", rawBeginTx(flipBegin, func(c *pgxpool.Conn, opts pgx.TxOptions) (pgx.Tx, bool, error) {
			tx, err := c.BeginTx(ctx, opts)
			return tx, c.Conn().PgConn().ParameterStatus("default_transaction_read_only") == "on", err
		})},
		{"raw-pgx-pool-begintx-noflip", rawBeginTx(tagBegin, func(c *pgxpool.Conn, opts pgx.TxOptions) (pgx.Tx, bool, error) {
			tx, err := c.BeginTx(ctx, opts)
			return tx, true, err // not learnt: BeginTx drops the tag
		})},
		{"raw-pgx-pool-begintx-trace", rawBeginTx(tagBegin, func(c *pgxpool.Conn, opts pgx.TxOptions) (pgx.Tx, bool, error) {
			fe := c.Conn().PgConn().Frontend()
			var w tagWatch
			fe.Trace(&w, pgproto3.TracerOptions{SuppressTimestamps: true})
			tx, err := c.BeginTx(ctx, opts)
			fe.Untrace()
			return tx, w.got, err
		})},
		{"advisory-dotx", func(b *testing.B) func() error { return dotx(b, dsn) }},
		{"pgbouncer/raw-pgx-xact2", func(b *testing.B) func() error {
			c := newConnOn(b, bouncerDSN(b))
			begin := fmt.Sprintf("BEGIN; SELECT pg_advisory_xact_lock(%d)", txCycleKey)
			return func() error {
				if _, err := c.Exec(ctx, begin); err != nil {
					return err
				}
				_, err := c.Exec(ctx, "COMMIT")
				return err
			}
		}},
		{"pgbouncer/advisory-dotx", func(b *testing.B) func() error { return dotx(b, bouncerDSN(b)) }},
	}
}

// bouncerDSN starts PgBouncer in transaction mode in front of the server,
// stopped when the benchmark ends, and returns its DSN in exec mode.
func bouncerDSN(b *testing.B) string {
	b.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	pgb, err := pgtest.StartPgBouncerWith(ctx, server, pgtest.PgBouncerOptions{Mode: "transaction", PoolSize: 2})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { _ = pgb.Stop() })
	return pgb.DSN + "&default_query_exec_mode=exec"
}

// BenchmarkTxCycle: one uncontended transaction lock per op, taken and
// ended with its transaction, against the session floor (raw pgx's
// lock+unlock, two round trips) measured in the same run; subjects in
// txCycleSubjects. ns/op is the mean; p50-ns and p99-ns are per cycle.
func BenchmarkTxCycle(b *testing.B) {
	for _, s := range txCycleSubjects() {
		b.Run(s.name, func(b *testing.B) {
			measureCycles(b, s.open(b))
		})
	}
}

// tagWatch is a pgproto3 trace writer (one message per Write) that notes
// a CommandComplete whose tag is SELECT 1.
type tagWatch struct{ got bool }

func (w *tagWatch) Write(p []byte) (int, error) {
	if bytes.Contains(p, []byte("\tCommandComplete\t")) && bytes.HasSuffix(p, []byte(`"SELECT 1"`+"\n")) {
		w.got = true
	}
	return len(p), nil
}
