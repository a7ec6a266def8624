// Package advisoryotel records what the advisory package traces as
// OpenTelemetry metrics. It is a module of its own
// (github.com/seed0ad592b7/advisory/otel), so that the advisory module
// depends only on pgx and xxhash; its package name avoids a clash with
// go.opentelemetry.io/otel.
//
//	tr, err := advisoryotel.NewTracer(meterProvider)
//	if err != nil { ... }
//	opts := []advisory.Option{advisory.WithTracer(tr)}
//	lock, err := advisory.Acquire(ctx, pool, key, opts...)
//
// Instruments (the meter is named after this package's import path):
//
//	advisory.lock.wait.duration   histogram, s   entry, mode, outcome
//	advisory.lock.acquired        counter        entry, mode
//	advisory.lock.not_acquired    counter        entry, mode, outcome
//	advisory.lock.waiting         up-down        entry, mode
//	advisory.lock.hold.duration   histogram, s   entry, mode, end
//	advisory.lock.held            up-down        entry, mode
//	advisory.lock.lost            counter        entry, mode
//	advisory.lead.duration        histogram, s   end
//	advisory.lead.leading         up-down
//
// Attribute keys are advisory.entry (the call: "Acquire", "Session.Lock",
// ...), advisory.mode ("exclusive", "shared"), advisory.outcome (how a wait
// ended: "acquired", "busy", "timeout", ...; see advisory.WaitOutcome) and
// advisory.end (how a hold or leadership ended: "released", "lost", "ttl",
// "release_all"). Their values are few, so the number of series stays
// small whatever keys are locked. The key itself is an attribute
// (advisory.key) only when WithKeyNames asks for it.
//
// A hold is a (key, mode) a session holds on the server, counted once
// however often it is re-entered; a LockMany of n new keys starts n holds.
// advisory.lock.lost counts holds whose connection was lost (end "lost");
// a TTL that passed shows as advisory.lock.hold.duration with end "ttl".
// Transaction locks (LockTx, DoTx) report waits only.
package advisoryotel

import (
	"context"

	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/metric"

	"github.com/seed0ad592b7/advisory"
)

// meterName is the instrumentation scope's name.
const meterName = "github.com/seed0ad592b7/advisory/otel"

// Attribute keys.
const (
	keyEntry   = attribute.Key("advisory.entry")
	keyMode    = attribute.Key("advisory.mode")
	keyOutcome = attribute.Key("advisory.outcome")
	keyEnd     = attribute.Key("advisory.end")
	keyKey     = attribute.Key("advisory.key")
)

// durationBuckets are the histogram buckets, in seconds: waits and holds
// last from a millisecond (an uncontended lock) to hours (a leader).
var durationBuckets = []float64{0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600, 4 * 3600, 24 * 3600}

// Tracer is an advisory.Tracer, HoldTracer and LeadTracer that records
// metrics. Make one with NewTracer and give it with advisory.WithTracer.
// It is safe for concurrent use.
type Tracer struct {
	keyName func(advisory.Key) string

	waitDuration metric.Float64Histogram
	acquired     metric.Int64Counter
	notAcquired  metric.Int64Counter
	waiting      metric.Int64UpDownCounter
	holdDuration metric.Float64Histogram
	held         metric.Int64UpDownCounter
	lost         metric.Int64Counter
	leadDuration metric.Float64Histogram
	leading      metric.Int64UpDownCounter
}

// Option configures a Tracer.
type Option func(*Tracer)

// WithKeyNames adds the attribute advisory.key, name(key), to every
// measurement about one key (a wait of Session.LockMany has none; its
// holds do), unless name returns "". Pass advisory.Key.String for the
// key's value ("int64:…", "pair:…"), or a function that names the few keys
// worth a series of their own and returns "" for the others. Every
// distinct name makes new series: do not name keys drawn from unbounded
// data (user ids, job ids).
func WithKeyNames(name func(advisory.Key) string) Option {
	return func(t *Tracer) { t.keyName = name }
}

