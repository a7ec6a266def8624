package advisory

import (
	"context"
	"errors"
	"fmt"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
)

// grantedThenCancelled counts lock statements that failed after the server
// had granted the lock (found by dropIfGranted), for tests to report how
// often they hit that race.
var grantedThenCancelled atomic.Int64

// Lock takes key on the session: exclusively, or with Shared(); waiting on
// the server, or trying once with NoWait(), or waiting at most WaitTimeout(d)
// or until ctx's deadline. It returns true when the session holds the key
// (again, if it already did: holds are counted), false with a nil error when
// NoWait found it held elsewhere.
//
// On a session that holds nothing, a wait is a sequence of short wait
// slices that hold no snapshot for long; on a session that already holds
// locks it is one server-side wait, which PostgreSQL's deadlock detector
// sees and which holds a snapshot while it lasts (see the package
// documentation, "What waiting costs the server"). Either way the
// session's other calls wait for it.
//
// On error nothing new is held and the session's earlier holds are kept:
// ErrTimeout when the wait bound passed (also matching
// context.DeadlineExceeded when that bound was ctx's deadline), ErrDeadlock
// when PostgreSQL broke a deadlock by failing this wait, ErrTooManyLocks
// when the server's lock table is full, the context's error when ctx was
// cancelled (a wait slice is left to end on its own, a one-statement wait
// is interrupted with a cancel request; the connection survives). A try,
// which never waits on the server, is not interrupted: the call returns
// once it has answered, with what it got, or, if it has not answered 500
// ms after ctx ended, closes the connection, which ends the session (the
// error then matches ctx's). If the connection is lost the session ends
// and every hold goes with it: Done is closed, and the error matches
// ErrLockLost when the session held locks; on a session that held nothing
// the call was only waiting and never held the lock, so its error says the
// connection was lost while waiting and does not match ErrLockLost.
func (s *Session) Lock(ctx context.Context, key Key, opts ...Option) (bool, error) {
	cfg, err := newConfig(callSessionLock, opts)
	if err != nil {
		return false, err
	}
	cfg.trace, cfg.entry = s.trace.option(), EntrySessionLock
	ctx, w := traceWait(ctx, cfg, TraceWaitStartData{Key: key})
	got, err := s.lock(ctx, key, cfg)
	w.end(ctx, got, err)
	return got, err
}

func (s *Session) lock(ctx context.Context, key Key, cfg config) (bool, error) {
	if !key.Valid() {
		return false, invalidKey("lock")
	}
	if err := s.takeTurn(ctx); err != nil {
		return false, turnError("lock", key, err)
	}
	defer s.giveTurn()

	h := hold{key, cfg.mode}
	s.mu.Lock()
	if s.holds[h] > 0 {
		s.holds[h]++
		s.mu.Unlock()
		return true, nil
	}

	first := len(s.holds) == 0 // a WithConn's own locks: the first try asks the server
	rawUsed := s.rawUsed
	s.mu.Unlock()

	// A Session whose WithConn ran may hold locks of its own: its wait may
	// close a deadlock cycle, so it must reach the server, not queue in the
	// process behind another Session's sliced wait. A Session on a
	// connection its caller owns has no pool, and the gate is per pool:
	// such Sessions may be on other databases or servers, and one of them
	// that holds the key notices the loss of its connection only at its
	// next call.
	if !first || rawUsed || s.pool == nil || cfg.entry != EntrySessionLock || cfg.noWait || cfg.noCohort {
		return s.lockOnce(ctx, key, cfg, h, first)
	}
	cfg, gate, err := s.gateSession(ctx, key, cfg) // one Session per key per process past it (cohort_gate.go)
	if err != nil {
		return false, err
	}
	// Deferred, so that a panic out of the wait (a tracer's) does not leave
	// the gate closed for good; before the turn is given.
	if cfg.mode == ModeShared { // shared holders do not keep each other waiting
		defer gate.leaveGate()
	} else {
		defer s.keepGate(gate, h) // left at once unless h is held
	}
	return s.lockOnce(ctx, key, cfg, h, first)
}

