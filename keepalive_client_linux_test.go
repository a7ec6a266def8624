package advisory

import (
	"context"
	"syscall"
	"testing"

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
		if s.kaTried {
			t.Errorf("%s: the keep-alive was tightened by the first lock, which waits in slices", tc.name)
		}
		must(t, tc.use(s))
		if s.clientKA == nil {
			t.Errorf("%s: the client socket's keep-alive was not tightened", tc.name)
		}
		must(t, s.Close(e.ctx))
		if got := socketKeepalive(t, e.ctx, pool); got != lent {
			t.Errorf("%s: the pool's connection has keep-alive options %v afterwards; the pool lent it with %v", tc.name, got, lent)
		}
	}
}
