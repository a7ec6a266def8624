package advisory

import (
	"context"
	"errors"
	"math"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
)

// Cohorts (SPEC §13): goroutines of one process that wait for one key
// through one pool share one server-side wait, and a holder that releases
// while another of them waits passes it the lock with its connection, at
// most CohortPasses times in a row and within CohortHold of the server's
// grant, before releasing it on the server.
//
// This is lock cohorting (Dice, Marathe and Shavit, PPoPP 2012) with the
// process as the cohort: the server's lock is the global lock, a queue in
// the process the local one. One goroutine of the cohort waits on the
// server (its "server waiter", on a pool connection of its own); the others
// wait in the queue and pin no connection. When the server waiter is
// granted the key, the queue's first goroutine becomes the next server
// waiter if the key has room for another holder (a semaphore's other
// slots), and otherwise waits for a pass. A pass hands over the Session
// that holds the key: the new holder gets a Lock of its own (its own Done,
// Err, TTL and trace), while the key stays held on the server without a
// round trip. A holder that cannot pass (nobody queued, the bounds
// reached, a WithConn of its own in flight, its session ending) releases
// on the server as any Lock does, and the queue's first goroutine becomes
// the server waiter: it queues on the server behind the other processes'
// waiters, which the release woke first.
//
// Sessions own their connections, so nothing passes between them; but a
// Session that holds nothing and waits for a key queues behind the other
// such Sessions of the process waiting for or holding that key through the
// same pool (a gate: the same queue, without passes; see cohort_gate.go),
// so that the server sees at most one waiter per key per process.

// CohortPasses is the most times in a row a lock passes between goroutines
// of one process (Acquire, Do, AcquireSemaphore, DoSemaphore) before it is
// released on the server, so that other processes get their turn.
const CohortPasses = 8

// CohortHold bounds how long a lock keeps passing between goroutines of one
// process: no pass is made once CohortHold has passed since the server
// granted the key to the first of them. A process holds a key for at most
// CohortHold plus one holder's hold, or CohortPasses+1 holds in a row,
// whichever ends first, while other processes wait for it.
const CohortHold = 10 * time.Millisecond

// testHookServerTurn, if set, is called by a goroutine of a cohort told to
// wait on the server, before it takes a connection.
var testHookServerTurn atomic.Pointer[func()]

// cohortHoldBound is CohortHold, which tests that need a pass to happen
// whatever the machine's speed lengthen.
var cohortHoldBound = CohortHold

// NoCohort makes Acquire, Do, AcquireSemaphore, DoSemaphore and
// Session.Lock wait for the key on their own, outside the process's
// cohort: on the server, on a pool connection of their own, and, holding
// the key, never given a lock passed by another goroutine nor passing theirs
// on. NoWait calls, Lead and Acquire's and Do's Shared locks never take
// part in a cohort (a Session's shared Lock queues behind the process's
// other Sessions waiting for the key shared).
func NoCohort() Option { return func(c *config) { c.given |= optNoCohort; c.noCohort = true } }

// cohortKey identifies a cohort: the goroutines of the process that wait
// for, or hold, key (a semaphore's key with slots > 0; slots < 0 for the
// gate of Sessions) through pool, with the same health interval and
// tracer, so that a passed session is what each of them asked for.
type cohortKey struct {
	pool   *pgxpool.Pool
	key    Key
	mode   Mode
	slots  int
	health time.Duration
	trace  *tracerOption
}

// cohort is the process's queue for one cohortKey.
type cohort struct {
	ck cohortKey

	mu      sync.Mutex
	holders int  // Locks of the cohort that hold the key (a slot)
	serving bool // a goroutine of the cohort waits on the server
	queue   []*cohortWaiter

	users int // goroutines holding, serving or queued; guarded by cohorts
}

// cohortWaiter is a goroutine in a cohort's queue.
type cohortWaiter struct{ turn chan cohortTurn }

// cohortTurn is what ends a goroutine's wait in the queue: a Session
// holding key, passed by its holder (passes made since since, the server's
// grant); or, with s nil, its turn to wait on the server; or err, when
// ReleaseAll ended the wait.
type cohortTurn struct {
	queued bool // the turn came through the queue
	s      *Session
	key    Key
	passes int
	since  time.Time
	err    error
}

// cohorts is the process's cohorts.
var cohorts = struct {
	sync.Mutex
	m map[cohortKey]*cohort
}{m: make(map[cohortKey]*cohort)}

