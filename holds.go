package advisory

import (
	"cmp"
	"context"
	"errors"
	"slices"
	"time"

	"github.com/jackc/pgx/v5"
)

// holdings is what a session holds. Its rule: holds are counted as
// PostgreSQL counts them, apart for each (key, mode), and only the first
// hold and the last release of a (key, mode) reach the server. Guarded by
// the Session's mu.
type holdings struct {
	holds   map[hold]int
	rawUsed bool // WithConn ran: the connection may hold locks the Session did not take
	// heldSince is when the session began holding something without a
	// break (its first hold, or WithConn); zero while it holds nothing. Its
	// health checks report it (heldPingSQL).
	heldSince time.Time
	// gate is the gate of Sessions this session passed to take gateHold,
	// kept closed behind it until it no longer holds gateHold
	// (cohort_gate.go).
	gate     *cohort
	gateHold hold
}

// hold is one (key, mode) a Session holds.
type hold struct {
	key  Key
	mode Mode
}

// Hold is one key a Session holds, in one mode, Count times.
type Hold struct {
	Key   Key
	Mode  Mode
	Count int
}

// Unlock releases one hold of key in the mode opts say (exclusive unless
// Shared()). The last hold of a (key, mode) is released on the server, and
// the boolean pg_advisory_unlock returns is checked.
//
// It returns ErrNotHeld, sending nothing, when the session does not hold key
// in that mode. ctx only bounds the wait for the connection's turn, never
// the unlock: a ctx that has already ended (a deferred Unlock after a
// cancellation) still gets the unlock done, waiting up to 5 s for the turn;
// the statement is bounded by its own timeout. If the server did not hold the lock, or the unlock
// fails, the session ends and its connection is closed (which releases
// whatever it held), and the error matches ErrLockLost.
func (s *Session) Unlock(ctx context.Context, key Key, opts ...Option) error {
	cfg, err := newConfig(callSessionUnlock, opts)
	if err != nil {
		return err
	}
	return s.unlock(ctx, hold{key, cfg.mode})
}

// unlock releases one hold of h.
func (s *Session) unlock(ctx context.Context, h hold) error {
	key := h.key
	if !key.Valid() {
		return invalidKey("unlock")
	}
	if err := s.unlockTurn(ctx); err != nil {
		return keyError("unlock", key, nil, err)
	}
	defer s.giveTurn()
	s.mu.Lock()
	n := s.holds[h]
	switch {
	case n > 1:
		s.holds[h] = n - 1
	case n == 1:
		delete(s.holds, h)
		s.notHolding()
	}
	s.mu.Unlock()
	switch {
	case n == 0:
		return keyError("unlock", key, ErrNotHeld, nil)
	case n > 1:
		return nil
	}
	err := s.unlockStatement(h, false)
	s.leaveGateIfDone()
	s.trace.released(h.mode, err, key)
	if err != nil {
		s.lose(err)
		return keyError("unlock", key, ErrLockLost, err)
	}
	return nil
}

// notHolding forgets when the session began holding, if it holds nothing
// now. The caller holds mu.
func (s *Session) notHolding() {
	if len(s.holds) == 0 && !s.rawUsed {
		s.heldSince = time.Time{}
	}
}

// errUnlockFalse is the cause when pg_advisory_unlock returns false for a
// lock the session had recorded as held.
var errUnlockFalse = errors.New("pg_advisory_unlock returned false: the server did not hold the lock")

// unlockStatement releases h on the server once; if it is the session's
// last hold, the same statement resets the keep-alives. The caller holds the
// turn.
func (s *Session) unlockStatement(h hold, last bool) error {
	s.answer = false
	err := s.runCleanup(func(ctx context.Context, c *pgx.Conn) error {
		if last {
			return c.QueryRow(ctx, unlockLastSQL[h.mode][h.key.space-1], s.keyArgs(h.key)...).Scan(&s.answer, nil)
		}
		return c.QueryRow(ctx, unlockSQL[h.mode][h.key.space-1], s.keyArgs(h.key)...).Scan(&s.answer)
	})
	if err == nil && !s.answer {
		err = errUnlockFalse
	}
	return err
}

// Held returns the session's holds, ordered by key and mode. It never
// blocks.
func (s *Session) Held() []Hold {
	s.mu.Lock()
	held := make([]Hold, 0, len(s.holds))
	for h, n := range s.holds {
		held = append(held, Hold{Key: h.key, Mode: h.mode, Count: n})
	}
	s.mu.Unlock()
	slices.SortFunc(held, func(a, b Hold) int {
		return cmp.Or(compareKeys(a.Key, b.Key), cmp.Compare(a.Mode, b.Mode))
	})
	return held
}

// unlockHolds releases holds on the server, once each, checking the
// boolean every pg_advisory_unlock returns; then, if rawUsed, whatever else
// the connection holds (locks a WithConn callback took). The caller holds
// the turn.
func (s *Session) unlockHolds(holds []hold, rawUsed bool) error {
	switch {
	case len(holds) == 1 && !rawUsed:
		return s.unlockStatement(holds[0], true) // a Lock's Release: the one-key statement
	case len(holds) == 0 && !rawUsed: // a Session that held locks and gave them all back
		return s.execCleanup(keepaliveResetOnlySQL)
	}
	var byMode [2][]Key
	for _, h := range holds {
		byMode[h.mode] = append(byMode[h.mode], h.key)
	}
	for m, keys := range byMode {
		if len(keys) == 0 {
			continue
		}
		slices.SortFunc(keys, compareKeys)
		// The last statement resets the keep-alives, unless unlock_all
		// (which does) follows.
		last := !rawUsed && (m == int(ModeShared) || len(byMode[ModeShared]) == 0)
		if err := s.unlockManyStatement(keys, Mode(m), last); err != nil {
			return err
		}
	}
	if !rawUsed {
		return nil
	}
	return s.execCleanup(unlockAllSQL)
}

// holding reports whether the session has anything to watch.
func (s *Session) holding() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.holds) > 0 || s.rawUsed
}
