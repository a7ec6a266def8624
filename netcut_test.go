package advisory

import (
	"context"
	"errors"
	"fmt"
	"net"
	"runtime"
	"strconv"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"golang.org/x/sys/unix"

	"github.com/seed0ad592b7/advisory/internal/pgtest"
)

// Two kinds of silent network cut, neither touching the host's network
// configuration:
//
//   - pgtest.Proxy, in process and without privileges: a TCP proxy between
//     client and server that stops forwarding. The client hears nothing;
//     the server does not notice either, but only because the proxy's
//     kernel still answers its keep-alives.
//   - netns, for root: a network namespace of the test's own, holding a
//     server of its own, whose loopback interface the test takes down.
//     Packets are then dropped for both ends, keep-alives included, as on
//     a real cut, so the server's side of the story can be observed too.

// newCutProxy returns a proxy to target (see pgtest.Proxy), closed when the
// test ends.
func newCutProxy(t *testing.T, target string) *pgtest.Proxy {
	t.Helper()
	p, err := pgtest.NewProxy(target)
	must(t, err)
	t.Cleanup(p.Close)
	return p
}

// A silent network cut (no packet delivered, no RST, no FIN): the holder is
// told its lock is lost (Done, Err = ErrLockLost) by the health check while
// the server, which has not noticed anything, still shows the lock held by
// the old backend. So the holder gives the lock up before the server can
// free it (SPEC §4). Release and later calls report ErrLockLost. The time
// to detection is logged, not asserted.
func TestSilentNetworkCut(t *testing.T) {
	e := newEnv(t)
	host, port := server.Host, server.Port
	proxy := newCutProxy(t, net.JoinHostPort(host, strconv.Itoa(port)))
	pool := e.pool(func(c *pgxpool.Config) {
		c.ConnConfig.Host = "127.0.0.1"
		c.ConnConfig.Port = proxy.Port()
	})
	const interval = 100 * time.Millisecond
	key, key2 := Int64Key(4711), PairKey(47, 11)
	lock, err := Acquire(e.ctx, pool, key, HealthInterval(interval))
	must(t, err)
	s, err := NewSession(e.ctx, pool, HealthInterval(interval))
	must(t, err)
	ok, err := s.Lock(e.ctx, key2)
	must(t, err)
	if !ok {
		t.Fatal("Session.Lock returned false")
	}
	var lockPID uint32
	must(t, lock.WithConn(e.ctx, func(c *pgx.Conn) error {
		return c.QueryRow(e.ctx, "SELECT pg_backend_pid()").Scan(&lockPID)
	}))

	proxy.Cut()
	start := time.Now()
	for what, done := range map[string]<-chan struct{}{"Lock": lock.Done(), "Session": s.Done()} {
		select {
		case <-done:
		case <-time.After(notHung - time.Since(start)):
			t.Fatalf("%s: Done not closed %v after a silent network cut", what, time.Since(start))
		}
	}
	t.Logf("a silent cut was noticed after %v with HealthInterval(%v)", time.Since(start).Round(time.Millisecond), interval)
	if !errors.Is(lock.Err(), ErrLockLost) || !errors.Is(s.Err(), ErrLockLost) {
		t.Errorf("Err after the cut: lock %v, session %v; want ErrLockLost", lock.Err(), s.Err())
	}
	// The server has not noticed: the old backend still holds the key.
	rows := e.lockRows(key)
	if len(rows) != 1 || rows[0].PID != lockPID || !rows[0].Granted {
		t.Errorf("server rows for %s after the holder gave up: %v; want still granted to pid %d", key, rows, lockPID)
	}

	_, err = s.Lock(context.Background(), Int64Key(1))
	if !errors.Is(err, ErrLockLost) {
		t.Errorf("Session.Lock after the cut: %v; want ErrLockLost", err)
	}
	if errors.Is(err, context.DeadlineExceeded) {
		// Reported, not asserted: the session's end reason (the health
		// check's ping timeout) is in the chain, although this call's
		// context has no deadline.
		t.Logf("note: Session.Lock after the cut also matches context.DeadlineExceeded: %v", err)
	}
	if err := lock.Release(e.ctx); !errors.Is(err, ErrLockLost) {
		t.Errorf("Release after the cut: %v; want ErrLockLost", err)
	}
	if err := s.Close(e.ctx); !errors.Is(err, ErrLockLost) {
		t.Errorf("Close after the cut: %v; want ErrLockLost", err)
	}
	// The network comes back: the server sees the closes and frees the
	// locks (newEnv's check awaits that). Until then pgxpool counts the
	// dead connections as acquired: pgx closes a connection that timed out
	// in the background, sending a cancel request first, which waits up to
	// 15 s for an answer that a cut network never brings.
	proxy.Close()
	awaitAcquired(t, pool, 0)
	e.awaitKeyFree(key)
	e.awaitKeyFree(key2)
}

