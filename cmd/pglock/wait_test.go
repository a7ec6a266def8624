package main

import (
	"net"
	"net/url"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/seed0ad592b7/advisory"
)

// stallProxy forwards TCP connections to the test server until stalled:
// from then on it silently drops every byte both ways and keeps both
// sockets open, like a network that stopped delivering packets or a server
// that stopped answering. Close ends every connection, so that the server
// sees its clients go. (The root package's netcut_test.go has the same
// proxy; test files cannot be shared across packages.)
type stallProxy struct {
	ln      net.Listener
	target  string
	stalled chan struct{}
	once    sync.Once
	mu      sync.Mutex
	conns   []net.Conn
	wg      sync.WaitGroup
}

func (e *env) newStallProxy() *stallProxy {
	e.t.Helper()
	u, err := url.Parse(e.dsn)
	if err != nil {
		e.t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		e.t.Fatal(err)
	}
	p := &stallProxy{ln: ln, target: u.Host, stalled: make(chan struct{})}
	p.wg.Add(1)
	go p.serve()
	e.t.Cleanup(p.Close)
	return p
}

// dsn is the test server's DSN through the proxy.
func (p *stallProxy) dsn(e *env) string {
	u, err := url.Parse(e.dsn)
	if err != nil {
		e.t.Fatal(err)
	}
	u.Host = p.ln.Addr().String()
	return u.String()
}

func (p *stallProxy) serve() {
	defer p.wg.Done()
	for {
		client, err := p.ln.Accept()
		if err != nil {
			return
		}
		srv, err := net.Dial("tcp", p.target)
		if err != nil {
			client.Close()
			continue
		}
		p.mu.Lock()
		p.conns = append(p.conns, client, srv)
		p.mu.Unlock()
		p.wg.Add(2)
		go p.pipe(srv, client)
		go p.pipe(client, srv)
	}
}

// pipe copies src to dst until stalled, then drops what it reads.
func (p *stallProxy) pipe(dst, src net.Conn) {
	defer p.wg.Done()
	buf := make([]byte, 32<<10)
	for {
		n, err := src.Read(buf)
		select {
		case <-p.stalled:
			if err != nil {
				return
			}
			continue
		default:
		}
		if n > 0 {
			if _, werr := dst.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			dst.Close()
			return
		}
	}
}

// Stall stops all traffic, silently.
func (p *stallProxy) Stall() { p.once.Do(func() { close(p.stalled) }) }

// Close closes the listener and every connection, and waits for the
// proxy's goroutines.
func (p *stallProxy) Close() {
	p.ln.Close()
	p.mu.Lock()
	for _, c := range p.conns {
		c.Close()
	}
	p.mu.Unlock()
	p.wg.Wait()
}

// A waiting pglock whose connection stalls notices it, exits 1 and never
// runs CMD, instead of waiting forever while the server may grant the lock
// to a backend whose client will never run CMD.
func TestRunWaitNoticesStalledConnection(t *testing.T) {
	e := newEnv(t)
	key := advisory.StringKey("stall")
	holder := e.hold(key, false)
	proxy := e.newStallProxy()
	p := e.start(nil, "", "run", "--dsn", proxy.dsn(e), "--key", "stall", "--", "touch", "ran")
	e.awaitHolders(key, 1, 1)
	proxy.Stall()
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
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var (
		wg    sync.WaitGroup
		mu    sync.Mutex
		conns []net.Conn
	)
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns = append(conns, c) // never answered
			mu.Unlock()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		wg.Wait()
		for _, c := range conns {
			c.Close()
		}
	})
	dsn := "postgres://postgres@" + ln.Addr().String() + "/postgres?sslmode=disable"
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
