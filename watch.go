package advisory

import (
	"context"
	"errors"
	"fmt"
	"net"
	"time"
)

// The health watcher: one goroutine per Session that notices a lost
// connection while the session holds locks and nobody is using it.
//
// Between the holder's own calls the watcher takes the connection's turn and
// sits in a read on it (pgconn's WaitForNotification). A terminated backend
// or a stopped server sends a FATAL error or closes the socket, which ends
// that read at once: such a loss is noticed immediately, with no round trip.
// A silent network cut sends nothing, so every health interval the watcher
// also pings (one small round trip), and a ping that gets no answer within
// the interval (at least minPingTimeout) closes the connection.
//
// The holder's calls come first: the watcher starts only once the session
// has been quiet for watchQuiet, and a caller that finds the watcher holding
// the turn ends its read (wantTurn) by a past read deadline, leaving the
// connection intact. A statement that a caller runs detects a closed
// connection by itself.
//
// The watcher owns its socket deadlines: its reads and pings run under
// context.Background, bounded by deadlines it sets on the net.Conn itself,
// so no pgx context handler takes part (CancelRequestContextWatcherHandler
// would first send a cancel request and end the read only DeadlineDelay
// later, delaying both the callers and the detection of a cut).

// watchQuiet is how long the session must be unused before the watcher takes
// the connection, so that a holder's quick sequence of calls never waits for
// it.
const watchQuiet = 2 * time.Millisecond

// arm tells the watcher the session holds something to watch. The first
// call schedules the watcher to start after watchQuiet, so a lock released
// sooner (an Acquire and Release in quick succession) never starts a
// goroutine at all.
func (s *Session) arm() {
	s.mu.Lock()
	if s.watchStart == nil && !s.ending {
		s.watcher.Add(1)
		s.watchStart = time.AfterFunc(watchQuiet, s.watch)
	}
	s.mu.Unlock()
	select {
	case s.armed <- struct{}{}:
	default:
	}
}

// wantTurn counts a caller that starts (delta 1) or stops (delta -1)
// waiting for the turn. A caller that starts ends the watcher's read, if it
// is in one; and the watcher does not start a read while anyone waits. So a
// waiting caller is never left behind a read, whatever the interleaving.
func (s *Session) wantTurn(delta int) {
	s.listenMu.Lock()
	defer s.listenMu.Unlock()
	s.waiting += delta
	if delta > 0 && s.listenStop != nil {
		s.listenStop() // ends the read at once
	}
}

// holding reports whether the session has anything to watch.
func (s *Session) holding() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.holds) > 0 || s.rawUsed
}

// watch runs until the session ends; when it finds the connection lost it
// ends the session.
func (s *Session) watch() {
	defer s.watcher.Done()
	timer := time.NewTimer(s.health)
	defer timer.Stop()
	nextPing := time.Now().Add(s.health)
	for {
		if !s.holding() {
			select {
			case <-s.ctx.Done():
				return
			case <-s.armed:
				nextPing = time.Now().Add(s.health)
			}
			continue
		}
		if wait := time.Until(time.Unix(0, s.lastUse.Load()).Add(watchQuiet)); wait > 0 {
			timer.Reset(wait)
			select {
			case <-s.ctx.Done():
				return
			case <-timer.C:
			}
			continue
		}
		select {
		case <-s.ctx.Done():
			return
		case s.turn <- struct{}{}:
		}
		if s.ctx.Err() != nil {
			// The session ended while we waited: finish may already have
			// given the connection back, and it must not be touched.
			<-s.turn
			return
		}
		var err error
		if time.Since(time.Unix(0, s.lastUse.Load())) < watchQuiet {
			// A caller used the session while we waited for the turn.
		} else if !time.Now().Before(nextPing) {
			err = s.ping()
			nextPing = time.Now().Add(s.health)
		} else if s.holding() {
			err = s.listen(time.Until(nextPing))
		}
		<-s.turn // not giveTurn: the watcher's use does not count as the holder's
		if err != nil {
			s.lose(err)
			return
		}
	}
}

// minPingTimeout is the least time a health check waits for its answer, so
// that a short health interval on a busy machine does not end healthy
// sessions. keepaliveArgs keeps the server's bound above it.
const minPingTimeout = time.Second

// ping is one round trip, bounded by the health interval (at least
// minPingTimeout) with a socket deadline; a timeout closes the connection.
// A timeout is reported as such, not as a context error: the caller's
// context had nothing to do with it.
func (s *Session) ping() error {
	if s.ctx.Err() != nil {
		return nil
	}
	timeout := max(s.health, minPingTimeout)
	pg := s.pc.PgConn()
	nc := pg.Conn()
	if err := nc.SetDeadline(time.Now().Add(timeout)); err != nil {
		return err
	}
	err := pg.Ping(context.Background())
	if netErr := net.Error(nil); errors.As(err, &netErr) && netErr.Timeout() {
		return fmt.Errorf("no answer to a health check within %v (network cut or server stalled): %w", timeout, err)
	}
	if err != nil {
		return err
	}
	return nc.SetDeadline(time.Time{})
}

// listen reads from the connection for up to d, or until a caller wants
// the turn or the session ends, either of which sets a past read deadline
// (stopListen). It returns an error only when the connection is closed (a
// FATAL from the server, EOF, a network error).
func (s *Session) listen(d time.Duration) error {
	pg := s.pc.PgConn()
	nc := pg.Conn()
	s.listenMu.Lock()
	if s.waiting > 0 {
		s.listenMu.Unlock()
		return nil
	}
	if err := nc.SetReadDeadline(time.Now().Add(d)); err != nil {
		s.listenMu.Unlock()
		return err
	}
	s.listenStop = func() { _ = nc.SetReadDeadline(time.Unix(1, 0)) }
	s.listenMu.Unlock()
	stopEnd := context.AfterFunc(s.ctx, s.stopListen)

	err := pg.WaitForNotification(context.Background())

	stopEnd()
	s.listenMu.Lock()
	s.listenStop = nil // from here on, nothing sets a deadline on the connection
	s.listenMu.Unlock()
	if err != nil && pg.IsClosed() {
		return err
	}
	// A notification (pgx keeps it for the connection), or the read was
	// ended by its deadline: the connection is intact.
	return nc.SetReadDeadline(time.Time{})
}

// stopListen ends the watcher's read, if it is in one.
func (s *Session) stopListen() {
	s.listenMu.Lock()
	defer s.listenMu.Unlock()
	if s.listenStop != nil {
		s.listenStop()
	}
}