// A silent network cut that both ends only learn of through their own
// timers (packets dropped both ways, keep-alives included): the holder steps
// down, and only after that does the server free the lock, which it does
// through the keep-alives the lock's session set. The cut takes down the
// loopback interface of a network namespace the test creates for a server
// of its own, so it needs root and the local PostgreSQL binaries; the
// test's own questions to that server go through its unix socket, which the
// cut does not touch. The times are logged, not asserted.
func TestNetworkCut(t *testing.T) {
	e, ns, pool := newCutEnv(t)
	const interval = 200 * time.Millisecond
	key := StringKey("cut")
	lock, err := Acquire(e.ctx, pool, key, HealthInterval(interval))
	must(t, err)

	must(t, ns.setLoopback(false))
	steppedDown, freedAfter := e.awaitFreedAfterStepDown(key, lock.Done(), time.Now())
	if !errors.Is(lock.Err(), ErrLockLost) {
		t.Errorf("Err() = %v; want ErrLockLost", lock.Err())
	}
	if err := lock.Release(e.ctx); !errors.Is(err, ErrLockLost) {
		t.Errorf("Release after the cut: %v; want ErrLockLost", err)
	}
	t.Logf("network cut: holder stepped down after %v, server freed the lock after %v (health interval %v)",
		steppedDown, freedAfter, interval)
	// The network comes back. Until then pgxpool counts the dead
	// connection as acquired: pgx closes it in the background, sending a
	// cancel request first, whose dial waits up to 15 s on a cut network.
	must(t, ns.setLoopback(true))
	awaitAcquired(t, pool, 0)
}

// newCutEnv starts a server of the test's own in a network namespace
// (newNetns), and returns the test's env on it, which reaches it through
// its unix socket (in the file system, reachable from any namespace, and
// untouched by a cut), the namespace, and a pool that connects through the
// namespace's loopback interface, which the test can take down.
func newCutEnv(t *testing.T) (*env, *netns, *pgxpool.Pool) {
	t.Helper()
	ns := newNetns(t)
	srv := ns.startServer(t)
	port := uint16(srv.Port)
	var socketDir string
	must(t, ns.query(srv.DSN, "SHOW unix_socket_directories", &socketDir))
	e := newEnvOn(t, &pgtest.Server{
		DSN: fmt.Sprintf("host=%s port=%d user=postgres dbname=postgres sslmode=disable", socketDir, port),
	})
	pool := e.pool(func(c *pgxpool.Config) {
		c.ConnConfig.Host, c.ConnConfig.Port, c.ConnConfig.Fallbacks = "127.0.0.1", port, nil
		c.ConnConfig.DialFunc = ns.dial
	})
	return e, ns, pool
}

