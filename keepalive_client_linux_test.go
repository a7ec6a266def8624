package advisory

import (
	"context"
	"errors"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

// socketKeepalive reads the client socket's keep-alive options (those
// clientKeepalive sets) of the pool's one connection.
func socketKeepalive(t *testing.T, ctx context.Context, pool *pgxpool.Pool) [len(keepaliveOpts)]int {
	t.Helper()
	c, err := pool.Acquire(ctx)
	must(t, err)
	defer c.Release()
	var vals [len(keepaliveOpts)]int
	sc, err := netConn(c.Conn().PgConn().Conn()).(syscall.Conn).SyscallConn()
	must(t, err)
	must(t, sc.Control(func(fd uintptr) {
		for i, o := range keepaliveOpts {
			vals[i], err = syscall.GetsockoptInt(int(fd), o[0], o[1])
			must(t, err)
		}
	}))
	return vals
}

// The client socket's keep-alive, tightened while a session that holds a
// lock waits in one statement or runs a WithConn callback, is tightened
// then, and goes back to the pool as the pool lent it.
func TestClientKeepaliveTightenedAndPutBack(t *testing.T) {
	e := newEnv(t)
	pool := e.pool(func(c *pgxpool.Config) { c.MaxConns = 1 })
	lent := socketKeepalive(t, e.ctx, pool)
	for _, tc := range []struct {
		name string
		use  func(s *Session) error
	}{
		{"a wait for a second key", func(s *Session) error {
			_, err := s.Lock(e.ctx, StringKey("client-ka-2"))
			return err
		}},
		{"LockMany on a session that holds a lock", func(s *Session) error {
			_, err := s.LockMany(e.ctx, []Key{Int64Key(3), Int64Key(4)})
			return err
		}},
		{"a WithConn callback", func(s *Session) error {
			return s.WithConn(e.ctx, func(*pgx.Conn) error { return nil })
		}},
	} {
		s, err := NewSession(e.ctx, pool)
		must(t, err)
		if _, err := s.Lock(e.ctx, StringKey("client-ka-1")); err != nil {
			t.Fatal(err)
		}
		if s.ka.tried {
			t.Errorf("%s: the keep-alive was tightened by the first lock, which waits in slices", tc.name)
		}
		must(t, tc.use(s))
		if s.ka.client == nil {
			t.Errorf("%s: the client socket's keep-alive was not tightened", tc.name)
		}
		must(t, s.Close(e.ctx))
		if got := socketKeepalive(t, e.ctx, pool); got != lent {
			t.Errorf("%s: the pool's connection has keep-alive options %v afterwards; the pool lent it with %v", tc.name, got, lent)
		}
	}
}

// connKeepalive reads a connection's keep-alive socket options (those
// clientKeepalive sets), in keepaliveOpts order.
func connKeepalive(t *testing.T, c *pgx.Conn) [len(keepaliveOpts)]int {
	t.Helper()
	var vals [len(keepaliveOpts)]int
	sc, err := netConn(c.PgConn().Conn()).(syscall.Conn).SyscallConn()
	must(t, err)
	var gerr error
	must(t, sc.Control(func(fd uintptr) {
		for i, o := range keepaliveOpts {
			if vals[i], err = syscall.GetsockoptInt(int(fd), o[0], o[1]); err != nil {
				gerr = err
			}
		}
	}))
	must(t, gerr)
	return vals
}

// clientGivesUp is when Linux drops a connection whose peer went silent, by
// its keep-alive options: the time after the last packet received, and how
// many probes it sent by then. Its keep-alive timer runs after idle and
// then every interval; with TCP_USER_TIMEOUT set, it drops the connection
// at the first run that finds the user timeout passed and a probe sent,
// otherwise once count probes went unanswered (tcp(7), tcp_keepalive_timer).
func clientGivesUp(idle, interval, count, userTimeoutMS int) (after time.Duration, probes int) {
	at := idle
	for {
		switch {
		case userTimeoutMS > 0 && at*1000 >= userTimeoutMS && probes > 0:
			return time.Duration(at) * time.Second, probes
		case userTimeoutMS == 0 && probes >= count:
			return time.Duration(at) * time.Second, probes
		}
		probes++
		at += interval
	}
}

// A session's client socket, tightened during a wait and during a WithConn
// callback on a session that holds locks, tolerates one lost keep-alive
// probe (it sends at least two before it gives up), and still gives up on
// a silent peer at least a second before the server, by the keep-alives
// the session set there, can free the locks: the server hears a healthy
// client at most one of its idle times before the cut, so it drops the
// client at least interval × count after the cut (SPEC §4). Red before:
// one probe, and with TCP_USER_TIMEOUT a tie with the server's bound.
func TestClientKeepaliveToleratesALostProbe(t *testing.T) {
	e := newEnv(t)
	for _, h := range []time.Duration{50 * time.Millisecond, time.Second, 1500 * time.Millisecond, 3 * time.Second} {
		s, err := NewSession(e.ctx, e.pool(), HealthInterval(h))
		must(t, err)
		for _, k := range []Key{StringKey("client-probes-1"), StringKey("client-probes-2")} {
			_, err := s.Lock(e.ctx, k) // the second waits in one statement: TCP_USER_TIMEOUT set
			must(t, err)
		}
		must(t, s.takeTurn(e.ctx))
		duringWait := connKeepalive(t, s.pc)
		s.giveTurn()
		var server keepalives
		var duringCallback [len(keepaliveOpts)]int
		must(t, s.WithConn(e.ctx, func(c *pgx.Conn) error {
			duringCallback = connKeepalive(t, c)
			server = showKeepalives(t, e.ctx, c)
			return nil
		}))
		must(t, s.Close(e.ctx))
		sInterval, err1 := strconv.Atoi(server[1])
		sCount, err2 := strconv.Atoi(server[2])
		must(t, errors.Join(err1, err2))
		serverFrees := time.Duration(sInterval*sCount) * time.Second // at the earliest, after the cut
		for what, o := range map[string][len(keepaliveOpts)]int{"a wait": duringWait, "a WithConn callback": duringCallback} {
			if o[0] == 0 {
				t.Errorf("h %v, %s: keep-alive off on the client socket", h, what)
				continue
			}
			after, probes := clientGivesUp(o[1], o[2], o[3], o[4])
			if probes < 2 {
				t.Errorf("h %v, %s: the client gives up after %d keep-alive probe (options %v): one lost probe ends the session", h, what, probes, o)
			}
			if after+time.Second > serverFrees {
				t.Errorf("h %v, %s: the client gives up %v after the cut at the latest, the server may free the locks %v after it (keep-alives %v): want the client a second earlier",
					h, what, after, serverFrees, server)
			}
		}
	}
}
