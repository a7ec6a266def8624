package advisory

import (
	"context"
	"errors"
)

// The gate of Sessions (SPEC §13): a Session that holds nothing and is
// about to wait for a key queues in the process behind the other such
// Sessions waiting for that key (in that mode) through the same pool (a
// Session of NewConnSession has no pool and does not queue), and the one
// let through keeps the gate closed behind it until it no longer
// holds the key it took exclusively (a shared holder, or a wait that ends
// without the key, lets the next through at once). So the server sees at most
// one waiter per key per process, and none while a Session of the process
// holds the key: the next Session is let through when the holder releases
// and tries the key then, usually free. Waiting on the server behind a
// holder of the same process instead costs the server, per hand-off, the
// wait's second try and a slice (a DO block): in
// BenchmarkContendedInterleaved's 16 Sessions of one process on 4 keys,
// that was a third of raw pgx's throughput; see BENCHMARKS.md.

// gateSession queues a Session that holds nothing and is about to wait for
// key behind the other such Sessions of the process waiting for or holding
// key through the same pool. It returns cfg with its WaitTimeout shortened
// by the time spent in the queue, and the gate, which the caller keeps
// once its wait has ended (keepGate, which leaves it at once if the wait
// ended without the key), or leaves for a shared lock (leaveGate).
func (s *Session) gateSession(ctx context.Context, key Key, cfg config) (config, *cohort, error) {
	c := joinCohort(cohortKey{pool: s.pool, key: key, mode: cfg.mode, slots: -1})
	_, cfg, err := c.await(ctx, key, cfg, s.ctx.Done())
	if err != nil {
		c.leave()
		if errors.Is(err, ErrClosed) && s.ctx.Err() != nil {
			return cfg, nil, keyError("lock", key, s.endKind(), nil)
		}
		return cfg, nil, err
	}
	return cfg, c, nil
}

// leaveGate lets the gate's next Session through and counts the caller out
// of the gate.
func (c *cohort) leaveGate() {
	c.served()
	c.leave()
}

// keepGate keeps gate closed behind the session, which passed it to take
// h, until the session no longer holds h or ends (leaveGateIfDone): at
// once if it did not take h.
func (s *Session) keepGate(gate *cohort, h hold) {
	s.mu.Lock()
	s.gate, s.gateHold = gate, h
	s.mu.Unlock()
	s.leaveGateIfDone() // the session may have ended meanwhile
}

// leaveGateIfDone leaves the gate the session keeps, if any, once the
// session no longer holds the key it took through it or has ended. Called
// after every release of a hold and at the session's end.
func (s *Session) leaveGateIfDone() {
	s.mu.Lock()
	gate := s.gate
	if gate == nil || s.holds[s.gateHold] > 0 && !s.ending {
		s.mu.Unlock()
		return
	}
	s.gate = nil
	s.mu.Unlock()
	gate.leaveGate()
}
