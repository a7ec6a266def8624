package advisory

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
)

// capturedLog is a JSON slog handler writing to a buffer, at Debug.
type capturedLog struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (c *capturedLog) Write(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.buf.Write(p)
}

func (c *capturedLog) logger() *slog.Logger {
	return slog.New(slog.NewJSONHandler(c, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

// take returns the records written since the last take, and their text.
func (c *capturedLog) take(t *testing.T) ([]map[string]any, string) {
	t.Helper()
	c.mu.Lock()
	text := c.buf.String()
	c.buf.Reset()
	c.mu.Unlock()
	var recs []map[string]any
	for line := range strings.Lines(text) {
		var rec map[string]any
		if err := json.Unmarshal([]byte(line), &rec); err != nil {
			t.Fatalf("log line %q: %v", line, err)
		}
		recs = append(recs, rec)
	}
	return recs, text
}

// expectRecord checks that one of recs has msg, level and the attributes
// want (compared as fmt.Sprint prints them), and returns it.
func expectRecord(t *testing.T, recs []map[string]any, level, msg string, want map[string]any) map[string]any {
	t.Helper()
next:
	for _, rec := range recs {
		if rec["msg"] != msg || rec["level"] != level {
			continue
		}
		for k, v := range want {
			if fmt.Sprint(rec[k]) != fmt.Sprint(v) {
				continue next
			}
		}
		return rec
	}
	var lines []string
	for _, rec := range recs {
		b, _ := json.Marshal(rec)
		lines = append(lines, string(b))
	}
	t.Errorf("no %s record %q with %v among:\n  %s", level, msg, want, strings.Join(lines, "\n  "))
	return nil
}

// SlogTracer against a real lock scenario: a wait that gets the lock at
// once, a try that finds it busy, a wait that times out, a waiter woken by
// the holder's release, a hold lost when its backend is terminated, a hold
// ended by its TTL, and a leadership won and resigned. It logs each at its
// level with its attributes, and no password, even for a connection error.
func TestSlogTracer(t *testing.T) {
	e := newEnv(t)
	freshKeyNames(t)
	pool := e.pool()
	var logs capturedLog
	tr := WithTracer(SlogTracer(logs.logger()))
	key := StringKey("slog-trace")
	ks := `"slog-trace" (` + key.String() + `)` // the key's name, then its numbers

	holder, err := Acquire(e.ctx, pool, key, tr)
	must(t, err)
	recs, _ := logs.take(t)
	expectRecord(t, recs, "DEBUG", "advisory lock wait started", map[string]any{"entry": "Acquire", "key": ks, "mode": "exclusive", "try": false})
	expectRecord(t, recs, "DEBUG", "advisory lock wait ended", map[string]any{"entry": "Acquire", "key": ks, "outcome": "acquired"})
	expectRecord(t, recs, "DEBUG", "advisory lock hold started", map[string]any{"entry": "Acquire", "key": ks, "mode": "exclusive"})

	if l, err := Acquire(e.ctx, pool, key, tr, NoWait()); err != nil || l.Acquired() {
		t.Fatalf("NoWait on a held key = %v, %v", l.Acquired(), err)
	}
	if _, err := Acquire(e.ctx, pool, key, tr, WaitTimeout(50*time.Millisecond)); !errors.Is(err, ErrTimeout) {
		t.Fatalf("WaitTimeout on a held key = %v; want ErrTimeout", err)
	}
	recs, _ = logs.take(t)
	expectRecord(t, recs, "DEBUG", "advisory lock wait ended", map[string]any{"key": ks, "try": true, "outcome": "busy"})
	if rec := expectRecord(t, recs, "DEBUG", "advisory lock wait ended", map[string]any{"key": ks, "try": false, "outcome": "timeout"}); rec != nil {
		if !strings.Contains(fmt.Sprint(rec["error"]), "timed out") {
			t.Errorf("a timed-out wait logged error %q", rec["error"])
		}
	}
	if len(recs) != 3 {
		t.Errorf("a try and a timed-out wait logged %d records; want 3 (a try logs no start)", len(recs))
	}

	// A waiter woken by the release: the holder's hold ends, the waiter's
	// wait ends with the lock.
	waiter := make(chan error, 1)
	go func() {
		_, err := Do(e.ctx, pool, key, func(context.Context) error { return nil }, tr, NoCohort()) // on the server (SPEC §13)
		waiter <- err
	}()
	e.awaitWaiters(1)
	must(t, holder.Release(e.ctx))
	must(t, <-waiter)
	recs, _ = logs.take(t)
	expectRecord(t, recs, "DEBUG", "advisory lock hold ended", map[string]any{"entry": "Acquire", "key": ks, "end": "released"})
	expectRecord(t, recs, "DEBUG", "advisory lock wait ended", map[string]any{"entry": "Do", "key": ks, "outcome": "acquired"})
	expectRecord(t, recs, "DEBUG", "advisory lock hold started", map[string]any{"entry": "Do", "key": ks, "mode": "exclusive"})
	expectRecord(t, recs, "DEBUG", "advisory lock hold ended", map[string]any{"entry": "Do", "key": ks, "end": "released"})

	// A semaphore's hold names the slot taken; a shared hold its mode.
	sem, err := AcquireSemaphore(e.ctx, pool, key, 2, tr)
	must(t, err)
	must(t, sem.Release(e.ctx))
	shared, err := Acquire(e.ctx, pool, key, tr, Shared())
	must(t, err)
	must(t, shared.Release(e.ctx))
	recs, _ = logs.take(t)
	expectRecord(t, recs, "DEBUG", "advisory lock hold started", map[string]any{"entry": "AcquireSemaphore", "key": `"slog-trace#0" (` + SemaphoreKeys(key, 2)[0].String() + `)`, "mode": "exclusive"})
	expectRecord(t, recs, "DEBUG", "advisory lock hold started", map[string]any{"entry": "Acquire", "key": ks, "mode": "shared"})

	// Lost: the backend is terminated.
	lost, err := Acquire(e.ctx, pool, key, tr, HealthInterval(50*time.Millisecond))
	must(t, err)
	e.terminate(lockPID(t, e.ctx, lost))
	e.awaitDone(lost.Done(), "terminated holder")
	if err := lost.Release(e.ctx); !errors.Is(err, ErrLockLost) {
		t.Errorf("Release after the loss = %v; want ErrLockLost", err)
	}
	recs, _ = logs.take(t)
	if rec := expectRecord(t, recs, "ERROR", "advisory lock hold ended", map[string]any{"key": ks, "end": "lost"}); rec != nil {
		if msg := fmt.Sprint(rec["error"]); !strings.Contains(msg, "lock lost") || !strings.Contains(msg, ks) {
			t.Errorf("a lost hold logged error %q; want ErrLockLost's, naming %s", msg, ks)
		}
	}

	// TTL.
	ttl, err := Acquire(e.ctx, pool, key, tr, TTL(50*time.Millisecond))
	must(t, err)
	e.awaitDone(ttl.Done(), "lock with a TTL")
	if err := ttl.Release(e.ctx); !errors.Is(err, ErrTTLExceeded) {
		t.Errorf("Release after the TTL = %v; want ErrTTLExceeded", err)
	}
	recs, _ = logs.take(t)
	expectRecord(t, recs, "WARN", "advisory lock hold ended", map[string]any{"key": ks, "end": "ttl"})

	// Leadership.
	errStop := errors.New("stop leading")
	if err := Lead(e.ctx, pool, key, func(context.Context) error { return errStop }, tr); !errors.Is(err, errStop) {
		t.Fatalf("Lead = %v; want fn's error", err)
	}
	recs, _ = logs.take(t)
	expectRecord(t, recs, "INFO", "advisory leadership won", map[string]any{"entry": "Lead", "key": ks})
	expectRecord(t, recs, "INFO", "advisory leadership ended", map[string]any{"key": ks, "end": "released", "error": "stop leading"})

	// A connection error, from a pool whose connection string has a
	// password, is logged without it.
	const password = "s3cret-pw-never-logged"
	bad := e.pool(func(c *pgxpool.Config) {
		c.ConnConfig.Host, c.ConnConfig.Port, c.ConnConfig.Password = "127.0.0.1", 1, password
		c.ConnConfig.Fallbacks = nil
	})
	if _, err := Acquire(e.ctx, bad, key, tr); err == nil {
		t.Fatal("Acquire through a pool that cannot connect succeeded")
	}
	recs, text := logs.take(t)
	expectRecord(t, recs, "WARN", "advisory lock waits failing", map[string]any{"key": ks, "outcome": "error"})
	// The second failure is part of the same outage: Debug only.
	if _, err := Acquire(e.ctx, bad, key, tr); err == nil {
		t.Fatal("Acquire through a pool that cannot connect succeeded")
	}
	more, _ := logs.take(t)
	expectRecord(t, more, "DEBUG", "advisory lock wait ended", map[string]any{"key": ks, "outcome": "error"})
	if l, err := Acquire(e.ctx, pool, key, tr, NoWait()); err != nil || !l.Acquired() {
		t.Fatalf("Acquire after the outage = %v, %v", l.Acquired(), err)
	} else {
		must(t, l.Release(e.ctx))
	}
	more, _ = logs.take(t)
	expectRecord(t, more, "INFO", "advisory lock waits reach the server again", map[string]any{"failed_waits": 2})
	if strings.Contains(text, password) {
		t.Errorf("the log carries the password:\n%s", text)
	}
}

// A wait begun before an outage began and answered during it (a Lead
// standby granted the lock as the leader's backend exits in a fast
// shutdown, which fails the other waits) does not end the outage: the
// outage is logged once when it begins, not again after that answer, and
// ends when a wait begun since is answered.
func TestSlogOutageNotEndedByOlderWait(t *testing.T) {
	newEnv(t)
	var logs capturedLog
	tr := SlogTracer(logs.logger())
	ctx := context.Background()
	start := TraceWaitStartData{Entry: EntryLead, Key: StringKey("outage-old-wait"), Mode: ModeExclusive}
	lostConn := errors.New("the connection was lost while waiting")
	fail := TraceWaitEndData{TraceWaitStartData: start, Err: lostConn} // a wait begun now

	tr.TraceWaitEnd(ctx, fail)
	tr.TraceWaitEnd(ctx, TraceWaitEndData{TraceWaitStartData: start, Acquired: true, Duration: time.Minute})
	tr.TraceWaitEnd(ctx, fail)
	recs, _ := logs.take(t)
	if n := countRecords(recs, "advisory lock waits failing"); n != 1 {
		t.Errorf("one outage logged %d times as beginning; want once", n)
	}
	if n := countRecords(recs, "advisory lock waits reach the server again"); n != 0 {
		t.Errorf("a wait begun before the outage, answered during it, ended the outage (%d records)", n)
	}

	// A wait begun now, after the outage began.
	tr.TraceWaitEnd(ctx, TraceWaitEndData{TraceWaitStartData: start, Acquired: true})
	recs, _ = logs.take(t)
	expectRecord(t, recs, "INFO", "advisory lock waits reach the server again", map[string]any{"failed_waits": 2})
}
