package advisory

import (
	"context"
	"errors"
	"time"

	"github.com/jackc/pgx/v5"
)

// connTurn is the session's connection's turn. Its rule: whoever holds the
// turn may use the connection, and nobody else touches it. Taking the turn
// obeys a context (takeTurn) and fails once the session is ending; Close
// takes it after interrupting the holder. The turn also guards what goes
// with the connection's use: the wait in progress, the keep-alives
// (keepalive), the watcher's readiness arming.
type connTurn struct {
	turn chan struct{} // a token: holding it is holding the turn
	// handOver, set under the turn, passes the turn to a wait slice left
	// to end on its own (waitSlices): giveTurn closes it instead of giving
	// the turn back.
	handOver chan struct{}
	// waitingSince is when the wait in progress began, if a caller said
	// (WaitingSince); zero otherwise.
	waitingSince time.Time
}

// takeTurn waits for exclusive use of the connection, or for ctx to end. It
// fails with the session's end reason once the session is ending.
func (s *Session) takeTurn(ctx context.Context) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	select {
	case s.turn <- struct{}{}:
	case <-ctx.Done():
		return ctx.Err()
	case <-s.ctx.Done():
		return s.endKind()
	}
	if !s.tookTurn() {
		return s.endKind()
	}
	return nil
}

// tookTurn completes taking the turn: once the session is ending it gives
// the turn back at once and returns false (finish may already have given
// the connection back: it must not be touched); otherwise it disarms the
// watcher's readiness, since the turn's holder reads what comes.
func (s *Session) tookTurn() bool {
	if s.ctx.Err() != nil {
		<-s.turn
		return false
	}
	s.ready.Load().disarm()
	return true
}

// turnError is the error of op on key when takeTurn failed: a context
// deadline that passed while waiting for the connection is a wait that timed
// out, and matches ErrTimeout as a server-side timeout does.
func turnError(op string, key Key, err error) *Error {
	if errors.Is(err, context.DeadlineExceeded) {
		e := keyError(op, key, ErrTimeout, nil)
		e.deadline = true
		return e
	}
	return keyError(op, key, nil, err)
}

// unlockTurn takes the turn for an unlock. ctx bounds the wait, except
// that a ctx that has already ended (an Unlock deferred past a
// cancellation) waits up to cleanupTimeout instead: such an unlock is never
// skipped.
func (s *Session) unlockTurn(ctx context.Context) error {
	if ctx.Err() != nil {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(context.WithoutCancel(ctx), cleanupTimeout)
		defer cancel()
	}
	return s.takeTurn(ctx)
}

// giveTurn ends a takeTurn. If the session holds something its watcher
// does not watch, the watcher looks at it once the session has been quiet
// for watchQuiet (watchSoon), not at once: a caller that takes the turn
// again sooner leaves nothing to disarm. The look is asked for after the
// turn is given back: a look that was already due, and finds the turn
// taken, then found it taken by a later caller, whose giveTurn asks for
// another (asked for before giving the turn back, the look could come in
// between, find the turn still taken, and no look would follow).
func (s *Session) giveTurn() {
	if h := s.handOver; h != nil {
		s.handOver = nil
		close(h)
		return
	}
	unwatched := s.unwatched() // under the turn, which guards the readiness
	<-s.turn
	if unwatched {
		s.watchSoon()
	}
}

// giveWatchTurn ends the watcher's takeWatchTurn, arming the health
// watcher's readiness if the session holds something.
func (s *Session) giveWatchTurn() {
	if s.holding() {
		s.ready.Load().arm()
	}
	<-s.turn
}

// run runs f on the connection; the caller holds the turn. f gets a context
// that is never cancelled: when ctx ends (or, if untilEnd, when the
// session starts ending) the statement in flight is interrupted with a
// cancel request, so the connection survives, and closed if that cannot be
// done. f fails at once, sending nothing, if ctx is already done.
func (s *Session) run(ctx context.Context, untilEnd bool, f func(context.Context, *pgx.Conn) error) error {
	return s.answered(s.runFor(ctx, untilEnd, false, f))
}

// runTry runs f, a statement that never waits on the server (a lock's
// first try), as run does, except that neither ctx's end nor the
// session's interrupts it: a cancel request would write the statement to
// the server log as an ERROR (SPEC §2a). It answers within a round trip
// unless the server or the network holds it up: if it has not answered
// tryGrace after ctx ended, the connection is closed under it, and
// its error wraps ctx's cause (statement.runTry). f fails at once, sending
// nothing, if ctx is already done or the session is ending.
func (s *Session) runTry(ctx context.Context, f func(context.Context, *pgx.Conn) error) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if s.ctx.Err() != nil { // ending: nothing more is sent but clean-up
		return s.endKind()
	}
	return s.answered(s.stmt.runTry(ctx, f))
}

// answered records, for the health watcher, that the server answered one of
// the library's statements: it returned no error or the server's own.
func (s *Session) answered(err error) error {
	if err == nil || sqlState(err) != "" { // only a failure pays for errors.As
		s.lastAnswer.Store(time.Now().UnixNano())
		s.trace.answered()
	}
	return err
}

// runCleanup runs one of the library's own clean-up statements, bounded by
// cleanupTimeout and not interrupted by the session's end.
func (s *Session) runCleanup(f func(context.Context, *pgx.Conn) error) error {
	return s.answered(s.runFor(context.Background(), false, true, f))
}

// execCleanup runs sql, one of the library's own clean-up statements that
// returns nothing, as runCleanup does.
func (s *Session) execCleanup(sql string) error {
	return s.runCleanup(func(ctx context.Context, c *pgx.Conn) error {
		_, err := c.Exec(ctx, sql)
		return err
	})
}

// runFor is run, and if cleanup the statement is also interrupted once it
// has run for cleanupTimeout (statement.run). Once the session is ending
// it sends nothing but clean-up.
func (s *Session) runFor(ctx context.Context, untilEnd, cleanup bool, f func(context.Context, *pgx.Conn) error) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if untilEnd && s.ctx.Err() != nil { // ending: nothing more is sent but clean-up
		return s.endKind()
	}
	return s.stmt.run(ctx, untilEnd, cleanup, f)
}