// awaitFreedAfterStepDown waits until the server frees key after a cut at
// cut, and fails the test unless done (the holder's Done) had closed while
// the server still held key: the holder must step down first (SPEC §4). It
// returns when each happened after the cut.
func (e *env) awaitFreedAfterStepDown(key Key, done <-chan struct{}, cut time.Time) (steppedDown, freedAfter time.Duration) {
	e.t.Helper()
	heldWhenSteppedDown := false
	e.eventually("the server frees the cut holder's lock", func(c *pgx.Conn) (bool, error) {
		var n int
		classid, objid, objsubid := key.LockRow()
		err := c.QueryRow(context.Background(), `SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'
			AND classid::int8 = $1 AND objid::int8 = $2 AND objsubid = $3`, int64(classid), int64(objid), objsubid).Scan(&n)
		select {
		case <-done:
			if steppedDown == 0 {
				steppedDown = time.Since(cut).Round(time.Millisecond)
				heldWhenSteppedDown = n > 0
			}
		default:
		}
		if n == 0 {
			freedAfter = time.Since(cut).Round(time.Millisecond)
		}
		return n == 0, err
	})
	if steppedDown == 0 || !heldWhenSteppedDown {
		e.t.Errorf("the server freed the lock (after %v) before the holder stepped down (after %v; 0: not yet)",
			freedAfter, steppedDown)
	}
	return steppedDown, freedAfter
}

// netns is a network namespace of the test's own, with nothing in it but a
// loopback interface. It is removed when the test ends: the kernel drops a
// namespace once no process, socket or file refers to it, and the test
// stops the server it started there and closes the namespace's file.
type netns struct {
	fd   int         // an open /proc/thread-self/ns/net of the namespace
	down atomic.Bool // the loopback interface is down: dial fails at once
}

// newNetns creates the namespace with its loopback interface up. It fails
// the test, saying so, when the process may not create one (it needs root,
// or CAP_SYS_ADMIN and CAP_NET_ADMIN).
func newNetns(t *testing.T) *netns {
	t.Helper()
	fdc := make(chan int, 1)
	errc := make(chan error, 1)
	go func() {
		// Never unlocked: the thread leaves the host's namespace for good,
		// and the runtime ends it when this goroutine returns.
		runtime.LockOSThread()
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			errc <- fmt.Errorf("unshare(CLONE_NEWNET): %w", err)
			return
		}
		fd, err := unix.Open("/proc/thread-self/ns/net", unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			errc <- err
			return
		}
		fdc <- fd
	}()
	var ns *netns
	select {
	case fd := <-fdc:
		ns = &netns{fd: fd}
	case err := <-errc:
		t.Fatalf("this test needs root: it creates a network namespace of its own to cut a connection "+
			"without touching the host's network (run the tests as root, as CI does): %v", err)
	}
	t.Cleanup(func() { unix.Close(ns.fd) })
	if err := ns.setLoopback(true); err != nil {
		t.Fatalf("this test needs root: bringing up the loopback interface of its network namespace: %v", err)
	}
	return ns
}

// do runs f on an OS thread that has entered the namespace: a socket f
// makes belongs to the namespace, and so does a process f starts.
func (ns *netns) do(f func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread() // never unlocked, as in newNetns
		if err := unix.Setns(ns.fd, unix.CLONE_NEWNET); err != nil {
			errc <- fmt.Errorf("setns: %w", err)
			return
		}
		errc <- f()
	}()
	return <-errc
}

// setLoopback takes the namespace's loopback interface up or down. Down,
// every packet on it is dropped without a word to either end.
func (ns *netns) setLoopback(up bool) error {
	ns.down.Store(!up)
	return ns.do(func() error {
		fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			return err
		}
		defer unix.Close(fd)
		ifr, err := unix.NewIfreq("lo")
		if err != nil {
			return err
		}
		if err := unix.IoctlIfreq(fd, unix.SIOCGIFFLAGS, ifr); err != nil {
			return fmt.Errorf("SIOCGIFFLAGS lo: %w", err)
		}
		flags := ifr.Uint16()
		if up {
			flags |= unix.IFF_UP
		} else {
			flags &^= unix.IFF_UP
		}
		ifr.SetUint16(flags)
		if err := unix.IoctlIfreq(fd, unix.SIOCSIFFLAGS, ifr); err != nil {
			return fmt.Errorf("SIOCSIFFLAGS lo: %w", err)
		}
		return nil
	})
}

