package advisory

import (
	"context"
	"time"

	"github.com/jackc/pgx/v5"
)

// Mode is how a key is held: exclusively, or shared with other shared
// holders. PostgreSQL counts a session's shared and exclusive holds of one
// key separately, and so does Session.
type Mode int

const (
	ModeExclusive Mode = iota // conflicts with every other session's hold of the key
	ModeShared                // conflicts only with other sessions' exclusive holds
)

// String returns "exclusive" or "shared".
func (m Mode) String() string {
	if m == ModeShared {
		return "shared"
	}
	return "exclusive"
}

// sqlSuffix is the suffix of the advisory lock functions for the mode:
// "_shared" or "".
func (m Mode) sqlSuffix() string {
	if m == ModeShared {
		return "_shared"
	}
	return ""
}

// lockMode is the pg_locks.mode of a hold in this mode.
func (m Mode) lockMode() string {
	if m == ModeShared {
		return "ShareLock"
	}
	return "ExclusiveLock"
}

// DefaultHealthInterval is how often a Session with holds checks that its
// connection is alive, unless HealthInterval says otherwise.
const DefaultHealthInterval = time.Second

// Option changes how a lock is taken or held. Options that do not apply to a
// call are ignored: Shared, NoWait and WaitTimeout apply to every lock call;
// TTL to Acquire, Do and Lead; HealthInterval to calls that create a session
// (NewSession, Acquire, Do, Lead); WithTracer to every call but Session.Lock
// and Session.LockMany, which the Session's own tracer traces.
type Option func(*config)

// config is the result of applying Options.
type config struct {
	mode        Mode
	noWait      bool
	entry       EntryPoint    // the call, for the tracer; set by it, not by an Option
	waitTimeout time.Duration // 0: not set
	ttl         time.Duration // 0: no TTL
	health      time.Duration
	trace       *tracerOption // nil: not traced (WithTracer)
	tx          pgx.TxOptions // DoTx's fn's transaction (TxOptions)
	err         error         // the first invalid option
}

// Shared takes (or, for Session.Unlock, releases) a shared hold instead of
// an exclusive one.
func Shared() Option { return func(c *config) { c.mode = ModeShared } }

// NoWait tries once: when another session holds the key the call returns
// acquired == false and a nil error at once.
func NoWait() Option { return func(c *config) { c.noWait = true } }

// WaitTimeout bounds the wait for the lock to d. The bound is enforced by the
// server (the last wait slice ends at it, without an error; a single
// server-side wait runs under lock_timeout for that statement), so a wait
// that reaches it returns ErrTimeout and the connection stays healthy. With a context
// deadline as well, the earlier of the two applies. WaitTimeout(0) is
// NoWait(); a negative d makes the call fail before any SQL is sent.
func WaitTimeout(d time.Duration) Option {
	return func(c *config) {
		switch {
		case d < 0:
			c.setErr(errorf("WaitTimeout(%v): the wait bound must not be negative", d))
		case d == 0:
			c.noWait = true
		default:
			c.waitTimeout = d
		}
	}
}

// TxOptions sets the isolation level, access mode and deferrable mode of
// the transaction DoTx runs its function in (pgx's BeginQuery and
// CommitQuery too, if set). Whatever they are, that transaction's
// snapshot is taken after the key is granted, so a REPEATABLE READ or
// SERIALIZABLE function sees what the previous holder committed. Other
// calls ignore it. An invalid option makes DoTx fail when its
// transaction begins, holding nothing.
func TxOptions(o pgx.TxOptions) Option { return func(c *config) { c.tx = o } }

// TTL is the longest the lock may be held. When it passes, the lock is
// released on the server even if the holder is still running, Done is
// closed, Err returns ErrTTLExceeded, and Do cancels its function's context
// and returns ErrTTLExceeded. A d that is not positive makes the call fail
// before any SQL is sent.
func TTL(d time.Duration) Option {
	return positive("TTL", d, func(c *config) { c.ttl = d })
}

// HealthInterval sets how often a session's connection is checked while it
// holds locks (default DefaultHealthInterval): a check is one small round
// trip, sent once the connection has been quiet for d and skipped while
// another statement is running on it. A closed connection or a terminated
// backend is noticed at once on Linux (the watcher waits for the socket to
// become readable), within one interval elsewhere; a silent network cut
// within about two, as a check that gets no answer within one interval
// closes the connection. A d that is not positive makes the call fail
// before any SQL is sent. Any longer d is accepted, but the server-side
// keep-alives it sets are clamped to what TCP allows (32767 s each): over
// about 4.5 hours, the server may drop a silently cut client, and free its
// locks, before a holder that checks so rarely notices the cut.
func HealthInterval(d time.Duration) Option {
	return positive("HealthInterval", d, func(c *config) { c.health = d })
}

// positive is the Option that applies set if d > 0, and otherwise fails the
// call naming the option.
func positive(name string, d time.Duration, set func(*config)) Option {
	return func(c *config) {
		if d <= 0 {
			c.setErr(errorf("%s(%v): the duration must be positive", name, d))
			return
		}
		set(c)
	}
}

func (c *config) setErr(err error) {
	if c.err == nil {
		c.err = err
	}
}

// newConfig applies opts over the defaults and returns the first invalid
// option's error.
func newConfig(opts []Option) (config, error) {
	if len(opts) == 0 {
		// The common call: no Option, so no pointer to the config escapes
		// into one, and it stays off the heap.
		return config{health: DefaultHealthInterval}, nil
	}
	c := &config{health: DefaultHealthInterval}
	for _, opt := range opts {
		if opt != nil {
			opt(c)
		}
	}
	return *c, c.err
}

// endOf is when a wait bounded by bound (from waitPlan, just computed)
// ends: the zero time for no bound.
func endOf(bound time.Duration) time.Time {
	if bound <= 0 {
		return time.Time{}
	}
	return time.Now().Add(bound)
}

// waitPlan says how a lock statement waits under c and ctx: try once, wait
// forever, or wait bounded by the earlier of WaitTimeout and ctx's deadline.
// byDeadline is true when the bound is the context's deadline.
func (c config) waitPlan(ctx context.Context) (w wait, bound time.Duration, byDeadline bool) {
	if c.noWait {
		return waitTry, 0, false
	}
	bound = c.waitTimeout
	if d, ok := ctx.Deadline(); ok {
		if left := time.Until(d); bound == 0 || left < bound {
			bound, byDeadline = left, true
		}
	}
	if bound == 0 {
		return waitForever, 0, false
	}
	return waitBounded, bound, byDeadline
}
