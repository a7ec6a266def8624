package main

import (
	"os/exec"
	"strconv"
	"strings"
	"testing"

	"github.com/seed0ad592b7/advisory"
	"github.com/seed0ad592b7/advisory/compat"
)

func TestKey(t *testing.T) {
	e := newEnv(t)
	names := []string{"migrations", "", "a b", "nightly-report", "ünïcødé ✓", "tab\there"}
	p := e.pglock(nil, append([]string{"key", "--empty-key", "--"}, names...)...)
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

func TestKeyTool(t *testing.T) {
	e := newEnv(t)
	for _, c := range []struct {
		args []string
		want []advisory.Key
	}{
		{[]string{"goose"}, []advisory.Key{compat.Goose()}},
		{[]string{"migrate", "app"}, []advisory.Key{
			compat.GolangMigrate("app", "public", "schema_migrations"),
			compat.GolangMigrate("/app", "public", "schema_migrations")}},
		{[]string{"migrate", "/app", "billing"}, []advisory.Key{compat.GolangMigrate("/app", "billing", "schema_migrations")}},
		{[]string{"migrate", "app", "billing", "versions"}, []advisory.Key{
			compat.GolangMigrate("app", "billing", "versions"),
			compat.GolangMigrate("/app", "billing", "versions")}},
		{[]string{"rails", "app_production"}, []advisory.Key{compat.Rails("app_production")}},
		{[]string{"sqlx-migrate", "app"}, []advisory.Key{compat.SQLxMigrate("app")}},
	} {
		p := e.pglock(nil, append([]string{"key", "--tool"}, c.args...)...)
		e.want(p, 0)
		lines := strings.Split(strings.TrimSpace(p.stdout.String()), "\n")
		if len(lines) != len(c.want)+1 {
			t.Fatalf("pglock key --tool %q printed:\n%s\nwant a header and %d lines", c.args, p.stdout.String(), len(c.want))
		}
		for i, key := range c.want {
			f := strings.Fields(lines[i+1])
			v, _ := key.Int64()
			classid, objid, objsubid := key.LockRow()
			want := []string{strconv.FormatInt(v, 10), strconv.FormatUint(uint64(classid), 10),
				strconv.FormatUint(uint64(objid), 10), strconv.Itoa(int(objsubid))}
			if len(f) < 5 || strings.Join(f[:4], " ") != strings.Join(want, " ") {
				t.Errorf("pglock key --tool %q line %d: %q, want %s and a description", c.args, i+1, lines[i+1], want)
			}
		}
	}
	for _, args := range [][]string{{"flyway"}, {"goose", "extra"}, {"migrate"}, {"migrate", "a", "b", "c", "d"}, {"rails"}, {"sqlx-migrate", "a", "b"}} {
		p := e.pglock(nil, append([]string{"key", "--tool"}, args...)...)
		e.want(p, exitUsage)
		if !strings.Contains(p.stderr.String(), "Usage") || p.stdout.Len() != 0 {
			t.Errorf("pglock key --tool %q: stdout %q, stderr %q; want a usage message", args, p.stdout.String(), p.stderr.String())
		}
	}
}