// joinCohort returns ck's cohort, counting the caller in it until leave.
func joinCohort(ck cohortKey) *cohort {
	cohorts.Lock()
	defer cohorts.Unlock()
	c := cohorts.m[ck]
	if c == nil {
		c = &cohort{ck: ck}
		cohorts.m[ck] = c
	}
	c.users++
	return c
}

// leave counts the caller out of the cohort, which is forgotten once
// nobody is in it.
func (c *cohort) leave() {
	cohorts.Lock()
	defer cohorts.Unlock()
	if c.users--; c.users == 0 {
		delete(cohorts.m, c.ck)
	}
}

// room is how many holders the cohort's key has room for.
func (c *cohort) room() int {
	switch {
	case c.ck.slots < 0:
		return math.MaxInt // a gate: holders are not counted
	case c.ck.slots == 0:
		return 1
	}
	return c.ck.slots
}

// cohorted reports whether a lock asked for with cfg takes part in its
// process's cohort.
func cohorted(cfg config) bool {
	if cfg.noCohort || cfg.noWait || cfg.mode != ModeExclusive {
		return false
	}
	switch cfg.entry {
	case EntryAcquire, EntryDo, EntryAcquireSemaphore, EntryDoSemaphore:
		return true
	}
	return false
}

// lockInCohort is newLock for a lock asked for with cfg: in the process's
// cohort for key (with cfg.slots slots) when it takes part in one.
func lockInCohort(ctx context.Context, pool *pgxpool.Pool, key Key, cfg config, lock func(context.Context, *Session) (Key, error)) (*Lock, error) {
	if !cohorted(cfg) || pool == nil {
		return newLock(ctx, pool, key, cfg, nil, lock)
	}
	// On its way for ReleaseAll from here, in the queue and after it, until
	// its session is registered: a goroutine told to wait on the server is
	// in neither the queue nor the registry otherwise.
	_, way := onTheWay(ctx, pool)
	defer way.leave()
	c := joinCohort(cohortKey{pool: pool, key: key, mode: cfg.mode, slots: cfg.slots, health: cfg.health, trace: cfg.trace})
	t, cfg, err := c.await(way.ctx, key, cfg, nil)
	if err != nil {
		c.leave()
		return nil, err
	}
	if t.s != nil {
		l := &Lock{key: t.key, mode: cfg.mode, s: t.s}
		c.hold(l, t.passes, t.since, cfg.ttl)
		if why := context.Cause(t.s.ctx); errors.Is(why, errReleasedAll) {
			_ = l.Release(ctx) // ReleaseAll ended it on its way here
			return nil, keyError(opOf(cfg), key, ErrClosed, why)
		}
		t.s.trace.started(ctx, cfg.entry, cfg.mode, t.key)
		return l, nil
	}
	ttl := cfg.ttl
	cfg.ttl = 0 // started below, once the Lock is in the cohort
	if hook := testHookServerTurn.Load(); hook != nil {
		(*hook)()
	}
	l, err := newLock(ctx, pool, key, cfg, way, lock)
	got := err == nil && l.Acquired()
	c.mu.Lock()
	c.serving = false
	if got {
		c.holders++
	}
	next := c.nextServer()
	c.mu.Unlock()
	next.serve()
	if !got {
		c.leave()
		return l, err
	}
	c.hold(l, 0, time.Now(), ttl)
	return l, nil
}

