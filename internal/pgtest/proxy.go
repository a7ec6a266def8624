package pgtest

import (
	"net"
	"sync"
)

// Proxy forwards TCP connections to a server until cut: from then on it
// silently drops every byte both ways and keeps both sockets open, like a
// network that stopped delivering packets (no RST, no FIN reaches either
// end). Close ends every connection, as the network coming back would let
// the server see the client's close. Tests use it to cut one client's
// connections without touching the server.
type Proxy struct {
	ln     net.Listener
	target string
	cut    chan struct{}
	once   sync.Once
	mu     sync.Mutex
	conns  []net.Conn
	closed bool // Close began
	wg     sync.WaitGroup
}

// NewProxy listens on a free loopback port and forwards every connection
// to target (host:port). It fails if it cannot listen.
func NewProxy(target string) (*Proxy, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	p := &Proxy{ln: ln, target: target, cut: make(chan struct{})}
	p.wg.Add(1)
	go p.serve()
	return p, nil
}

// Port is the loopback port the proxy listens on.
func (p *Proxy) Port() uint16 { return uint16(p.ln.Addr().(*net.TCPAddr).Port) }

func (p *Proxy) serve() {
	defer p.wg.Done()
	for {
		client, err := p.ln.Accept()
		if err != nil {
			return
		}
		select {
		case <-p.cut:
			client.Close()
			continue
		default:
		}
		srv, err := net.Dial("tcp", p.target)
		if err != nil {
			client.Close()
			continue
		}
		p.mu.Lock()
		if p.closed { // accepted while Close ran (pgconn's background cancel request)
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
func (p *Proxy) pipe(dst, src net.Conn) {
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

// Cut stops all traffic, silently, on every connection, present and
// future.
func (p *Proxy) Cut() { p.once.Do(func() { close(p.cut) }) }

// Close closes the listener and every connection, and waits for the
// proxy's goroutines. It may be called more than once.
func (p *Proxy) Close() {
	p.ln.Close()
	p.mu.Lock()
	p.closed = true
	for _, c := range p.conns {
		c.Close()
	}
	p.mu.Unlock()
	p.wg.Wait()
}
