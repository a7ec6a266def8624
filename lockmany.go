package advisory

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/jackc/pgx/v5"
)

// LockMany takes every key in keys on the session, in one mode (exclusive,
// or Shared()), and returns true when the session holds them all: Lock for
// a set of keys, in a constant number of round trips. Keys the session
// already holds in that mode only have their counts raised.
//
// keys is a set: Int64Key (and StringKey) and PairKey keys may be mixed,
// and a key listed more than once is taken and counted once. An empty set
// returns true at once. An invalid key fails the call with ErrInvalidKey
// before anything is sent.
//
// The keys are taken in one canonical order, whatever the order of keys:
// the Int64Key space first, by the key's value as an unsigned number, then
// the PairKey space, by (uint32(a), uint32(b)). Two sessions that LockMany
// overlapping sets therefore never deadlock on each other; keys taken
// before, with Lock or an earlier LockMany, are outside that promise.
//
// It waits as Lock does (the session's other calls wait for it), and takes
// every key or none: with NoWait, if any key is held elsewhere it returns
// false and a nil error; on a session that holds nothing, no key is held
// between wait slices. WaitTimeout(d) bounds each key's wait and the whole
// call, ctx's deadline the whole call; either fails with ErrTimeout.
//
// On error nothing new is held and earlier holds keep their counts. The
// errors are Lock's: ErrTimeout, ErrDeadlock, ErrTooManyLocks (the
// server's lock table is too small for the set), ctx's error when ctx was
// cancelled. If the connection is lost, or the clean-up fails, the session
// ends with every hold, and the error matches ErrLockLost when the session
// held locks before the call (otherwise it never held any: the error says
// the connection was lost while waiting). Errors are an *Error with Op
// "lock_many" and the zero Key.
func (s *Session) LockMany(ctx context.Context, keys []Key, opts ...Option) (bool, error) {
	cfg, err := newConfig(callSessionLockMany, opts)
	if err != nil {
		return false, err
	}
	set, err := canonicalKeys("lock_many", keys)
	if err != nil {
		return false, err
	}
	cfg.trace, cfg.entry = s.trace.option(), EntrySessionLockMany
	ctx, w := traceWait(ctx, cfg, TraceWaitStartData{Keys: set})
	got, err := s.lockMany(ctx, set, cfg)
	w.end(ctx, got, err)
	return got, err
}

// lockMany is LockMany for set, the keys in canonical order.
func (s *Session) lockMany(ctx context.Context, set []Key, cfg config) (bool, error) {
	if err := s.takeTurn(ctx); err != nil {
		return false, turnError("lock_many", Key{}, err)
	}
	defer s.giveTurn()

	var fresh []Key
	s.mu.Lock()
	for _, k := range set {
		if s.holds[hold{k, cfg.mode}] == 0 {
			fresh = append(fresh, k)
		}
	}
	first := len(s.holds) == 0
	rawUsed := s.rawUsed
	s.mu.Unlock()
	if first && rawUsed && len(fresh) > 0 {
		// A WithConn callback may have left locks of its own: ask the server
		// whether the session holds any (then the wait can be part of a
		// cycle and is one server-side wait).
		held, err := s.holdsAny(ctx)
		if err != nil {
			return false, s.lockManyFailed("lock_many", Key{}, ctx, ctx, nil, cfg.mode, false, err)
		}
		first = !held
	}
	if len(fresh) > 0 {
		if ok, err := s.lockFresh(ctx, fresh, cfg, first); err != nil || !ok {
			return false, err
		}
	}
	s.mu.Lock()
	for _, k := range set {
		s.holds[hold{k, cfg.mode}]++
	}
	s.ka.on = true
	s.mu.Unlock()
	s.arm()
	s.trace.started(ctx, cfg.entry, cfg.mode, fresh...)
	return true, nil
}

// holdsAny asks the server whether the session holds any lock
// (holdsAnySQL). The caller holds the turn.
func (s *Session) holdsAny(ctx context.Context) (held bool, err error) {
	err = s.runTry(ctx, func(ctx context.Context, c *pgx.Conn) error {
		return c.QueryRow(ctx, holdsAnyOnlySQL).Scan(&held)
	})
	return held, err
}

