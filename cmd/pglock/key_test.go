package main

import (
	"os/exec"
	"strconv"
	"strings"
	"testing"

	"github.com/seed0ad592b7/advisory"
)

func TestKey(t *testing.T) {
	e := newEnv(t)
	names := []string{"migrations", "", "a b", "nightly-report", "ünïcødé ✓", "tab\there"}
	p := e.pglock(nil, append([]string{"key", "--"}, names...)...)
	e.want(p, 0)
	lines := strings.Split(strings.TrimSpace(p.stdout.String()), "\n")
	if len(lines) != len(names)+1 {
		t.Fatalf("pglock key printed %d lines, want a header and %d:\n%s", len(lines), len(names), p.stdout.String())
	}
	xxhsum, xxhErr := exec.LookPath("xxhsum")
	if xxhErr != nil {
		t.Logf("xxhsum not installed (apt-get install xxhash): comparing with the library only")
	}
	for i, name := range names {
		f := strings.Fields(lines[i+1])
		if len(f) < 6 {
			t.Fatalf("line %q: want XXH64 INT64 CLASSID OBJID OBJSUBID NAME", lines[i+1])
		}
		key := advisory.StringKey(name)
		v, _ := key.Int64()
		classid, objid, objsubid := key.LockRow()
		want := []string{strconv.FormatUint(uint64(v), 16), strconv.FormatInt(v, 10),
			strconv.FormatUint(uint64(classid), 10), strconv.FormatUint(uint64(objid), 10), strconv.Itoa(int(objsubid))}
		want[0] = strings.Repeat("0", 16-len(want[0])) + want[0]
		for j, w := range want {
			if f[j] != w {
				t.Errorf("name %q: column %d = %s, want %s (advisory.StringKey)", name, j+1, f[j], w)
			}
		}
		if xxhErr == nil {
			cmd := exec.Command(xxhsum, "-H1")
			cmd.Stdin = strings.NewReader(name)
			out, err := cmd.Output()
			if err != nil {
				t.Fatalf("xxhsum -H1: %v", err)
			}
			if got := strings.Fields(string(out)); len(got) == 0 || got[0] != f[0] {
				t.Errorf("name %q: pglock key says %s, xxhsum -H1 says %q", name, f[0], out)
			}
		}
	}
	e.want(e.pglock(nil, "key"), exitUsage)
}
