package advisory

import (
	"context"
	"errors"
	"fmt"
	"net"
	"sync/atomic"
	"time"
)

// The health watcher: one goroutine per Session that notices a lost
// connection while the session holds locks and nobody is using it.
//
// The watcher never holds the connection while it waits, and never waits
// for a caller: a caller takes the turn and uses the connection at once,
// waking nobody. Between the holder's calls the server sends nothing unasked,
// so on Linux the watcher waits for the socket to become readable
// (readiness_linux.go): a terminated backend's FATAL error, a stopped
// server's end of stream, a notification or a changed setting wakes it, and
// it pings, which reads what came; a closed connection is noticed at once.
// A caller that takes the turn disarms that wait (one epoll_ctl) if it was
// armed; once the session has held something for watchQuiet with the turn
// given back, the wait is armed again (watch_quiet.go), so that a Lock and
// Unlock in quick succession make no system call for it.
//
// A silent network cut sends nothing, so the watcher also pings once the
// connection has been quiet for a health interval (one small round trip); a
// ping that gets no answer within the interval (at least minPingTimeout)
// closes the connection. Where the socket cannot be watched (other systems,
// or a DialFunc whose connection is not a socket) the pings are the only
// check, and a closed connection is noticed within the health interval.
//
// The watcher takes the turn when it is free. When a caller holds it and
// the watcher has something to look at (the socket reported input, or the
// watcher has not set up its readiness yet), it waits for the turn instead
// of sleeping until its next look: the look that arms the readiness as it
// gives the turn back (lookQuiet) may wake the watcher before the turn is
// free, and the report, once taken, does not come again; and a watcher
// whose turn was taken before it set up its readiness has no readiness for
// that caller to leave armed. A caller that holds the turn detects a closed
// connection by the statement it runs.
//
// The watcher owns its socket deadlines: its pings run under
// context.Background, bounded by deadlines it sets on the net.Conn itself,
// so no pgx context handler takes part (CancelRequestContextWatcherHandler
// would first send a cancel request and end the read only DeadlineDelay
// later, delaying the detection of a cut).

// watching is what the health watcher shares with the session's callers.
// Its rule: the watcher owns its deadlines and borrows nothing from the
// callers. They only tell it when the server last answered them
// (lastAnswer), and have it look at the session once quiet when they give
// the turn back holding something unwatched (watchSoon).
type watching struct {
	health time.Duration // how often the watcher checks a quiet connection (HealthInterval)
	// lastAnswer is when the server last answered one of the library's own
	// statements (Unix nanoseconds): the watcher need not ping before an
	// interval has passed since. A turn taken without a round trip, or a
	// WithConn callback (which may send nothing), does not count.
	lastAnswer atomic.Int64
	// ready tells the watcher that the socket has something to read; set by
	// the watcher at its first turn, nil until then and where the socket
	// cannot be watched. Armed and disarmed under the turn, closed by
	// whoever ends the session.
	ready atomic.Pointer[readiness]
	// watchStarted: the watcher has started (watch_quiet.go). Guarded by
	// the Session's mu.
	watchStarted bool
	// lookDue: the session is to be looked at once quiet (watchSoon).
	// Guarded by quietSessions.
	lookDue bool
}

// watchQuiet is how long the session must hold something, its turn given
// back, before the watcher starts or its readiness is armed again
// (watch_quiet.go), so that a lock released sooner (an Acquire and Release
// in quick succession, or a Session's Lock and Unlock) costs no goroutine
// and no system call to watch it. A loss while the session holds is
// noticed at most twice that much later (the look comes between
// watchQuiet and twice that after the turn was given back).
//
// It is 10 ms, not less: while locks are taken, the process's one timer
// for the looks (watch_quiet.go) fires every watchQuiet, and each firing
// wakes a thread. A 20 ms later notice is small beside the health interval
// that bounds detection (default 1 s).
const watchQuiet = 10 * time.Millisecond

// arm tells the session it holds something to watch, since when: the
// watcher starts, or its readiness is armed, once the session has given
// its turn back and watchQuiet has passed (giveTurn, watchSoon). A
// NewConnSession has no watcher: its owner uses the connection between the
// session's calls.
func (s *Session) arm() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.heldSince.IsZero() {
		s.heldSince = time.Now()
	}
}

