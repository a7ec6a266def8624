package advisory

import (
	"context"
	"errors"
	"net"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

// cutProxy forwards TCP connections to the server until cut: from then on
// it silently drops every byte both ways and keeps both sockets open, like
// a network that stopped delivering packets (no RST, no FIN reaches the
// server). Close ends every connection, as the network coming back would
// let the server see the client's close.
type cutProxy struct {
	ln     net.Listener
	target string
	cut    chan struct{}
	once   sync.Once
	mu     sync.Mutex
	conns  []net.Conn
	closed bool // Close began: a connection accepted meanwhile is closed at once
	wg     sync.WaitGroup
}

func newCutProxy(t *testing.T, target string) *cutProxy {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	must(t, err)
	p := &cutProxy{ln: ln, target: target, cut: make(chan struct{})}
	p.wg.Add(1)
	go p.serve()
	t.Cleanup(p.Close)
	return p
}

func (p *cutProxy) port() uint16 { return uint16(p.ln.Addr().(*net.TCPAddr).Port) }

func (p *cutProxy) serve() {
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
		if p.closed {
			p.mu.Unlock()
			client.Close()
			srv.Close()
			continue
		}
		p.conns = append(p.conns, client, srv)
		p.mu.Unlock()
		p.wg.Add(2)
		go p.pipe(srv, client)
		go p.pipe(client, srv)
	}
}

// pipe copies src to dst until cut, then drops what it reads. An end of
// src is passed on to dst only before the cut.
func (p *cutProxy) pipe(dst, src net.Conn) {
	defer p.wg.Done()
	buf := make([]byte, 32<<10)
	for {
		n, err := src.Read(buf)
		select {
		case <-p.cut:
			if err != nil {
				return // the other side never hears of it
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

// Cut stops all traffic, silently.
func (p *cutProxy) Cut() { p.once.Do(func() { close(p.cut) }) }

// Close closes the listener and every connection, and waits for the
// proxy's goroutines.
func (p *cutProxy) Close() {
	p.ln.Close()
	p.mu.Lock()
	p.closed = true
	for _, c := range p.conns {
		c.Close()
	}
	p.mu.Unlock()
	p.wg.Wait()
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
		c.ConnConfig.Port = proxy.port()
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
		case <-e.ctx.Done():
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
	awaitNoAcquired(t, pool)
}