// lockOnce is lock once the session's turn is taken and h is not held yet.
func (s *Session) lockOnce(ctx context.Context, key Key, cfg config, h hold, first bool) (bool, error) {
	w, bound, byDeadline := cfg.waitPlan(ctx)
	s.waitingSince = cfg.waitingSince()
	var (
		got bool
		err error
	)
	if first {
		got, err = s.lockFirst(ctx, key, cfg.mode, w, endOf(bound))
	} else {
		got, err = s.lockMore(ctx, key, cfg.mode, w, bound)
	}
	switch {
	case err != nil:
		return false, s.lockFailed(ctx, h, first, byDeadline, err)
	case got:
		s.mu.Lock()
		s.holds[h] = 1
		s.ka.on = true
		s.mu.Unlock()
		s.arm()
		s.trace.started(ctx, cfg.entry, cfg.mode, key)
		return true, nil
	case w != waitTry:
		e := keyError("lock", key, ErrTimeout, nil)
		e.deadline = byDeadline
		return false, e
	}
	return false, nil
}

// lockFirst takes key on a session that holds nothing of its own: one try
// that also sets the keep-alives if it got the key; if it did not and the
// lock waits, a second try that also sets the keep-alives and asks what a
// wait needs to know (waitTrySQL), then wait slices, unless that try found
// that the session holds a lock after all (a WithConn callback's:
// holdsAnySQL), when the wait is one server-side wait as for lockMore.
// The questions are not asked with the first try: a statement that carries
// them costs the server their start-up even when the try gets the key
// (BenchmarkCycleAblation: waittry-sql against trydt-sql), and most locks
// get their key at once. got == false with a nil error means not
// acquired: busy (waitTry) or the bound passed. The first try is not
// interrupted when ctx ends (runTry: a cancel request would write an ERROR
// to the server log, SPEC §2a); it answers within a round trip, and one
// that has not answered tryGrace after ctx ended has its connection
// closed. If ctx ends during the second try or a slice, the error is a
// leftToEnd (see waitSlices). The caller holds the turn.
func (s *Session) lockFirst(ctx context.Context, key Key, m Mode, w wait, end time.Time) (got bool, err error) {
	kaOn, args := s.ka.on, s.keyArgs(key)
	s.answer = false
	err = s.runTry(ctx, func(ctx context.Context, c *pgx.Conn) error {
		if kaOn { // set by an earlier hold of this session: not again
			return c.QueryRow(ctx, lockSQL[scopeSession][m][waitTry][key.space-1], args...).Scan(&s.answer)
		}
		return c.QueryRow(ctx, firstTrySQL[m][key.space-1], append(args, s.ka.args...)...).Scan(&s.answer, nil)
	})
	if got = s.answer; err != nil || got || w == waitTry {
		return got, err
	}
	// Declared here, not captured from above: the detached try's closure
	// would move them to the heap for every lock, also one the first try
	// took.
	sql, tryArgs := waitTrySQL[m][key.space-1], args
	if !kaOn { // set whatever the try's outcome: not in the wait's slices
		sql, tryArgs = waitFirstTrySQL[m][key.space-1], append(args, s.ka.args...)
	}
	var (
		dtMs              int64
		holdsAny, canDoPL *bool
		holders           []int32
	)
	// The second try is part of the wait: once sent, it is not interrupted
	// when ctx ends or the session begins to end (a cancel request would
	// write an ERROR to the server log, SPEC §2a) but, like a wait slice,
	// left to end on its own while the caller returns (at once when ctx is
	// cancelled, deadlineGrace after its deadline), a late grant then
	// dropped (leftTry). A try can be held up on the server (a lock on
	// a catalog its questions read) or by a silent network cut: one left to
	// end that has not ended within cleanupTimeout closes the connection.
	if err = ctx.Err(); err != nil {
		return false, err
	}
	if s.ctx.Err() != nil { // ending: nothing more is sent but clean-up
		return false, s.endKind()
	}
	tctx := ctx // a try in flight at ctx's deadline gets deadlineGrace to answer, as a slice does
	if _, ok := ctx.Deadline(); ok {
		var cancel context.CancelFunc
		tctx, cancel = pastDeadline(ctx, deadlineGrace)
		defer cancel()
	}
	handOver, ended := make(chan struct{}), make(chan struct{})
	got, err = sliceDetached(tctx, func() (bool, error) {
		defer close(ended)
		var got bool
		err := s.run(context.Background(), false, func(ctx context.Context, c *pgx.Conn) error {
			return c.QueryRow(ctx, sql, tryArgs...).Scan(&got, nil, &dtMs, &holdsAny, &canDoPL, &holders)
		})
		return got, err
	}, s.leftTry(hold{key, m}, handOver))
	if isLeftToEnd(err) {
		s.handOver = handOver
		time.AfterFunc(cleanupTimeout, func() {
			select {
			case <-ended:
			default:
				_ = s.pc.PgConn().Conn().Close()
			}
		})
	}
	if err != nil || got {
		return got, err
	}
	s.ka.on = true // by waitFirstTrySQL, or before; Close resets them
	switch {
	case holdsAny != nil && *holdsAny:
		return s.waitOnce(ctx, key, m, end)
	case canDoPL != nil && !*canDoPL:
		noteNoSlices(ctx, s)
		return s.waitOnce(ctx, key, m, end)
	}
	at, err := s.waitSlicesAt(ctx, dtMs, end, true, func(ms int64) string {
		rest := inPlaceSlices * ms
		if !end.IsZero() {
			rest = min(rest, max(1, time.Until(end).Milliseconds()))
		}
		return oneSliceSQL(key, m, ms, holders, rest)
	}, sliceReport)
	return at > 0, err
}

