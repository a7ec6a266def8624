package compat

import (
	"context"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/seed0ad592b7/advisory/internal/pgtest"
)

// envProbe makes TestCheckAtEndDoesNotHang, in a child test process, run
// the probes: a test that leaks on purpose, then a clean one.
const envProbe = "ADVISORY_COMPAT_HARNESS_PROBE"

// DEFECT (medium): checkAtEnd passes pgtest.CheckAtEnd no Free, so a test
// that fails with a pool connection still acquired (a Lock held at a
// t.Fatal, an Acquire never released) is reported, and then pool.Close,
// run after the check, blocks for ever: the package hangs until go test's
// -timeout panics, and no test after it runs. CheckAtEnd's contract (its
// doc, and EndCheck.Free's) is that one failure cannot hang the tests after
// it. The child below gets 60 s; the probe needs about 2 s.
func TestCheckAtEndDoesNotHang(t *testing.T) {
	if os.Getenv(envProbe) != "" {
		runProbes(t)
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, os.Args[0], "-test.run=^TestCheckAtEndDoesNotHang$", "-test.count=1", "-test.v",
		"-test.timeout=60s")
	cmd.Env = append(os.Environ(), envProbe+"=1", pgtest.EnvDSN+"="+dsn)
	out, _ := cmd.CombinedOutput()
	text := string(out)
	for _, want := range []string{
		"--- FAIL: TestCheckAtEndDoesNotHang/connection_never_given_back",
		"pool has 1 connections still acquired",
		"--- PASS: TestCheckAtEndDoesNotHang/clean_test_after_it",
	} {
		if !strings.Contains(text, want) {
			t.Errorf("the probes' output lacks %q:\n%s", want, text)
		}
	}
}

func runProbes(t *testing.T) {
	open := func(t *testing.T) (context.Context, *pgxpool.Pool) {
		ctx := context.Background()
		pool, _ := openChecked(t, ctx)
		return ctx, pool
	}
	t.Run("connection never given back", func(t *testing.T) {
		ctx, pool := open(t)
		if _, err := pool.Acquire(ctx); err != nil {
			t.Fatal(err)
		}
		t.Error("a failed assertion while a connection is acquired (on purpose)")
	})
	t.Run("clean test after it", func(t *testing.T) {
		ctx, pool := open(t)
		c, err := pool.Acquire(ctx)
		if err != nil {
			t.Fatal(err)
		}
		c.Release()
	})
}
