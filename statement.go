package advisory

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
)

// Timeouts of the library's own statements and clean-up.
const (
	// cleanupTimeout bounds an unlock, Close or Release, which do not obey
	// the caller's context (they must run even when it is cancelled). When
	// it passes, the connection is closed instead, which also ends its locks.
	cleanupTimeout = 5 * time.Second
	// cancelRequestTimeout bounds sending a cancel request; if it cannot be
	// sent, the connection is closed instead.
	cancelRequestTimeout = 2 * time.Second
	// cancelGrace is how long a cancelled statement may take to return
	// before its connection is closed under it.
	cancelGrace = 2 * time.Second
	// cancelRetry is how often a cancel request is sent again while its
	// statement runs on: a cancel that reaches the backend before the
	// statement itself (it travels on a connection of its own) is dropped.
	cancelRetry = 200 * time.Millisecond
)

// statement is the statement in flight on a session's connection. Its
// rule: a statement is interrupted only by a cancel request that names it,
// never by a context, and its connection is closed if it will not stop. So
// a cancel reaches no later statement, and a cancelled wait leaves the
// connection (and the session's locks) alive. A try (runTry), which never
// waits on the server, is not interrupted at all: its connection is
// closed if it does not answer in time.
type statement struct {
	pc  *pgx.Conn
	end context.Context // the session's: its end interrupts a statement begun untilEnd

	mu       sync.Mutex
	gen      uint64      // counts statements; an interrupt names the one it is for
	inFlight bool        // a statement (or WithConn callback) is running
	untilEnd bool        // the session's end interrupts the statement in flight
	stopper  *time.Timer // sends the cancel again, or closes the connection if it hangs (or closeLate's)
	// closedLate: closeLate closed the connection under the statement in
	// flight.
	closedLate bool
	// cleanupSince is when the clean-up statement in flight began (zero
	// for any other statement): one that runs for cleanupTimeout is
	// interrupted (interruptOverdue, from overdue.go's one timer).
	cleanupSince time.Time
}

// run runs f on the connection; the caller holds the session's turn. f
// gets a context that is never cancelled: when ctx ends (or, if untilEnd,
// when the session starts ending) the statement is interrupted, and if
// cleanup it is also interrupted once it has run for cleanupTimeout. It
// allocates nothing to watch a ctx that cannot end (context.Background) or
// the session's end (interruptForEnd interrupts the statement in flight
// itself), and sets no timer of its own for the timeout (overdue.go).
func (st *statement) run(ctx context.Context, untilEnd, cleanup bool, f func(context.Context, *pgx.Conn) error) error {
	gen := st.begin(untilEnd, cleanup)
	fctx := ctx
	if ctx.Done() != nil {
		stop := context.AfterFunc(ctx, func() { st.interrupt(gen) })
		defer stop()
		fctx = context.WithoutCancel(ctx)
	}
	err := f(fctx, st.pc)
	st.ended(cleanup)
	return err
}

// runTry runs f, a statement that never waits on the server (a lock's
// first try), on the connection; the caller holds the session's turn.
// Neither ctx's end nor the session's interrupts it: a cancel request
// would write the statement to the server log as an ERROR, and it answers
// in one round trip unless the server or the network holds it up. If it
// has not answered tryGrace after ctx ended, its connection is closed
// (which ends the statement, and whatever it took on the server), and its
// error then wraps ctx's cause; pgx then sends a cancel request of its
// own (pgconn's asyncClose), which the server logs if the statement is
// still held up when it lands. f gets a context that is never cancelled,
// with ctx's values.
func (st *statement) runTry(ctx context.Context, f func(context.Context, *pgx.Conn) error) error {
	gen := st.begin(false, false)
	fctx := ctx
	if ctx.Done() != nil {
		stop := context.AfterFunc(ctx, func() { st.closeLate(gen) })
		defer stop()
		fctx = context.WithoutCancel(ctx) // its values reach pgx's tracer
	}
	err := f(fctx, st.pc)
	if st.ended(false) {
		err = fmt.Errorf("%w; the try in flight had not answered %v later (a server or network held up), so its connection was closed: %w",
			context.Cause(ctx), time.Duration(tryGrace.Load()), err)
	}
	return err
}

// runTryOn runs f, a statement that never waits on the server, on c, a
// connection that is not a Session's (a LockTx's transaction, DoTx's
// waiting one), as runTry does: ctx's end does not interrupt it, whatever
// context handler c's pool has, but if it has not answered tryGrace
// later, c is closed. It sends nothing if ctx is already done.
func runTryOn(ctx context.Context, c *pgx.Conn, f func(context.Context, *pgx.Conn) error) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if ctx.Done() == nil {
		return f(ctx, c)
	}
	st := &statement{pc: c}
	return st.runTry(ctx, f)
}

