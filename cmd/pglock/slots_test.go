package main

import (
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/seed0ad592b7/advisory"
)

// pglock run --slots 2: two runs go at once, a third finds every slot busy
// (exit 75) or waits and takes the slot of the first run to end.
func TestRunSlots(t *testing.T) {
	e := newEnv(t)
	marks := filepath.Join(e.dir, "marks")
	run := func(name string) *proc {
		args := []string{"run", e.dsnArg(), "--key", "run-slots", "--slots", "2", "--"}
		return e.start(nil, "", append(args, marksCmd(name)...)...)
	}
	a := run("A")
	e.awaitFile(marks, "start A")
	b := run("B")
	e.awaitFile(marks, "start B") // while A still runs
	slots := advisory.SemaphoreKeys(advisory.StringKey("run-slots"), 2)
	for _, k := range slots {
		e.awaitHolders(k, 1, 0)
	}

	p := e.pglock(nil, "run", e.dsnArg(), "--key", "run-slots", "--slots", "2", "--no-wait", "--", "touch", "ran")
	e.want(p, exitConflict)
	if fileExists(filepath.Join(e.dir, "ran")) || !strings.Contains(p.stderr.String(), "all 2 slots of") {
		t.Errorf("--no-wait with both slots busy: stderr %q; want every slot said busy, and CMD not run", p.stderr.String())
	}

	d := run("D")
	c := e.conn()
	e.await("run D waiting on a slot", func() (bool, error) {
		waiting := 0
		for _, k := range slots {
			hs, err := advisory.Holders(e.ctx, c, k)
			if err != nil {
				return false, err
			}
			for _, h := range hs {
				if !h.Granted {
					waiting++
				}
			}
		}
		return waiting == 1, nil
	})
	touch(t, filepath.Join(e.dir, "release-A"))
	e.awaitFile(marks, "start D")
	touch(t, filepath.Join(e.dir, "release-B"))
	touch(t, filepath.Join(e.dir, "release-D"))
	for _, p := range []*proc{a, b, d} {
		e.wait(p)
		e.want(p, 0)
	}
	got := readLines(t, marks)
	if slices.Index(got, "end A") > slices.Index(got, "start D") {
		t.Errorf("marks = %q: D started before A ended, three at once", got)
	}

	e.want(e.pglock(nil, "run", e.dsnArg(), "--key", "x", "--slots", "0", "--", "true"), exitUsage)
	e.want(e.pglock(nil, "run", e.dsnArg(), "--key", "x", "--slots", "2", "--shared", "--", "true"), exitUsage)
}

// pglock key --slots N prints each NAME's N slot keys, as
// advisory.SemaphoreKeys has them.
func TestKeySlots(t *testing.T) {
	e := newEnv(t)
	p := e.pglock(nil, "key", "--slots", "3", "exports", "a b")
	e.want(p, 0)
	lines := strings.Split(strings.TrimSpace(p.stdout.String()), "\n")
	if len(lines) != 7 {
		t.Fatalf("pglock key --slots 3 with two names printed %d lines; want a header and 6:\n%s", len(lines), p.stdout.String())
	}
	i := 1
	for _, name := range []string{"exports", "a b"} {
		for slot, k := range advisory.SemaphoreKeys(advisory.StringKey(name), 3) {
			v, _ := k.Int64()
			want := strconv.FormatInt(v, 10)
			if f := strings.Fields(lines[i]); len(f) < 6 || f[1] != want || !strings.HasSuffix(lines[i], " slot "+strconv.Itoa(slot)+" of 3") {
				t.Errorf("line %q; want INT64 %s and slot %d of 3 of %q", lines[i], want, slot, name)
			}
			i++
		}
	}
	if !strings.HasPrefix(lines[1], "380214df2c78648c ") { // xxhsum -H1 of "int64:3609083425553560728#0"
		t.Errorf("slot 0 of exports: %q; want XXH64 380214df2c78648c", lines[1])
	}
	e.want(e.pglock(nil, "key", "--slots", "0", "x"), exitUsage)
	e.want(e.pglock(nil, "key", "--slots", "2", "--tool", "goose"), exitUsage)
}
