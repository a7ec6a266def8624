package main

import (
	"io"
	"net"
	"net/url"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"

	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/seed0ad592b7/advisory"
	"github.com/seed0ad592b7/advisory/internal/pgtest"
)

// newStallProxy returns a pgtest.Proxy to the test server, closed when the
// test ends: Cut stalls it (every byte dropped, both sockets kept open).
func (e *env) newStallProxy() *pgtest.Proxy {
	e.t.Helper()
	u, err := url.Parse(e.dsn)
	if err != nil {
		e.t.Fatal(err)
	}
	p, err := pgtest.NewProxy(u.Host)
	if err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(p.Close)
	return p
}

// proxyDSN is the test server's DSN through p.
func (e *env) proxyDSN(p *pgtest.Proxy) string {
	u, err := url.Parse(e.dsn)
	if err != nil {
		e.t.Fatal(err)
	}
	u.Host = net.JoinHostPort("127.0.0.1", strconv.Itoa(int(p.Port())))
	return u.String()
}

// silentServer is a server that never answers a query: with startup
// false it accepts connections and answers nothing at all; with startup
// true it first completes each connection's startup (AuthenticationOk,
// ReadyForQuery), as a hung server or a pgbouncer with no server
// connection free behaves. It returns a DSN for it, closed when the test
// ends.
func (e *env) silentServer(startup bool) string {
	e.t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		e.t.Fatal(err)
	}
	var (
		wg     sync.WaitGroup
		mu     sync.Mutex
		conns  []net.Conn
		closed bool
	)
	serve := func(c net.Conn) {
		defer wg.Done()
		if startup {
			b := pgproto3.NewBackend(c, c)
			if _, err := b.ReceiveStartupMessage(); err != nil {
				return
			}
			b.Send(&pgproto3.AuthenticationOk{})
			b.Send(&pgproto3.ParameterStatus{Name: "server_version", Value: "15.0"})
			b.Send(&pgproto3.BackendKeyData{ProcessID: 1, SecretKey: []byte{0, 0, 0, 2}})
			b.Send(&pgproto3.ReadyForQuery{TxStatus: 'I'})
			_ = b.Flush()
		}
		_, _ = io.Copy(io.Discard, c) // never answered
	}
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			if closed { // accepted as the test ended
				c.Close()
			}
			conns = append(conns, c)
			wg.Add(1)
			mu.Unlock()
			go serve(c)
		}
	}()
	e.t.Cleanup(func() {
		ln.Close()
		mu.Lock()
		closed = true
		for _, c := range conns {
			c.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
	return "postgres://postgres@" + ln.Addr().String() + "/postgres?sslmode=disable"
}

// A waiting pglock whose connection stalls notices it, exits 1 and never
// runs CMD, instead of waiting forever while the server may grant the lock
// to a backend whose client will never run CMD.
func TestRunWaitNoticesStalledConnection(t *testing.T) {
	e := newEnv(t)
	key := advisory.StringKey("stall")
	holder := e.hold(key, false)
	proxy := e.newStallProxy()
	p := e.start(nil, "", "run", "--dsn", e.proxyDSN(proxy), "--key", "stall", "--", "touch", "ran")
	e.awaitHolders(key, 1, 1)
	proxy.Cut()
	e.unlockAll(holder) // the server may now grant the stalled waiter's backend
	e.wait(p)           // hang guard: testTimeout
	e.want(p, exitFailure)
	t.Logf("pglock exited %d %v after it started; stderr: %s", p.code, p.elapsed, p.stderr.String())
	if !strings.Contains(p.stderr.String(), "stalled") || fileExists(filepath.Join(e.dir, "ran")) {
		t.Errorf("stderr %q; want it to say the connection stalled, and CMD not run", p.stderr.String())
	}
	proxy.Close() // the server sees the stalled client go and frees what it held
}

// --timeout bounds connecting too: a server that accepts and never answers
// is a lock not acquired in time (75), not a failure after the 10 s
// connect timeout.
func TestRunTimeoutBoundsConnecting(t *testing.T) {
	e := newEnv(t)
	dsn := e.silentServer(false)
	p := e.pglock(nil, "run", "--dsn", dsn, "--key", "mute", "--timeout", "1", "--", "touch", "ran")
	e.want(p, exitConflict)
	t.Logf("pglock exited %d after %v; stderr: %s", p.code, p.elapsed, p.stderr.String())
	if !strings.Contains(p.stderr.String(), "--timeout 1s") || fileExists(filepath.Join(e.dir, "ran")) {
		t.Errorf("stderr %q; want the --timeout named, and CMD not run", p.stderr.String())
	}
}

// A waiter whose backend is terminated never held the lock: it says so,
// not that mutual exclusion was lost.
func TestRunWaiterTerminated(t *testing.T) {
	e := newEnv(t)
	key := advisory.StringKey("waiter")
	holder := e.hold(key, false)
	p := e.start(nil, "", "run", e.dsnArg(), "--key", "waiter", "--", "touch", "ran")
	var waiter int32
	for _, h := range e.awaitHolders(key, 1, 1) {
		if !h.Granted {
			waiter = h.PID
		}
	}
	var ok bool
	if err := e.conn().QueryRow(e.ctx, "SELECT pg_terminate_backend($1)", waiter).Scan(&ok); err != nil || !ok {
		t.Fatalf("pg_terminate_backend(%d) = %v, %v", waiter, ok, err)
	}
	e.wait(p)
	e.want(p, exitFailure)
	stderr := p.stderr.String()
	if strings.Contains(stderr, "mutual exclusion") || strings.Count(stderr, "\n") != 1 ||
		!strings.Contains(stderr, "while waiting") || fileExists(filepath.Join(e.dir, "ran")) {
		t.Errorf("stderr = %q; want one line saying the connection was lost while waiting, and CMD not run", stderr)
	}
	e.unlockAll(holder)
}
