package advisory

import (
	"context"
	"errors"
	"strconv"
	"sync"
	"sync/atomic"
	"time"
)

// Tracing (SPEC §11), modelled on pgx's QueryTracer: small interfaces with
// start and end data structs, so that adding an event or a field never
// breaks a tracer. A Tracer sees every wait; a Tracer that also implements
// HoldTracer sees every hold begin and end, and one that implements
// LeadTracer sees Lead's leadership won and ended. SlogTracer logs them;
// github.com/seed0ad592b7/advisory/otel records them as OpenTelemetry
// metrics.
//
// A tracer is given per call with WithTracer, as every other setting of
// this package is (see WithTracer for why not per pool). With no tracer the
// hooks cost one nil check each and allocate nothing.
//
// Tracer methods run on the caller's goroutine, or, for a hold that ends
// because its connection was lost or its TTL passed, on the library's own;
// they must be safe for concurrent use, return quickly, and not call back
// into the Session or Lock they trace (its turn may be held).

// Tracer traces waits for locks: every call that asks for a lock reports
// when it starts waiting and how the wait ended. Implement HoldTracer and
// LeadTracer as well to see holds and leadership.
type Tracer interface {
	// TraceWaitStart is called when a call starts asking for a lock: for
	// the calls that take a connection of their own (Acquire, Do, Lead,
	// AcquireSemaphore, DoSemaphore, DoTx), before it waits for a
	// connection from the pool. The returned context is used for the rest
	// of the call and passed to TraceWaitEnd and, when the lock is taken,
	// to HoldTracer.TraceHoldStart.
	TraceWaitStart(ctx context.Context, data TraceWaitStartData) context.Context
	// TraceWaitEnd is called when the call has its answer: the lock, "not
	// acquired", or an error.
	TraceWaitEnd(ctx context.Context, data TraceWaitEndData)
}

// HoldTracer traces the holds of session locks: a (key, mode) a session
// holds on the server, from the call that took it until its last release,
// the loss of its connection, its TTL, or ReleaseAll. Re-entrant holds are
// one hold (PostgreSQL's lock table has one row for them), and a LockMany
// of n new keys starts n holds. Transaction locks (LockTx, DoTx) are not
// traced as holds: they end with their transaction.
type HoldTracer interface {
	// TraceHoldStart is called when a session starts holding a (key,
	// mode), with the context TraceWaitStart returned, before the wait's
	// TraceWaitEnd. The context it returns is passed to TraceHoldEnd; it
	// may have been cancelled by then (use it for its values).
	TraceHoldStart(ctx context.Context, data TraceHoldStartData) context.Context
	// TraceHoldEnd is called once the hold has ended, before the Lock's or
	// Session's Done channel is closed.
	TraceHoldEnd(ctx context.Context, data TraceHoldEndData)
}

// LeadTracer traces Lead's leadership: won when a campaign takes the key
// and fn is about to run, ended when fn has returned and the key is
// released or lost.
type LeadTracer interface {
	// TraceLeadStart is called when Lead has won and is about to call fn;
	// the returned context is the parent of fn's leaderCtx and is passed
	// to TraceLeadEnd.
	TraceLeadStart(ctx context.Context, data TraceLeadStartData) context.Context
	// TraceLeadEnd is called when the leadership has ended.
	TraceLeadEnd(ctx context.Context, data TraceLeadEndData)
}

// EntryPoint names the call that asked for a lock; its String is a
// low-cardinality label for logs and metrics.
type EntryPoint uint8

// The entry points.
const (
	EntryAcquire          EntryPoint = iota + 1 // "Acquire"
	EntryDo                                     // "Do"
	EntryLead                                   // "Lead"
	EntryAcquireSemaphore                       // "AcquireSemaphore"
	EntryDoSemaphore                            // "DoSemaphore"
	EntrySessionLock                            // "Session.Lock"
	EntrySessionLockMany                        // "Session.LockMany"
	EntryLockTx                                 // "LockTx"
	EntryDoTx                                   // "DoTx"
)

// String returns the call's name, as in the constants' comments.
func (e EntryPoint) String() string {
	return name(e, []string{"", "Acquire", "Do", "Lead", "AcquireSemaphore", "DoSemaphore",
		"Session.Lock", "Session.LockMany", "LockTx", "DoTx"}, "EntryPoint")
}

// name returns names[v], or type(v) when v is out of range.
func name[T ~uint8](v T, names []string, typ string) string {
	if int(v) < len(names) && names[v] != "" {
		return names[v]
	}
	return typ + "(" + strconv.Itoa(int(v)) + ")"
}

