package advisory

import (
	"context"
	"strings"
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

// Option changes how a lock is taken or held. An Option given to a call it
// does not apply to is an error naming the option and the call, returned
// before any connection is taken or SQL sent:
//
//	                     Shared NoWait WaitTimeout TTL HealthInterval WithTracer
//	NewSession,
//	NewConnSession                                      x              x
//	Acquire, Do            x      x        x        x   x              x
//	Lead                                            x   x              x
//	AcquireSemaphore,
//	DoSemaphore                   x        x        x   x              x
//	Session.Lock,
//	Session.LockMany       x      x        x
//	Session.Unlock,
//	Session.UnlockMany     x
//	LockTx, DoTx           x      x        x                           x
//
// TxOptions applies to DoTx only. WaitingSince and NoCohort apply to Acquire, Do, AcquireSemaphore, DoSemaphore and
// Session.Lock. Lead always waits and leads exclusively; a semaphore's slots are held
// exclusively; a Session's health interval and tracer are given to
// NewSession, and its holds have no TTL.
type Option func(*config)

// optionSet is a set of kinds of Option, to check that each Option given
// to a call applies to it.
type optionSet uint16

// The kinds of Option, in the order of optionNames.
const (
	optShared optionSet = 1 << iota
	optNoWait
	optWaitTimeout
	optTTL
	optHealthInterval
	optWithTracer
	optWaitingSince
	optNoCohort
	optTxOptions
)

// optionNames names the kinds of Option, bit by bit.
var optionNames = [...]string{"Shared", "NoWait", "WaitTimeout", "TTL", "HealthInterval", "WithTracer", "WaitingSince", "NoCohort", "TxOptions"}

// String lists the options in o: "TTL, HealthInterval".
func (o optionSet) String() string {
	var names []string
	for i, name := range optionNames {
		if o&(1<<i) != 0 {
			names = append(names, name)
		}
	}
	return strings.Join(names, ", ")
}

// call is an exported function or method that takes Options.
type call uint8

// The calls that take Options.
const (
	callNewSession call = iota
	callNewConnSession
	callAcquire
	callDo
	callLead
	callAcquireSemaphore
	callDoSemaphore
	callSessionLock
	callSessionLockMany
	callSessionUnlock
	callSessionUnlockMany
	callLockTx
	callDoTx
)

// calls names each call and the Options that apply to it (the table in
// Option's documentation).
var calls = [...]struct {
	name    string
	applies optionSet
}{
	callNewSession:        {"NewSession", optHealthInterval | optWithTracer},
	callNewConnSession:    {"NewConnSession", optHealthInterval | optWithTracer},
	callAcquire:           {"Acquire", optShared | optNoWait | optWaitTimeout | optTTL | optHealthInterval | optWithTracer | optWaitingSince | optNoCohort},
	callDo:                {"Do", optShared | optNoWait | optWaitTimeout | optTTL | optHealthInterval | optWithTracer | optWaitingSince | optNoCohort},
	callLead:              {"Lead", optTTL | optHealthInterval | optWithTracer},
	callAcquireSemaphore:  {"AcquireSemaphore", optNoWait | optWaitTimeout | optTTL | optHealthInterval | optWithTracer | optWaitingSince | optNoCohort},
	callDoSemaphore:       {"DoSemaphore", optNoWait | optWaitTimeout | optTTL | optHealthInterval | optWithTracer | optWaitingSince | optNoCohort},
	callSessionLock:       {"Session.Lock", optShared | optNoWait | optWaitTimeout | optWaitingSince | optNoCohort},
	callSessionLockMany:   {"Session.LockMany", optShared | optNoWait | optWaitTimeout},
	callSessionUnlock:     {"Session.Unlock", optShared},
	callSessionUnlockMany: {"Session.UnlockMany", optShared},
	callLockTx:            {"LockTx", optShared | optNoWait | optWaitTimeout | optWithTracer},
	callDoTx:              {"DoTx", optShared | optNoWait | optWaitTimeout | optWithTracer | optTxOptions},
}

// config is the result of applying Options.
type config struct {
	mode        Mode
	noWait      bool
	entry       EntryPoint    // the call, for the tracer; set by it, not by an Option
	given       optionSet     // the kinds of Option given
	waitTimeout time.Duration // 0: not set
	ttl         time.Duration // 0: no TTL
	health      time.Duration
	trace       *tracerOption // nil: not traced (WithTracer)
	waitingFrom int64         // WaitingSince, Unix nanoseconds; 0: not set
	noCohort    bool          // NoCohort
	slots       int           // a semaphore's size, for its cohort; 0 for a key
	tx          pgx.TxOptions // DoTx's fn's transaction (TxOptions)
	err         error         // the first invalid option
}

// Shared takes (or, for Session.Unlock, releases) a shared hold instead of
// an exclusive one.
func Shared() Option { return func(c *config) { c.given |= optShared; c.mode = ModeShared } }

// WaitingSince says that the call's wait continues one that began at t,
// for a caller that waits in several calls (a loop of WaitTimeout waits,
// as pglock run's): while the call waits, Holders and pglock status show
// it waiting since t rather than since the call began. It changes nothing
// else. A zero t, or one after the call began, is ignored.
func WaitingSince(t time.Time) Option {
	return func(c *config) {
		c.given |= optWaitingSince
		if !t.IsZero() {
			c.waitingFrom = t.UnixNano()
		}
	}
}

// NoWait tries once: when another session holds the key the call returns
// acquired == false and a nil error at once.
func NoWait() Option { return func(c *config) { c.given |= optNoWait; c.noWait = true } }

// WaitTimeout bounds the wait for the lock to d. The bound is enforced by the
// server (the last wait slice ends at it, without an error; a single
// server-side wait runs under lock_timeout for that statement), so a wait
// that reaches it returns ErrTimeout and the connection stays healthy. With a context
// deadline as well, the earlier of the two applies. WaitTimeout(0) is
// NoWait(); a negative d makes the call fail before any SQL is sent.
func WaitTimeout(d time.Duration) Option {
	return func(c *config) {
		c.given |= optWaitTimeout
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
func TxOptions(o pgx.TxOptions) Option {
	return func(c *config) { c.given |= optTxOptions; c.tx = o }
}

// TTL is the longest the lock may be held. When it passes, the lock is
// released on the server even if the holder is still running, Done is
// closed, Err returns ErrTTLExceeded, and Do cancels its function's context
// and returns ErrTTLExceeded. A d that is not positive makes the call fail
// before any SQL is sent.
func TTL(d time.Duration) Option {
	return positive(optTTL, d, func(c *config) { c.ttl = d })
}

// HealthInterval sets how often a session's connection is checked while it
// holds locks (default DefaultHealthInterval): a check is one small round
// trip, sent once the connection has been quiet for d and skipped while
// another statement is running on it. A closed connection or a terminated
// backend is noticed at once on Linux (the watcher waits for the socket to
// become readable, from 10-20 ms after the session's last call on, or at
// once for a d under 20 ms),
// within one interval elsewhere; a silent network cut within about two,
// as a check that gets no answer within one interval closes the
// connection. A d that is not positive makes the call fail
// before any SQL is sent. Any longer d is accepted, but the server-side
// keep-alives it sets are clamped to what TCP allows (32767 s each): over
// about 4.5 hours, the server may drop a silently cut client, and free its
// locks, before a holder that checks so rarely notices the cut.
func HealthInterval(d time.Duration) Option {
	return positive(optHealthInterval, d, func(c *config) { c.health = d })
}

// SessionOptions splits opts into those of the call that creates a Session
// (HealthInterval, WithTracer) and the others, in order: for an adapter
// that takes one list of Options for a Session and its locks, as
// advisorygoose's SessionLocker does for NewConnSession and Session.Lock.
// Each of those calls still reports an option that does not apply to it.
func SessionOptions(opts []Option) (session, others []Option) {
	for _, opt := range opts {
		var c config
		if opt != nil {
			opt(&c)
		}
		if c.given&calls[callNewSession].applies != 0 {
			session = append(session, opt)
		} else {
			others = append(others, opt)
		}
	}
	return session, others
}

// positive is the Option of kind opt that applies set if d > 0, and
// otherwise fails the call naming the option.
func positive(opt optionSet, d time.Duration, set func(*config)) Option {
	return func(c *config) {
		c.given |= opt
		if d <= 0 {
			c.setErr(errorf("%s(%v): the duration must be positive", opt, d))
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

// newConfig applies opts, given to fn, over the defaults and returns the
// first invalid option's error, or else an error naming the first option
// that does not apply to fn.
func newConfig(fn call, opts []Option) (config, error) {
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
	if extra := c.given &^ calls[fn].applies; extra != 0 {
		c.setErr(errorf("option %s does not apply to %s (it takes %s)",
			extra&-extra, calls[fn].name, calls[fn].applies))
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

// waitingSince is WaitingSince's time, zero when not given.
func (c config) waitingSince() time.Time {
	if c.waitingFrom == 0 {
		return time.Time{}
	}
	return time.Unix(0, c.waitingFrom)
}
