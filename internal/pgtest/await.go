package pgtest

import (
	"testing"
	"time"
)

// PollEvery is how often Await asks again.
const PollEvery = 2 * time.Millisecond

// Await returns once cond reports true, asking again every PollEvery. It
// stops the test (t.Fatalf) with what it awaited if cond returns an error,
// or if bound passes first. It is for a state that offers nothing to wait
// on: a pool's counts, a server's pg_locks or pg_stat_activity, a log, a
// process table. Where a channel exists, a test waits on the channel.
// Call it from the test's goroutine, as t.Fatalf requires.
func Await(t testing.TB, what string, bound time.Duration, cond func() (bool, error)) {
	t.Helper()
	deadline := time.Now().Add(bound)
	for {
		ok, err := cond()
		if err != nil {
			t.Fatalf("awaiting %s: %v", what, err)
		}
		if ok {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("not seen within %v: %s", bound, what)
		}
		time.Sleep(PollEvery) // polling: the state offers nothing to wait on
	}
}
