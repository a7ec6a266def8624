package advisory

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"time"
)

// lifetime is a session's end. Its rule: a session ends once, and whoever
// begins the end finishes it. The end begins at Close, or at a loss found
// by a statement or the watcher; every later call fails with why it ended.
type lifetime struct {
	ctx    context.Context // cancelled, with the reason, when the session starts ending
	cancel context.CancelCauseFunc
	done   chan struct{} // closed once the connection is given back or closed

	// Guarded by the Session's mu.
	ending bool  // Close began or the session was lost
	closed bool  // Close has returned the end reason once
	err    error // why it ended; nil after a clean Close

	// watcher counts the goroutines the end waits for: the health
	// watcher, a finish in the background (lose), a cohort hold's end.
	watcher sync.WaitGroup
}

// Done returns a channel that is closed when the session has ended: after
// Close, or once its connection is found lost (then every hold is gone).
func (s *Session) Done() <-chan struct{} { return s.done }

// Err returns nil while the session lives and after a Close; otherwise why
// it ended, matching ErrLockLost (or ErrTTLExceeded for a Lock's TTL).
func (s *Session) Err() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.err
}

// Close releases every hold, checking that the server held each, and gives
// the connection back to the pool; if the session cannot be sure its
// connection holds no lock, it closes the connection instead. It does not
// obey ctx. It interrupts the statement in flight (a Lock waiting on the
// session, a WithConn callback's statement) with a cancel request and waits
// for the call to return; after 5 s without the connection,
// it closes the connection under that call, which ends the session's locks
// on the server, and returns; the connection then leaves the pool when that
// call returns. Called from inside a WithConn callback, it returns after
// that timeout.
//
// The first Close returns nil when the session ended cleanly, and otherwise
// why it ended (matching ErrLockLost, or ErrTTLExceeded). Later calls return
// nil.
func (s *Session) Close(ctx context.Context) error {
	return s.end(ErrClosed)
}

// end ends the session as Close does; why becomes the cause of the
// session's context, and so of a Do or Lead body's context.
func (s *Session) end(why error) error {
	if s.beginEnd(nil, why, false) {
		s.finish(nil)
	}
	<-s.done
	s.watcher.Wait()
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return nil
	}
	s.closed = true
	return s.err
}

// beginEnd marks the session as ending: err is its end reason (nil for a
// clean end) and why the cause of its context, which it cancels; that
// interrupts the statement in flight and stops the watcher. Only the first
// call returns true; it must then call finish, in a goroutine counted by
// the watcher group if inBackground.
func (s *Session) beginEnd(err, why error, inBackground bool) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.ending {
		return false
	}
	s.ending = true
	s.err = err
	if inBackground {
		s.watcher.Add(1)
	}
	s.cancel(why)
	s.stmt.interruptForEnd()
	return true
}

// finish completes the end begun by beginEnd: it takes the turn (the
// statement in flight was interrupted), releases every hold and returns the
// connection clean, or discards it when the session was lost or the release
// fails. Then it closes done. If the turn does not come within
// cleanupTimeout, it cuts the connection off instead (see cutOff).
func (s *Session) finish(cause error) {
	select {
	case s.turn <- struct{}{}:
	default: // only a busy turn needs the timer
		select {
		case s.turn <- struct{}{}:
		case <-time.After(cleanupTimeout):
			s.cutOff()
			return
		}
	}
	defer s.giveTurn()
	s.ready.Load().disarm() // the unlock's answer wakes nobody

	clean := !errors.Is(cause, ErrLockLost) && !s.pc.IsClosed()
	s.mu.Lock()
	holds := make([]hold, 0, len(s.holds))
	for h := range s.holds {
		holds = append(holds, h)
	}
	rawUsed, kaOn := s.rawUsed, s.ka.on
	clear(s.holds)
	s.ka.on = false
	s.mu.Unlock()
	var unlockErr error
	switch {
	case clean && (len(holds) > 0 || rawUsed || kaOn):
		unlockErr = s.unlockHolds(holds, rawUsed)
	case !clean && cause == nil && (len(holds) > 0 || rawUsed):
		// Closed under a Close, found by none of the session's statements
		// (its watcher's turn had not come, or it has none).
		unlockErr = errClosedUnder
	}
	if unlockErr != nil {
		clean = false
		s.mu.Lock()
		s.err = &Error{Op: "close", Kind: ErrLockLost, Err: unlockErr}
		s.mu.Unlock()
	}
	s.ready.Load().close() // before the connection can go back to the pool; ends the watcher
	if clean {
		s.ka.client.restore()
	}
	s.giveBack(clean)
	s.ended(unlockErr)
}

