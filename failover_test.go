package advisory

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/seed0ad592b7/advisory/internal/pgtest"
)

// fencedWriter inserts (name, seq) rows through a holder's own connection
// (exec is Lock.Exec or Session.WithConn) while the holder holds its locks,
// and records what it believes landed. It stops at its first failed write,
// waits to be told of the loss (done), and then tries once more at once
// and once more after the standby was promoted: those writes must fail with
// ErrLockLost and never land.
type fencedWriter struct {
	name string
	exec func(ctx context.Context, sql string, args ...any) error
	done <-chan struct{}

	committed []int // writes that returned nil
	inDoubt   int   // the write that failed when the primary went; 0 if none
	doubtErr  error // its error
	afterLoss []int // writes tried after the holder was told
	errs      []string
	started   chan struct{} // closed after a few committed writes
}

const insertFenced = "INSERT INTO fenced (writer, seq) VALUES ($1, $2)"

func (w *fencedWriter) run(e *env, promoted <-chan struct{}) {
	tick := time.NewTicker(2 * time.Millisecond) // pace, so the writers leave CPU for the servers
	defer tick.Stop()
	seq := 0
	for {
		seq++
		if err := w.exec(e.ctx, insertFenced, w.name, seq); err != nil {
			w.inDoubt, w.doubtErr = seq, err
			break
		}
		w.committed = append(w.committed, seq)
		if len(w.committed) == 3 {
			close(w.started)
		}
		select {
		case <-tick.C:
		case <-w.done:
		}
	}
	select {
	case <-w.done:
	case <-e.ctx.Done():
		w.errs = append(w.errs, fmt.Sprintf("write %d failed but the holder was never told", w.inDoubt))
		return
	}
	for _, wait := range []<-chan struct{}{nil, promoted} {
		if wait != nil {
			select {
			case <-wait:
			case <-e.ctx.Done():
				return
			}
		}
		seq++
		w.afterLoss = append(w.afterLoss, seq)
		if err := w.exec(e.ctx, insertFenced, w.name, seq); !errors.Is(err, ErrLockLost) {
			w.errs = append(w.errs, fmt.Sprintf("write %d after the loss: %v; want ErrLockLost", seq, err))
		}
	}
}

// check compares what w believes with the rows the new primary has: every
// committed write is there (replication is synchronous), and nothing else
// but the write in doubt, which the old backend may have committed while it
// still held the lock.
func (w *fencedWriter) check(t *testing.T, landed []int) {
	t.Helper()
	for _, msg := range w.errs {
		t.Errorf("%s: %s", w.name, msg)
	}
	if len(w.committed) < 3 || w.inDoubt == 0 {
		t.Errorf("%s: %d writes committed, write in doubt %d; want some committed, then one failed", w.name, len(w.committed), w.inDoubt)
	}
	for _, seq := range w.committed {
		if !slices.Contains(landed, seq) {
			t.Errorf("%s: committed write %d is not on the new primary", w.name, seq)
		}
	}
	for _, seq := range landed {
		if !slices.Contains(w.committed, seq) && seq != w.inDoubt {
			t.Errorf("%s: write %d landed on the new primary; it was tried after the loss (%v)", w.name, seq, w.afterLoss)
		}
	}
	t.Logf("%s: %d fenced writes committed and on the new primary, %d tried after the loss, none landed",
		w.name, len(w.committed), len(w.afterLoss))
	if slices.Contains(landed, w.inDoubt) {
		t.Logf("%s: the write in doubt landed although it returned: %v", w.name, w.doubtErr)
	}
}

// landedRows returns the seqs of writer's rows on the server dsn reaches.
func (e *env) landedRows(writer string) []int {
	e.t.Helper()
	rows, err := e.adminConn().Query(e.ctx, "SELECT seq FROM fenced WHERE writer = $1 ORDER BY seq", writer)
	must(e.t, err)
	seqs, err := pgx.CollectRows(rows, pgx.RowTo[int])
	must(e.t, err)
	return seqs
}

// term is one Lead candidate's time as leader.
type term struct {
	cand  int
	start time.Time
	end   time.Time
	cause error // context.Cause of the leader's context
}

// failoverCandidates runs two Lead candidates with default options and
// records their terms.
type failoverCandidates struct {
	mu      sync.Mutex
	running map[int]*term
	ended   []*term
	began   chan *term
	endedCh chan *term
	cancels []context.CancelFunc
	results chan error
}