// begin marks a statement in flight and returns its number (see run).
func (st *statement) begin(untilEnd, cleanup bool) (gen uint64) {
	st.mu.Lock()
	st.gen++
	gen = st.gen
	st.inFlight, st.untilEnd, st.closedLate = true, untilEnd, false
	st.cleanupSince = time.Time{}
	if cleanup {
		st.cleanupSince = time.Now()
		cleanupStarted(st, st.cleanupSince)
	}
	st.mu.Unlock()
	if untilEnd && st.end.Err() != nil { // the end came just before inFlight was set
		go st.interrupt(gen)
	}
	return gen
}

// ended marks the statement begun by begin as ended, after an interrupt
// already under way, so that its cancel request cannot reach a later
// statement. It reports whether closeLate closed the connection under it.
func (st *statement) ended(cleanup bool) (closedLate bool) {
	st.mu.Lock()
	defer st.mu.Unlock()
	st.inFlight = false
	if cleanup {
		cleanupEnded(st)
	}
	if st.stopper != nil {
		st.stopper.Stop()
		st.stopper = nil
	}
	return st.closedLate
}

// tryGrace is how long a try (runTry) in flight when its ctx ends may take
// to answer before its connection is closed, in nanoseconds: deadlineGrace,
// which tests lengthen to see a held-up try answer after its ctx ended.
var tryGrace atomic.Int64

func init() { tryGrace.Store(int64(deadlineGrace)) }

// closeLate closes the connection if statement gen is still in flight
// tryGrace from now (runTry: its ctx ended).
func (st *statement) closeLate(gen uint64) {
	st.mu.Lock()
	defer st.mu.Unlock()
	if !st.inFlight || st.gen != gen || st.stopper != nil {
		return
	}
	st.stopper = time.AfterFunc(time.Duration(tryGrace.Load()), func() {
		st.mu.Lock()
		defer st.mu.Unlock()
		if st.inFlight && st.gen == gen {
			st.closedLate = true
			st.pc.PgConn().Conn().Close()
		}
	})
}

// interruptForEnd interrupts the statement in flight if the session's end
// is to interrupt it (run's untilEnd); a statement that starts later sees
// the end itself. If mu is busy it looks in a goroutine: interrupt may hold
// mu for a network round trip.
func (st *statement) interruptForEnd() {
	if !st.mu.TryLock() {
		go func() {
			st.mu.Lock()
			st.interruptUntilEnd()
		}()
		return
	}
	st.interruptUntilEnd()
}

// interruptUntilEnd is interruptForEnd once mu is held; it unlocks mu.
func (st *statement) interruptUntilEnd() {
	gen, ok := st.gen, st.inFlight && st.untilEnd
	st.mu.Unlock()
	if ok {
		go st.interrupt(gen)
	}
}

// interruptOverdue interrupts the clean-up statement in flight if it has
// run for cleanupTimeout. It may come late for a statement that has ended:
// the one in flight then began less than cleanupTimeout ago, or is not a
// clean-up statement, and is left alone.
func (st *statement) interruptOverdue() {
	st.mu.Lock()
	gen, due := st.gen, st.inFlight && !st.cleanupSince.IsZero() && time.Since(st.cleanupSince) >= cleanupTimeout
	st.mu.Unlock()
	if due {
		st.interrupt(gen)
	}
}

// interrupt cancels statement gen if it is still in flight: it sends a
// cancel request and returns once the server has taken it, so the cancel
// can only hit that statement (PostgreSQL drops a cancel that arrives while
// the backend is idle). If the request cannot be sent, or the statement does
// not return within cancelGrace, the connection is closed.
func (st *statement) interrupt(gen uint64) {
	st.mu.Lock()
	defer st.mu.Unlock()
	if !st.inFlight || st.gen != gen || st.stopper != nil {
		return
	}
	st.cancel(gen, time.Now().Add(cancelGrace))
}

// cancel sends a cancel request for statement gen, and again every
// cancelRetry while it is in flight; at giveUp it closes the connection.
// The caller holds mu.
func (st *statement) cancel(gen uint64, giveUp time.Time) {
	pg := st.pc.PgConn()
	ctx, cancel := context.WithTimeout(context.Background(), cancelRequestTimeout)
	err := pg.CancelRequest(ctx)
	cancel()
	if err != nil {
		pg.Conn().Close()
		return
	}
	st.stopper = time.AfterFunc(min(cancelRetry, time.Until(giveUp)), func() {
		st.mu.Lock()
		defer st.mu.Unlock()
		switch {
		case !st.inFlight || st.gen != gen:
		case !time.Now().Before(giveUp):
			pg.Conn().Close()
		default:
			st.cancel(gen, giveUp)
		}
	})
}
