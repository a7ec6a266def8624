package advisory

import (
	"net"
	"os"
	"sync/atomic"
	"syscall"
	"time"
)

// readiness tells the health watcher that its session's socket has
// something to read, without reading it: an epoll instance of the
// session's own that watches that one socket. The watcher waits on the
// epoll instance through Go's poller, so the wait holds no thread and no
// connection. The registration is one-shot: it reports once and is then
// off until armed again, so input that a caller reads never wakes the
// watcher, and a closed socket cannot wake it in a loop.
//
// arm and disarm are called under the session's turn; wait only by the
// watcher; close by anyone, any number of times. After close every method
// does nothing: the epoll descriptor is owned by an os.File, and the socket's
// by its net.Conn, so neither number is used once its file is closed (and
// so never names another file). All methods do nothing on a nil readiness.
type readiness struct {
	ep    *os.File        // the epoll instance
	epc   syscall.RawConn // ep's descriptor
	sock  syscall.RawConn // the socket's descriptor
	armed bool            // the registration reports input; guarded by the turn

	// ctl's request, its result and its two callbacks, made once so that
	// arming and disarming (once per turn) allocate nothing; used under
	// the turn, or before the readiness is published.
	op         int
	event      syscall.EpollEvent
	epfd       uintptr
	err        error
	onEp, onSk func(uintptr)
}

// newReadiness returns a readiness for nc's socket, or nil if nc is not a
// socket (a DialFunc's own net.Conn) or epoll cannot be had.
func newReadiness(nc net.Conn) *readiness {
	sc, ok := netConn(nc).(syscall.Conn)
	if !ok {
		return nil
	}
	sock, err := sc.SyscallConn()
	if err != nil {
		return nil
	}
	fd, err := syscall.EpollCreate1(syscall.EPOLL_CLOEXEC)
	if err != nil {
		return nil
	}
	if err := syscall.SetNonblock(fd, true); err != nil {
		syscall.Close(fd)
		return nil
	}
	ep := os.NewFile(uintptr(fd), "advisory health watcher")
	r := &readiness{ep: ep, sock: sock}
	r.onEp = func(ep uintptr) {
		r.epfd = ep
		if err := r.sock.Control(r.onSk); r.err == nil {
			r.err = err
		}
	}
	r.onSk = func(s uintptr) { r.err = syscall.EpollCtl(int(r.epfd), r.op, int(s), &r.event) }
	if r.epc, err = ep.SyscallConn(); err != nil || ep.SetReadDeadline(time.Time{}) != nil ||
		r.ctl(syscall.EPOLL_CTL_ADD, syscall.EPOLLONESHOT) != nil {
		ep.Close() // no deadline: Go's poller does not take the descriptor
		return nil
	}
	return r
}

// readinessCalls counts the epoll_ctl calls of every readiness, for tests
// to check that quick turns make none.
var readinessCalls atomic.Int64

// ctl changes the socket's registration.
func (r *readiness) ctl(op int, events uint32) error {
	readinessCalls.Add(1)
	r.op, r.event, r.err = op, syscall.EpollEvent{Events: events}, nil
	if err := r.epc.Control(r.onEp); r.err == nil {
		r.err = err
	}
	return r.err
}

// arm makes the registration report input, the end of the stream or an
// error, once. It reports at once what is already there.
func (r *readiness) arm() {
	if r == nil || r.armed {
		return
	}
	r.armed = r.ctl(syscall.EPOLL_CTL_MOD, syscall.EPOLLIN|syscall.EPOLLRDHUP|syscall.EPOLLONESHOT) == nil
}

// disarm stops the registration reporting input.
func (r *readiness) disarm() {
	if r == nil || !r.armed {
		return
	}
	r.armed = false
	_ = r.ctl(syscall.EPOLL_CTL_MOD, syscall.EPOLLONESHOT) // a closed socket leaves nothing to report
}

// unarmed reports whether r exists and its registration is not armed.
func (r *readiness) unarmed() bool { return r != nil && !r.armed }

// wait returns true when the registration reported, false when deadline
// passed or r was closed.
func (r *readiness) wait(deadline time.Time) bool {
	if r.ep.SetReadDeadline(deadline) != nil {
		return false
	}
	var events [1]syscall.EpollEvent
	reported := false
	err := r.epc.Read(func(ep uintptr) bool {
		n, err := syscall.EpollWait(int(ep), events[:], 0)
		reported = n > 0
		return reported || (err != nil && err != syscall.EINTR)
	})
	return reported && err == nil
}

// close ends a wait in progress and frees the epoll instance, which drops
// the registration.
func (r *readiness) close() {
	if r != nil {
		r.ep.Close()
	}
}

// netConn is the connection under nc's TLS, if any.
func netConn(nc net.Conn) net.Conn {
	for {
		u, ok := nc.(interface{ NetConn() net.Conn }) // *tls.Conn
		if !ok {
			return nc
		}
		nc = u.NetConn()
	}
}
