package advisory

import (
	"context"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"
)

// SlogTracer returns a Tracer that logs to logger (slog.Default() if nil).
// It is also a HoldTracer and a LeadTracer. Give it with WithTracer:
//
//	tr := advisory.SlogTracer(logger)
//	lock, err := advisory.Acquire(ctx, pool, key, advisory.WithTracer(tr))
//
// Levels: the start and end of waits, and the start of holds and holds
// released, at Debug (a try with NoWait logs only its end); waits that end in a deadlock, a full lock
// table, a lost or closed session or another error at Warn; a hold whose
// TTL passed at Warn, a hold lost at Error; leadership won and resigned at
// Info, lost at Error (TTL: Warn). Attributes: entry (the call), key (as
// Key.String prints it, preceded by the key's quoted name when it has one,
// as "scheduler" (int64:…): see NameKey; for LockMany, keys: how many), mode, try, outcome
// or end, duration (waited, held, led), error (the library's error
// message, which carries no password). A record is built only when logger
// is enabled for its level.
//
// Outages: a wait that fails without an answer about the lock (the pool
// cannot connect, the connection is lost while waiting, the server refuses
// the session) begins an outage, logged once at Warn as "advisory lock
// waits failing" with the wait's attributes and error. Further such waits
// are logged at Debug only, so that Lead candidates retrying through a
// server restart do not flood the log. The outage ends, logged once at Info
// as "advisory lock waits reach the server again" with its duration and
// the number of failed waits, when a session of a traced call is next
// answered by the server (a Lead standby queued again, a lock taken) or a
// wait begun since the outage began ends otherwise. A wait begun before
// does not end it: in a fast shutdown, a standby can be granted the lock
// as the leader's backend exits, just before its own is terminated (it
// leads for a moment, and its loss is logged at Error). One SlogTracer
// tracks one outage at a time: use one per database.
func SlogTracer(logger *slog.Logger) Tracer {
	if logger == nil {
		logger = slog.Default()
	}
	return &slogTracer{l: logger}
}

type slogTracer struct {
	l *slog.Logger

	outage   atomic.Bool // an outage is in progress: down is not zero
	mu       sync.Mutex
	down     time.Time // when the outage in progress began; zero: none
	up       time.Time // when the last outage ended
	failures int       // failed waits in the outage in progress
}

// TraceWaitStart logs a wait that may wait (not a try) at Debug.
func (t *slogTracer) TraceWaitStart(ctx context.Context, d TraceWaitStartData) context.Context {
	if !d.Try {
		t.log(ctx, slog.LevelDebug, "advisory lock wait started", func(a []slog.Attr) []slog.Attr {
			return waitAttrs(a, d)
		})
	}
	return ctx
}

// TraceWaitEnd logs how a wait ended: at Debug, or Warn for the outcomes
// that need attention.
func (t *slogTracer) TraceWaitEnd(ctx context.Context, d TraceWaitEndData) {
	outcome := d.Outcome()
	level := slog.LevelWarn
	msg := "advisory lock wait ended"
	switch outcome {
	case OutcomeAcquired, OutcomeBusy, OutcomeTimeout, OutcomeCanceled:
		level = slog.LevelDebug
	}
	start := time.Now().Add(-d.Duration)
	switch outcome {
	case OutcomeError, OutcomeLost:
		if t.failed(start) {
			msg = "advisory lock waits failing"
		} else {
			level = slog.LevelDebug
		}
	case OutcomeCanceled, OutcomeClosed:
	default:
		t.reached(ctx, start)
	}
	t.log(ctx, level, msg, func(a []slog.Attr) []slog.Attr {
		a = waitAttrs(a, d.TraceWaitStartData)
		a = append(a, slog.String("outcome", outcome.String()), slog.Duration("duration", d.Duration))
		return errAttr(a, d.Err)
	})
}

// failed counts a wait begun at start that failed without an answer about
// the lock, and reports whether it begins an outage. A wait begun before
// the last outage ended belongs to that outage.
func (t *slogTracer) failed(start time.Time) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	if !t.down.IsZero() || start.Before(t.up) {
		t.failures++
		return false
	}
	t.down, t.failures = time.Now(), 1
	t.outage.Store(true)
	return true
}

