package advisory

import (
	"errors"
	"math"
	"math/rand/v2"
	"slices"
	"testing"
)

// documentedOrder is LockMany's canonical order as its doc comment states
// it, written out by hand (not computed by the library): the Int64Key space
// first, by the key's value as an unsigned number, then the PairKey space,
// by (uint32(a), uint32(b)).
var documentedOrder = []Key{
	Int64Key(0),
	Int64Key(1),
	Int64Key(2),
	Int64Key(1<<32 - 1),
	Int64Key(1 << 32),
	Int64Key(1<<32 + 1),
	Int64Key(math.MaxInt64),
	Int64Key(math.MinInt64),
	Int64Key(-(1 << 32)),
	Int64Key(-2),
	Int64Key(-1),
	PairKey(0, 0),
	PairKey(0, 1),
	PairKey(0, math.MaxInt32),
	PairKey(0, math.MinInt32),
	PairKey(0, -1),
	PairKey(1, 0),
	PairKey(math.MaxInt32, -1),
	PairKey(math.MinInt32, 0),
	PairKey(-1, 0),
	PairKey(-1, -1),
}

// LockMany takes its keys in the documented order, whatever the order it
// is given: while it waits for the key at position i (held elsewhere), the
// session holds exactly the keys before i. The expectation is the list
// above, not the library's own comparison.
func TestLockManyDocumentedOrder(t *testing.T) {
	e := newEnv(t)
	pool := e.pool()
	blocker := e.conn()
	blockerPID := blocker.PgConn().PID()
	s := e.session(pool)
	given := slices.Clone(documentedOrder)
	rand.Shuffle(len(given), func(i, j int) { given[i], given[j] = given[j], given[i] })
	for i, busy := range documentedOrder {
		_, err := blocker.Exec(e.ctx, lockSQL[scopeSession][ModeExclusive][waitForever][busy.space-1], busy.args()...)
		must(t, err)
		done := make(chan error, 1)
		go func() {
			_, err := s.LockMany(e.ctx, given)
			done <- err
		}()
		e.awaitWaiters(1)
		granted, waiting := e.grantedExcept(blockerPID)
		if !sameKeys(granted, documentedOrder[:i]) || !sameKeys(waiting, []Key{busy}) {
			t.Errorf("busy key %d (%s): the session holds %v and waits for %v; want %v and %s",
				i, busy, granted, waiting, documentedOrder[:i], busy)
		}
		_, err = blocker.Exec(e.ctx, unlockSQL[ModeExclusive][busy.space-1], busy.args()...)
		must(t, err)
		must(t, <-done)
		must(t, s.UnlockMany(e.ctx, given))
	}
	// UnlockMany names the first key not held in that order.
	_, err := s.LockMany(e.ctx, documentedOrder[:3])
	must(t, err)
	err = s.UnlockMany(e.ctx, given)
	var aerr *Error
	if !errors.As(err, &aerr) || !errors.Is(err, ErrNotHeld) || aerr.Key != documentedOrder[3] {
		t.Errorf("UnlockMany with keys not held = %v; want ErrNotHeld naming %s", err, documentedOrder[3])
	}
	must(t, s.UnlockMany(e.ctx, documentedOrder[:3]))
}

// sameKeys reports whether a and b hold the same keys, in any order.
func sameKeys(a, b []Key) bool {
	if len(a) != len(b) {
		return false
	}
	in := make(map[Key]int, len(a))
	for _, k := range a {
		in[k]++
	}
	for _, k := range b {
		if in[k] == 0 {
			return false
		}
		in[k]--
	}
	return true
}
