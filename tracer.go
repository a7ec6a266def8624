package advisory

import "context"

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
//
// This file holds the interfaces and WithTracer; tracer_data.go the data
// they are given, tracer_hooks.go the hooks the library calls, and
// tracer_slog.go SlogTracer.

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