// lockFresh takes keys, none of which the session holds in cfg.mode. On a
// session that holds nothing (first), a wait is a sequence of wait slices,
// all or nothing each, and the statement that takes the keys also sets the
// keep-alives; on a session that holds locks, one statement takes them all,
// waiting for each in turn on the server. It returns false, nil when NoWait
// found a key busy (after releasing the ones it took) and, for a first
// lock, when the WaitTimeout bound passed. The caller holds the turn.
func (s *Session) lockFresh(ctx context.Context, keys []Key, cfg config, first bool) (bool, error) {
	w, bound, byDeadline := cfg.waitPlan(ctx)
	if first && w != waitTry {
		end := endOf(bound)
		if !s.saidNoSlices() {
			ka := s.ka.args
			if s.ka.on {
				ka = nil
			}
			got, err := s.waitSlices(ctx, 0, end, func(ms int64) string { return manySliceSQL(keys, cfg.mode, ms, ka) })
			switch {
			case noPLpgSQL(err):
				// LockMany has no first try to ask plpgsqlSQL with: the
				// server logs the failed slice, once per Session (it
				// remembers: noteNoSlices).
				noteNoSlices(ctx, s)
			case err != nil:
				return false, s.lockManyFailed("lock_many", Key{}, ctx, ctx, keys, cfg.mode, byDeadline, err)
			case !got:
				return false, &Error{Op: "lock_many", Kind: ErrTimeout, deadline: byDeadline}
			default:
				return true, nil
			}
		}
		// No PL/pgSQL: one server-side wait, below, on a session whose
		// keep-alives are set.
		if !s.ka.on {
			if err := s.setKeepalives(ctx); err != nil {
				return false, s.lockManyFailed("lock_many", Key{}, ctx, ctx, nil, cfg.mode, byDeadline, err)
			}
		}
		if !end.IsZero() {
			if bound = time.Until(end); bound <= 0 {
				return false, &Error{Op: "lock_many", Kind: ErrTimeout, deadline: byDeadline}
			}
		}
	}
	if w != waitTry {
		s.keepClientAlive(true)
	}
	runCtx := ctx
	if w == waitBounded && !byDeadline {
		// lock_timeout bounds each key's wait; this bounds their sum.
		var cancel context.CancelFunc
		runCtx, cancel = context.WithTimeout(ctx, bound)
		defer cancel()
	}
	sql, args := lockManySQL[cfg.mode][w], manyArgs(keys)
	switch {
	case w == waitTry && first:
		sql, args = manyFirstTrySQL[cfg.mode], append(args, s.ka.args...)
	case w == waitBounded:
		args = append([]any{lockTimeoutText(bound)}, args...)
	}
	var (
		n        int64  // keys taken, when waiting
		failedAt *int64 // 1-based position of the first busy key, with NoWait
	)
	scan := func(row pgx.Row) error {
		switch {
		case w == waitTry && first:
			return row.Scan(&failedAt, nil)
		case w == waitTry:
			if err := row.Scan(&failedAt); !errors.Is(err, pgx.ErrNoRows) {
				return err
			}
			return nil
		case w == waitBounded:
			return row.Scan(nil, &n)
		}
		return row.Scan(&n)
	}
	err := s.runLock(runCtx, w, func(ctx context.Context, c *pgx.Conn) error {
		return scan(c.QueryRow(ctx, sql, args...))
	})
	if err == nil && w != waitTry && n != int64(len(keys)) {
		err = fmt.Errorf("the lock statement took %d of %d keys", n, len(keys))
	}
	if err != nil {
		return false, s.lockManyFailed("lock_many", Key{}, ctx, runCtx, keys, cfg.mode, byDeadline, err)
	}
	if failedAt == nil {
		return true, nil
	}
	// NoWait: the keys before the busy one were taken; give them back.
	if *failedAt > 1 {
		if err := s.unlockManyStatement(keys[:*failedAt-1], cfg.mode, false); err != nil {
			s.lose(err)
			return false, lostError("lock_many", Key{}, !first, err)
		}
	}
	return false, nil
}

// lockManyFailed makes sure a failed many-key lock statement left none of
// keys held, and returns the error for it, an *Error for op on key. Unlike
// one key, a statement that failed on its k-th key holds the keys before
// it, whatever the error, so the session's pg_locks rows always decide; if
// they cannot, the session ends. runCtx is ctx, or ctx bounded by
// WaitTimeout.
func (s *Session) lockManyFailed(op string, key Key, ctx, runCtx context.Context, keys []Key, m Mode, byDeadline bool, err error) error {
	s.mu.Lock()
	heldBefore := len(s.holds) > 0 || s.rawUsed // before s.lost: the session's end clears them
	s.mu.Unlock()
	if s.lost(err) {
		return lostAtEnd(ctx, byDeadline, lostError(op, key, heldBefore, err))
	}
	// A slice left to end on its own drops a late grant itself (leftSlice).
	if !isLeftToEnd(err) {
		if err := s.dropGrantedMany(keys, m); err != nil {
			return lostError(op, key, heldBefore, err)
		}
	}
	if s.ctx.Err() != nil {
		return &Error{Op: op, Key: key, Kind: ErrClosed, Err: err}
	}
	kind := kindOf(err)
	switch {
	case ctx.Err() != nil:
		if errors.Is(ctx.Err(), context.DeadlineExceeded) && byDeadline {
			kind = ErrTimeout
		} else if kind == nil {
			err = errors.Join(context.Cause(ctx), err)
		}
	case runCtx.Err() != nil:
		kind = ErrTimeout // the WaitTimeout bound on the whole call
	}
	kind, err = serverCancelled(runCtx, kind, err)
	return &Error{Op: op, Key: key, Kind: kind, Err: err, deadline: kind == ErrTimeout && byDeadline}
}