// dial is a pgconn.DialFunc that connects inside the namespace. While the
// loopback interface is down it fails at once, as an unreachable network
// would: otherwise the cancel request pgconn sends in the background when it
// closes the lost connection would wait in SYN retries for seconds after the
// network is back, outliving the test (goleak).
func (ns *netns) dial(ctx context.Context, network, addr string) (net.Conn, error) {
	if ns.down.Load() {
		return nil, errors.New("network unreachable: the test cut it")
	}
	var c net.Conn
	err := ns.do(func() (err error) {
		c, err = (&net.Dialer{}).DialContext(ctx, network, addr)
		return err
	})
	return c, err
}

// startServer starts a PostgreSQL of the test's own inside the namespace
// (the local binaries: a Docker or ADVISORY_TEST_DSN server cannot be put
// there), stopped when the test ends.
func (ns *netns) startServer(t *testing.T) *pgtest.Server {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
	defer cancel()
	var srv *pgtest.Server
	err := ns.do(func() (err error) {
		srv, err = pgtest.Start(ctx, pgtest.Options{Private: true})
		return err
	})
	if err != nil {
		t.Fatalf("starting a server in the test's network namespace: %v", err)
	}
	t.Cleanup(func() {
		if err := srv.Stop(); err != nil {
			t.Error(err)
		}
	})
	if srv.Source() != pgtest.SourceLocal {
		t.Fatalf("this test needs the local PostgreSQL binaries (initdb, pg_ctl) to start a server inside "+
			"its network namespace; got a %s server (stop Docker, or install postgresql)", srv.Source())
	}
	return srv
}

// query runs one single-value query on a connection made inside the
// namespace.
func (ns *netns) query(dsn, sql string, dst any) error {
	cfg, err := pgx.ParseConfig(dsn)
	if err != nil {
		return err
	}
	cfg.DialFunc = ns.dial
	ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
	defer cancel()
	c, err := pgx.ConnectConfig(ctx, cfg)
	if err != nil {
		return err
	}
	defer c.Close(ctx)
	return c.QueryRow(ctx, sql).Scan(dst)
}

// A silent network cut while a Session that holds a lock waits for another
// in one server-side wait (a Session that holds locks does not wait in
// slices, so that the deadlock detector sees it): the wait keeps the
// connection's turn, so the health watcher cannot ping, and the client
// hears nothing. A backend waiting on a lock does not read its socket, so
// the server keeps the held lock while the wait lasts; once the other
// holder lets the awaited key go, the backend finds its client gone and
// ends, freeing both. The holder must step down before that (SPEC §4). The
// times are logged, not asserted.
func TestNetworkCutDuringWaitWhileHolding(t *testing.T) {
	e, ns, pool := newCutEnv(t)
	other := e.conn() // through the unix socket: the cut does not touch it
	held, waited := StringKey("cut-held"), StringKey("cut-waited")
	if !e.tryFromKeep(other, waited) {
		t.Fatal("the other connection could not take the key")
	}
	const interval = 200 * time.Millisecond
	s, err := NewSession(e.ctx, pool, HealthInterval(interval))
	must(t, err)
	got, err := s.Lock(e.ctx, held)
	must(t, err)
	if !got {
		t.Fatal("Lock returned false")
	}
	result := make(chan error, 1)
	go func() {
		_, err := s.Lock(e.ctx, waited)
		result <- err
	}()
	e.awaitWaiters(1)

	must(t, ns.setLoopback(false))
	cut := time.Now()
	if _, err := other.Exec(e.ctx, "SELECT pg_advisory_unlock_all()"); err != nil {
		t.Fatal(err)
	}
	steppedDown, freedAfter := e.awaitFreedAfterStepDown(held, s.Done(), cut)
	t.Logf("cut during a wait while holding: holder stepped down after %v, server freed the lock after %v (health interval %v)",
		steppedDown, freedAfter, interval)
	if err := s.Close(e.ctx); !errors.Is(err, ErrLockLost) {
		t.Errorf("Close after the cut: %v; want ErrLockLost", err)
	}
	if err := <-result; !errors.Is(err, ErrLockLost) {
		t.Errorf("the wait cut by the network: %v; want ErrLockLost", err)
	}
	must(t, ns.setLoopback(true))
	awaitAcquired(t, pool, 0)
}
