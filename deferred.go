package advisory

import (
	"slices"
	"sync"
	"time"
)

// Work that sessions put off, done by one timer for every session in the
// process:
//   - a session's health watcher starts watchQuiet after the session first
//     holds something (arm), so that a lock released sooner starts nothing;
//   - a clean-up statement (an unlock, a session's last statement) is
//     interrupted once it has run for cleanupTimeout (runCleanup).
//
// A timer per lock and per unlock would cost, each time, a thread woken up
// for nothing: the Go runtime wakes an idle processor to watch every new
// timer that is due sooner than the ones it already has. On two cores that
// was 0.04–0.06 of a lock's hand-off (BENCHMARKS.md, session 5). Here, new
// work resets the one timer only when it is due before everything already
// waiting; under a steady stream of locks the timer fires once per
// watchQuiet, whatever the number of locks.
//
// All work of one kind waits the same delay, so each queue is in due order.
var deferred struct {
	mu     sync.Mutex
	starts []pendingStart // watchers to start, in due order
	bounds boundQueue     // clean-up statements in flight, in due order
	timer  *time.Timer    // runs runDeferred; nil until first needed
	at     time.Time      // when timer fires; zero when it is not pending
}

// pendingStart is a session whose watcher starts at due.
type pendingStart struct {
	due time.Time
	s   *Session
}

// boundLink is a session's place in deferred.bounds while a clean-up
// statement of its runs: a session runs one statement at a time. Guarded by
// deferred.mu.
type boundLink struct {
	prev, next *Session
	queued     bool
	due        time.Time
	gen        uint64 // the statement to interrupt
}

// boundQueue is a doubly linked list of sessions through their boundLink,
// so that a statement that ends leaves it at once.
type boundQueue struct{ head, tail *Session }

func (q *boundQueue) push(s *Session) {
	s.bound.prev, s.bound.next, s.bound.queued = q.tail, nil, true
	if q.tail != nil {
		q.tail.bound.next = s
	} else {
		q.head = s
	}
	q.tail = s
}

func (q *boundQueue) remove(s *Session) {
	if !s.bound.queued {
		return
	}
	if s.bound.prev != nil {
		s.bound.prev.bound.next = s.bound.next
	} else {
		q.head = s.bound.next
	}
	if s.bound.next != nil {
		s.bound.next.bound.prev = s.bound.prev
	} else {
		q.tail = s.bound.prev
	}
	s.bound = boundLink{}
}

// deferStart has s's watcher started (startWatcher) after watchQuiet.
func deferStart(s *Session) {
	due := time.Now().Add(watchQuiet)
	deferred.mu.Lock()
	defer deferred.mu.Unlock()
	deferred.starts = append(deferred.starts, pendingStart{due: due, s: s})
	fireBy(due)
}

// boundStatement has statement gen of s interrupted once it has run for
// cleanupTimeout, unless unbound(s) comes first.
func boundStatement(s *Session, gen uint64) {
	due := time.Now().Add(cleanupTimeout)
	deferred.mu.Lock()
	defer deferred.mu.Unlock()
	deferred.bounds.push(s)
	s.bound.due, s.bound.gen = due, gen
	fireBy(due)
}

// unbound takes s's statement out of deferred.bounds: it ended.
func unbound(s *Session) {
	deferred.mu.Lock()
	defer deferred.mu.Unlock()
	deferred.bounds.remove(s)
}

// fireBy makes the timer fire no later than due. The caller holds
// deferred.mu.
func fireBy(due time.Time) {
	if !deferred.at.IsZero() && !deferred.at.After(due) {
		return
	}
	deferred.at = due
	if deferred.timer == nil {
		deferred.timer = time.AfterFunc(time.Until(due), runDeferred)
		return
	}
	deferred.timer.Reset(time.Until(due))
}

// runDeferred does the work that is due and sets the timer for the rest.
func runDeferred() {
	type pendingStop struct {
		s   *Session
		gen uint64
	}
	now := time.Now()
	deferred.mu.Lock()
	deferred.at = time.Time{}
	n := 0
	for n < len(deferred.starts) && !deferred.starts[n].due.After(now) {
		n++
	}
	start := slices.Clone(deferred.starts[:n])
	deferred.starts = slices.Delete(deferred.starts, 0, n)
	var stop []pendingStop
	for s := deferred.bounds.head; s != nil && !s.bound.due.After(now); s = deferred.bounds.head {
		stop = append(stop, pendingStop{s, s.bound.gen})
		deferred.bounds.remove(s)
	}
	if len(deferred.starts) > 0 {
		fireBy(deferred.starts[0].due)
	}
	if s := deferred.bounds.head; s != nil {
		fireBy(s.bound.due)
	}
	deferred.mu.Unlock()

	for _, p := range start {
		p.s.startWatcher()
	}
	for _, p := range stop {
		go p.s.interrupt(p.gen)
	}
}