// await waits, if the cohort's state says so, for the caller's turn: to
// wait on the server (a zero cohortTurn; the cohort is then marked as
// serving), or a passed Session. It returns cfg with its WaitTimeout
// shortened by the time spent in the queue. The wait in the queue ends
// with an error when ctx ends, cfg's WaitTimeout passes, ReleaseAll ends
// it, or end (if not nil) is closed, with the error endErr gives.
func (c *cohort) await(ctx context.Context, key Key, cfg config, end <-chan struct{}) (cohortTurn, config, error) {
	c.mu.Lock()
	if !c.serving && c.holders < c.room() && len(c.queue) == 0 {
		c.serving = true
		c.mu.Unlock()
		return cohortTurn{}, cfg, nil
	}
	w := &cohortWaiter{turn: make(chan cohortTurn, 1)}
	c.queue = append(c.queue, w)
	c.mu.Unlock()

	start := time.Now()
	var timeout <-chan time.Time
	if cfg.waitTimeout > 0 {
		t := time.NewTimer(cfg.waitTimeout)
		defer t.Stop()
		timeout = t.C
	}
	var why error
	select {
	case t := <-w.turn:
		t.queued = true
		if t.err != nil {
			return t, cfg, keyError(opOf(cfg), key, ErrClosed, t.err)
		}
		if cfg.waitTimeout > 0 {
			// Still positive: the timer has not fired.
			cfg.waitTimeout = max(cfg.waitTimeout-time.Since(start), time.Nanosecond)
		}
		return t, cfg, nil
	case <-ctx.Done():
		why = ctx.Err()
	case <-timeout:
		why = ErrTimeout
	case <-end:
		why = ErrClosed
	}
	c.mu.Lock()
	i := slices.Index(c.queue, w)
	if i >= 0 {
		c.queue = slices.Delete(c.queue, i, i+1)
	}
	c.mu.Unlock()
	if i < 0 { // the turn came as the wait ended: hand it on
		if t := <-w.turn; t.err == nil {
			c.giveBack(t)
		}
	}
	op := opOf(cfg)
	switch {
	case errors.Is(context.Cause(ctx), errReleasedAll):
		return cohortTurn{}, cfg, keyError(op, key, ErrClosed, errReleasedAll)
	case why == ErrTimeout:
		return cohortTurn{}, cfg, keyError(op, key, ErrTimeout, nil)
	case why == ErrClosed:
		return cohortTurn{}, cfg, keyError(op, key, ErrClosed, nil)
	case errors.Is(why, context.DeadlineExceeded):
		e := keyError(op, key, ErrTimeout, nil)
		e.deadline = true
		return cohortTurn{}, cfg, e
	}
	return cohortTurn{}, cfg, keyError(op, key, nil, context.Cause(ctx))
}

// opOf is the Op of the errors of a lock asked for with cfg.
func opOf(cfg config) string {
	if cfg.slots > 0 {
		return opSemaphore
	}
	return "lock"
}

// giveBack hands on a turn that came to a waiter that no longer wants it.
func (c *cohort) giveBack(t cohortTurn) {
	if t.s == nil {
		c.served()
		return
	}
	if w := c.nextHolder(t.passes, t.since); w != nil {
		w.turn <- cohortTurn{s: t.s, key: t.key, passes: t.passes + 1, since: t.since}
		return
	}
	_ = t.s.Close(context.Background()) // as a Release would; its error is the session's, reported to nobody
	c.mu.Lock()
	c.holders--
	next := c.nextServer()
	c.mu.Unlock()
	next.serve()
}

// served ends the caller's turn as the cohort's server waiter without a
// hold (a Session's wait, through the gate, or a turn given back).
func (c *cohort) served() {
	c.mu.Lock()
	c.serving = false
	next := c.nextServer()
	c.mu.Unlock()
	next.serve()
}

// nextServer takes the queue's first goroutine as the next server waiter
// if there is room for it; it returns nil otherwise. The caller holds c.mu
// and, once it has let go, calls serve on what it got.
func (c *cohort) nextServer() *cohortWaiter {
	if c.serving || c.holders >= c.room() || len(c.queue) == 0 {
		return nil
	}
	c.serving = true
	return c.pop()
}

// serve tells w (if not nil) to wait on the server.
func (w *cohortWaiter) serve() {
	if w != nil {
		w.turn <- cohortTurn{}
	}
}

// pop takes the queue's first goroutine. The caller holds c.mu.
func (c *cohort) pop() *cohortWaiter {
	w := c.queue[0]
	c.queue = slices.Delete(c.queue, 0, 1)
	return w
}

// nextHolder takes the queue's first goroutine to pass a held key to, if
// the bounds allow one more pass (passes made since the grant at since).
func (c *cohort) nextHolder(passes int, since time.Time) *cohortWaiter {
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(c.queue) == 0 || passes >= CohortPasses || time.Since(since) >= cohortHoldBound {
		return nil
	}
	return c.pop()
}

// releaseAllCohorts ends the wait of every goroutine queued in a cohort of
// pool with an error matching ErrClosed (ReleaseAll).
func releaseAllCohorts(pool *pgxpool.Pool) {
	cohorts.Lock()
	var of []*cohort
	for ck, c := range cohorts.m {
		if ck.pool == pool {
			of = append(of, c)
		}
	}
	cohorts.Unlock()
	for _, c := range of {
		c.mu.Lock()
		queue := c.queue
		c.queue = nil
		c.mu.Unlock()
		for _, w := range queue {
			w.turn <- cohortTurn{err: errReleasedAll}
		}
	}
}
