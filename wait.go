package advisory

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// Waiting for a lock held elsewhere (SPEC §2a).
//
// A Session that holds nothing waits in slices (see sliceOneSQL and sliceManySQL): short
// server-side waits, each ended by the server before deadlock_timeout,
// without an error, so that no waiter holds a snapshot for longer than a
// slice. Between two slices the session is out of the server's queue only
// for the moment it takes to send the next; a release by any client during a
// slice wakes the waiter at once, as a plain pg_advisory_lock would. The
// session keeps its connection's turn for the whole wait: other calls on the
// same Session wait for it, as they wait for any statement.
//
// A Session that already holds locks waits in one server-side wait (see
// Session.lock): it can be part of a deadlock cycle, and PostgreSQL's
// deadlock detector, which runs once per wait after deadlock_timeout, must
// see it. Such a wait holds a snapshot for as long as it waits.

// sliceStall is how much longer than a slice may last its round trip before
// the connection is taken for dead (a stalled server or a silent network
// cut) and closed: the same allowance the health watcher gives a ping.
func (s *Session) sliceStall() time.Duration {
	return sliceCap + max(s.health, minPingTimeout)
}

// waitSlices waits, slice after slice, until a slice gets its keys, the
// bound (end; the zero time: none) passes, or ctx ends; slice(ms) is the message of one slice
// of ms milliseconds, and dtMs the server's deadlock_timeout (0: unknown).
// The session holds nothing, and the caller holds the turn. It returns got
// == true when the session holds the keys; got == false and err == nil when
// the bound passed (nothing is held); err when a slice failed (a lost
// connection, a full lock table), for the caller's clean-up, which must
// find out what is held.
//
// A slice is never cancelled (a cancel request would log the internal
// statement as an ERROR): when ctx is cancelled during a slice, or its
// deadline is deadlineGrace past (the server ends the last slice at the
// bound, without an error), waitSlices returns at once with a leftToEnd
// error, and the slice ends on its own in the background, which then drops
// a grant that came too late and gives the turn back (leftSlice). The
// caller must then send nothing (see isLeftToEnd) and give the turn as
// usual: it passes to the background.
func (s *Session) waitSlices(ctx context.Context, dtMs int64, end time.Time, slice func(ms int64) string) (got bool, err error) {
	at, err := s.waitSlicesAt(ctx, dtMs, end, false, slice, sliceReport)
	return at > 0, err
}

// waitSlicesAt is waitSlices with report reading what each slice's
// message returned: 0 when the slice did not get its keys, a positive
// number (1 for sliceReport, the slot's position for a semaphore's) when it
// did, which waitSlicesAt returns. onStays says that a slice may wait on in
// place for up to inPlaceSlices more slices (sliceOneSQL): it is then
// given that much longer before the connection is taken for dead.
func (s *Session) waitSlicesAt(ctx context.Context, dtMs int64, end time.Time, onStays bool, slice func(ms int64) string,
	report func([]*pgconn.Result, error) (int, error)) (at int, err error) {
	start := time.Now()
	if s.waitingSince.Before(start) && !s.waitingSince.IsZero() {
		start = s.waitingSince // WaitingSince
	}
	_, err = inSlices(ctx, dtMs, end, func(ctx context.Context, ms int64) (bool, error) {
		if s.ctx.Err() != nil {
			return false, s.endKind()
		}
		sql := waitMarkerSQL(time.Since(start), start) + slice(ms) // since when it waits, for pg_stat_activity
		stall := s.sliceStall()
		if onStays {
			stall += inPlaceSlices * time.Duration(ms) * time.Millisecond
		}
		stop := context.Background()
		handOver := make(chan struct{})
		ended := make(chan struct{})
		got, err := sliceDetached(ctx, func() (int, error) {
			defer close(ended)
			return s.runSlice(stop, sql, stall, report)
		}, s.leftSlice(handOver))
		if isLeftToEnd(err) {
			s.handOver = handOver
			// Nobody waits for the slice any more: if it has not ended some
			// time after its length (a cut network, a stalled server), close
			// the connection, which ends the session holding nothing,
			// rather than keep it busy for the stall allowance.
			longest := time.Duration(ms) * time.Millisecond
			if onStays {
				longest *= 1 + inPlaceSlices
			}
			time.AfterFunc(longest+cancelGrace, func() {
				select {
				case <-ended:
				default:
					_ = s.pc.PgConn().Conn().Close()
				}
			})
		}
		at = got
		return got > 0, err
	})
	return at, err
}