// TraceWaitStartData describes a wait that starts.
type TraceWaitStartData struct {
	Entry EntryPoint
	// Key is the key asked for: the semaphore's own key for
	// AcquireSemaphore and DoSemaphore (the slot taken is in
	// TraceHoldStartData), the zero Key for LockMany.
	Key Key
	// Keys is LockMany's set of keys, in canonical order, without
	// duplicates; nil for every other call. Do not modify or keep it.
	Keys []Key
	Mode Mode
	// Try is true for one try without waiting (NoWait, WaitTimeout(0)).
	Try bool
}

// TraceWaitEndData describes how a wait ended. It repeats what
// TraceWaitStart was told, so a tracer needs to keep nothing.
type TraceWaitEndData struct {
	TraceWaitStartData
	// Acquired reports whether the call got its lock (all of LockMany's
	// keys, one slot of a semaphore).
	Acquired bool
	// Duration is the time from TraceWaitStart to the answer, including
	// the wait for a connection or for the Session's turn.
	Duration time.Duration
	// Err is the call's error (an *Error matching the sentinels), nil when
	// the lock was acquired or a try found it busy.
	Err error
	// NoSlices, when not empty, says why this wait was one server-side
	// wait, which holds a snapshot while it lasts, where it would have been
	// cut into slices (the package documentation, "What waiting costs the
	// server"): NoSlicesPLpgSQL. A Session says it once, at its first such
	// wait; LockTx and DoTx at each.
	NoSlices string
}

// NoSlicesPLpgSQL is TraceWaitEndData.NoSlices when PL/pgSQL cannot be
// used by the waiting session (not installed, or its role lacks USAGE).
const NoSlicesPLpgSQL = "PL/pgSQL cannot be used (not installed, or no USAGE on it): waits hold a snapshot"

// WaitOutcome classifies how a wait ended; its String is a low-cardinality
// label.
type WaitOutcome uint8

// The outcomes of a wait, with their String.
const (
	OutcomeAcquired     WaitOutcome = iota // "acquired"
	OutcomeBusy                            // "busy": a try found the key held elsewhere
	OutcomeTimeout                         // "timeout": ErrTimeout
	OutcomeDeadlock                        // "deadlock": ErrDeadlock
	OutcomeTooManyLocks                    // "too_many_locks": ErrTooManyLocks
	OutcomeCanceled                        // "canceled": ctx was cancelled
	OutcomeLost                            // "lost": ErrLockLost, the session ended
	OutcomeClosed                          // "closed": ErrClosed, Close or ReleaseAll
	OutcomeError                           // "error": any other error
)

// String returns the outcome's label, as in the constants' comments.
func (o WaitOutcome) String() string {
	return name(o, []string{"acquired", "busy", "timeout", "deadlock", "too_many_locks",
		"canceled", "lost", "closed", "error"}, "WaitOutcome")
}

// Outcome classifies the wait's end by Acquired and the sentinel Err
// matches.
func (d TraceWaitEndData) Outcome() WaitOutcome {
	switch err := d.Err; {
	case err == nil && d.Acquired:
		return OutcomeAcquired
	case err == nil:
		return OutcomeBusy
	case errors.Is(err, ErrTimeout):
		return OutcomeTimeout
	case errors.Is(err, ErrDeadlock):
		return OutcomeDeadlock
	case errors.Is(err, ErrTooManyLocks):
		return OutcomeTooManyLocks
	case errors.Is(err, ErrLockLost):
		return OutcomeLost
	case errors.Is(err, ErrClosed):
		return OutcomeClosed
	case errors.Is(err, context.Canceled):
		return OutcomeCanceled
	}
	return OutcomeError
}

// TraceHoldStartData describes a hold that starts.
type TraceHoldStartData struct {
	Entry EntryPoint // the call that took it
	Key   Key        // for a semaphore, the slot
	Mode  Mode
}

// HoldEnd says why a hold or a leadership ended; its String is a
// low-cardinality label.
type HoldEnd uint8

// How holds end, with their String.
const (
	// HoldReleased, "released": Release, Unlock, UnlockMany or Close
	// released it; for Lead, it resigned (fn returned, or ctx ended).
	HoldReleased HoldEnd = iota
	// HoldLost, "lost": the connection was lost, or the server did not
	// hold the lock when it was released (ErrLockLost), or Close cut the
	// connection off under a call that kept it.
	HoldLost
	// HoldTTL, "ttl": its TTL passed (ErrTTLExceeded).
	HoldTTL
	// HoldReleasedAll, "release_all": ReleaseAll ended it.
	HoldReleasedAll
)

