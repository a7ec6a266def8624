package advisory

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

// traceEvent is one call a recorder got: what, the data it was given, and
// the value of the recorder's context key in the ctx it was given.
type traceEvent struct {
	what  string // "wait-start", "wait-end", "hold-start", "hold-end", "lead-start", "lead-end"
	wait  TraceWaitEndData
	hold  TraceHoldEndData
	lead  TraceLeadEndData
	ctxIn any
	// ctxOut is what a start put in the context it returned.
	ctxOut string
	// holdCtx is, for a hold-end, what its hold-start put in its context.
	holdCtx string
}

// traceCtxKey is the recorder's context key: each start returns a ctx that
// names it, so the test can follow the contexts through the calls.
type traceCtxKey struct{}

// recorder is a Tracer, HoldTracer and LeadTracer that records every call.
type recorder struct {
	mu      sync.Mutex
	events  []traceEvent
	holdCtx map[hold]string // the ctxOut of each hold's start
}

func (r *recorder) add(ctx context.Context, ev traceEvent) context.Context {
	r.mu.Lock()
	defer r.mu.Unlock()
	ev.ctxIn = ctx.Value(traceCtxKey{})
	if strings.HasSuffix(ev.what, "-start") {
		ev.ctxOut = fmt.Sprintf("%s#%d", ev.what, len(r.events))
		ctx = context.WithValue(ctx, traceCtxKey{}, ev.ctxOut)
	}
	h := hold{ev.hold.Key, ev.hold.Mode}
	switch ev.what {
	case "hold-start":
		if r.holdCtx == nil {
			r.holdCtx = make(map[hold]string)
		}
		r.holdCtx[h] = ev.ctxOut
	case "hold-end":
		ev.holdCtx = r.holdCtx[h]
	}
	r.events = append(r.events, ev)
	return ctx
}

func (r *recorder) TraceWaitStart(ctx context.Context, d TraceWaitStartData) context.Context {
	d.Keys = slices.Clone(d.Keys) // not to be kept
	return r.add(ctx, traceEvent{what: "wait-start", wait: TraceWaitEndData{TraceWaitStartData: d}})
}
func (r *recorder) TraceWaitEnd(ctx context.Context, d TraceWaitEndData) {
	d.Keys = slices.Clone(d.Keys)
	r.add(ctx, traceEvent{what: "wait-end", wait: d})
}
func (r *recorder) TraceHoldStart(ctx context.Context, d TraceHoldStartData) context.Context {
	return r.add(ctx, traceEvent{what: "hold-start", hold: TraceHoldEndData{TraceHoldStartData: d}})
}
func (r *recorder) TraceHoldEnd(ctx context.Context, d TraceHoldEndData) {
	r.add(ctx, traceEvent{what: "hold-end", hold: d})
}
func (r *recorder) TraceLeadStart(ctx context.Context, d TraceLeadStartData) context.Context {
	return r.add(ctx, traceEvent{what: "lead-start", lead: TraceLeadEndData{Key: d.Key}})
}
func (r *recorder) TraceLeadEnd(ctx context.Context, d TraceLeadEndData) {
	r.add(ctx, traceEvent{what: "lead-end", lead: d})
}

// take returns the events recorded since the last take.
func (r *recorder) take() []traceEvent {
	r.mu.Lock()
	defer r.mu.Unlock()
	evs := r.events
	r.events = nil
	return evs
}

// line is a short description of an event, for comparing sequences.
func (ev traceEvent) line() string {
	switch ev.what {
	case "wait-start":
		d := ev.wait
		if d.Entry == EntrySessionLockMany {
			return fmt.Sprintf("wait-start %v %v %v try=%v", d.Entry, d.Keys, d.Mode, d.Try)
		}
		return fmt.Sprintf("wait-start %v %v %v try=%v", d.Entry, d.Key, d.Mode, d.Try)
	case "wait-end":
		return fmt.Sprintf("wait-end %v %v", ev.wait.Entry, ev.wait.Outcome())
	case "hold-start":
		return fmt.Sprintf("hold-start %v %v %v", ev.hold.Entry, ev.hold.Key, ev.hold.Mode)
	case "hold-end":
		return fmt.Sprintf("hold-end %v %v %v", ev.hold.Key, ev.hold.Mode, ev.hold.End)
	case "lead-start":
		return fmt.Sprintf("lead-start %v", ev.lead.Key)
	}
	return fmt.Sprintf("lead-end %v %v err=%v", ev.lead.Key, ev.lead.End, ev.lead.Err)
}