// reached ends the outage in progress, if any: the server answered a
// call begun at start. An answer to a wait begun before the outage began
// does not end it: a standby queued before a fast shutdown can be granted
// the lock as the leader's backend exits, in the shutdown that fails the
// other waits.
func (t *slogTracer) reached(ctx context.Context, start time.Time) {
	if !t.outage.Load() {
		return
	}
	t.mu.Lock()
	down, failures := t.down, t.failures
	if start.Before(down) {
		down = time.Time{}
	}
	if !down.IsZero() {
		t.up, t.down, t.failures = time.Now(), time.Time{}, 0
		t.outage.Store(false)
	}
	t.mu.Unlock()
	if down.IsZero() {
		return
	}
	t.log(ctx, slog.LevelInfo, "advisory lock waits reach the server again", func(a []slog.Attr) []slog.Attr {
		return append(a, slog.Duration("outage", time.Since(down)), slog.Int("failed_waits", failures))
	})
}

// serverAnswered is told by a traced session that the server answered its
// first statement.
func (t *slogTracer) serverAnswered() { t.reached(context.Background(), time.Now()) }

// TraceHoldStart logs a hold that starts at Debug, so that the log says
// who held what at any moment without pairing wait records: for a
// semaphore its key is the slot taken.
func (t *slogTracer) TraceHoldStart(ctx context.Context, d TraceHoldStartData) context.Context {
	t.log(ctx, slog.LevelDebug, "advisory lock hold started", func(a []slog.Attr) []slog.Attr {
		return append(a, slog.String("entry", d.Entry.String()), slog.String("key", d.Key.describe()), slog.String("mode", d.Mode.String()))
	})
	return ctx
}

// TraceHoldEnd logs a hold that ended: released at Debug, TTL at Warn,
// lost at Error.
func (t *slogTracer) TraceHoldEnd(ctx context.Context, d TraceHoldEndData) {
	t.log(ctx, endLevel(d.End, slog.LevelDebug), "advisory lock hold ended", func(a []slog.Attr) []slog.Attr {
		a = append(a, slog.String("entry", d.Entry.String()), slog.String("key", d.Key.describe()), slog.String("mode", d.Mode.String()),
			slog.String("end", d.End.String()), slog.Duration("duration", d.Duration))
		return errAttr(a, d.Err)
	})
}

// TraceLeadStart logs a leadership won at Info.
func (t *slogTracer) TraceLeadStart(ctx context.Context, d TraceLeadStartData) context.Context {
	t.log(ctx, slog.LevelInfo, "advisory leadership won", func(a []slog.Attr) []slog.Attr {
		return append(a, slog.String("entry", EntryLead.String()), slog.String("key", d.Key.describe()))
	})
	return ctx
}

// TraceLeadEnd logs a leadership that ended: resigned at Info, TTL at
// Warn, lost at Error.
func (t *slogTracer) TraceLeadEnd(ctx context.Context, d TraceLeadEndData) {
	t.log(ctx, endLevel(d.End, slog.LevelInfo), "advisory leadership ended", func(a []slog.Attr) []slog.Attr {
		a = append(a, slog.String("entry", EntryLead.String()), slog.String("key", d.Key.describe()),
			slog.String("end", d.End.String()), slog.Duration("duration", d.Duration))
		return errAttr(a, d.Err)
	})
}

// log logs msg at level with the attributes attrs appends, if the logger
// is enabled for level.
func (t *slogTracer) log(ctx context.Context, level slog.Level, msg string, attrs func([]slog.Attr) []slog.Attr) {
	if t.l.Enabled(ctx, level) {
		t.l.LogAttrs(ctx, level, msg, attrs(make([]slog.Attr, 0, 8))...)
	}
}

// endLevel is the level of a hold or leadership that ended as end; ok is
// the level of an end the holder asked for.
func endLevel(end HoldEnd, ok slog.Level) slog.Level {
	switch end {
	case HoldLost:
		return slog.LevelError
	case HoldTTL:
		return slog.LevelWarn
	}
	return ok
}

func waitAttrs(a []slog.Attr, d TraceWaitStartData) []slog.Attr {
	a = append(a, slog.String("entry", d.Entry.String()))
	if d.Entry == EntrySessionLockMany {
		a = append(a, slog.Int("keys", len(d.Keys)))
	} else {
		a = append(a, slog.String("key", d.Key.describe()))
	}
	return append(a, slog.String("mode", d.Mode.String()), slog.Bool("try", d.Try))
}

func errAttr(a []slog.Attr, err error) []slog.Attr {
	if err != nil {
		a = append(a, slog.String("error", err.Error()))
	}
	return a
}