// unwatched reports whether the session holds something that its watcher
// does not watch: the watcher has not started, or its readiness is not
// armed. The caller holds the turn.
func (s *Session) unwatched() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.ending || s.conn == nil || len(s.holds) == 0 && !s.rawUsed {
		return false
	}
	return !s.watchStarted || s.ready.Load().unarmed()
}

// watch runs until the session ends; when it finds the connection lost it
// ends the session.
func (s *Session) watch() {
	defer s.watcher.Done()
	defer func() { s.ready.Load().close() }()
	started := false      // the readiness is set up (at the watcher's first turn)
	checked := time.Now() // when the last ping answered
	readable := false     // the socket has something to read
	for {
		if s.takeWatchTurn(readable || !started) {
			if !started {
				started = true
				s.ready.Store(newReadiness(s.pc.PgConn().Conn()))
			}
			var err error
			quiet := time.Since(s.lastActive(checked)) >= s.health
			if (readable || quiet) && s.holding() {
				err = s.ping()
				checked = time.Now()
			}
			s.giveWatchTurn()
			if err != nil {
				s.lose(err)
				return
			}
		}
		// The session's end closes the readiness, which ends the wait; an
		// end that came before the readiness was stored is seen here.
		if s.ctx.Err() != nil {
			return
		}
		readable = s.await(s.nextLook(checked))
	}
}

// nextLook is when the watcher looks at the connection again, unless the
// socket becomes readable first: a health interval after the server last
// answered. If that is past, no ping came of the last look: with nothing
// held, look again an interval later; while a caller kept the turn, a
// quarter interval later, so that the ping it put off is not late by more.
func (s *Session) nextLook(checked time.Time) time.Time {
	next := s.lastActive(checked).Add(s.health)
	if now := time.Now(); !next.After(now) {
		if s.holding() {
			return now.Add(s.health / 4)
		}
		return now.Add(s.health)
	}
	return next
}

// lastActive is the later of checked and the last time the server answered
// one of the library's statements (lastAnswer).
func (s *Session) lastActive(checked time.Time) time.Time {
	if used := time.Unix(0, s.lastAnswer.Load()); used.After(checked) {
		return used
	}
	return checked
}

// takeWatchTurn takes the turn for the watcher if nobody holds it, or, if
// wait, once its holder gives it back; never once the session is ending.
func (s *Session) takeWatchTurn(wait bool) bool {
	select {
	case s.turn <- struct{}{}:
	default:
		if !wait {
			return false
		}
		select {
		case s.turn <- struct{}{}:
		case <-s.ctx.Done():
			return false
		}
	}
	return s.tookTurn()
}

// await waits until the socket has something to read (true), deadline
// passes or the session ends.
func (s *Session) await(deadline time.Time) bool {
	if r := s.ready.Load(); r != nil {
		return r.wait(deadline)
	}
	t := time.NewTimer(time.Until(deadline))
	defer t.Stop()
	select {
	case <-s.ctx.Done():
	case <-t.C:
	}
	return false
}

// minPingTimeout is the least time a health check waits for its answer, so
// that a short health interval on a busy machine does not end healthy
// sessions. keepaliveArgs keeps the server's bound above it.
const minPingTimeout = time.Second

// ping is one round trip, bounded by the health interval (at least
// minPingTimeout) with a socket deadline; a timeout closes the connection.
// A timeout is reported as such, not as a context error: the caller's
// context had nothing to do with it. It is an empty query, as pgconn's
// Ping, whose text says since when the session holds (heldPingSQL), for
// pg_stat_activity and so for Holders and pglock status.
func (s *Session) ping() error {
	timeout := max(s.health, minPingTimeout)
	pg := s.pc.PgConn()
	nc := pg.Conn()
	if err := nc.SetDeadline(time.Now().Add(timeout)); err != nil {
		return err
	}
	sql := pingSQL
	s.mu.Lock()
	if since := s.heldSince; !since.IsZero() {
		sql = heldPingSQL(time.Since(since), since)
	}
	s.mu.Unlock()
	err := pg.Exec(context.Background(), sql).Close()
	if netErr := net.Error(nil); errors.As(err, &netErr) && netErr.Timeout() {
		return fmt.Errorf("no answer to a health check within %v (network cut or server stalled): %w", timeout, err)
	}
	if err != nil {
		return err
	}
	return nc.SetDeadline(time.Time{})
}