// NewTracer returns a Tracer recording with a meter from mp (the global
// MeterProvider if mp is nil). It fails only if an instrument cannot be
// created, with the meter provider's error.
func NewTracer(mp metric.MeterProvider, opts ...Option) (*Tracer, error) {
	if mp == nil {
		mp = otel.GetMeterProvider()
	}
	m := mp.Meter(meterName)
	t := &Tracer{}
	for _, opt := range opts {
		opt(t)
	}
	var err error
	seconds := func(name, desc string) metric.Float64Histogram {
		var h metric.Float64Histogram
		if err == nil {
			h, err = m.Float64Histogram(name, metric.WithUnit("s"), metric.WithDescription(desc),
				metric.WithExplicitBucketBoundaries(durationBuckets...))
		}
		return h
	}
	counter := func(name, unit, desc string) metric.Int64Counter {
		var c metric.Int64Counter
		if err == nil {
			c, err = m.Int64Counter(name, metric.WithUnit(unit), metric.WithDescription(desc))
		}
		return c
	}
	upDown := func(name, unit, desc string) metric.Int64UpDownCounter {
		var c metric.Int64UpDownCounter
		if err == nil {
			c, err = m.Int64UpDownCounter(name, metric.WithUnit(unit), metric.WithDescription(desc))
		}
		return c
	}
	t.waitDuration = seconds("advisory.lock.wait.duration", "How long calls waited for advisory locks, by how the wait ended.")
	t.acquired = counter("advisory.lock.acquired", "{wait}", "Waits that got their advisory lock.")
	t.notAcquired = counter("advisory.lock.not_acquired", "{wait}", "Waits that did not get their advisory lock, by outcome.")
	t.waiting = upDown("advisory.lock.waiting", "{wait}", "Calls waiting for an advisory lock now.")
	t.holdDuration = seconds("advisory.lock.hold.duration", "How long advisory locks were held, by how the hold ended.")
	t.held = upDown("advisory.lock.held", "{hold}", "Advisory locks held now, one per key and mode.")
	t.lost = counter("advisory.lock.lost", "{hold}", "Advisory locks lost with their connection.")
	t.leadDuration = seconds("advisory.lead.duration", "How long Lead kept leadership, by how it ended.")
	t.leading = upDown("advisory.lead.leading", "{leader}", "Lead calls that are leader now.")
	if err != nil {
		return nil, err
	}
	return t, nil
}

// attrs returns the measurement option for entry and mode (when entry is
// set), key (when named) and extra.
func (t *Tracer) attrs(entry advisory.EntryPoint, mode advisory.Mode, key advisory.Key, extra ...attribute.KeyValue) metric.MeasurementOption {
	kvs := make([]attribute.KeyValue, 0, 4)
	if entry != 0 {
		kvs = append(kvs, keyEntry.String(entry.String()), keyMode.String(mode.String()))
	}
	if t.keyName != nil && key.Valid() {
		if name := t.keyName(key); name != "" {
			kvs = append(kvs, keyKey.String(name))
		}
	}
	return metric.WithAttributes(append(kvs, extra...)...)
}

// TraceWaitStart counts a waiting call.
func (t *Tracer) TraceWaitStart(ctx context.Context, d advisory.TraceWaitStartData) context.Context {
	t.waiting.Add(ctx, 1, t.attrs(d.Entry, d.Mode, d.Key))
	return ctx
}

// TraceWaitEnd records the wait's duration and outcome.
func (t *Tracer) TraceWaitEnd(ctx context.Context, d advisory.TraceWaitEndData) {
	t.waiting.Add(ctx, -1, t.attrs(d.Entry, d.Mode, d.Key))
	outcome := keyOutcome.String(d.Outcome().String())
	t.waitDuration.Record(ctx, d.Duration.Seconds(), t.attrs(d.Entry, d.Mode, d.Key, outcome))
	if d.Acquired {
		t.acquired.Add(ctx, 1, t.attrs(d.Entry, d.Mode, d.Key))
	} else {
		t.notAcquired.Add(ctx, 1, t.attrs(d.Entry, d.Mode, d.Key, outcome))
	}
}

// TraceHoldStart counts a hold.
func (t *Tracer) TraceHoldStart(ctx context.Context, d advisory.TraceHoldStartData) context.Context {
	t.held.Add(ctx, 1, t.attrs(d.Entry, d.Mode, d.Key))
	return ctx
}

// TraceHoldEnd records the hold's duration and how it ended.
func (t *Tracer) TraceHoldEnd(ctx context.Context, d advisory.TraceHoldEndData) {
	t.held.Add(ctx, -1, t.attrs(d.Entry, d.Mode, d.Key))
	t.holdDuration.Record(ctx, d.Duration.Seconds(), t.attrs(d.Entry, d.Mode, d.Key, keyEnd.String(d.End.String())))
	if d.End == advisory.HoldLost {
		t.lost.Add(ctx, 1, t.attrs(d.Entry, d.Mode, d.Key))
	}
}

// TraceLeadStart counts a leader.
func (t *Tracer) TraceLeadStart(ctx context.Context, d advisory.TraceLeadStartData) context.Context {
	t.leading.Add(ctx, 1, t.attrs(0, 0, d.Key))
	return ctx
}

// TraceLeadEnd records how long the leadership lasted and how it ended.
func (t *Tracer) TraceLeadEnd(ctx context.Context, d advisory.TraceLeadEndData) {
	t.leading.Add(ctx, -1, t.attrs(0, 0, d.Key))
	t.leadDuration.Record(ctx, d.Duration.Seconds(), t.attrs(0, 0, d.Key, keyEnd.String(d.End.String())))
}

var (
	_ advisory.Tracer     = (*Tracer)(nil)
	_ advisory.HoldTracer = (*Tracer)(nil)
	_ advisory.LeadTracer = (*Tracer)(nil)
)
