package advisory

import (
	"context"
	"strconv"
	"time"

	"github.com/jackc/pgx/v5"
)

// keepalive is the TCP keep-alive of a session's connection. Its rule: what
// a session sets on its connection's keep-alives it puts back before the
// connection leaves it. The server's end is set by the statement that takes
// the session's first hold (or by setKeepalives) and reset by the one that
// releases its last (finish); the client's socket is tightened before a
// statement that may last (keepClientAlive) and restored by finish.
// Guarded by the session's turn: every reader and writer holds it (the lock
// paths also happen to set on beside the hold they record under the
// Session's mu, which on does not need).
type keepalive struct {
	args []any // the server's settings for this health interval (keepaliveArgs); shared, never changed
	on   bool  // the server's are set; the session's end resets them
	// client is the client socket's keep-alive as the session found it,
	// once keepClientAlive has tightened it (nil: not yet, or not a TCP
	// socket); tried says it tried.
	client *clientKeepalive
	tried  bool
}

// setKeepalives sets the session's keep-alives, which stay in force until
// it ends. The caller holds the turn.
func (s *Session) setKeepalives(ctx context.Context) error {
	err := s.run(ctx, true, func(ctx context.Context, c *pgx.Conn) error {
		_, err := c.Exec(ctx, keepaliveSetSQL, s.ka.args...)
		return err
	})
	if err == nil {
		s.ka.on = true
	}
	return err
}

// keepClientAlive tightens the client socket's keep-alive (see
// clientKeepalive) before a statement that may last runs on a session that
// holds locks: a wait in one statement, or a WithConn callback. Once per
// session; finish puts it back before the connection returns to the pool.
// userTimeout sets TCP_USER_TIMEOUT too (a wait statement of the library's
// own), or puts it back (a WithConn callback; see clientKeepalive). The
// caller holds the turn.
func (s *Session) keepClientAlive(userTimeout bool) {
	if !s.ka.tried {
		s.ka.tried = true
		s.ka.client = tightenClientKeepalive(s.pc.PgConn().Conn(), s.health)
	}
	s.ka.client.userTimeout(userTimeout)
}

// defaultKeepalive is keepaliveArgs(DefaultHealthInterval), computed once:
// sessions share it and never change it.
var defaultKeepalive = keepaliveArgs(DefaultHealthInterval)

// keepaliveFor is keepaliveArgs(h), shared for the default interval.
func keepaliveFor(h time.Duration) []any {
	if h == DefaultHealthInterval {
		return defaultKeepalive
	}
	return keepaliveArgs(h)
}

// keepaliveArgs returns the keep-alive values (firstTrySQL's last arguments) for a session checked every
// health interval h. With s = secs(h) (h in whole seconds, rounded up, at
// least 1):
//
//   - The holder steps down within h + max(h, 1 s) of a silent cut through
//     its health checks (a check every h, each allowed max(h, 1 s) to
//     answer), at most 2s; and within 3s during a statement that keeps the
//     checks out, through its socket's own keep-alive (clientKeepalive:
//     probes after s of silence, s apart, two of them, so one lost probe
//     is tolerated): 3s after the last packet it got, which came before
//     the cut.
//   - The server probes after s of silence, s apart, and drops the client
//     when four probes went unanswered (tcp_user_timeout, 5s, bounds
//     unacknowledged data the same way): 5s after the last packet it got.
//     A healthy client answers every probe, so that packet came at most s
//     before the cut, and the server frees the locks at least 4s after the
//     cut (at most 5s after it: 5 s for h = 1 s).
//
// So the server frees the locks at least s (one second or more) after the
// holder stepped down, and up to three of its own probes may be lost.
func keepaliveArgs(h time.Duration) []any {
	idle, interval, count := secs(h), secs(h), serverProbes
	userTimeoutMS := (idle + interval*count) * 1000
	return []any{strconv.Itoa(idle), strconv.Itoa(interval), strconv.Itoa(count), strconv.Itoa(userTimeoutMS)}
}

// serverProbes and clientProbes are how many keep-alive probes in a row
// must go unanswered before the server, and the client during a statement
// that keeps the health checks out, drop the connection (see keepaliveArgs
// for why the server's must exceed the client's by at least two).
const (
	serverProbes = 4
	clientProbes = 2
)

// secs is d in whole seconds, rounded up, at least 1 and at most
// maxKeepaliveSecs: the unit and range of TCP keep-alive settings.
func secs(d time.Duration) int {
	return int(min(max(1, (d+time.Second-1)/time.Second), maxKeepaliveSecs))
}

// maxKeepaliveSecs is the longest keep-alive time Linux accepts
// (TCP_KEEPIDLE, TCP_KEEPINTVL: 32767 s, about 9 days); the server
// ignores a longer one with a log line, and a longer health interval's
// tcp_user_timeout would overflow its int milliseconds. Keep-alive times
// are clamped to it: for a HealthInterval over about 4.5 hours the server
// drops a silent client after at most about 45 hours (five intervals: keepaliveArgs), which may be before
// a holder that checks so rarely notices a network cut (HealthInterval
// says so).
const maxKeepaliveSecs = 32767