// expectTrace compares the events' lines with want, and checks that every
// end got the context its start returned, and a hold's start the context
// of the wait that took it.
func expectTrace(t *testing.T, what string, evs []traceEvent, want ...string) {
	t.Helper()
	var got []string
	for _, ev := range evs {
		got = append(got, ev.line())
	}
	if !slices.Equal(got, want) {
		t.Errorf("%s: events\n  %s\nwant\n  %s", what, strings.Join(got, "\n  "), strings.Join(want, "\n  "))
	}
	waitCtx := ""
	for _, ev := range evs {
		switch ev.what {
		case "wait-start":
			waitCtx = ev.ctxOut
		case "wait-end":
			if ev.ctxIn != waitCtx {
				t.Errorf("%s: %s got ctx %v; want %s", what, ev.line(), ev.ctxIn, waitCtx)
			}
		case "hold-start":
			if ev.ctxIn != waitCtx {
				t.Errorf("%s: %s got ctx %v; want the wait's, %s", what, ev.line(), ev.ctxIn, waitCtx)
			}
		case "hold-end":
			if ev.ctxIn != ev.holdCtx {
				t.Errorf("%s: %s got ctx %v; want its start's, %s", what, ev.line(), ev.ctxIn, ev.holdCtx)
			}
		}
	}
}

// A Session traced from NewSession reports each wait, one hold per (key,
// mode) however often it is re-entered, and the end of each hold: at the
// last Unlock, UnlockMany, and Close.
func TestTracerSession(t *testing.T) {
	e := newEnv(t)
	pool := e.pool()
	var rec recorder
	k1, k2, k3 := StringKey("trace-s1"), StringKey("trace-s2"), StringKey("trace-s3")
	s, err := NewSession(e.ctx, pool, WithTracer(&rec))
	must(t, err)
	lock := func(k Key, opts ...Option) {
		t.Helper()
		if ok, err := s.Lock(e.ctx, k, opts...); !ok || err != nil {
			t.Fatalf("Lock(%v) = %v, %v", k, ok, err)
		}
	}
	lock(k1)
	lock(k1)
	lock(k1, Shared(), NoWait())
	if ok, err := s.LockMany(e.ctx, []Key{k3, k2, k1}); !ok || err != nil {
		t.Fatalf("LockMany = %v, %v", ok, err)
	}
	sorted := []Key{k1, k2, k3}
	slices.SortFunc(sorted, compareKeys)
	fresh := []Key{k2, k3} // LockMany takes them in canonical order
	slices.SortFunc(fresh, compareKeys)
	expectTrace(t, "locks", rec.take(),
		"wait-start Session.Lock "+k1.String()+" exclusive try=false",
		"hold-start Session.Lock "+k1.String()+" exclusive",
		"wait-end Session.Lock acquired",
		"wait-start Session.Lock "+k1.String()+" exclusive try=false",
		"wait-end Session.Lock acquired",
		"wait-start Session.Lock "+k1.String()+" shared try=true",
		"hold-start Session.Lock "+k1.String()+" shared",
		"wait-end Session.Lock acquired",
		fmt.Sprintf("wait-start Session.LockMany %v exclusive try=false", sorted),
		"hold-start Session.LockMany "+fresh[0].String()+" exclusive",
		"hold-start Session.LockMany "+fresh[1].String()+" exclusive",
		"wait-end Session.LockMany acquired",
	)
	must(t, s.Unlock(e.ctx, k1))
	must(t, s.Unlock(e.ctx, k1))
	expectTrace(t, "Unlocks of a key held three times (Lock, Lock, LockMany)", rec.take())
	must(t, s.Unlock(e.ctx, k1))
	must(t, s.UnlockMany(e.ctx, []Key{k2}))
	expectTrace(t, "last Unlock, UnlockMany", rec.take(),
		"hold-end "+k1.String()+" exclusive released",
		"hold-end "+k2.String()+" exclusive released",
	)
	must(t, s.Close(e.ctx))
	evs := rec.take()
	slices.SortFunc(evs, func(a, b traceEvent) int { return strings.Compare(a.line(), b.line()) })
	want := []string{"hold-end " + k1.String() + " shared released", "hold-end " + k3.String() + " exclusive released"}
	slices.Sort(want)
	expectTrace(t, "Close", evs, want...)
}

// tracedEnv starts a test with a pool and a recorder to trace with.
func tracedEnv(t *testing.T) (*env, *pgxpool.Pool, *recorder, Option) {
	e := newEnv(t)
	rec := &recorder{}
	return e, e.pool(), rec, WithTracer(rec)
}