// ended closes done, once the connection is given back or closed (or, at
// cutOff, can no longer be used): the tracer hears of the end, with the
// clean-up's error, and ReleaseAll no longer sees the session.
func (s *Session) ended(cleanupErr error) {
	s.trace.ended(context.Cause(s.ctx), cleanupErr)
	unregister(s)
	s.leaveGateIfDone()
	close(s.done)
}

// errCutOff is why a session ended whose connection was closed under a
// call that kept it past Close's timeout.
var errCutOff = errors.New("a call kept the connection past the close timeout (5 s): " +
	"the connection was closed under it, which ended the session's locks on the server; " +
	"do not call Close or Release from inside WithConn, and return from WithConn when its context ends")

// errClosedUnder is why a session ends lost whose connection was found
// closed when it ended: closed by its owner (a NewConnSession's), or by a
// statement that found the backend gone.
var errClosedUnder = errors.New("the connection was closed while the session held locks: the server ended them with it")

// cutOff ends a session whose turn was not given back within
// cleanupTimeout: a WithConn callback that ignored the interruption, or
// that called Close or Release itself. It closes the socket under the
// turn's holder, which ends the session's locks on the server and makes
// the holder's statements fail, and ends the session at once; the
// connection leaves the pool when the holder gives the turn back.
func (s *Session) cutOff() {
	s.pc.PgConn().Conn().Close()
	s.ready.Load().close()
	s.mu.Lock()
	clear(s.holds)
	if s.err == nil {
		s.err = &Error{Op: "close", Kind: ErrClosed, Err: errCutOff}
	}
	s.mu.Unlock()
	s.ended(errCutOff)
	go func() {
		s.turn <- struct{}{}
		s.discard()
	}()
}

// lose ends the session because its connection was lost or its lock state
// cannot be known: it closes the connection at once, so nothing more is
// sent on it, and finishes the end in the background (the caller may hold
// the turn).
func (s *Session) lose(cause error) {
	err := s.lossError(cause)
	first := s.beginEnd(err, err, true)
	// If the session was already ending (a Close, or a lock's clean-up after
	// a failed wait), the connection's state is unknown now too: it must not
	// go back to the pool, and closing it ends whatever it holds on the
	// server.
	s.pc.PgConn().Conn().Close()
	if first {
		go func() {
			defer s.watcher.Done()
			s.finish(err)
		}()
	}
}

// lossError is the end reason of a session lost by cause: it names the key
// the session held (a Lock's, a Lead's, a semaphore slot's) or, for a
// Session holding several, how many and the first few.
func (s *Session) lossError(cause error) *Error {
	s.mu.Lock()
	var keys []Key
	for h := range s.holds {
		if !slices.Contains(keys, h.key) {
			keys = append(keys, h.key)
		}
	}
	s.mu.Unlock()
	err := &Error{Op: "session", Kind: ErrLockLost, Err: cause}
	switch len(keys) {
	case 0:
	case 1:
		err.Key = keys[0]
	default:
		slices.SortFunc(keys, compareKeys)
		listed := make([]string, 0, 4)
		for _, k := range keys[:min(3, len(keys))] {
			listed = append(listed, k.describe())
		}
		if len(keys) > 3 {
			listed = append(listed, "…")
		}
		err.Err = fmt.Errorf("it held %d keys (%s): %w", len(keys), strings.Join(listed, ", "), cause)
	}
	return err
}

// lost reports whether err means the session's connection is gone, and if
// so ends the session. The caller's error then matches ErrLockLost, with
// err as its cause.
func (s *Session) lost(err error) bool {
	// After a slice left to end on its own, the connection is its own
	// (leftSlice finds out).
	if err == nil || isLeftToEnd(err) || !s.pc.IsClosed() {
		return false
	}
	s.lose(err)
	return true
}

// endKind is the sentinel for a call made after the session started ending.
func (s *Session) endKind() error {
	if err := s.Err(); err != nil {
		return err
	}
	return ErrClosed
}
