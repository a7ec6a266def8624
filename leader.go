package advisory

import (
	"context"
	"errors"
	"math/rand/v2"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
)

// Lead runs fn whenever this process is the leader for key, until ctx ends.
//
// It campaigns by waiting for key on the server (always waiting, and
// leading exclusively: NoWait, WaitTimeout and Shared are errors), then
// runs fn with a context that is
// cancelled when leadership is lost (the lock's connection died, or its TTL
// passed) or ctx ends. Then:
//   - after a loss, it campaigns again, whatever fn returned;
//   - if fn returns nil while still leader, it resigns (releases key) and
//     campaigns again;
//   - if fn returns an error while still leader, it resigns and returns that
//     error.
//
// It returns ctx.Err() (or its cause) when ctx ends; fn is never called
// once ctx has ended, even when a campaign is won at that moment. It
// returns an error matching ErrClosed when ReleaseAll is called on pool,
// campaigning, leading (fn's context is cancelled first) or between
// campaigns. When a campaign
// fails for another reason (the server is restarting, the pool cannot
// connect, the server's statement_timeout ended the wait) it campaigns again
// after a pause: one health interval (at most 100 ms) after the failed
// campaign began, so it leaves the server's queue only for a moment; then,
// while campaigns keep failing, a pause that doubles each time, up to
// 5 s, less a random part of up to a quarter (so that a fleet of
// candidates does not retry in step). A won campaign, or one that failed
// after 5 s or more (it was waiting on the server), starts the pauses over.
// So while the server is down a candidate tries about once every 4–5 s, and
// a leader is elected within about 5 s of the server's return.
//
// Fail-over is done by the server: the next candidate's wait ends as soon as
// the old leader's session ends, so a leader whose backend is terminated is
// replaced at once; the old leader's fn learns of the loss within one health
// interval. Until then two fn calls may run at once: work that must never
// run twice goes through the lock's connection (see Lock.WithConn), which is
// fenced.
func Lead(ctx context.Context, pool *pgxpool.Pool, key Key, fn func(leaderCtx context.Context) error, opts ...Option) error {
	cfg, err := newConfig(callLead, opts)
	if err != nil {
		return err
	}
	if !key.Valid() {
		return invalidKey("lead")
	}
	if pool == nil {
		return errorf("lead %s: nil *pgxpool.Pool", key)
	}
	cfg.entry = EntryLead
	// On its way to a lock for as long as it runs: ReleaseAll ends it
	// wherever it is (campaigning, leading, or pausing between campaigns),
	// by cancelling ctx with a cause matching ErrClosed.
	ctx, way := onTheWay(ctx, pool)
	defer way.leave()
	retry := time.NewTimer(0)
	defer retry.Stop()
	failed := 0 // campaigns failed in a row
	for {
		start := time.Now()
		lock, err := acquire(ctx, pool, key, cfg)
		if err != nil {
			if ctx.Err() != nil {
				return context.Cause(ctx)
			}
			if errors.Is(err, ErrClosed) {
				return err // ReleaseAll
			}
			if time.Since(start) >= leadPauseCap {
				failed = 0 // it was waiting on the server: not a failure in a row
			}
			failed++
			retry.Reset(leadPause(cfg.health, failed) - time.Since(start))
			select {
			case <-ctx.Done():
				return context.Cause(ctx)
			case <-retry.C:
			}
			continue
		}
		failed = 0
		var (
			fnErr   error
			leadCtx = ctx
			lead    leadTrace
		)
		if ctx.Err() == nil { // a campaign won just as ctx ended does not run fn
			leadCtx, lead = traceLead(ctx, cfg.tracer(), key)
			fnErr = lock.run(leadCtx, fn)
		}
		lost := lock.Err() != nil
		releaseErr := lock.Release(ctx)
		lead.end(leadCtx, lock, releaseErr, fnErr)
		switch {
		case ctx.Err() != nil:
			return context.Cause(ctx)
		case lost, releaseErr != nil, fnErr == nil:
			continue
		default:
			return fnErr
		}
	}
}

// leadPauseCap is the longest pause between two failed campaigns.
const leadPauseCap = 5 * time.Second

// leadPause is the pause after the failed-th failed campaign in a row,
// counted from when it began: the health interval (at most 100 ms) after
// the first, then doubling up to leadPauseCap, less a random part of up to
// a quarter after the first.
func leadPause(health time.Duration, failed int) time.Duration {
	first := min(health, 100*time.Millisecond)
	if failed <= 1 {
		return first
	}
	d := leadPauseCap
	if failed-1 < 32 && first<<(failed-1) < leadPauseCap {
		d = first << (failed - 1)
	}
	return d - rand.N(d/4+1)
}
