package advisory

import (
	"context"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/seed0ad592b7/advisory/internal/pgtest"
)

// envProbe makes TestHarnessReportsLeaks, in a child test process, run the
// probes: tests that leak on purpose.
const envProbe = "ADVISORY_HARNESS_PROBE"

// The end-of-test checks of newEnv can fail: each probe below leaks on
// purpose in a child test process (this test binary, on the same server),
// which must report it, and must then go on to run a clean test (so one
// failure cannot hang the package).
func TestHarnessReportsLeaks(t *testing.T) {
	if os.Getenv(envProbe) != "" {
		runProbes(t)
		return
	}
	e := newEnv(t)
	text, err := pgtest.RunChild(e.ctx, "TestHarnessReportsLeaks", envProbe, e.dsn, 5*time.Minute)
	if err == nil {
		t.Errorf("the probes passed; want each leak reported:\n%s", text)
	}
	for _, want := range []string{
		"--- FAIL: TestHarnessReportsLeaks/idle_pooled_connection",
		"--- FAIL: TestHarnessReportsLeaks/test_connection",
		"--- FAIL: TestHarnessReportsLeaks/lock_held_at_failure",
		"--- FAIL: TestHarnessReportsLeaks/connection_never_given_back",
		"--- PASS: TestHarnessReportsLeaks/clean_test_after_them",
		"held by pid", // the lock check names the backend
		"a connection of the test's pool #1",
		"a connection the test opened with env.conn",
		"pool has 1 connections still acquired",
		"pool.Close blocks",
	} {
		if !strings.Contains(text, want) {
			t.Errorf("the probes' output lacks %q:\n%s", want, text)
		}
	}
	for _, probe := range []string{"idle_pooled_connection", "test_connection"} {
		if !probeReported(text, probe, "advisory lock left on the server") {
			t.Errorf("probe %s: the leaked lock was not reported:\n%s", probe, text)
		}
	}
}

// probeReported reports whether the output of subtest name contains msg.
func probeReported(out, name, msg string) bool {
	_, rest, ok := strings.Cut(out, "=== RUN   TestHarnessReportsLeaks/"+name+"\n")
	if !ok {
		return false
	}
	section, _, _ := strings.Cut(rest, "=== RUN")
	return strings.Contains(section, msg)
}

// runProbes is the child's side: every subtest but the last leaks.
func runProbes(t *testing.T) {
	key := Int64Key(16_016)
	t.Run("idle pooled connection", func(t *testing.T) {
		// The leak the library exists to prevent: a session lock left on a
		// connection that went back to the pool.
		e := newEnv(t)
		pool := e.pool()
		c, err := pool.Acquire(e.ctx)
		must(t, err)
		_, err = c.Exec(e.ctx, "SELECT pg_advisory_lock(16016)")
		must(t, err)
		c.Release()
	})
	t.Run("test connection", func(t *testing.T) {
		e := newEnv(t)
		_, err := e.conn().Exec(e.ctx, "SELECT pg_advisory_lock(16016)")
		must(t, err)
	})
	t.Run("lock held at failure", func(t *testing.T) {
		// A failed assertion with a Lock still held: reported at once,
		// the lock's session ended by the harness.
		e := newEnv(t)
		lock, err := Acquire(e.ctx, e.pool(), key)
		must(t, err)
		_ = lock
		t.Fatal("a failed assertion while the lock is held (on purpose)")
	})
	t.Run("connection never given back", func(t *testing.T) {
		// A failed assertion with a connection acquired and never
		// released: pool.Close would block for ever; the harness closes
		// its socket and gives up on it.
		e := newEnv(t)
		c, err := e.pool().Acquire(e.ctx)
		must(t, err)
		_ = c
		t.Error("a failed assertion while a connection is acquired (on purpose)")
	})
	t.Run("clean test after them", func(t *testing.T) {
		e := newEnv(t)
		lock, err := Acquire(e.ctx, e.pool(), key, NoWait())
		must(t, err)
		if !lock.Acquired() {
			t.Error("the key is still held after the probes")
		}
		must(t, lock.Release(context.Background()))
	})
}