// String returns the label, as in the constants' comments.
func (h HoldEnd) String() string {
	return name(h, []string{"released", "lost", "ttl", "release_all"}, "HoldEnd")
}

// TraceHoldEndData describes how a hold ended.
type TraceHoldEndData struct {
	TraceHoldStartData
	Duration time.Duration // how long it was held
	End      HoldEnd
	// Err says why a hold was lost (matching ErrLockLost) or its TTL passed
	// (ErrTTLExceeded); nil otherwise.
	Err error
}

// TraceLeadStartData describes a leadership won.
type TraceLeadStartData struct {
	Key Key
}

// TraceLeadEndData describes how a leadership ended.
type TraceLeadEndData struct {
	Key      Key
	Duration time.Duration // from TraceLeadStart to the end
	End      HoldEnd       // HoldReleased when Lead resigned
	// Err is the loss (matching ErrLockLost or ErrTTLExceeded) when the
	// leadership was lost, else fn's error (nil when fn returned nil).
	Err error
}

// WithTracer traces the call with t: its wait and, when t also implements
// HoldTracer or LeadTracer, its holds and leadership. Given to a call that
// creates a session (NewSession, Acquire, Do, Lead, AcquireSemaphore,
// DoSemaphore), t traces that session for its whole life, including its
// Lock, LockMany, Unlock and UnlockMany, which take no WithTracer. A nil t
// traces nothing; without WithTracer nothing is traced and nothing is
// allocated.
func WithTracer(t Tracer) Option {
	// Why per call and not per pool: every setting of this package is an
	// Option, and a tracer is one more (define the options once, next to
	// the pool); it reaches every entry point alike, LockTx too, whose
	// pgx.Tx does not lead to a pool; it needs no global registry that
	// tests or libraries sharing a pool would fight over; and it costs
	// nothing when absent. Reading it from the pool's ConnConfig.Tracer, as
	// pgxpool finds its AcquireTracer, would make every advisory tracer a
	// pgx QueryTracer too and would copy the pool's configuration
	// (pgxpool.Pool.Config allocates) on every call.
	if t == nil {
		return func(c *config) { c.given |= optWithTracer; c.trace = nil }
	}
	o := &tracerOption{t}
	return func(c *config) { c.given |= optWithTracer; c.trace = o }
}

// tracerOption holds WithTracer's tracer behind a pointer, which keeps the
// config that every call fills in to 64 bytes, the size it had before
// tracing.
type tracerOption struct{ t Tracer }

// tracer returns the tracer WithTracer gave, nil for none.
func (c config) tracer() Tracer {
	if c.trace == nil {
		return nil
	}
	return c.trace.t
}

// waitTrace is one wait being traced; the zero waitTrace traces nothing.
type waitTrace struct {
	t        Tracer
	data     TraceWaitStartData
	start    time.Time
	noSlices *string // set by noteNoSlices through the call's context
}

// noSlicesKey is the context key of a traced wait's waitTrace.noSlices.
type noSlicesKey struct{}

// traceWait reports a wait described by data (its Entry, Mode and Try
// taken from cfg) to cfg's tracer, if any, and returns the context for the
// rest of the call.
func traceWait(ctx context.Context, cfg config, data TraceWaitStartData) (context.Context, waitTrace) {
	t := cfg.tracer()
	if t == nil {
		return ctx, waitTrace{}
	}
	data.Entry, data.Mode, data.Try = cfg.entry, cfg.mode, cfg.noWait
	w := waitTrace{t: t, data: data, start: time.Now(), noSlices: new(string)}
	return context.WithValue(t.TraceWaitStart(ctx, data), noSlicesKey{}, w.noSlices), w
}

// end reports the wait's answer.
func (w waitTrace) end(ctx context.Context, acquired bool, err error) {
	if w.t == nil {
		return
	}
	w.t.TraceWaitEnd(ctx, TraceWaitEndData{TraceWaitStartData: w.data, Acquired: acquired, Duration: time.Since(w.start), Err: err,
		NoSlices: *w.noSlices})
}

// sessionTrace is a traced Session's tracer and, if it traces holds, when
// each hold began; nil for a Session without a tracer (every method is a
// no-op on nil).
type sessionTrace struct {
	opt   *tracerOption // the session's WithTracer
	holds HoldTracer    // nil if it does not trace holds

	mu   sync.Mutex
	held map[hold]heldSince

	reached atomic.Bool // the server answered a statement (answered)
}

// heldSince is a traced hold: what TraceHoldStart got and returned.
type heldSince struct {
	ctx   context.Context
	data  TraceHoldStartData
	start time.Time
}