// dropGrantedMany reads which of keys the session holds in mode m on the
// server and releases them. Any failure ends the session, which is then
// the only way to be sure.
func (s *Session) dropGrantedMany(keys []Key, m Mode) error {
	want := make(map[Key]bool, len(keys))
	for _, k := range keys {
		want[k] = true
	}
	var granted []Key
	err := s.runCleanup(func(ctx context.Context, c *pgx.Conn) error {
		rows, err := c.Query(ctx, heldInModeSQL, m.lockMode())
		if err != nil {
			return err
		}
		var classid, objid int64
		var objsubid int16
		_, err = pgx.ForEachRow(rows, []any{&classid, &objid, &objsubid}, func() error {
			k, err := KeyFromLockRow(uint32(classid), uint32(objid), objsubid)
			if err == nil && want[k] {
				granted = append(granted, k)
			}
			return err
		})
		return err
	})
	if err == nil && len(granted) > 0 {
		grantedThenCancelled.Add(1)
		err = s.unlockManyStatement(granted, m, false)
	}
	if err != nil {
		s.lose(err)
		return err
	}
	return nil
}

// UnlockMany releases one hold of every key in keys, in the mode opts say
// (exclusive unless Shared()): Unlock for a set of keys. keys is a set, as
// for LockMany: a key listed more than once is released once. The keys
// whose last hold this releases are unlocked on the server in one
// statement, and every boolean pg_advisory_unlock returns is checked;
// keys still held more than once only have their counts lowered.
//
// It is all or nothing: if the session does not hold some key in that
// mode, it returns an error matching ErrNotHeld (its Key is the first such
// key in canonical order), sends nothing and changes no count. An invalid
// key fails with ErrInvalidKey, also before anything changes. Like Unlock,
// it sends the unlock even when ctx has already ended (ctx only bounds the
// wait for the connection's turn), bounded by its own timeout. If the
// server did not hold one of the keys, or the unlock fails, the session
// ends and its connection is closed (which releases whatever it held), and
// the error matches ErrLockLost.
func (s *Session) UnlockMany(ctx context.Context, keys []Key, opts ...Option) error {
	cfg, err := newConfig(callSessionUnlockMany, opts)
	if err != nil {
		return err
	}
	set, err := canonicalKeys("unlock_many", keys)
	if err != nil {
		return err
	}
	if err := s.unlockTurn(ctx); err != nil {
		return &Error{Op: "unlock_many", Err: err}
	}
	defer s.giveTurn()

	var last []Key
	s.mu.Lock()
	for _, k := range set {
		if s.holds[hold{k, cfg.mode}] == 0 {
			s.mu.Unlock()
			return keyError("unlock_many", k, ErrNotHeld, nil)
		}
	}
	for _, k := range set {
		h := hold{k, cfg.mode}
		if s.holds[h] == 1 {
			last = append(last, k)
		} else {
			s.holds[h]--
		}
	}
	s.mu.Unlock()
	if len(last) == 0 {
		return nil
	}
	s.mu.Lock()
	for _, k := range last {
		delete(s.holds, hold{k, cfg.mode})
	}
	s.notHolding()
	s.mu.Unlock()
	err = s.unlockManyStatement(last, cfg.mode, false)
	s.leaveGateIfDone()
	s.trace.released(cfg.mode, err, last...)
	if err != nil {
		s.lose(err)
		return &Error{Op: "unlock_many", Kind: ErrLockLost, Err: err}
	}
	return nil
}

// unlockManyStatement releases keys in mode m on the server, once each,
// with one statement; if they are the session's last holds, the same
// statement resets the keep-alives. The caller holds the turn.
func (s *Session) unlockManyStatement(keys []Key, m Mode, last bool) error {
	var notHeld int64
	err := s.runCleanup(func(ctx context.Context, c *pgx.Conn) error {
		if last {
			return c.QueryRow(ctx, unlockManyLastSQL[m], manyArgs(keys)...).Scan(&notHeld, nil)
		}
		return c.QueryRow(ctx, unlockManySQL[m], manyArgs(keys)...).Scan(&notHeld)
	})
	if err == nil && notHeld > 0 {
		err = fmt.Errorf("%w (%d of %d keys)", errUnlockFalse, notHeld, len(keys))
	}
	return err
}

// canonicalKeys returns keys sorted in the canonical lock order (key space,
// then classid, then objid, as unsigned numbers) without duplicates, or an
// ErrInvalidKey error for op if any key is invalid.
func canonicalKeys(op string, keys []Key) ([]Key, error) {
	for _, k := range keys {
		if !k.Valid() {
			return nil, invalidKey(op)
		}
	}
	set := slices.Clone(keys)
	slices.SortFunc(set, compareKeys)
	return slices.Compact(set), nil
}

// compareKeys orders keys canonically: by key space, classid, objid.
func compareKeys(a, b Key) int {
	return cmp.Or(cmp.Compare(a.space, b.space), cmp.Compare(a.classid, b.classid), cmp.Compare(a.objid, b.objid))
}
