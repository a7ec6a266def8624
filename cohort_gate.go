package advisory

import (
	"context"
	"errors"
)

// gateSession queues a Session that holds nothing and is about to wait for
// key behind the other such Sessions of the process waiting for key
// through the same pool, so that the server sees one waiter per key per
// process. It returns cfg with its WaitTimeout shortened by the time spent
// in the queue, and the gate's cohort, whose leaveGate the caller calls
// once the wait on the server has ended.
func (s *Session) gateSession(ctx context.Context, key Key, cfg config) (config, *cohort, error) {
	c := joinCohort(cohortKey{pool: s.pool, key: key, mode: cfg.mode, slots: -1})
	t, cfg, err := c.await(ctx, key, cfg, s.ctx.Done())
	if err != nil {
		c.leave()
		if errors.Is(err, ErrClosed) && s.ctx.Err() != nil {
			return cfg, nil, keyError("lock", key, s.endKind(), nil)
		}
		return cfg, nil, err
	}
	// Let through once the Session before it ended its wait on the server,
	// most often with the key: the first try would find it held (a hint
	// only; the second try asks the server).
	cfg.busy = t.queued
	return cfg, c, nil
}

// leaveGate lets the gate's next Session through, once the caller's wait on
// the server has ended, and counts the caller out of the gate.
func (c *cohort) leaveGate() {
	c.served()
	c.leave()
}
