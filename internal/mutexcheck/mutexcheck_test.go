package mutexcheck

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"go.uber.org/goleak"

	"github.com/seed0ad592b7/advisory"
	"github.com/seed0ad592b7/advisory/internal/pgtest"
)

// server is this package's own PostgreSQL: private, so that it can be
// restarted.
var server *pgtest.Server

func TestMain(m *testing.M) {
	if spec := os.Getenv(envWorker); spec != "" {
		os.Exit(runWorker(spec))
	}
	os.Exit(pgtest.RunMain(m, pgtest.Options{Private: true}, func(s *pgtest.Server) { server = s }))
}

// envLong is the environment variable for the long mode: a duration, for
// example ADVISORY_LONG=5m, shared between the checker's runs.
const envLong = "ADVISORY_LONG"

// longMode returns the duration ADVISORY_LONG asks for, or 0.
func longMode(t *testing.T) time.Duration {
	s := os.Getenv(envLong)
	if s == "" {
		return 0
	}
	d, err := time.ParseDuration(s)
	if err != nil || d <= 0 {
		t.Fatalf("%s=%q: want a positive duration such as 5m", envLong, s)
	}
	return d
}

// run is one run of the checker.
type run struct {
	name        string
	procs       int
	goroutines  int
	keys        int
	keyBase     int64
	writerRatio float64
	faults      bool
	noLock      bool // the negative control: sections take no lock (see TestCheckerSeesNoLock)
	restarts    int  // server restarts during the run (fault mode)
	duration    time.Duration
}

// result is what a run found.
type result struct {
	workers     []workerStats
	reported    map[int]workerStats // by proc, the workers that reported
	writersBy   map[int]int64       // by proc, completed writer sections recorded on the server
	total       workerStats
	terminated  int64 // backends terminated by the injector
	restarts    int
	overlaps    int64 // overlapping completed sections a writer was part of (must be 0)
	readerOver  int64 // completed reader sections that overlapped another reader
	intervals   int64 // completed sections recorded on the server
	counters    int64 // sum of the counter rows
	writersSrv  int64 // completed writer sections recorded on the server
	sameBackend int64 // writer sections after another goroutine's of the same process on the same backend
	zombies     int64 // rows written by holders after they were told of a loss
	locksLeft   int64
}

const schema = `
DROP TABLE IF EXISTS counters, intervals, zombie;
CREATE TABLE counters (k int PRIMARY KEY, n bigint NOT NULL);
CREATE TABLE intervals (
	id bigserial PRIMARY KEY, proc int NOT NULL, g int NOT NULL, k int NOT NULL,
	role text NOT NULL, pid int NOT NULL,
	t_enter timestamptz NOT NULL, t_exit timestamptz, seen bigint, seen2 bigint);
CREATE TABLE zombie (proc int, note text);
`

// overlapSQL counts overlapping completed sections per key, sorting each
// key's sections by entry: a writer overlaps something when any earlier
// section ended after it entered; a reader overlaps a writer when an
// earlier writer ended after it entered (a later writer is caught as the
// later one). The last column counts readers overlapping readers, which
// shared locks allow.
const overlapSQL = `
WITH s AS (
	SELECT role, t_enter,
		max(t_exit) OVER w AS prev_any,
		max(t_exit) FILTER (WHERE role = 'w') OVER w AS prev_w,
		max(t_exit) FILTER (WHERE role = 'r') OVER w AS prev_r
	FROM intervals WHERE t_exit IS NOT NULL
	WINDOW w AS (PARTITION BY k ORDER BY t_enter, id ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING))
SELECT count(*) FILTER (WHERE (role = 'w' AND prev_any > t_enter) OR (role = 'r' AND prev_w > t_enter)),
	count(*) FILTER (WHERE role = 'r' AND prev_r > t_enter),
	count(*)
FROM s`

