package advisory

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"time"
)

// The hooks the library calls to report to a call's tracer (tracer.go):
// each is a no-op, with one nil check, when the call has no tracer.

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
