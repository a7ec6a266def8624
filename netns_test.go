package advisory

import (
	"context"
	"errors"
	"fmt"
	"net"
	"runtime"
	"sync/atomic"
	"testing"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"golang.org/x/sys/unix"

	"github.com/seed0ad592b7/advisory/internal/pgtest"
)

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