// leftTry returns what runs in the background when a wait's second try
// was left to end on its own (sliceDetached): once it has ended and its
// caller has given the turn (closing handOver, see giveTurn), the
// keep-alives it set are recorded (waitFirstTrySQL sets them whatever its
// outcome), a grant that came too late is released (one hold of h: the
// session's other locks, a WithConn's included, are kept), and the turn is
// given back. A connection whose state cannot be known ends the session.
func (s *Session) leftTry(h hold, handOver chan struct{}) func(got bool, err error) {
	return func(got bool, err error) {
		<-handOver
		switch {
		case s.lost(err):
		case err == nil:
			s.ka.on = true
			if got {
				grantedThenCancelled.Add(1)
				if err := s.unlockStatement(h, false); err != nil {
					s.lose(err)
				}
			}
		}
		s.giveTurn()
	}
}

// waitOnce waits for key in one server-side wait (lockMore) until end (the
// zero time: none). The session's keep-alives are set; the caller holds
// the turn.
func (s *Session) waitOnce(ctx context.Context, key Key, m Mode, end time.Time) (bool, error) {
	w, bound := waitForever, time.Duration(0)
	if !end.IsZero() {
		if bound = time.Until(end); bound <= 0 {
			return false, nil
		}
		w = waitBounded
	}
	return s.lockMore(ctx, key, m, w, bound)
}

// lockMore takes key on a session that already holds locks (and so has its
// keep-alives set), in one statement: a try, or one server-side wait that
// PostgreSQL's deadlock detector can see, under lock_timeout if bounded. The
// health watcher cannot ping while such a wait lasts, so on Linux the
// socket's TCP keep-alive is tightened for it, as for WithConn. The caller
// holds the turn.
func (s *Session) lockMore(ctx context.Context, key Key, m Mode, w wait, bound time.Duration) (got bool, err error) {
	if w != waitTry {
		s.keepClientAlive(true)
	}
	sql, args := lockStatement(scopeSession, m, w, key, bound)
	got = true
	err = s.runLock(ctx, w, func(ctx context.Context, c *pgx.Conn) error {
		row := c.QueryRow(ctx, sql, args...)
		if w == waitTry {
			return row.Scan(&got)
		}
		return row.Scan(nil)
	})
	return got, err
}

