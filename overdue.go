package advisory

import (
	"sync"
	"time"
)

// The bound of the library's clean-up statements (an unlock, a Release's
// or Close's statements): one that runs for cleanupTimeout is interrupted
// (interruptOverdue). Its rule: a clean-up statement in flight is in
// cleanups from its start to its end, and one timer for the process fires
// when the earliest of them is due. A timer per statement (or per
// session, reset for each) that became a thread's next one woke an idle
// thread of the Go scheduler at every Release of an Acquire (a new session
// each time; profile of BenchmarkUncontendedAcquireRelease); the one timer
// is set when the first statement starts and stays set while statements
// come and go.
var cleanups = struct {
	sync.Mutex
	inFlight map[*statement]time.Time // since when
	timer    sharedTimer              // runs checkCleanups
}{inFlight: make(map[*statement]time.Time)}

// cleanupStarted puts st, whose clean-up statement started at since, in
// cleanups.
func cleanupStarted(st *statement, since time.Time) {
	cleanups.Lock()
	defer cleanups.Unlock()
	cleanups.inFlight[st] = since
	cleanups.timer.setUnlessSet(cleanupTimeout, checkCleanups)
}

// cleanupEnded takes st, whose clean-up statement ended, out of cleanups.
func cleanupEnded(st *statement) {
	cleanups.Lock()
	delete(cleanups.inFlight, st)
	cleanups.Unlock()
}

// checkCleanups interrupts the clean-up statements that are due, and sets
// the timer for the earliest of the others, if any. A due statement leaves
// cleanups: its interruption sends the cancel again or closes the
// connection on its own (statement.cancel).
func checkCleanups() {
	now := time.Now()
	var due []*statement
	var next time.Time
	cleanups.Lock()
	for st, since := range cleanups.inFlight {
		at := since.Add(cleanupTimeout)
		switch {
		case !at.After(now):
			due = append(due, st)
			delete(cleanups.inFlight, st)
		case next.IsZero() || at.Before(next):
			next = at
		}
	}
	var after time.Duration
	if !next.IsZero() {
		after = next.Sub(now) // positive: the due ones are out
	}
	cleanups.timer.fired(after)
	cleanups.Unlock()
	for _, st := range due {
		go st.interruptOverdue() // each may wait for its cancel request: not one after another
	}
}
