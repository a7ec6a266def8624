package advisory

import (
	"context"
	"errors"
	"strconv"
	"time"
)

// The data a Tracer is given (tracer.go): the start and end structs of
// waits, holds and leadership, and their labels.

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