// inPlaceSlices is how many slices long a slice that saw the key change
// hands waits on in place, at most (sliceOneSQL): enough for the waiters
// that wait in one statement and came first to be served, if each holds
// for less than a slice or so; then it slices again.
const inPlaceSlices = 8

// runSlice sends one slice's message and reads its report. It is not
// interrupted by the caller's ctx or by the session's end, but by stop (a
// cancel request); a slice that gets no answer within stall (0: no limit)
// closes the connection. The caller holds the turn.
func (s *Session) runSlice(stop context.Context, sql string, stall time.Duration, report func([]*pgconn.Result, error) (int, error)) (at int, err error) {
	err = s.answered(s.runFor(stop, false, false, func(ctx context.Context, c *pgx.Conn) error {
		var stalled atomic.Bool
		if stall > 0 {
			t := time.AfterFunc(stall, func() {
				stalled.Store(true)
				_ = c.PgConn().Conn().Close()
			})
			defer t.Stop()
		}
		var err error
		at, err = report(c.PgConn().Exec(ctx, sql).ReadAll())
		if err != nil && stalled.Load() {
			err = fmt.Errorf("no answer to a wait slice within %v (network cut or server stalled): %w", stall, err)
		}
		return err
	}))
	return at, err
}

// leftSlice returns what runs in the background when a slice was left to
// end on its own (sliceDetached): once it has ended and its caller has
// given the turn (closing handOver, see giveTurn), a grant that came too
// late is dropped (the session held nothing before the wait), and the turn
// is given back. A connection whose state cannot be known ends the session.
func (s *Session) leftSlice(handOver chan struct{}) func(at int, err error) {
	return func(at int, err error) {
		<-handOver
		switch {
		case s.lost(err):
		case at > 0:
			grantedThenCancelled.Add(1)
			if err := s.execCleanup(dropLateGrantSQL); err != nil {
				s.lose(err)
			}
		}
		s.giveTurn()
	}
}

// inSlices runs slice, each time for the length of the next slice in
// milliseconds (sliceLen of dtMs, the server's deadlock_timeout, and of
// what is left until end, the zero time: no bound), until one reports got,
// one fails, or end passes (false, nil). end is fixed when the call's bound
// is (endOf), so the time of a first try counts against it. A ctx deadline does not interrupt a slice
// until deadlineGrace after it: the server ends the last slice on time.
func inSlices(ctx context.Context, dtMs int64, end time.Time, slice func(ctx context.Context, ms int64) (bool, error)) (bool, error) {
	if _, ok := ctx.Deadline(); ok {
		var cancel context.CancelFunc
		ctx, cancel = pastDeadline(ctx, deadlineGrace)
		defer cancel()
	}
	for {
		var left time.Duration
		if !end.IsZero() {
			if left = time.Until(end); left <= 0 {
				return false, nil
			}
		}
		if got, err := slice(ctx, sliceLen(dtMs, left)); err != nil || got {
			return got, err
		}
	}
}

// sliceReport reads what the last statement of a slice's message returned,
// whether the slice got its keys (1) or not (0): a session slice's SHOW
// lock_timeout ("0" when it did not, else the slice's length, as "500ms"
// or "1s"), or a transaction slice's try ("t" or "f"). Anything else is an
// error.
func sliceReport(results []*pgconn.Result, err error) (int, error) {
	if err != nil {
		return 0, err
	}
	if len(results) == 0 || len(results[len(results)-1].Rows) != 1 {
		return 0, errors.New("a wait slice returned no report")
	}
	v := string(results[len(results)-1].Rows[0][0])
	switch unit := strings.TrimLeft(v, "0123456789"); {
	case v == "t":
		return 1, nil
	case v == "f" || v == "0":
		return 0, nil
	case len(unit) < len(v) && (unit == "ms" || unit == "s"):
		return 1, nil
	}
	return 0, fmt.Errorf("a wait slice reported %q", v)
}