// Every entry point reports its waits as itself; a semaphore's hold is its
// slot; transaction locks report waits only; Lead reports its leadership,
// whose context reaches fn; ReleaseAll ends holds as release_all.
func TestTracerEntryPoints(t *testing.T) {
	e, pool, rec, tr := tracedEnv(t)
	key := StringKey("trace-entry")
	ks := key.String()

	lock, err := Acquire(e.ctx, pool, key, tr)
	must(t, err)
	must(t, lock.Release(e.ctx))
	_, err = Do(e.ctx, pool, key, func(context.Context) error { return nil }, tr, Shared())
	must(t, err)
	expectTrace(t, "Acquire, Do", rec.take(),
		"wait-start Acquire "+ks+" exclusive try=false", "hold-start Acquire "+ks+" exclusive", "wait-end Acquire acquired",
		"hold-end "+ks+" exclusive released",
		"wait-start Do "+ks+" shared try=false", "hold-start Do "+ks+" shared", "wait-end Do acquired",
		"hold-end "+ks+" shared released",
	)

	slot := SemaphoreKeys(key, 2)[0]
	lock, err = AcquireSemaphore(e.ctx, pool, key, 2, tr, NoWait())
	must(t, err)
	must(t, lock.Release(e.ctx))
	_, err = DoSemaphore(e.ctx, pool, key, 2, func(context.Context) error { return nil }, tr)
	must(t, err)
	expectTrace(t, "AcquireSemaphore, DoSemaphore", rec.take(),
		"wait-start AcquireSemaphore "+ks+" exclusive try=true", "hold-start AcquireSemaphore "+slot.String()+" exclusive", "wait-end AcquireSemaphore acquired",
		"hold-end "+slot.String()+" exclusive released",
		"wait-start DoSemaphore "+ks+" exclusive try=false", "hold-start DoSemaphore "+slot.String()+" exclusive", "wait-end DoSemaphore acquired",
		"hold-end "+slot.String()+" exclusive released",
	)

	tx, err := pool.Begin(e.ctx)
	must(t, err)
	_, err = LockTx(e.ctx, tx, key, tr)
	must(t, err)
	must(t, tx.Rollback(e.ctx))
	_, err = DoTx(e.ctx, pool, key, func(context.Context, pgx.Tx) error { return nil }, tr, NoWait())
	must(t, err)
	expectTrace(t, "LockTx, DoTx", rec.take(),
		"wait-start LockTx "+ks+" exclusive try=false", "wait-end LockTx acquired",
		"wait-start DoTx "+ks+" exclusive try=true", "wait-end DoTx acquired",
	)

	errStop := errors.New("stop leading")
	var fnCtx any
	err = Lead(e.ctx, pool, key, func(ctx context.Context) error {
		fnCtx = ctx.Value(traceCtxKey{})
		return errStop
	}, tr)
	if !errors.Is(err, errStop) {
		t.Fatalf("Lead = %v; want fn's error", err)
	}
	evs := rec.take()
	expectTrace(t, "Lead", evs,
		"wait-start Lead "+ks+" exclusive try=false", "hold-start Lead "+ks+" exclusive", "wait-end Lead acquired",
		"lead-start "+ks,
		"hold-end "+ks+" exclusive released",
		"lead-end "+ks+" released err=stop leading",
	)
	if len(evs) == 6 && (fnCtx != evs[3].ctxOut || evs[5].ctxIn != evs[3].ctxOut) {
		t.Errorf("fn's context has %v, TraceLeadEnd's %v; want TraceLeadStart's, %v", fnCtx, evs[5].ctxIn, evs[3].ctxOut)
	}

	lock, err = Acquire(e.ctx, pool, key, tr)
	must(t, err)
	must(t, ReleaseAll(e.ctx, pool))
	must(t, lock.Release(e.ctx))
	expectTrace(t, "ReleaseAll", rec.take(),
		"wait-start Acquire "+ks+" exclusive try=false", "hold-start Acquire "+ks+" exclusive", "wait-end Acquire acquired",
		"hold-end "+ks+" exclusive release_all",
	)
}

// Waits that do not get the lock report why, and start no hold.
func TestTracerNotAcquired(t *testing.T) {
	e, pool, rec, tr := tracedEnv(t)
	key := StringKey("trace-busy")
	ks := key.String()
	holder := e.acquire(pool, key)
	defer func() { must(t, holder.Release(e.ctx)) }()

	lock, err := Acquire(e.ctx, pool, key, tr, NoWait())
	if err != nil || lock.Acquired() {
		t.Fatalf("NoWait on a held key = %v, %v", lock.Acquired(), err)
	}
	const bound = 50 * time.Millisecond
	if _, err := Acquire(e.ctx, pool, key, tr, WaitTimeout(bound)); !errors.Is(err, ErrTimeout) {
		t.Fatalf("WaitTimeout on a held key = %v; want ErrTimeout", err)
	}
	ctx, cancel := context.WithCancel(e.ctx)
	cancel()
	s, err := NewSession(e.ctx, pool, tr)
	must(t, err)
	if _, err := s.Lock(ctx, key); !errors.Is(err, context.Canceled) {
		t.Fatalf("Lock with a cancelled ctx = %v", err)
	}
	must(t, s.Close(e.ctx))
	evs := rec.take()
	// Not a timing claim: the wait cannot have ended before its bound.
	if len(evs) > 3 && evs[3].wait.Duration < bound {
		t.Errorf("a wait bounded by %v reported a duration of %v", bound, evs[3].wait.Duration)
	}
	for _, ev := range evs {
		if ev.what == "wait-end" && (ev.wait.Outcome() == OutcomeBusy) != (ev.wait.Err == nil) {
			t.Errorf("%s: Err %v", ev.line(), ev.wait.Err)
		}
	}
	expectTrace(t, "not acquired", evs,
		"wait-start Acquire "+ks+" exclusive try=true", "wait-end Acquire busy",
		"wait-start Acquire "+ks+" exclusive try=false", "wait-end Acquire timeout",
		"wait-start Session.Lock "+ks+" exclusive try=false", "wait-end Session.Lock canceled",
	)
}
