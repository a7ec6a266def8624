package advisory

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/seed0ad592b7/advisory/internal/pgtest"
)

// A campaign that fails (its wait's connection ends with a server restart,
// and connections are refused while the server is down) is not the end of
// Lead: it campaigns again and becomes leader on the restarted server.
func TestLeadRetriesFailedCampaign(t *testing.T) {
	srv, err := pgtest.Start(context.Background(), pgtest.Options{Private: true})
	must(t, err)
	t.Cleanup(func() { must(t, srv.Stop()) })
	e := newEnvOn(t, srv)
	pool := e.pool()
	key := Int64Key(1605)
	holder := e.conn()
	_, err = holder.Exec(e.ctx, "SELECT pg_advisory_lock(1605)")
	must(t, err)

	ctx, cancel := context.WithCancel(e.ctx)
	defer cancel()
	elected := make(chan struct{}, 16)
	result := make(chan error, 1)
	go func() {
		result <- Lead(ctx, pool, key, func(leaderCtx context.Context) error {
			elected <- struct{}{}
			<-leaderCtx.Done()
			return nil
		}, HealthInterval(50*time.Millisecond))
	}()
	e.awaitWaiters(1) // campaigning, on the server
	must(t, srv.Restart(e.ctx))

	// A term that began before the restart (the wait granted as the old
	// holder's backend exited) does not count: the leader must hold the
	// key on the restarted server.
	for leading := false; !leading; {
		select {
		case <-elected:
			for _, r := range e.lockRows(key) {
				leading = leading || r.Granted
			}
		case err := <-result:
			t.Fatalf("Lead returned %v after its campaign failed; want it to campaign again", err)
		case <-e.ctx.Done():
			t.Fatal("no leader after the restart")
		}
	}
	cancel()
	if err := <-result; !errors.Is(err, context.Canceled) {
		t.Errorf("Lead after its ctx was cancelled = %v; want context.Canceled", err)
	}
}