func startFailoverCandidates(e *env, pool *pgxpool.Pool, key Key) *failoverCandidates {
	c := &failoverCandidates{running: map[int]*term{}, began: make(chan *term, 16), endedCh: make(chan *term, 16), results: make(chan error, 2)}
	for i := range 2 {
		ctx, cancel := context.WithCancel(e.ctx)
		c.cancels = append(c.cancels, cancel)
		go func() {
			c.results <- Lead(ctx, pool, key, func(leaderCtx context.Context) error {
				tm := &term{cand: i, start: time.Now()}
				c.mu.Lock()
				c.running[i] = tm
				c.mu.Unlock()
				c.began <- tm
				<-leaderCtx.Done()
				c.mu.Lock()
				tm.end, tm.cause = time.Now(), context.Cause(leaderCtx)
				delete(c.running, i)
				c.ended = append(c.ended, tm)
				c.mu.Unlock()
				c.endedCh <- tm
				return nil
			})
		}()
	}
	return c
}

// leaders returns the terms running now.
func (c *failoverCandidates) leaders() []*term {
	c.mu.Lock()
	defer c.mu.Unlock()
	var out []*term
	for _, tm := range c.running {
		out = append(out, tm)
	}
	return out
}

// A fail-over to a promoted standby, the way a user runs it: a pool on the
// multi-host DSN, holders of every kind, the primary stopped, the standby
// promoted. "immediate" is a crash of the primary; "fast" is a switchover,
// where the old primary terminates its sessions and refuses new ones for a
// moment before it exits. Checked: every holder is told (Done, Err,
// ErrLockLost, Do and Lead bodies' contexts cancelled); no fenced write
// lands after the loss; Lead elects exactly one leader on the new primary;
// new Acquires work there; nothing is left. Times are logged, not asserted.
func TestFailover(t *testing.T) {
	for _, mode := range []pgtest.ShutdownMode{pgtest.ShutdownImmediate, pgtest.ShutdownFast} {
		t.Run(string(mode), func(t *testing.T) { testFailover(t, mode) })
	}
}

