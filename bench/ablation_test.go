package bench

import (
	"context"
	"fmt"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/seed0ad592b7/advisory"
)

// BenchmarkCycleAblation takes the uncontended cycle apart (issue 28):
// try (pg_try_advisory_lock instead of pg_advisory_lock), +dt (reading
// deadlock_timeout, as the first try did for every lock before issue 28),
// +ka/reset (setting the keep-alives with the grant and resetting them
// with the unlock, SPEC §4), +lazydt (deadlock_timeout read only when the
// try fails), first-try (the statement before issue 28), trydt-sql and
// waittry-sql (a Session's first try without and with the questions a wait
// needs, as sent before the first try became a plain try), ask0..ask2
// (each of those questions alone), try+SETTING (one keep-alive setting set
// with the try and reset with the unlock; work_mem: a setting with no
// socket behind it). Each subject is a lock + unlock cycle on a connection of its own, the
// first ones raw pgx sending parts of what the library's first statement
// and its unlock send, the last ones the library itself (on a pool of one
// connection, so that its backend is known). Measured interleaved, as
// BenchmarkInterleaved; besides NAME-p50-ns and NAME-vs-floor it reports
// NAME-server-cpu-ns, the CPU time the subject's backend spent per cycle
// (from /proc/PID/schedstat: the server shares the host), which a loaded
// machine disturbs far less than wall time.
//
//	go test -run '^$' -bench '^BenchmarkCycleAblation$' -benchtime 2000x -count 5 .
func BenchmarkCycleAblation(b *testing.B) {
	ctx := context.Background()
	const (
		ka    = `set_config('tcp_keepalives_idle', $2, false) || set_config('tcp_keepalives_interval', $3, false) || set_config('tcp_keepalives_count', $4, false) || set_config('tcp_user_timeout', $5, false)`
		reset = `set_config('tcp_keepalives_idle', NULL, false) || set_config('tcp_keepalives_interval', NULL, false) || set_config('tcp_keepalives_count', NULL, false) || set_config('tcp_user_timeout', NULL, false)`
		dt    = `(extract(epoch FROM current_setting('deadlock_timeout')::interval) * 1000)::int8`
		// askIfMissed: what the library's waiting try asks when it misses.
		askIfMissed = `CASE WHEN NOT t.got THEN EXISTS (SELECT FROM pg_catalog.pg_lock_status() AS l WHERE l.pid = pg_backend_pid() AND l.granted AND l.locktype <> 'virtualxid' AND NOT (l.locktype = 'relation' AND l.mode = 'AccessShareLock' AND l.relation < 16384)) END, ` +
			`CASE WHEN NOT t.got THEN EXISTS (SELECT FROM pg_catalog.pg_language WHERE lanname = 'plpgsql' AND has_language_privilege(oid, 'USAGE')) END, ` +
			`CASE WHEN NOT t.got THEN ARRAY(SELECT pid FROM pg_catalog.pg_lock_status() WHERE locktype = 'advisory' AND granted AND objsubid = 1 AND classid::int8 = ($1 >> 32) & 4294967295 AND objid::int8 = $1 & 4294967295 ORDER BY pid) END`
	)
	kaArgs := []any{"2", "1", "2", "4000"}
	type sqlPair struct {
		name, lock, unlock string
		ka                 []any // the keep-alive arguments after the key
	}
	pairs := []sqlPair{
		{"raw-pgx", `SELECT pg_advisory_lock($1)`, `SELECT pg_advisory_unlock($1)`, nil},
		{"try", `SELECT pg_try_advisory_lock($1)`, `SELECT pg_advisory_unlock($1)`, nil},
		{"try+dt", `SELECT pg_try_advisory_lock($1), NULL::text, ` + dt, `SELECT pg_advisory_unlock($1)`, nil},
		{"try+ka/unlock+reset", `SELECT t.got, CASE WHEN t.got THEN ` + ka + ` END FROM (SELECT pg_try_advisory_lock($1) AS got OFFSET 0) AS t`,
			`SELECT pg_advisory_unlock($1), ` + reset, kaArgs},
		{"try+ka+lazydt/unlock+reset", `SELECT t.got, CASE WHEN t.got THEN ` + ka + ` END, CASE WHEN t.got THEN 0 ELSE ` + dt + ` END FROM (SELECT pg_try_advisory_lock($1) AS got OFFSET 0) AS t`,
			`SELECT pg_advisory_unlock($1), ` + reset, kaArgs},
		{"first-try/unlock+reset", `SELECT t.got, CASE WHEN t.got THEN ` + ka + ` END, ` + dt + ` FROM (SELECT pg_try_advisory_lock($1) AS got OFFSET 0) AS t`,
			`SELECT pg_advisory_unlock($1), ` + reset, kaArgs},
		// The Session's statements once its keep-alives are set: with and
		// without the questions asked only when the try fails.
		{"trydt-sql", `SELECT t.got, NULL::text, CASE WHEN t.got THEN 0 ELSE ` + dt + ` END, NULL::bool, NULL::bool, NULL::int4[] FROM (SELECT pg_try_advisory_lock($1) AS got OFFSET 0) AS t`,
			`SELECT pg_advisory_unlock($1)`, nil},
		{"waittry-sql", `SELECT t.got, NULL::text, CASE WHEN t.got THEN 0 ELSE ` + dt + ` END, ` + askIfMissed + ` FROM (SELECT pg_try_advisory_lock($1) AS got OFFSET 0) AS t`,
			`SELECT pg_advisory_unlock($1)`, nil},
	}
	// Each question of askIfMissed alone, to tell which one costs.
	for i, q := range strings.SplitAfter(askIfMissed, " END, ") {
		q = strings.TrimSuffix(q, ", ")
		pairs = append(pairs, sqlPair{fmt.Sprintf("ask%d", i), `SELECT t.got, ` + q + ` FROM (SELECT pg_try_advisory_lock($1) AS got OFFSET 0) AS t`, `SELECT pg_advisory_unlock($1)`, nil})
	}
	pairs = append(pairs, sqlPair{"try+work_mem", `SELECT t.got, CASE WHEN t.got THEN set_config('work_mem', $2, false) END FROM (SELECT pg_try_advisory_lock($1) AS got OFFSET 0) AS t`,
		`SELECT pg_advisory_unlock($1), set_config('work_mem', NULL, false)`, []any{"5MB"}})
	// One keep-alive setting at a time, set with the try and reset with
	// the unlock: which of the four costs what.
	for i, name := range []string{"tcp_keepalives_idle", "tcp_keepalives_interval", "tcp_keepalives_count", "tcp_user_timeout"} {
		pairs = append(pairs, sqlPair{"try+" + name, fmt.Sprintf(`SELECT t.got, CASE WHEN t.got THEN set_config('%s', $2, false) END FROM (SELECT pg_try_advisory_lock($1) AS got OFFSET 0) AS t`, name),
			fmt.Sprintf(`SELECT pg_advisory_unlock($1), set_config('%s', NULL, false)`, name), kaArgs[i : i+1]})
	}
	var names []string
	var runs []func() error
	var pids []int
	for i, p := range pairs {
		c := newConn(b)
		key := int64(cycleKey + 500 + i)
		args := []any{key}
		args = append(args, p.ka...)
		names, pids = append(names, p.name), append(pids, int(c.PgConn().PID()))
		runs = append(runs, func() error {
			if _, err := c.Exec(ctx, p.lock, args...); err != nil {
				return err
			}
			_, err := c.Exec(ctx, p.unlock, key)
			return err
		})
	}
	one := func(name string, open func(*pgxpool.Pool, advisory.Key) func() error) {
		pool := newPool(b, 1)
		var pid int
		if err := pool.QueryRow(ctx, `SELECT pg_backend_pid()`).Scan(&pid); err != nil {
			b.Fatal(err)
		}
		names, pids = append(names, name), append(pids, pid)
		runs = append(runs, open(pool, advisory.Int64Key(int64(cycleKey+500+len(names)))))
	}
	one("advisory-acquire", func(pool *pgxpool.Pool, key advisory.Key) func() error {
		return func() error {
			l, err := advisory.Acquire(ctx, pool, key)
			if err != nil {
				return err
			}
			return l.Release(ctx)
		}
	})
	one("advisory-session", func(pool *pgxpool.Pool, key advisory.Key) func() error {
		s, err := advisory.NewSession(ctx, pool)
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { _ = s.Close(ctx) })
		return func() error {
			if _, err := s.Lock(ctx, key); err != nil {
				return err
			}
			return s.Unlock(ctx, key)
		}
	})
	cpu := make([]time.Duration, len(names))
	interleave(b, names, func(i int) time.Duration {
		before := schedCPU(b, pids[i])
		start := time.Now()
		if err := runs[i](); err != nil {
			b.Fatal(err)
		}
		d := time.Since(start)
		cpu[i] += schedCPU(b, pids[i]) - before
		return d
	})
	for i, name := range names {
		b.ReportMetric(float64(cpu[i].Nanoseconds())/float64(b.N+1), name+"-server-cpu-ns") // +1: interleave's untimed first round
	}
}

// schedCPU is the CPU time process pid has used (Linux schedstat).
func schedCPU(b *testing.B, pid int) time.Duration {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/schedstat", pid))
	if err != nil {
		b.Fatal(err)
	}
	var ns int64
	if _, err := fmt.Sscan(strings.Fields(string(data))[0], &ns); err != nil {
		b.Fatal(err)
	}
	return time.Duration(ns)
}
