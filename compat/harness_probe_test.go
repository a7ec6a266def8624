package compat

import (
	"context"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/seed0ad592b7/advisory/internal/pgtest"
)

// envProbe makes TestCheckAtEndDoesNotHang, in a child test process, run
// the probes: a test that leaks on purpose, then a clean one.
const envProbe = "ADVISORY_COMPAT_HARNESS_PROBE"

// A test that fails with a pool connection still acquired (a Lock held at
// a t.Fatal, an Acquire never released) is reported, and the package goes
// on (pgtest.ClosePool): before, pool.Close, run after the check, blocked
// for ever and the package hung until go test's -timeout. The child gets
// 60 s; the probe needs about 2 s.
func TestCheckAtEndDoesNotHang(t *testing.T) {
	if os.Getenv(envProbe) != "" {
		runProbes(t)
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	text, _ := pgtest.RunChild(ctx, "TestCheckAtEndDoesNotHang", envProbe, dsn, 60*time.Second)
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