func testFailover(t *testing.T, mode pgtest.ShutdownMode) {
	primary, standby, dsn := startFailoverPair(t)
	e := newEnvDSN(t, dsn)
	pool := e.pool(func(c *pgxpool.Config) { c.MaxConns = 12 })
	lockKey, doKey, leaderKey := StringKey("failover/lock"), StringKey("failover/do"), StringKey("failover/leader")
	sessionKeys := []Key{Int64Key(1400), PairKey(14, 0), StringKey("failover/session")}
	sharedKey := StringKey("failover/shared")

	lock, err := Acquire(e.ctx, pool, lockKey)
	must(t, err)
	s, err := NewSession(e.ctx, pool)
	must(t, err)
	for _, k := range sessionKeys {
		_, err := s.Lock(e.ctx, k)
		must(t, err)
	}
	_, err = s.Lock(e.ctx, sharedKey, Shared())
	must(t, err)

	type doResult struct {
		acquired bool
		err      error
	}
	type cancelled struct {
		cause error
		at    time.Time
	}
	doCancelled := make(chan cancelled, 1) // the Do body's context: cause and when
	doStarted := make(chan struct{})
	doDone := make(chan doResult, 1)
	go func() {
		acquired, err := Do(e.ctx, pool, doKey, func(ctx context.Context) error {
			close(doStarted)
			<-ctx.Done()
			doCancelled <- cancelled{context.Cause(ctx), time.Now()}
			return ctx.Err()
		})
		doDone <- doResult{acquired, err}
	}()
	receive(e, doStarted, "the Do body to start")

	cands := startFailoverCandidates(e, pool, leaderKey)
	first := receive(e, cands.began, "a first leader")
	e.awaitWaiters(1) // the other candidate waits on the server

	promoted := make(chan struct{})
	writers := []*fencedWriter{
		{name: "lock", done: lock.Done(), exec: func(ctx context.Context, sql string, args ...any) error {
			_, err := lock.Exec(ctx, sql, args...)
			return err
		}},
		{name: "session", done: s.Done(), exec: func(ctx context.Context, sql string, args ...any) error {
			return s.WithConn(ctx, func(c *pgx.Conn) error {
				_, err := c.Exec(ctx, sql, args...)
				return err
			})
		}},
	}
	var writing sync.WaitGroup
	for _, w := range writers {
		w.started = make(chan struct{})
		writing.Go(func() { w.run(e, promoted) })
		receive(e, w.started, w.name+" writer's first writes")
	}

	// Every holder records when it was told.
	type told struct {
		what string
		at   time.Time
	}
	toldCh := make(chan told, 4)
	for what, done := range map[string]<-chan struct{}{"Lock": lock.Done(), "Session": s.Done()} {
		go func() {
			select {
			case <-done:
				toldCh <- told{what, time.Now()}
			case <-e.ctx.Done():
			}
		}()
	}

	stopAt := time.Now()
	must(t, primary.Halt(e.ctx, mode))
	stopped := time.Since(stopAt)

	// Every holder is told.
	var toldAfter []string
	for range 2 {
		tl := receive(e, toldCh, "Lock and Session told of the loss")
		toldAfter = append(toldAfter, fmt.Sprintf("%s %v", tl.what, tl.at.Sub(stopAt).Round(time.Millisecond)))
	}
	if !errors.Is(lock.Err(), ErrLockLost) || !errors.Is(s.Err(), ErrLockLost) {
		t.Errorf("Err after the primary stopped: Lock %v, Session %v; want ErrLockLost", lock.Err(), s.Err())
	}
	if held := s.Held(); len(held) != 0 {
		t.Errorf("Session.Held() after the loss = %v", held)
	}
	doBody := receive(e, doCancelled, "the Do body's context cancelled")
	if !errors.Is(doBody.cause, ErrLockLost) {
		t.Errorf("Do body's context cause = %v; want ErrLockLost", doBody.cause)
	}
	toldAfter = append(toldAfter, fmt.Sprintf("Do body %v", doBody.at.Sub(stopAt).Round(time.Millisecond)))
	if r := receive(e, doDone, "Do to return"); !r.acquired || !errors.Is(r.err, ErrLockLost) {
		t.Errorf("Do = %v, %v; want true, ErrLockLost", r.acquired, r.err)
	}
	for receive(e, cands.endedCh, "the first leader's context cancelled") != first {
	}
	if !errors.Is(first.cause, ErrLockLost) {
		t.Errorf("the leader's context cause = %v; want ErrLockLost", first.cause)
	}
	toldAfter = append(toldAfter, fmt.Sprintf("leader %v", first.end.Sub(stopAt).Round(time.Millisecond)))
	t.Logf("-m %s: pg_ctl stop returned after %v; holders told after: %v (from the stop command)",
		mode, stopped.Round(time.Millisecond), toldAfter)
	if err := lock.Release(e.ctx); !errors.Is(err, ErrLockLost) {
		t.Errorf("Release after the loss = %v; want ErrLockLost", err)
	}
	if err := s.Close(e.ctx); !errors.Is(err, ErrLockLost) {
		t.Errorf("Close after the loss = %v; want ErrLockLost", err)
	}

	promoteAt := time.Now()
	must(t, standby.Promote(e.ctx))
	promotedAfter := time.Since(promoteAt)
	close(promoted)
	writing.Wait()

	// Exactly one leader, on the new primary: one fn running, and the
	// server shows one candidate granted and the other waiting.
	var leader *term
	e.eventually("one leader on the new primary and the other candidate waiting", func(c *pgx.Conn) (bool, error) {
		leaders := cands.leaders()
		if len(leaders) != 1 {
			return false, nil
		}
		leader = leaders[0]
		var granted, waiting int
		classid, objid, objsubid := leaderKey.LockRow()
		err := c.QueryRow(context.Background(), `SELECT count(*) FILTER (WHERE granted), count(*) FILTER (WHERE NOT granted)
			FROM pg_locks WHERE locktype = 'advisory' AND classid::int8 = $1 AND objid::int8 = $2 AND objsubid = $3`,
			int64(classid), int64(objid), objsubid).Scan(&granted, &waiting)
		return granted == 1 && waiting == 1, err
	})
	if leader.start.Before(promoteAt) {
		t.Errorf("the leader's term began %v before the promotion; want a term on the new primary", promoteAt.Sub(leader.start))
	}
	cands.mu.Lock()
	ended := slices.Clone(cands.ended)
	cands.mu.Unlock()
	for _, tm := range ended {
		if !errors.Is(tm.cause, ErrLockLost) {
			t.Errorf("candidate %d's term ended with %v; want ErrLockLost", tm.cand, tm.cause)
		}
	}
	t.Logf("-m %s: the standby accepted writes %v after the promote command; candidate %d led there %v after that (terms ended: %d)",
		mode, promotedAfter.Round(time.Millisecond), leader.cand,
		leader.start.Sub(promoteAt.Add(promotedAfter)).Round(time.Millisecond), len(ended))

	for _, w := range writers {
		w.check(t, e.landedRows(w.name))
	}

	// New Acquires work on the new primary, for every key the old one held.
	for _, k := range append([]Key{lockKey, doKey, sharedKey}, sessionKeys...) {
		l, err := Acquire(e.ctx, pool, k, NoWait())
		if err != nil || !l.Acquired() {
			t.Errorf("Acquire(%s) on the new primary = %v, acquired %v", k, err, err == nil && l.Acquired())
			continue
		}
		must(t, l.Release(e.ctx))
	}

	for _, cancel := range cands.cancels {
		cancel()
	}
	for range 2 {
		if err := receive(e, cands.results, "Lead to return"); !errors.Is(err, context.Canceled) {
			t.Errorf("Lead after its ctx was cancelled = %v; want context.Canceled", err)
		}
	}
}
