package advisory

import (
	"sync"
	"sync/atomic"
	"time"
)

// The health watcher's start and its readiness's arming wait until a
// session has held something for watchQuiet with its turn given back
// (giveTurn): a lock released sooner (an Acquire and Release in quick
// succession, a Session's Lock and Unlock) never starts a goroutine nor
// makes a system call to watch its socket. Its rule: a session that gives
// the turn back holding something and not watched is looked at once,
// between watchQuiet and twice that later; the look starts its watcher, or
// arms its readiness if the turn is free then. A session whose turn is
// taken at the look is looked at again after that caller gives it back.
//
// One timer serves the process, not one per lock: a timer that becomes a
// thread's next one wakes a thread of the Go scheduler to wait for it (a
// futex or netpollBreak call, and a thread that runs, which on a small
// machine takes a core from the database server): a timer per lock cost an
// uncontended Acquire a netpollBreak each (profile and strace of
// BenchmarkUncontendedAcquireRelease). The timer fires every watchQuiet
// while looks are due, each time for all the looks then due, never at each
// look's own time: a process that takes locks fast wakes for its looks at
// most once per watchQuiet, however many it asks for (firing at the next
// look due woke the process once per lock taken: 74-137 firings for 200
// Acquire cycles, TestQuietLooksWakeOncePerWatchQuiet; Sessions of 16
// client processes contending on 4 keys, bench
// BenchmarkContendedProcesses, made 0.6-2 more voluntary context switches
// per cycle). It goes on firing
// for quietLinger after the last look was asked for, so that locks taken a
// few milliseconds apart do not set it each time. An idle process sets no
// timer.

// quietLinger is how long the timer goes on firing after the last look was
// asked for.
const quietLinger = 4 * watchQuiet

// quietFirings counts the firings of the looks' timer, for tests that
// check how often the process wakes for them.
var quietFirings atomic.Int64

// quietSessions is the process's sessions to look at, in the order they
// gave the turn back, so by when they are due.
var quietSessions = struct {
	sync.Mutex
	due   []quietLook
	timer sharedTimer // runs lookQuiet
	asked time.Time   // when the last look was asked for
}{}

// quietLook is a session to look at, from when on.
type quietLook struct {
	s  *Session
	at time.Time
}

// watchSoon has s looked at watchQuiet from now, unless a look is already
// due. A session whose health interval is shorter than the longest a look
// may take (twice watchQuiet) is looked at at once, as every session was
// before the looks waited: SPEC §4 bounds the notice of a closed
// connection by the interval.
func (s *Session) watchSoon() {
	if s.health < 2*watchQuiet {
		s.lookQuiet()
		return
	}
	quietSessions.Lock()
	defer quietSessions.Unlock()
	if s.lookDue {
		return
	}
	s.lookDue = true
	now := time.Now()
	quietSessions.asked = now
	quietSessions.due = append(quietSessions.due, quietLook{s, now.Add(watchQuiet)})
	quietSessions.timer.setUnlessSet(watchQuiet, lookQuiet)
}

// lookQuiet looks at the sessions that are due, and sets the timer for
// watchQuiet later while looks are due or were asked for within
// quietLinger.
func lookQuiet() {
	quietFirings.Add(1)
	now := time.Now()
	quietSessions.Lock()
	n := 0
	for n < len(quietSessions.due) && !quietSessions.due[n].at.After(now) {
		quietSessions.due[n].s.lookDue = false
		n++
	}
	due := make([]*Session, 0, n)
	for _, l := range quietSessions.due[:n] {
		due = append(due, l.s)
	}
	rest := copy(quietSessions.due, quietSessions.due[n:])
	clear(quietSessions.due[rest:]) // no ended session kept from the collector
	quietSessions.due = quietSessions.due[:rest]
	var next time.Duration
	if rest > 0 || now.Sub(quietSessions.asked) < quietLinger {
		next = watchQuiet
	}
	quietSessions.timer.fired(next)
	quietSessions.Unlock()
	for _, s := range due {
		s.lookQuiet()
	}
}

// lookQuiet starts s's watcher if s still holds something and its watcher
// has not started; or, if it has, arms its readiness if the turn is free.
func (s *Session) lookQuiet() {
	s.mu.Lock()
	if s.ending || len(s.holds) == 0 && !s.rawUsed {
		s.mu.Unlock()
		return
	}
	if !s.watchStarted {
		s.watchStarted = true
		s.watcher.Add(1)
		s.mu.Unlock()
		go s.watch()
		return
	}
	s.mu.Unlock()
	if s.takeWatchTurn(false) {
		s.giveWatchTurn()
	}
}
