package advisory

import (
	"context"
	"errors"

	"github.com/jackc/pgx/v5"
)

// WithConn runs fn with exclusive use of the session's own connection, the
// backend that holds its locks: fn's statements run only while those locks
// are held (fenced work). Other calls on the session wait for fn.
//
// It returns fn's error; an error matching ErrLockLost (joined with fn's)
// if the session was lost before or during fn; ErrClosed after Close.
//
// ctx bounds the wait for the connection and then fn. When ctx ends while
// fn runs, the statement in flight is cancelled (SQLSTATE 57014, also
// matching ctx's error) and the locks survive; fn must then return within
// 2 s, or the connection is closed under it and the session ends.
//
// Give fn's statements a context that lives as long as the lock should,
// such as context.WithoutCancel(ctx): by default pgx closes a connection
// whose statement's own context ends, which ends every lock of the session.
//
// fn must not keep the connection or rows read from it after it returns,
// must not leave a transaction open (it is rolled back and WithConn returns
// an error), and must not call Close or Release (they wait for fn, and
// close the connection under it after 5 s). Locks fn takes with its own SQL
// are the caller's to release; Close releases them too.
//
// A silent network cut while fn's statement runs ends the session within
// about three health intervals on Linux (one lost keep-alive probe
// is forgiven); elsewhere only when ctx ends or the
// operating system gives up on the connection (minutes): bound long fenced
// work with a deadline.
func (s *Session) WithConn(ctx context.Context, fn func(*pgx.Conn) error) error {
	if err := s.takeTurn(ctx); err != nil {
		return &Error{Op: "with_conn", Err: err}
	}
	defer s.giveTurn()
	// fn may take locks of its own, so from now on the keep-alives stay in
	// force until the session ends (its unlock_all resets them); a session
	// that holds nothing yet does not have them yet.
	if !s.holding() {
		if err := s.setKeepalives(ctx); err != nil {
			if s.lost(err) {
				return &Error{Op: "with_conn", Kind: ErrLockLost, Err: err}
			}
			return &Error{Op: "with_conn", Err: err}
		}
	}
	s.mu.Lock()
	s.rawUsed, s.ka.on = true, true
	s.mu.Unlock()
	s.arm()
	// While fn's statement runs the health watcher cannot check the
	// connection, so on Linux the socket's TCP keep-alive is tightened for
	// the rest of the session (put back before the connection returns to
	// the pool): a silent cut during a statement the server has received
	// ends the connection within two health intervals (rounded up to whole
	// seconds), before the server frees the locks (a busy backend finds its
	// client gone only when the statement ends). TCP_USER_TIMEOUT is not
	// set, as it would also end a healthy connection whose server is slow to
	// read what fn sends (a COPY waiting on a row lock). Elsewhere, or for a
	// cut as a statement is sent, the cut is noticed when ctx ends (the
	// cancel request cannot get through; the connection is closed within
	// 4 s) or when the operating system gives up.
	s.keepClientAlive(false)
	err := s.runFor(ctx, true, false, func(_ context.Context, c *pgx.Conn) error { return fn(c) }) // not answered: fn may send nothing
	if s.lost(err) {
		return &Error{Op: "with_conn", Kind: ErrLockLost, Err: err}
	}
	if s.pc.PgConn().TxStatus() != 'I' {
		rollback := s.execCleanup(rollbackSQL)
		if rollback != nil {
			s.lose(rollback)
		}
		return &Error{Op: "with_conn", Err: errors.Join(err, errorf("the callback left a transaction open; it was rolled back"), rollback)}
	}
	if s.ctx.Err() != nil {
		return &Error{Op: "with_conn", Kind: s.endKind(), Err: err}
	}
	if ctx.Err() != nil && sqlState(err) == codeQueryCanceled {
		return &Error{Op: "with_conn", Err: errors.Join(context.Cause(ctx), err)}
	}
	return err
}
