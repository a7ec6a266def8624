// Package advisorygoose guards pressly/goose v3 migrations with an advisory
// lock of github.com/seed0ad592b7/advisory, taken on the very connection
// goose runs its migrations on.
//
// goose's Provider takes one *sql.Conn, calls its lock.SessionLocker's
// SessionLock on it, runs its SQL migrations and version-table writes on
// that connection, and calls SessionUnlock. A SessionLocker from this
// package locks there, so the lock lives exactly as long as the session
// that migrates:
//
//   - Waiting instances wait as every wait of the advisory package does
//     (in slices shorter than deadlock_timeout, holding no snapshot for
//     longer than a slice), so the migrator's CREATE INDEX CONCURRENTLY is
//     not held up by them; they wake the moment the lock is free, where
//     goose's own locker polls every 5 s.
//   - The migrations are fenced: an instance killed mid-migration keeps the
//     lock until its statement has ended on the server (its backend ends
//     then), so the next instance never overlaps it.
//   - With compat.Goose() as the key, it excludes goose's own Postgres
//     session locker (and goose's CLI) both ways.
//
// Go migrations without a transaction run on goose's *sql.DB, not on the
// locked connection: they are guarded (they run while the lock is held)
// but not fenced.
//
// The *sql.DB must use pgx v5's database/sql driver
// (github.com/jackc/pgx/v5/stdlib).
package advisorygoose

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"sync"

	"github.com/jackc/pgx/v5"
	"github.com/pressly/goose/v3/lock"

	"github.com/seed0ad592b7/advisory"
)

// SessionLocker is a goose lock.SessionLocker that holds an advisory lock
// on the connection goose migrates on. It is safe for concurrent use: one
// SessionLocker may serve several Providers.
type SessionLocker struct {
	key         advisory.Key
	sessionOpts []advisory.Option // NewConnSession's (advisory.SessionOptions)
	lockOpts    []advisory.Option // Session.Lock's

	mu       sync.Mutex
	sessions map[*sql.Conn]*advisory.Session
}

var _ lock.SessionLocker = (*SessionLocker)(nil)

// NewSessionLocker returns a SessionLocker for key. opts are the advisory
// package's: WaitTimeout bounds the wait (by default it waits until
// SessionLock's ctx ends), NoWait makes SessionLock fail at once when the
// key is held elsewhere, HealthInterval sets the keep-alives of the locked
// session. Invalid options make SessionLock fail. Pass compat.Goose() (or
// advisory.Int64Key of the id given to goose's lock.WithLockID) to exclude
// goose's own locker.
func NewSessionLocker(key advisory.Key, opts ...advisory.Option) *SessionLocker {
	session, lock := advisory.SessionOptions(opts)
	return &SessionLocker{key: key, sessionOpts: session, lockOpts: lock, sessions: make(map[*sql.Conn]*advisory.Session)}
}

// ErrNotPgx is returned (wrapped) by SessionLock when the *sql.Conn is not
// one of pgx v5's database/sql driver.
var ErrNotPgx = errors.New("advisorygoose: the *sql.DB must use pgx v5's database/sql driver " +
	`(github.com/jackc/pgx/v5/stdlib: sql.Open("pgx", dsn) or stdlib.OpenDBFromPool(pool))`)

// ErrHeldByCaller is returned (wrapped) by SessionLock when its ctx is the
// context of an advisory.Do, DoSemaphore or Lead body that holds the same
// key on another connection: waiting would never end.
var ErrHeldByCaller = errors.New("advisorygoose: the caller already holds this key on another connection " +
	"(goose runs inside advisory.Do, DoSemaphore or Lead on the same key), so goose would wait for its own lock for ever: " +
	"drop the outer guard (this SessionLocker guards the migrations) or give goose another key")

// SessionLock takes the key on conn, waiting as the advisory package's
// waits do. It fails, holding nothing, when conn is not a pgx v5 stdlib
// connection (ErrNotPgx), when ctx is the context of an advisory.Do,
// DoSemaphore or Lead body holding the same key (it would wait for
// itself), when the wait is bounded and the bound passes
// (advisory.ErrTimeout), when NoWait was given and the key is held
// elsewhere (advisory.ErrTimeout as well), when ctx ends, or when conn
// already holds this locker's lock.
func (l *SessionLocker) SessionLock(ctx context.Context, conn *sql.Conn) error {
	if held := advisory.LockFromContext(ctx); held != nil && held.Key() == l.key {
		return fmt.Errorf("lock %s: %w", l.key, ErrHeldByCaller)
	}
	return conn.Raw(func(dc any) error {
		pc, err := pgxConn(dc)
		if err != nil {
			return err
		}
		s, err := advisory.NewConnSession(pc, l.sessionOpts...)
		if err != nil {
			return fmt.Errorf("advisorygoose: lock %s: %w", l.key, err)
		}
		if err := l.claim(conn, s); err != nil {
			return err
		}
		ok, err := s.Lock(ctx, l.key, l.lockOpts...)
		if err == nil && !ok {
			err = &advisory.Error{Op: "lock", Key: l.key, Kind: advisory.ErrTimeout}
		}
		if err != nil {
			l.drop(conn)
			return errors.Join(err, s.Close(ctx))
		}
		return nil
	})
}

// SessionUnlock releases the key on conn, checking that the server still
// held it, and resets what the lock set on the connection. It returns an
// error matching advisory.ErrLockLost when the lock was lost since
// SessionLock (the backend was terminated, the server restarted, the
// connection broke: the migrations' statements then failed with it), and
// closes the connection then; an error when conn holds no lock of this
// locker.
func (l *SessionLocker) SessionUnlock(ctx context.Context, conn *sql.Conn) error {
	s := l.drop(conn)
	if s == nil {
		return fmt.Errorf("advisorygoose: unlock %s: this *sql.Conn holds no lock of this SessionLocker", l.key)
	}
	err := conn.Raw(func(any) error { return s.Close(ctx) })
	if errors.Is(err, sql.ErrConnDone) {
		// database/sql has dropped the connection (a statement found it
		// broken): the session and its lock are gone with it.
		err = errors.Join(s.Close(ctx), err)
	}
	return err
}

// claim records s as conn's session.
func (l *SessionLocker) claim(conn *sql.Conn, s *advisory.Session) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.sessions[conn] != nil {
		return fmt.Errorf("advisorygoose: lock %s: this *sql.Conn already holds it (SessionLock called twice)", l.key)
	}
	l.sessions[conn] = s
	return nil
}

// drop forgets conn's session and returns it (nil if none).
func (l *SessionLocker) drop(conn *sql.Conn) *advisory.Session {
	l.mu.Lock()
	defer l.mu.Unlock()
	s := l.sessions[conn]
	delete(l.sessions, conn)
	return s
}

// pgxConn returns the *pgx.Conn of a driver connection of pgx's stdlib.
func pgxConn(dc any) (*pgx.Conn, error) {
	c, ok := dc.(interface{ Conn() *pgx.Conn })
	if !ok {
		return nil, fmt.Errorf("%w; this one's driver connection is a %T", ErrNotPgx, dc)
	}
	return c.Conn(), nil
}
