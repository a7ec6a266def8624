package advisory

import (
	"context"
	"errors"
	"testing"

	"github.com/jackc/pgx/v5"
)

// A sliced wait whose ctx is cancelled writes nothing to the server log
// (SPEC §2a): the slice in flight is left to end on its own rather than
// cancelled (a cancel request logged "canceling statement due to user
// request" with the whole DO block), and a grant that lands as it ends is
// dropped before the connection goes back. Checked for every waiting entry
// point, with the holder letting go right after the cancel (so the slice
// left running often gets the key); the key is then free for others, no
// connection stays acquired, and a Session whose Lock was cancelled takes
// its next lock.
func TestCancelledWaitLogsNothing(t *testing.T) {
	e := newEnv(t)
	checkLog := noErrorLogged(t)
	pool := e.pool(deadlockTimeout("4s", 10)) // slices of 1 s: the cancel lands mid-slice
	key := StringKey("cancel-quiet")
	other := e.conn()
	s, err := NewSession(e.ctx, pool)
	must(t, err)
	defer s.Close(e.ctx)
	for _, c := range []struct {
		name string
		sem  bool
		wait func(ctx context.Context) error
	}{
		{"Acquire", false, func(ctx context.Context) error {
			l, err := Acquire(ctx, pool, key, NoCohort()) // a server waiter, as another process's
			if err == nil {
				_ = l.Release(ctx)
			}
			return err
		}},
		{"Session.Lock", false, func(ctx context.Context) error { _, err := s.Lock(ctx, key); return err }},
		{"Session.LockMany", false, func(ctx context.Context) error { _, err := s.LockMany(ctx, []Key{Int64Key(9), key}); return err }},
		{"DoTx", false, func(ctx context.Context) error {
			_, err := DoTx(ctx, pool, key, func(context.Context, pgx.Tx) error { return errors.New("ran") })
			return err
		}},
		{"AcquireSemaphore", true, func(ctx context.Context) error {
			l, err := AcquireSemaphore(ctx, pool, key, 1, NoCohort())
			if err == nil {
				_ = l.Release(ctx)
			}
			return err
		}},
	} {
		var holder *Lock
		if c.sem {
			holder, err = AcquireSemaphore(e.ctx, pool, key, 1)
		} else {
			holder, err = Acquire(e.ctx, pool, key)
		}
		must(t, err)
		ctx, cancel := context.WithCancel(e.ctx)
		done := make(chan error, 1)
		go func() { done <- c.wait(ctx) }()
		e.awaitWaiters(1)
		cancel()
		if err := <-done; !errors.Is(err, context.Canceled) {
			t.Errorf("%s: a cancelled wait returned %v; want context.Canceled", c.name, err)
		}
		must(t, holder.Release(e.ctx)) // a slice left running may get the key now
		e.eventually(c.name+": the key is free for another session once the cancelled wait's slice ended", func(*pgx.Conn) (bool, error) {
			return e.tryFrom(other, holder.Key()), nil
		})
	}
	if ok, err := s.Lock(e.ctx, StringKey("cancel-quiet-next")); err != nil || !ok {
		t.Errorf("a Session whose waits were cancelled: the next Lock = %v, %v", ok, err)
	}
	must(t, s.Close(e.ctx))
	awaitAcquired(t, pool, 0)
	checkLog()
}