// runLock runs f, a lock statement that waits as w says: a try, which
// never waits on the server, with runTry (ctx's end does not interrupt
// it), a wait with run (ctx's end interrupts it with a cancel request).
func (s *Session) runLock(ctx context.Context, w wait, f func(context.Context, *pgx.Conn) error) error {
	if w == waitTry {
		return s.runTry(ctx, f)
	}
	return s.run(ctx, true, f)
}

// lockFailed makes sure a failed lock statement left nothing held, and
// returns the error for it. A cancel or lock_timeout can land after the
// server granted the lock, and a session lock outlives the statement that
// failed, so unless the error says the lock cannot have been granted, the
// session's own pg_locks rows decide; if that cannot be known, the session
// ends and its connection is closed. first: the session held nothing
// before this lock.
func (s *Session) lockFailed(ctx context.Context, h hold, first, byDeadline bool, err error) error {
	s.mu.Lock()
	heldBefore := !first || s.rawUsed // a WithConn's own locks were held too
	s.mu.Unlock()
	if s.lost(err) {
		return lostAtEnd(ctx, byDeadline, lostError("lock", h.key, heldBefore, err))
	}
	kind := kindOf(err)
	// A slice left to end on its own drops a late grant itself (leftSlice).
	if code := sqlState(err); code != codeDeadlock && code != codeOutOfMemory && !isLeftToEnd(err) {
		if err := s.dropIfGranted(h); err != nil {
			return lostError("lock", h.key, heldBefore, err)
		}
	}
	if s.ctx.Err() != nil {
		return keyError("lock", h.key, ErrClosed, err)
	}
	if ctxErr := ctx.Err(); ctxErr != nil {
		if errors.Is(ctxErr, context.DeadlineExceeded) && byDeadline {
			kind = ErrTimeout
		}
		if kind == nil {
			err = errors.Join(context.Cause(ctx), err)
		}
	}
	kind, err = serverCancelled(ctx, kind, err)
	e := keyError("lock", h.key, kind, err)
	e.deadline = kind == ErrTimeout && byDeadline
	return e
}

// lostAtEnd is e, the error of a call whose connection was lost, as a wait
// that timed out when its bound was ctx's deadline and that has passed:
// a first try that did not answer in time after it had its connection
// closed (runTry). A session's locks lost with it keep ErrLockLost.
func lostAtEnd(ctx context.Context, byDeadline bool, e *Error) *Error {
	if e.Kind == nil && byDeadline && errors.Is(ctx.Err(), context.DeadlineExceeded) {
		e.Kind, e.deadline = ErrTimeout, true
	}
	return e
}

// errServerCancelled explains a wait the server cancelled by itself.
var errServerCancelled = errors.New("the server cancelled the wait (statement_timeout, or pg_cancel_backend from another session); " +
	"set statement_timeout to 0 for the role or database the lock connections use, or bound waits with WaitTimeout")

// serverCancelled maps a lock statement's cancel (57014) that the library
// did not ask for (ctx had not ended; the session's end is handled before)
// to ErrTimeout: the server's statement_timeout bounded the wait. Other
// errors pass unchanged.
func serverCancelled(ctx context.Context, kind, err error) (error, error) {
	if kind != nil || ctx.Err() != nil || sqlState(err) != codeQueryCanceled {
		return kind, err
	}
	return ErrTimeout, fmt.Errorf("%w: %w", errServerCancelled, err)
}

// dropIfGranted asks the server whether the session holds h after an
// ambiguous failure and, if it does, releases it. Any failure ends the
// session, which is then the only way to be sure.
func (s *Session) dropIfGranted(h hold) error {
	classid, objid, objsubid := h.key.LockRow()
	var held bool
	err := s.runCleanup(func(ctx context.Context, c *pgx.Conn) error {
		return c.QueryRow(ctx, heldSQL, int64(classid), int64(objid), objsubid, h.mode.lockMode()).Scan(&held)
	})
	if err == nil && held {
		grantedThenCancelled.Add(1)
		err = s.unlockStatement(h, false)
	}
	if err != nil {
		s.lose(err)
		return err
	}
	return nil
}
