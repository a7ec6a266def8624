package advisory

import (
	"context"
	"errors"
	"fmt"

	"github.com/jackc/pgx/v5/pgconn"
)

// Sentinel errors. Every error the package returns for an operation on a key
// is an *Error, which matches one of these with errors.Is and keeps the
// underlying cause (a *pgconn.PgError, a context error, a network error)
// reachable with errors.As and errors.Is.
var (
	// ErrInvalidKey: the zero Key, or a pg_locks row that is not an advisory
	// key. Returned before any SQL is sent.
	ErrInvalidKey = errors.New("invalid advisory key (the zero Key locks nothing; use Int64Key, PairKey or StringKey)")

	// ErrTimeout: the wait bound (WaitTimeout, or the context's deadline)
	// passed before the lock was granted: SQLSTATE 55P03. Nothing is held
	// and the connection is healthy. When the bound was the context's
	// deadline the error also matches context.DeadlineExceeded, also when
	// it passed while waiting for a connection from an exhausted pool. A
	// wait the server's statement_timeout ended (SQLSTATE 57014, not asked
	// for by the library) is ErrTimeout too, with a message saying so.
	ErrTimeout = errors.New("timed out waiting for the lock (another session held it for the whole wait; retry later or wait longer)")

	// ErrDeadlock: PostgreSQL chose this wait as a deadlock victim (SQLSTATE
	// 40P01). Only the failed wait is lost: locks the session already held
	// are still held. Take keys in one fixed order to avoid it.
	ErrDeadlock = errors.New("deadlock detected (only this wait failed; locks already held are kept; take keys in one fixed order)")

	// ErrTooManyLocks: the server's shared lock table is full (SQLSTATE
	// 53200, "out of shared memory"). Release locks, or raise the server's
	// max_locks_per_transaction.
	ErrTooManyLocks = errors.New("server lock table is full (release locks or raise max_locks_per_transaction)")

	// ErrLockLost: a lock believed held is not held any more, because the
	// session that held it ended (connection closed, backend terminated,
	// server restarted, network cut) or the server no longer had it. Mutual
	// exclusion was not guaranteed from that moment on. A call that loses
	// its connection while it waits on a session that held nothing never
	// held the lock: its error does not match ErrLockLost, says the
	// connection was lost while waiting, and wraps the pgx or network
	// error (reachable with errors.As); calling again takes a new
	// connection.
	ErrLockLost = errors.New("lock lost (its session ended or the server no longer held it; mutual exclusion is no longer guaranteed)")

	// ErrNotHeld: Unlock of a key the session does not hold in that mode.
	// Nothing was sent to the server.
	ErrNotHeld = errors.New("lock not held by this session in that mode")

	// ErrTTLExceeded: the lock was held for its whole TTL; the body's
	// context was cancelled and the lock released.
	ErrTTLExceeded = errors.New("lock held past its TTL and released")

	// ErrClosed: the Session was closed (or its Lock released) before the
	// call.
	ErrClosed = errors.New("advisory session closed")
)

// Error describes a failed operation on one key.
type Error struct {
	Op   string // what was attempted: "lock", "unlock", "lock_tx", ...
	Key  Key    // the key it was attempted on; the zero Key for session-wide operations
	Kind error  // the sentinel it matches (ErrTimeout, ...); nil if none applies
	Err  error  // the cause; nil if Kind says it all

	deadline bool // the wait was bounded by the context's deadline
}

// Error returns "advisory: OP KEY: KIND: CAUSE", where KEY is the key's
// numbers (int64:…, pair:A,B) preceded by its quoted name when it has one
// (see NameKey): advisory: lock "scheduler" (int64:…): ….
func (e *Error) Error() string {
	msg := "advisory: " + e.Op
	if e.Key.Valid() {
		msg += " " + e.Key.describe()
	}
	if e.Kind != nil {
		msg += ": " + e.Kind.Error()
	}
	if e.Err != nil {
		msg += ": " + e.Err.Error()
	}
	return msg
}

// Unwrap returns the sentinel, the cause and, for a wait that ended at the
// context's deadline, context.DeadlineExceeded.
func (e *Error) Unwrap() []error {
	errs := make([]error, 0, 3)
	for _, err := range []error{e.Kind, e.Err} {
		if err != nil {
			errs = append(errs, err)
		}
	}
	if e.deadline {
		errs = append(errs, context.DeadlineExceeded)
	}
	return errs
}

// SQLSTATE codes the package maps to sentinels or reads to decide whether a
// lock may have been granted.
const (
	codeLockTimeout   = "55P03" // lock_not_available: lock_timeout passed
	codeQueryCanceled = "57014" // query_canceled: cancel request or statement_timeout
	codeDeadlock      = "40P01" // deadlock_detected
	codeOutOfMemory   = "53200" // out_of_memory: the shared lock table is full
)

// sqlState returns the SQLSTATE of a server error, or "".
func sqlState(err error) string {
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		return pgErr.Code
	}
	return ""
}

// kindOf maps a server error to its sentinel, or nil.
func kindOf(err error) error {
	switch sqlState(err) {
	case codeLockTimeout:
		return ErrTimeout
	case codeDeadlock:
		return ErrDeadlock
	case codeOutOfMemory:
		return ErrTooManyLocks
	}
	return nil
}

// keyError returns an *Error for op on key. It is the one place that turns a
// failed statement into the value users see.
func keyError(op string, key Key, kind, cause error) *Error {
	return &Error{Op: op, Key: key, Kind: kind, Err: cause}
}

// errLostWaiting says what a call whose connection was lost while it
// waited for a lock should know: it never held the lock.
var errLostWaiting = errors.New("the connection was lost while waiting for the lock; this call never held it: " +
	"call again, which takes a new connection " +
	"(after a network cut the server may keep the old session, and a lock granted to it just before the cut, until its keep-alives end it)")

// lostError is the error of op on key when the session ended during the
// call because its connection was lost or its lock state could not be
// known (cause says how). If the session held locks before the call
// (heldBefore), they are gone: ErrLockLost. Otherwise the call was only
// waiting, and never held the lock (SPEC §4): its error is a failed wait,
// not ErrLockLost, with cause (the pgx or network error) reachable.
func lostError(op string, key Key, heldBefore bool, cause error) *Error {
	if heldBefore {
		return keyError(op, key, ErrLockLost, cause)
	}
	return keyError(op, key, nil, fmt.Errorf("%w: %w", errLostWaiting, cause))
}

// invalidKey is the error for an invalid key given to op.
func invalidKey(op string) error {
	return &Error{Op: op, Kind: ErrInvalidKey}
}

// errorf is fmt.Errorf with the package prefix, for misuse that is not about
// a key (a nil pool, a negative duration).
func errorf(format string, args ...any) error {
	return fmt.Errorf("advisory: "+format, args...)
}