func newSessionTrace(cfg config) *sessionTrace {
	if cfg.tracer() == nil {
		return nil
	}
	st := &sessionTrace{opt: cfg.trace}
	if ht, ok := cfg.tracer().(HoldTracer); ok {
		st.holds, st.held = ht, make(map[hold]heldSince)
	}
	return st
}

// answerTracer is a Tracer told when a traced session is first answered by
// the server (SlogTracer, which ends an outage with it).
type answerTracer interface{ serverAnswered() }

// answered tells the tracer, once per session, that the server answered
// one of the session's statements.
func (st *sessionTrace) answered() {
	if st == nil || st.reached.Load() || st.reached.Swap(true) {
		return
	}
	if at, ok := st.opt.t.(answerTracer); ok {
		at.serverAnswered()
	}
}

// option returns the session's WithTracer for a config, nil for none.
func (st *sessionTrace) option() *tracerOption {
	if st == nil {
		return nil
	}
	return st.opt
}

// started reports that the session started holding keys in mode m, taken
// by entry; ctx is the context of the call's wait.
func (st *sessionTrace) started(ctx context.Context, entry EntryPoint, m Mode, keys ...Key) {
	if st == nil || st.holds == nil {
		return
	}
	for _, k := range keys {
		data := TraceHoldStartData{Entry: entry, Key: k, Mode: m}
		hctx := st.holds.TraceHoldStart(ctx, data)
		st.mu.Lock()
		st.held[hold{k, m}] = heldSince{ctx: hctx, data: data, start: time.Now()}
		st.mu.Unlock()
	}
}

// released reports that the session stopped holding keys in mode m: an
// unlock that succeeded, or, when err is not nil, failed and lost them.
func (st *sessionTrace) released(m Mode, err error, keys ...Key) {
	if st == nil || st.holds == nil {
		return
	}
	end := HoldReleased
	if err != nil {
		end = HoldLost
	}
	for _, k := range keys {
		st.end(hold{k, m}, end, err)
	}
}

// ended reports the end of every hold the session still had when it
// ended: why is the cause of the session's context (ErrClosed, or what
// ended it: a loss, the TTL, ReleaseAll), err an error that lost them on
// the way out (a failed unlock), or nil.
func (st *sessionTrace) ended(why, err error) {
	if st == nil || st.holds == nil {
		return
	}
	end, err := holdEnd(why, err)
	st.mu.Lock()
	holds := make([]hold, 0, len(st.held))
	for h := range st.held {
		holds = append(holds, h)
	}
	st.mu.Unlock()
	for _, h := range holds {
		st.end(h, end, err)
	}
}

func (st *sessionTrace) end(h hold, end HoldEnd, err error) {
	st.mu.Lock()
	since, ok := st.held[h]
	delete(st.held, h)
	st.mu.Unlock()
	if ok {
		st.holds.TraceHoldEnd(since.ctx, TraceHoldEndData{TraceHoldStartData: since.data, Duration: time.Since(since.start), End: end, Err: err})
	}
}

// holdEnd classifies the end of a session whose context's cause is why,
// and err an error that lost its holds on the way out, and returns the
// error to report with it.
func holdEnd(why, err error) (HoldEnd, error) {
	switch {
	case err != nil:
		return HoldLost, err
	case errors.Is(why, ErrLockLost):
		return HoldLost, why
	case errors.Is(why, ErrTTLExceeded):
		return HoldTTL, why
	case errors.Is(why, errReleasedAll):
		return HoldReleasedAll, nil
	}
	return HoldReleased, nil
}

// leadTrace is one leadership being traced; the zero leadTrace traces
// nothing.
type leadTrace struct {
	t     LeadTracer
	key   Key
	start time.Time
}

// traceLead reports a leadership won on key to t, if it traces leadership,
// and returns the context for fn.
func traceLead(ctx context.Context, t Tracer, key Key) (context.Context, leadTrace) {
	lt, ok := t.(LeadTracer)
	if !ok {
		return ctx, leadTrace{}
	}
	l := leadTrace{t: lt, key: key, start: time.Now()}
	return lt.TraceLeadStart(ctx, TraceLeadStartData{Key: key}), l
}

// end reports the end of the leadership held by lock, released (with
// releaseErr) once fn had returned fnErr.
func (l leadTrace) end(ctx context.Context, lock *Lock, releaseErr, fnErr error) {
	if l.t == nil {
		return
	}
	end, err := holdEnd(context.Cause(lock.s.ctx), releaseErr)
	if end == HoldReleased || end == HoldReleasedAll {
		err = fnErr
	}
	l.t.TraceLeadEnd(ctx, TraceLeadEndData{Key: l.key, Duration: time.Since(l.start), End: end, Err: err})
}
