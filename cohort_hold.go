package advisory

import (
	"context"
	"sync"
	"sync/atomic"
	"time"
)

// A holder of a cohort's key (cohort.go): its own Done, Err and TTL while
// the key may stay held on the server across holders, and its Release,
// which passes the key on when it can.

// cohortHold is a Lock's part in its cohort: its own end (Done, Err), the
// bounds of its session's passes, and whether it may pass.
type cohortHold struct {
	c      *cohort
	passes int       // passes of its session since the server's grant
	since  time.Time // the server's grant
	inConn atomic.Int32
	// unwatch stops the watch for the session's end (context.AfterFunc's
	// stop); counted: that watch is counted in the session's watcher group.
	unwatch func() bool
	counted bool

	left bool // the hold has left the cohort; guarded by c.mu

	done    chan struct{}
	endOnce sync.Once
	errMu   sync.Mutex
	err     error
}

// hold makes l, just granted or passed, a holder of the cohort, with its
// own Done and, if ttl > 0, its own TTL.
func (c *cohort) hold(l *Lock, passes int, since time.Time, ttl time.Duration) {
	h := &cohortHold{c: c, passes: passes, since: since, done: make(chan struct{})}
	l.ch = h
	s := l.s
	// The session's end waits for this hold to end (its watcher group), so
	// that Done is closed when ReleaseAll or Close returns.
	s.mu.Lock()
	counted := !s.ending
	if counted {
		s.watcher.Add(1)
	}
	s.mu.Unlock()
	h.counted = counted
	h.unwatch = context.AfterFunc(s.ctx, func() {
		if counted {
			defer s.watcher.Done()
		}
		<-s.done
		h.end(s.Err())
		h.unhold()
	})
	if ttl > 0 {
		l.ttl = time.AfterFunc(ttl, l.expire)
	}
}

// stop stops the watch for the end of s, h's session, and reports whether
// it did so before the watch ran.
func (h *cohortHold) stop(s *Session) bool {
	if !h.unwatch() {
		return false
	}
	if h.counted {
		s.watcher.Done()
	}
	return true
}

// end closes h's Done, with err as its Err.
func (h *cohortHold) end(err error) {
	h.endOnce.Do(func() {
		h.errMu.Lock()
		h.err = err
		h.errMu.Unlock()
		close(h.done)
	})
}

// Err is the Lock's Err.
func (h *cohortHold) Err() error {
	h.errMu.Lock()
	defer h.errMu.Unlock()
	return h.err
}

// unhold takes h out of the cohort once its key was released on the
// server (or its session ended), letting the next server waiter in.
func (h *cohortHold) unhold() {
	c := h.c
	c.mu.Lock()
	if h.left {
		c.mu.Unlock()
		return
	}
	h.left = true
	c.holders--
	next := c.nextServer()
	c.mu.Unlock()
	next.serve()
	c.leave()
}

// release is l's Release: it passes l's session to the queue's first
// goroutine if it can, and otherwise releases the key as any Lock does.
// The caller holds l.mu.
func (h *cohortHold) release(ctx context.Context, l *Lock) error {
	// A session whose WithConn ran is never passed: the callback may have
	// left locks of its own, or, if it panicked, a transaction open; it is
	// released on the server, where Close finds out and cleans up.
	l.s.mu.Lock()
	rawUsed := l.s.rawUsed
	l.s.mu.Unlock()
	if h.inConn.Load() == 0 && !rawUsed && h.stop(l.s) {
		if w := h.c.nextHolder(h.passes, h.since); w != nil {
			l.s.trace.released(l.mode, nil, l.key)
			h.c.mu.Lock()
			h.left = true // the hold moves on: holders stays
			h.c.mu.Unlock()
			h.end(nil)
			w.turn <- cohortTurn{s: l.s, key: l.key, passes: h.passes + 1, since: h.since}
			h.c.leave()
			return nil
		}
	}
	err := l.s.Close(ctx)
	h.end(l.s.Err())
	h.unhold()
	return err
}

// withConn is l's WithConn: not after l's Release (its session may have
// passed to another holder), and no pass while it runs.
func (h *cohortHold) withConn(l *Lock, fn func(*Session) error) error {
	l.mu.Lock()
	if l.released {
		l.mu.Unlock()
		if err := h.Err(); err != nil { // lost (or TTL) before the Release: as for any Lock
			return &Error{Op: "with_conn", Err: err}
		}
		return &Error{Op: "with_conn", Key: l.key, Kind: ErrClosed}
	}
	h.inConn.Add(1)
	l.mu.Unlock()
	defer h.inConn.Add(-1)
	return fn(l.s)
}
