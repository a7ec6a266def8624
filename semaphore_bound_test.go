package advisory

import (
	"bytes"
	"context"
	"errors"
	"net"
	"regexp"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

// slowSemaphoreTry is a pgx tracer that delays a semaphore's first try (a
// slow link or a busy server); its dial records what the client sends, to
// read the length of every wait slice the server is asked for (slices are
// sent below pgx's tracer).
type slowSemaphoreTry struct {
	delay time.Duration
	mu    sync.Mutex
	sent  bytes.Buffer
}

func (s *slowSemaphoreTry) TraceQueryStart(ctx context.Context, _ *pgx.Conn, d pgx.TraceQueryStartData) context.Context {
	if d.SQL == semaphoreTrySQL {
		time.Sleep(s.delay) // the latency under test, not synchronisation
	}
	return ctx
}

func (*slowSemaphoreTry) TraceQueryEnd(context.Context, *pgx.Conn, pgx.TraceQueryEndData) {}

// dial is a pgconn DialFunc whose connections record what they send.
func (s *slowSemaphoreTry) dial(ctx context.Context, network, addr string) (net.Conn, error) {
	c, err := (&net.Dialer{}).DialContext(ctx, network, addr)
	return recordingConn{c, s}, err
}

type recordingConn struct {
	net.Conn
	s *slowSemaphoreTry
}

func (c recordingConn) Write(p []byte) (int, error) {
	c.s.mu.Lock()
	c.s.sent.Write(p)
	c.s.mu.Unlock()
	return c.Conn.Write(p)
}

// sliceLength finds a slice's lock_timeout in its DO block.
var sliceLength = regexp.MustCompile(`PERFORM set_config\('lock_timeout', '(\d+)ms', true\);\s+PERFORM pg_advisory_lock`)

// waited is the sum of the slices the server was asked to wait, and each.
func (s *slowSemaphoreTry) waited() (time.Duration, []time.Duration) {
	s.mu.Lock()
	defer s.mu.Unlock()
	var sum time.Duration
	var each []time.Duration
	for _, m := range sliceLength.FindAllSubmatch(s.sent.Bytes(), -1) {
		ms, _ := strconv.Atoi(string(m[1]))
		each = append(each, time.Duration(ms)*time.Millisecond)
		sum += each[len(each)-1]
	}
	return sum, each
}

// An AcquireSemaphore bound (WaitTimeout or ctx's deadline) counts from the
// call, its first try included, as Acquire's and LockTx's do (SPEC §2a, §9).
// With a first try of 700 ms and a bound of 1.5 s, the server is asked to
// wait at most what is left, about 800 ms, in slices (red before: 1.5 s, so
// WaitTimeout(1.5 s) returned after 2.2 s); and with a ctx deadline the
// last slice ends on the server in time, so nothing is cancelled and the
// server logs no ERROR (red before: the slice outlived deadlineGrace and
// was cancelled).
func TestSemaphoreBoundCountsTheFirstTry(t *testing.T) {
	e := newEnv(t)
	const (
		firstTry = 700 * time.Millisecond
		bound    = 1500 * time.Millisecond
		// slack covers the time between the call's start and the first
		// try, and between slices: a few round trips on loopback.
		slack = 150 * time.Millisecond
	)
	key := StringKey("semaphore-bound")
	holder, err := AcquireSemaphore(e.ctx, e.pool(), key, 1)
	must(t, err)
	defer func() { must(t, holder.Release(e.ctx)) }()
	for _, byDeadline := range []bool{false, true} {
		tr := &slowSemaphoreTry{delay: firstTry}
		pool := e.pool(func(c *pgxpool.Config) {
			c.ConnConfig.RuntimeParams["deadlock_timeout"] = "2s" // slices of 1 s
			c.ConnConfig.Tracer = tr
			c.ConnConfig.DialFunc = tr.dial
		})
		checkLog := noErrorLogged(t)
		ctx, opts := e.ctx, []Option{WaitTimeout(bound)}
		if byDeadline {
			var cancel context.CancelFunc
			ctx, cancel = context.WithTimeout(e.ctx, bound)
			defer cancel()
			opts = nil
		}
		l, err := AcquireSemaphore(ctx, pool, key, 1, opts...)
		if l != nil && l.Acquired() {
			t.Fatal("AcquireSemaphore took a slot that another holder has")
		}
		if !errors.Is(err, ErrTimeout) || errors.Is(err, context.DeadlineExceeded) != byDeadline {
			t.Errorf("deadline %v: AcquireSemaphore of a busy semaphore = %v; want ErrTimeout (and DeadlineExceeded: %v)", byDeadline, err, byDeadline)
		}
		switch w, each := tr.waited(); {
		case len(each) == 0:
			t.Errorf("deadline %v: no wait slice seen on the wire", byDeadline)
		case w > bound-firstTry+slack:
			t.Errorf("deadline %v: the server was asked to wait %v in slices %v after a first try of %v; want at most %v (the bound %v counts from the call)",
				byDeadline, w, each, firstTry, bound-firstTry+slack, bound)
		}
		checkLog()
	}
}