// sliceDetached runs slice, a wait slice that the server ends on its own
// within one slice, and returns its outcome. When ctx ends first, it
// returns at once with a leftToEnd error, and left runs in the background
// with the slice's outcome once it has ended: to drop a grant that came
// too late and give the connection back. A slice is never cancelled: a
// cancel request would write the internal statement to the server log as
// an ERROR.
func sliceDetached[T any](ctx context.Context, slice func() (T, error), left func(got T, err error)) (T, error) {
	if ctx.Done() == nil {
		return slice()
	}
	type outcome struct {
		got T
		err error
	}
	out := make(chan outcome, 1)
	go func() {
		got, err := slice()
		out <- outcome{got, err}
	}()
	select {
	case o := <-out:
		return o.got, o.err
	case <-ctx.Done():
		go func() {
			o := <-out
			left(o.got, o.err)
		}()
		var none T
		return none, &leftToEnd{context.Cause(ctx)}
	}
}

// leftToEnd is the error of a wait whose ctx ended during a slice, which
// was left to end on its own (sliceDetached): nothing is held, and the
// connection is busy until that slice has ended. It is ctx's error.
type leftToEnd struct{ err error }

func (e *leftToEnd) Error() string { return e.err.Error() }
func (e *leftToEnd) Unwrap() error { return e.err }

// isLeftToEnd reports whether err is a leftToEnd.
func isLeftToEnd(err error) bool {
	var l *leftToEnd
	return errors.As(err, &l)
}

// noteNoSlices tells the traced wait of ctx (if any) that it waits in one
// statement because PL/pgSQL cannot be used; for a Session s, only at its
// first such wait.
func noteNoSlices(ctx context.Context, s *Session) {
	if s != nil {
		s.mu.Lock()
		said := s.noSlicesSaid
		s.noSlicesSaid = true
		s.mu.Unlock()
		if said {
			return
		}
	}
	if p, ok := ctx.Value(noSlicesKey{}).(*string); ok {
		*p = NoSlicesPLpgSQL
	}
}

// saidNoSlices reports whether the session found that it cannot run wait
// slices (noteNoSlices).
func (s *Session) saidNoSlices() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.noSlicesSaid
}

// closeAfterFailedLock closes a Lock's session after its lock failed with
// err (nil: not acquired). After a wait slice left to end on its own, the
// caller does not wait for it: the session ends in the background, giving
// its connection back once the slice has ended. Otherwise Close's error is
// the lock error's consequence, and dropped.
func (s *Session) closeAfterFailedLock(err error) {
	if !isLeftToEnd(err) {
		_ = s.Close(context.Background())
		return
	}
	if s.beginEnd(nil, ErrClosed, true) {
		go func() {
			defer s.watcher.Done()
			s.finish(nil)
		}()
	}
}

// deadlineGrace is how long past ctx's deadline a wait lets its statement
// run, so that the server, which ends the last slice at the deadline, ends
// the wait without an error and pgx does not close the connection.
const deadlineGrace = 500 * time.Millisecond

// pastDeadline returns a context that is cancelled when ctx is cancelled,
// but that outlives ctx's deadline by grace.
func pastDeadline(ctx context.Context, grace time.Duration) (context.Context, context.CancelFunc) {
	d, _ := ctx.Deadline()
	c, cancel := context.WithDeadline(context.WithoutCancel(ctx), d.Add(grace))
	stop := context.AfterFunc(ctx, func() {
		if !errors.Is(ctx.Err(), context.DeadlineExceeded) {
			cancel()
		}
	})
	return c, func() { stop(); cancel() }
}
