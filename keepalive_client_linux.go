package advisory

import (
	"net"
	"syscall"
	"time"
)

// clientKeepalive is the TCP keep-alive of the client's end of a session's
// connection, tightened while a statement that may last runs on a session
// that holds locks (see Session.keepClientAlive), with the settings it had
// before, to put back.
//
// Such a statement keeps the connection's turn, so the health watcher cannot
// ping, and on a silent network cut the client hears nothing; the waiting
// backend does not read its socket either, so the server keeps the locks,
// until the wait or the statement ends and the backend finds its client
// gone. Then the server frees them (its keep-alives, set by the session,
// have long declared the socket dead), while the client, left to its
// dialer's settings (Go's: nine probes 15 s apart after 15 s), would
// believe it held them for minutes more.
//
// With these settings, s = secs(h): the client's kernel probes after s of
// silence, then every s, and declares the connection dead when
// clientProbes (2) probes in a row went unanswered: 3s after the last
// packet it got, which came before the cut, so within 3s of the cut; one
// lost probe (or its lost answer) is forgiven. The server (keepaliveArgs)
// probes after s of silence, every s, and gives up after serverProbes (4):
// it heard the client last at most s before the cut (a healthy client
// answers its probes), so it frees the locks at least 4s after the cut,
// at least s after the holder stepped down. With one probe (as before) a
// single lost probe during a long statement ended the session: a loss the
// holder was told of, but a needless one, and likely on a lossy link when
// a statement lasts many intervals (a probe every s).
//
// Measured (TestNetworkCutDuringWaitWhileHolding, HealthInterval 200 ms,
// loaded machine): holder out after 2.9 s, server free after 5.6 s; with
// one probe and the server's two it was 2.0 s and 3.4 s. The price of the
// forgiven probe and the margin: a silent client's locks are freed up to
// 2 s later (5 s instead of 3 s for short intervals, 4 s for 1 s).
//
// TCP_USER_TIMEOUT ((clientProbes+1)·s, 3s) also ends the connection when
// the statement itself went unacknowledged (the cut came as it was sent);
// with keep-alive on, Linux lets it decide when probes have failed
// (tcp(7)), so it leaves room for clientProbes probes. It is set only
// around the library's own wait statements (userTimeout), never while a
// WithConn callback runs: it also bounds data held back by the server's
// closed receive window (tcp(7)), so a callback's COPY whose server is slow
// to read (its first row waits on another transaction) would end a healthy
// connection.
type clientKeepalive struct {
	sock   syscall.RawConn
	saved  [len(keepaliveOpts)]int
	secs   int  // the tightened keep-alive's idle time and interval
	userTO bool // TCP_USER_TIMEOUT is set (userTimeout)
}

// tcpUserTimeout is Linux's TCP_USER_TIMEOUT (linux/tcp.h), which package
// syscall does not name.
const tcpUserTimeout = 18

// keepaliveOpts are the socket options clientKeepalive sets and puts back.
var keepaliveOpts = [...][2]int{
	{syscall.SOL_SOCKET, syscall.SO_KEEPALIVE},
	{syscall.IPPROTO_TCP, syscall.TCP_KEEPIDLE},
	{syscall.IPPROTO_TCP, syscall.TCP_KEEPINTVL},
	{syscall.IPPROTO_TCP, syscall.TCP_KEEPCNT},
	{syscall.IPPROTO_TCP, tcpUserTimeout}, // last: set apart, by userTimeout
}

// tightenClientKeepalive tightens nc's keep-alive for health interval h and
// returns what to put back, or nil if nc is not a TCP socket (a unix
// socket, a DialFunc's own net.Conn) or its options cannot be read.
func tightenClientKeepalive(nc net.Conn, h time.Duration) *clientKeepalive {
	tc, ok := netConn(nc).(*net.TCPConn)
	if !ok {
		return nil
	}
	sock, err := tc.SyscallConn()
	if err != nil {
		return nil
	}
	k := &clientKeepalive{sock: sock, secs: secs(h)}
	if !k.control(func(fd int) error {
		for i, o := range keepaliveOpts {
			v, err := syscall.GetsockoptInt(fd, o[0], o[1])
			if err != nil {
				return err
			}
			k.saved[i] = v
		}
		tight := k.saved
		tight[0], tight[1], tight[2], tight[3] = 1, k.secs, k.secs, clientProbes
		return setsockopts(fd, tight)
	}) {
		return nil
	}
	return k
}

// userTimeout sets TCP_USER_TIMEOUT to (clientProbes+1)·secs(h) (on), the
// time the keep-alive takes to give up, or puts it back
// (off), if it is not so already; nil does nothing.
func (k *clientKeepalive) userTimeout(on bool) {
	if k == nil || k.userTO == on {
		return
	}
	v := k.saved[len(keepaliveOpts)-1]
	if on {
		v = (clientProbes + 1) * k.secs * 1000
	}
	o := keepaliveOpts[len(keepaliveOpts)-1]
	if k.control(func(fd int) error { return syscall.SetsockoptInt(fd, o[0], o[1], v) }) {
		k.userTO = on
	}
}

// restore puts the settings back; nil does nothing.
func (k *clientKeepalive) restore() {
	if k != nil {
		k.control(func(fd int) error { return setsockopts(fd, k.saved) })
	}
}

// control runs f on the socket's descriptor, and reports whether it could
// and f succeeded.
func (k *clientKeepalive) control(f func(fd int) error) bool {
	var err error
	cerr := k.sock.Control(func(fd uintptr) { err = f(int(fd)) })
	return cerr == nil && err == nil
}

func setsockopts(fd int, values [len(keepaliveOpts)]int) error {
	for i, o := range keepaliveOpts {
		if err := syscall.SetsockoptInt(fd, o[0], o[1], values[i]); err != nil {
			return err
		}
	}
	return nil
}