func (r run) exec(t *testing.T) result {
	t.Helper()
	defer goleak.VerifyNone(t)
	ctx, cancel := context.WithTimeout(context.Background(), r.duration+3*time.Minute)
	defer cancel()

	admin := connect(t, ctx)
	if _, err := admin.Exec(ctx, schema); err != nil {
		t.Fatal(err)
	}
	for k := range r.keys {
		if _, err := admin.Exec(ctx, `INSERT INTO counters VALUES ($1, 0)`, k); err != nil {
			t.Fatal(err)
		}
	}
	admin.Close(ctx)

	// Start the workers.
	type proc struct {
		cmd    *exec.Cmd
		stdin  io.WriteCloser
		stdout bytes.Buffer
		stderr bytes.Buffer
	}
	procs := make([]*proc, r.procs)
	seed := rand.Uint64()
	// The health check's ping times out after one interval and then ends
	// the session. Under faults a short interval tells holders quickly;
	// clean runs use the default, as a 50 ms ping on a loaded machine
	// ends healthy sessions (see RELIABILITY.md).
	health := advisory.DefaultHealthInterval
	if r.faults {
		health = 50 * time.Millisecond
	}
	t.Logf("%s: %d processes × %d goroutines, %d keys, writer ratio %.1f, faults %v, %v, seed %d",
		r.name, r.procs, r.goroutines, r.keys, r.writerRatio, r.faults, r.duration, seed)
	for i := range procs {
		spec, _ := json.Marshal(workerConfig{
			DSN: server.DSN, Proc: i, Goroutines: r.goroutines, Keys: r.keys, KeyBase: r.keyBase,
			WriterRatio: r.writerRatio, Faults: r.faults, NoLock: r.noLock, Health: health,
			Seed: seed, MaxRun: r.duration + 2*time.Minute,
		})
		p := &proc{cmd: exec.Command(os.Args[0], "-test.run=^$")}
		p.cmd.Env = append(os.Environ(), envWorker+"="+string(spec))
		p.cmd.Stdout, p.cmd.Stderr = &p.stdout, &p.stderr
		p.cmd.WaitDelay = 5 * time.Second
		var err error
		if p.stdin, err = p.cmd.StdinPipe(); err != nil {
			t.Fatal(err)
		}
		if err := p.cmd.Start(); err != nil {
			t.Fatal(err)
		}
		procs[i] = p
	}

	// Inject faults while they run.
	var res result
	stopFaults := make(chan struct{})
	var faults sync.WaitGroup
	var restartErr error
	if r.faults {
		faults.Add(1)
		go func() {
			defer faults.Done()
			res.terminated, res.restarts, restartErr = injectFaults(ctx, stopFaults, r.duration, r.restarts)
		}()
	}
	select {
	case <-time.After(r.duration):
	case <-ctx.Done():
	}
	close(stopFaults)
	faults.Wait()
	if restartErr != nil {
		t.Errorf("restart: %v", restartErr)
	}

	// Stop the workers and collect their stats. A worker bounds each of
	// its steps (a wait, a section, a Close: 30 s at most each, then 10 s
	// for its pools); one that has not exited after stopGrace is stuck, and
	// SIGQUIT makes it print every goroutine's stack before it exits.
	for _, p := range procs {
		_ = p.stdin.Close()
	}
	stuck := time.AfterFunc(stopGrace, func() {
		for _, p := range procs {
			_ = p.cmd.Process.Signal(syscall.SIGQUIT) // an exited process ignores it
		}
	})
	defer stuck.Stop()
	res.reported = make(map[int]workerStats)
	for i, p := range procs {
		err := p.cmd.Wait()
		if s := strings.TrimSpace(p.stderr.String()); s != "" {
			t.Logf("worker %d stderr:\n%s", i, s)
		}
		if err != nil {
			t.Errorf("worker %d: %v%s", i, err, exitReason(p.stderr.String()))
			continue
		}
		lines := strings.Split(strings.TrimSpace(p.stdout.String()), "\n")
		var st workerStats
		if err := json.Unmarshal([]byte(lines[len(lines)-1]), &st); err != nil {
			t.Errorf("worker %d: no stats: %v\n%s", i, err, p.stdout.String())
			continue
		}
		res.workers = append(res.workers, st)
		res.reported[i] = st
		res.total.add(st)
	}
	stuck.Stop()

	// Check on the server.
	admin = connect(t, ctx)
	defer admin.Close(ctx)
	if err := admin.QueryRow(ctx, overlapSQL).Scan(&res.overlaps, &res.readerOver, &res.intervals); err != nil {
		t.Fatal(err)
	}
	if err := admin.QueryRow(ctx, `SELECT (SELECT coalesce(sum(n), 0) FROM counters),
		(SELECT count(*) FROM intervals WHERE role = 'w' AND t_exit IS NOT NULL),
		(SELECT count(*) FROM zombie)`).Scan(&res.counters, &res.writersSrv, &res.zombies); err != nil {
		t.Fatal(err)
	}
	res.writersBy = make(map[int]int64)
	rows, err := admin.Query(ctx, `SELECT proc, count(*) FROM intervals
		WHERE role = 'w' AND t_exit IS NOT NULL GROUP BY proc`)
	if err != nil {
		t.Fatal(err)
	}
	var procID int
	var n int64
	if _, err := pgx.ForEachRow(rows, []any{&procID, &n}, func() error {
		res.writersBy[procID] = n
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	// Writer sections that followed one of another goroutine of the same
	// process on the same backend, with no section between them on that
	// key: a lock passed within the process (SPEC §13), or the key taken
	// again on the server through the same pooled connection.
	if err := admin.QueryRow(ctx, `SELECT count(*) FROM (SELECT proc, g, pid,
		lag(proc) OVER w AS pproc, lag(g) OVER w AS pg, lag(pid) OVER w AS ppid
		FROM intervals WHERE role = 'w' AND t_exit IS NOT NULL WINDOW w AS (PARTITION BY k ORDER BY t_enter)) AS s
		WHERE proc = pproc AND pid = ppid AND g <> pg`).Scan(&res.sameBackend); err != nil {
		t.Fatal(err)
	}
	res.locksLeft = awaitNoLocks(t, ctx, admin)
	if !r.noLock { // the negative control reports to a recorder (TestCheckerSeesNoLock)
		r.report(t, res)
	}
	return res
}

// add sums worker stats.
func (s *workerStats) add(o workerStats) {
	s.Attempts += o.Attempts
	s.Sections += o.Sections
	s.ReadSections += o.ReadSections
	s.DoSections += o.DoSections
	s.DoWrites += o.DoWrites
	s.Timeouts += o.Timeouts
	s.Cancels += o.Cancels
	s.Lost += o.Lost
	s.Untold += o.Untold
	s.FencedOther += o.FencedOther
	s.LeakedLocks += o.LeakedLocks
	s.ZombieTried += o.ZombieTried
	s.ZombieLanded += o.ZombieLanded
	s.ReaderSaw += o.ReaderSaw
	s.Failed += o.Failed
	s.LostWaiting += o.LostWaiting
	s.LeakedConns += o.LeakedConns
	if o.Leaked != "" {
		s.Leaked += o.Leaked + "\n"
	}
	for _, x := range o.Samples {
		if len(s.Samples) < 20 {
			s.Samples = append(s.Samples, x)
		}
	}
}

// reporter is what report needs of a test: a *testing.T, or the negative
// control's recorder.
type reporter interface {
	Helper()
	Logf(format string, args ...any)
	Errorf(format string, args ...any)
}

// report logs the run's counts and fails the test on any broken promise.
func (r run) report(t reporter, res result) {
	t.Helper()
	tot := res.total
	t.Logf("%s: operations %d (sections: %d writer, %d reader, %d Do), waits timed out %d, cancelled %d, "+
		"faults injected %d (backends terminated %d, restarts %d, plus %d cancelled or timed-out waits), "+
		"holders told of a loss %d (and %d lock calls), untold %d, zombie writes tried %d landed %d, "+
		"overlaps found %d (reader-reader overlaps, allowed: %d), other errors %d, "+
		"fenced statements failed without ErrLockLost %d, "+
		"leaks: %d advisory locks (%d on idle pooled connections), %d pool conns, goroutines %q; "+
		"writer sections following another goroutine's on the same backend (passes in the process) %d",
		r.name, tot.Attempts, tot.Sections, tot.ReadSections, tot.DoSections, tot.Timeouts, tot.Cancels,
		res.terminated+int64(res.restarts), res.terminated, res.restarts, tot.Timeouts+tot.Cancels,
		tot.Lost, tot.LostWaiting, tot.Untold, tot.ZombieTried, tot.ZombieLanded+res.zombies,
		res.overlaps, res.readerOver, tot.Failed, tot.FencedOther,
		res.locksLeft, tot.LeakedLocks, tot.LeakedConns, tot.Leaked, res.sameBackend)
	if len(tot.Samples) > 0 {
		t.Logf("error samples:\n  %s", strings.Join(tot.Samples, "\n  "))
	}
	if len(res.workers) != r.procs {
		t.Errorf("%d of %d workers reported", len(res.workers), r.procs)
	}
	if res.overlaps != 0 {
		t.Errorf("%d completed sections overlapped a writer's section", res.overlaps)
	}
	if tot.ReaderSaw != 0 {
		t.Errorf("%d readers saw the counter change while they held a shared lock", tot.ReaderSaw)
	}
	if tot.Untold != 0 {
		t.Errorf("%d holders lost their lock without being told", tot.Untold)
	}
	if tot.FencedOther != 0 {
		t.Errorf("%d fenced statements failed without ErrLockLost (a dead session must read as a lost lock)", tot.FencedOther)
	}
	if tot.LeakedLocks != 0 {
		t.Errorf("%d advisory locks left on the workers' idle pooled connections", tot.LeakedLocks)
	}
	if tot.ZombieLanded != 0 || res.zombies != 0 {
		t.Errorf("fenced writes after a loss landed: %d reported, %d rows", tot.ZombieLanded, res.zombies)
	}
	if res.locksLeft != 0 {
		t.Errorf("%d advisory locks left after the workers exited", res.locksLeft)
	}
	if tot.LeakedConns != 0 || tot.Leaked != "" {
		t.Errorf("workers leaked %d pool connections; goroutines: %s", tot.LeakedConns, tot.Leaked)
	}
	// Completed writer sections, worker by worker: what each worker counted
	// must be what the server recorded for it. A worker that did not report
	// has already failed the run (above); what the server recorded for it
	// is logged, as its sections are missing from the workers' total.
	for i := range r.procs {
		st, ok := res.reported[i]
		switch {
		case !ok:
			t.Logf("worker %d did not report; the server recorded %d completed writer sections for it",
				i, res.writersBy[i])
		case res.writersBy[i] != st.Sections:
			t.Errorf("worker %d: server recorded %d completed writer sections, the worker %d",
				i, res.writersBy[i], st.Sections)
		}
	}
	if len(res.reported) == r.procs && res.writersSrv != tot.Sections {
		t.Errorf("server recorded %d completed writer sections, workers %d", res.writersSrv, tot.Sections)
	}
	if tot.Sections == 0 || (r.writerRatio < 1 && tot.ReadSections == 0) {
		t.Errorf("too little work done: %d writer and %d reader sections", tot.Sections, tot.ReadSections)
	}
	if r.faults {
		// Writes are fenced: the counters equal the writer sections the
		// server recorded as completed, whatever the clients could tell.
		if res.counters != res.writersSrv {
			t.Errorf("counters sum to %d, completed writer sections %d", res.counters, res.writersSrv)
		}
		if res.restarts != r.restarts {
			t.Errorf("%d restarts, want %d", res.restarts, r.restarts)
		}
		// The injector terminates backends that hold a lock: nearly every
		// one is a holder that must be told (in its section, its
		// release, or Do). Half is far below what runs see (over 90 %),
		// yet far above what a holder that is rarely told would give.
		if res.terminated >= 5 && tot.Lost < res.terminated/2 {
			t.Errorf("%d holders terminated but only %d were told of a loss", res.terminated, tot.Lost)
		}
		return
	}
	if res.counters != tot.Sections+tot.DoWrites {
		t.Errorf("counters sum to %d, completed writer sections %d (+%d in Do): lost updates",
			res.counters, tot.Sections, tot.DoWrites)
	}
	if tot.Failed != 0 || tot.Lost != 0 || tot.LostWaiting != 0 || tot.Timeouts != 0 || tot.Cancels != 0 {
		t.Errorf("a clean run had %d errors, %d losses, %d timeouts, %d cancels", tot.Failed, tot.Lost, tot.Timeouts, tot.Cancels)
	}
}

// stopGrace is how long the workers get to exit once told to stop: longer
// than any one of their bounded steps (see runWorker and loop).
const stopGrace = 2 * time.Minute

// exitReason summarises why a worker process failed, from its stderr: the
// first line of a panic or fatal error, or a note that it was stuck.
func exitReason(stderr string) string {
	for _, line := range strings.Split(stderr, "\n") {
		line = strings.TrimSpace(line)
		switch {
		case strings.HasPrefix(line, "SIGQUIT"):
			return " (stuck after the stop: killed with SIGQUIT; the stacks are in its stderr above)"
		case strings.HasPrefix(line, "panic:"), strings.HasPrefix(line, "fatal error:"):
			return " (crashed: " + line + "; the stack is in its stderr above)"
		}
	}
	return ""
}

// injectFaults terminates the backend of a random holder every few tens of
// milliseconds, and restarts the server `restarts` times, evenly spread.
func injectFaults(ctx context.Context, stop <-chan struct{}, d time.Duration, restarts int) (terminated int64, restarted int, err error) {
	start := time.Now()
	var c *pgx.Conn
	defer func() {
		if c != nil {
			c.Close(context.Background())
		}
	}()
	for {
		select {
		case <-stop:
			return terminated, restarted, nil
		case <-time.After(time.Duration(10+rand.IntN(50)) * time.Millisecond):
		}
		if restarted < restarts && time.Since(start) > d*time.Duration(2*restarted+1)/time.Duration(2*restarts+1) {
			rctx, cancel := context.WithTimeout(ctx, time.Minute)
			err := server.Restart(rctx)
			cancel()
			if err != nil {
				return terminated, restarted, err
			}
			restarted++
			if c != nil {
				c.Close(context.Background())
				c = nil
			}
			continue
		}
		if c == nil {
			cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
			c, err = pgx.Connect(cctx, server.DSN)
			cancel()
			if err != nil {
				c = nil
				continue
			}
		}
		var ok bool
		err := c.QueryRow(ctx, `SELECT coalesce(pg_terminate_backend(pid), false) FROM pg_locks
			WHERE locktype = 'advisory' AND granted AND pid <> pg_backend_pid()
			AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
			ORDER BY random() LIMIT 1`).Scan(&ok)
		switch {
		case errors.Is(err, pgx.ErrNoRows):
		case err != nil:
			c.Close(context.Background())
			c = nil
		case ok:
			terminated++
		}
	}
}

func connect(t *testing.T, ctx context.Context) *pgx.Conn {
	t.Helper()
	c, err := pgx.Connect(ctx, server.DSN)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// awaitNoLocks waits (up to 20 s) until no advisory lock is left on the
// server: a closed connection's backend ends a moment after the close.
// It returns how many are left.
func awaitNoLocks(t *testing.T, ctx context.Context, c *pgx.Conn) int64 {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		var n int64
		if err := c.QueryRow(ctx, `SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'`).Scan(&n); err != nil {
			t.Fatal(err)
		}
		if n == 0 || time.Now().After(deadline) {
			return n
		}
		time.Sleep(5 * time.Millisecond) // polling a server state, not synchronising
	}
}

// duration returns a run length: short by default, a share of
// ADVISORY_LONG in long mode.
func duration(t *testing.T, short time.Duration, share float64) time.Duration {
	if d := longMode(t); d > 0 {
		return time.Duration(float64(d) * share)
	}
	return short
}

func TestExclusiveClean(t *testing.T) {
	run{name: "exclusive, clean", procs: 3, goroutines: 4, keys: 3, keyBase: 1000,
		writerRatio: 1, duration: duration(t, 4*time.Second, 0.15)}.exec(t)
}

func TestSharedClean(t *testing.T) {
	res := run{name: "shared, clean", procs: 3, goroutines: 4, keys: 2, keyBase: 2000,
		writerRatio: 0.3, duration: duration(t, 4*time.Second, 0.15)}.exec(t)
	if res.readerOver == 0 {
		t.Error("no two readers ever overlapped: shared locks did not share (or the run was too short)")
	}
}

func TestFaults(t *testing.T) {
	d := duration(t, 10*time.Second, 0.5)
	restarts := 1
	if longMode(t) > 0 {
		restarts = max(1, int(d/time.Minute))
	}
	run{name: "faults", procs: 3, goroutines: 4, keys: 3, keyBase: 3000,
		writerRatio: 0.6, faults: true, restarts: restarts, duration: d}.exec(t)
}

// TestCohortFaults runs many goroutines per process on one key under
// faults, so that locks pass between goroutines of a process (SPEC §13)
// while backends are terminated, the server restarts and waits are
// cancelled or time out: the same checks, and passes must happen.
func TestCohortFaults(t *testing.T) {
	d := duration(t, 8*time.Second, 0.2)
	res := run{name: "cohort, faults", procs: 3, goroutines: 8, keys: 1, keyBase: 5000,
		writerRatio: 1, faults: true, restarts: 1, duration: d}.exec(t)
	if res.sameBackend == 0 {
		t.Error("no writer section followed another goroutine's of its process on the same backend: nothing was passed")
	}
}

// TestCheckerSeesNoLock is the negative control, through the whole
// pipeline (worker processes, interval records, report): workers that take
// no lock, and leak one on purpose, must be reported with overlapping
// sections, lost updates and the leaked lock, or the checks above prove
// nothing.
func TestCheckerSeesNoLock(t *testing.T) {
	r := run{name: "no lock (negative control)", procs: 2, goroutines: 4, keys: 1, keyBase: 4000,
		writerRatio: 1, noLock: true, duration: 2 * time.Second}
	res := r.exec(t)
	rec := &recorder{t: t}
	r.report(rec, res)
	for _, want := range []string{
		"completed sections overlapped a writer's section",
		"lost updates",
		"advisory locks left on the workers' idle pooled connections",
	} {
		if !rec.reported(want) {
			t.Errorf("the report of a run without locks does not say %q; it said:\n  %s", want, strings.Join(rec.errors, "\n  "))
		}
	}
}

// recorder is a reporter that keeps the errors, logging everything.
type recorder struct {
	t      *testing.T
	errors []string
}

func (r *recorder) Helper()                         { r.t.Helper() }
func (r *recorder) Logf(format string, args ...any) { r.t.Logf(format, args...) }

func (r *recorder) Errorf(format string, args ...any) {
	msg := fmt.Sprintf(format, args...)
	r.t.Logf("reported (as it must be): %s", msg)
	r.errors = append(r.errors, msg)
}

func (r *recorder) reported(s string) bool {
	for _, e := range r.errors {
		if strings.Contains(e, s) {
			return true
		}
	}
	return false
}
