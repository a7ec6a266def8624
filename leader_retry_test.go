package advisory

import (
	"context"
	"errors"
	"fmt"
	"strings"
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

// Lead's pause between failed campaigns: the first is one health interval
// (at most 100 ms), then it doubles, less up to a quarter, up to 5 s.
func TestLeadPause(t *testing.T) {
	newEnv(t)
	if got := leadPause(50*time.Millisecond, 1); got != 50*time.Millisecond {
		t.Errorf("first pause with a 50ms health interval = %v; want 50ms", got)
	}
	if got := leadPause(time.Second, 1); got != 100*time.Millisecond {
		t.Errorf("first pause with a 1s health interval = %v; want 100ms", got)
	}
	for failed := 2; failed < 80; failed++ {
		full := min(leadPauseCap, 100*time.Millisecond<<min(failed-1, 20))
		for range 20 {
			if got := leadPause(time.Second, failed); got > full || got < full*3/4 {
				t.Fatalf("pause after %d failures = %v; want in [%v, %v]", failed, got, full*3/4, full)
			}
		}
	}
}

// maxCampaigns is the most campaigns one Lead candidate can start in d of
// failing campaigns, each failing at once, with the shortest pauses
// leadPause allows (health interval 1 s).
//
// The campaign under way when the outage begins fails, and the next starts
// at once if it began a pause ago (a standby's wait); from the second
// failure in a row on, each pause is at least three quarters of its full
// length.
func maxCampaigns(d time.Duration) int {
	n := 2
	for spent := time.Duration(0); ; n++ {
		if spent += min(leadPauseCap, 100*time.Millisecond<<min(n-1, 20)) * 3 / 4; spent > d {
			return n
		}
	}
}

// An outage, as a Lead fleet sees it: the server stops under a leader and
// two standbys of one process, which share one SlogTracer, and starts again.
// While it is down, the candidates pause longer and longer between
// campaigns (not every 100 ms), and the log says once that waits are
// failing and once that they reach the server again; a standby's failed
// wait is logged as a failed wait, never as a lost hold.
func TestLeadOutageReportedOnce(t *testing.T) {
	srv, err := pgtest.Start(context.Background(), pgtest.Options{Local: true})
	must(t, err)
	t.Cleanup(func() { must(t, srv.Stop()) })
	e := newEnvOn(t, srv)
	pool := e.pool()
	var logs capturedLog
	tr := WithTracer(SlogTracer(logs.logger()))
	key := StringKey("outage-fleet")

	ctx, cancel := context.WithCancel(e.ctx)
	defer cancel()
	elected := make(chan struct{}, 64)
	results := make(chan error, 3)
	for range 3 {
		go func() {
			results <- Lead(ctx, pool, key, func(leaderCtx context.Context) error {
				elected <- struct{}{}
				<-leaderCtx.Done()
				return nil
			}, tr)
		}()
	}
	select {
	case <-elected:
	case <-e.ctx.Done():
		t.Fatal("no leader among three candidates")
	}
	e.awaitWaiters(2)
	logs.take(t)

	down := time.Now()
	must(t, srv.Halt(e.ctx, pgtest.ShutdownFast))
	failedWaits := func(recs []map[string]any) int {
		n := 0
		for _, r := range recs {
			if r["msg"] == "advisory lock waits failing" || (r["msg"] == "advisory lock wait ended" && (r["outcome"] == "error" || r["outcome"] == "lost")) {
				n++
			}
		}
		return n
	}
	// The outage lasts 3 s, and at least a dozen failed campaigns: at one
	// campaign every 100 ms, as before, three candidates made about 90 in
	// that time; the growing pauses allow 18.
	var recs []map[string]any
	awaited := false
	defer func() {
		if !awaited {
			t.Logf("%d failed campaigns logged while the server was down", failedWaits(recs))
		}
	}()
	pgtest.Await(t, "3 s of outage and a dozen failed campaigns logged", testTimeout, func() (bool, error) {
		more, _ := logs.take(t)
		recs = append(recs, more...)
		return failedWaits(recs) >= 12 && time.Since(down) >= 3*time.Second, nil
	})
	awaited = true
	outage := time.Since(down)
	more, _ := logs.take(t)
	recs = append(recs, more...)
	if n, most := failedWaits(recs), 3*maxCampaigns(outage); n > most {
		t.Errorf("%d failed campaigns in %v of outage; the pauses allow at most %d for three candidates", n, outage, most)
	}
	// A standby can be granted the lock in the shutdown: the leader's
	// backend exits first, and the standby's wait (one slice, begun before
	// the outage) ends with the grant before its own backend is
	// terminated. It led for a moment and lost the lock: two ERROR records
	// of its own, and a wait answered that says nothing about the outage.
	// The server frees the key once per backend that held it: the two
	// standbys at most.
	won := 0
	for _, r := range recs {
		if r["msg"] != "advisory lock wait ended" || r["outcome"] != "acquired" {
			continue
		}
		won++
		end, err := time.Parse(time.RFC3339Nano, fmt.Sprint(r["time"]))
		waited, ok := r["duration"].(float64)
		if err != nil || !ok {
			t.Fatalf("a wait's record without its time or duration: %v", r)
		}
		if began := end.Add(-time.Duration(waited)); !began.Before(down) {
			t.Errorf("a campaign begun during the outage (at %v, the server halted at %v) got the lock: %v", began, down, r)
		}
	}
	if won > 0 {
		t.Logf("%d standbys granted the lock in the shutdown", won)
	}
	if won > 2 {
		t.Errorf("%d standbys granted the lock in the shutdown; two were waiting", won)
	}
	if n := countRecords(recs, "advisory lock waits reach the server again"); n != 0 {
		t.Errorf("the outage was logged as ended %d times while the server was down", n)
	}
	warns, errs := 0, 0
	for _, r := range recs {
		switch r["level"] {
		case "WARN":
			warns++
			if r["msg"] != "advisory lock waits failing" {
				t.Errorf("a WARN record during the outage besides its beginning: %v", r)
			}
			if strings.Contains(fmt.Sprint(r["error"]), "mutual exclusion") {
				t.Errorf("a failed wait is logged as a loss of mutual exclusion: %v", r)
			}
		case "ERROR":
			errs++
			if r["msg"] == "advisory lock hold ended" && r["entry"] != "Lead" || r["msg"] != "advisory lock hold ended" && r["msg"] != "advisory leadership ended" {
				t.Errorf("an ERROR record during the outage other than the leader's loss: %v", r)
			}
		}
	}
	if warns != 1 || errs != 2*(1+won) {
		t.Errorf("the outage logged %d WARN and %d ERROR records, %d standbys granted the lock in the shutdown; want one WARN (the outage began) and two ERROR (hold and leadership lost) for the leader and for each such standby", warns, errs, won)
		for _, r := range recs {
			if r["level"] != "DEBUG" || r["outcome"] == "acquired" {
				t.Logf("%v", r)
			}
		}
	}

	must(t, srv.Restart(e.ctx))
	for len(elected) > 0 {
		<-elected
	}
	select {
	case <-elected:
	case <-e.ctx.Done():
		t.Fatal("no leader after the server came back")
	}
	e.awaitWaiters(2)
	recs, _ = logs.take(t)
	expectRecord(t, recs, "INFO", "advisory lock waits reach the server again", nil)
	for _, r := range recs {
		if r["level"] == "WARN" || r["level"] == "ERROR" {
			t.Errorf("after the outage ended: %v", r)
		}
	}
	if n := countRecords(recs, "advisory lock waits reach the server again"); n != 1 {
		t.Errorf("the end of the outage was logged %d times; want once", n)
	}
	cancel()
	for range 3 {
		if err := <-results; !errors.Is(err, context.Canceled) {
			t.Errorf("Lead after its ctx was cancelled = %v; want context.Canceled", err)
		}
	}
}

func countRecords(recs []map[string]any, msg string) int {
	n := 0
	for _, r := range recs {
		if r["msg"] == msg {
			n++
		}
	}
	return n
}
