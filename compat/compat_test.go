package compat

import (
	"hash/crc32"
	"testing"

	"github.com/seed0ad592b7/advisory"
)

// vector is one name's keys, as compat/testdata/vectors.py computes them.
type vector struct {
	name               string
	migrate            uint32 // GolangMigrate(name, "public", "schema_migrations")
	rails, sqlxMigrate int64
	sqlx, django       int64
	wal0, walMinus7    [2]int32 // WithAdvisoryLock(name, 0) and (name, -7)
}

func TestVectors(t *testing.T) {
	for _, v := range vectors {
		for _, c := range []struct {
			tool string
			got  advisory.Key
			want advisory.Key
		}{
			{"GolangMigrate", GolangMigrate(v.name, "public", "schema_migrations"), advisory.Int64Key(int64(v.migrate))},
			{"Rails", Rails(v.name), advisory.Int64Key(v.rails)},
			{"SQLxMigrate", SQLxMigrate(v.name), advisory.Int64Key(v.sqlxMigrate)},
			{"SQLx", SQLx(v.name), advisory.Int64Key(v.sqlx)},
			{"DjangoPglocks", DjangoPglocks(v.name), advisory.Int64Key(v.django)},
			{"WithAdvisoryLock/0", WithAdvisoryLock(v.name, 0), advisory.PairKey(v.wal0[0], v.wal0[1])},
			{"WithAdvisoryLock/-7", WithAdvisoryLock(v.name, -7), advisory.PairKey(v.walMinus7[0], v.walMinus7[1])},
		} {
			if c.got != c.want {
				t.Errorf("%s(%.40q) = %s, want %s (vectors.py)", c.tool, v.name, c.got, c.want)
			}
		}
	}
}

// TestDocumentedExamples checks the values the tools themselves publish.
func TestDocumentedExamples(t *testing.T) {
	// sqlx-postgres advisory_lock.rs, PgAdvisoryLock::new's doc example.
	if got, want := SQLx("my first Postgres advisory lock!"), advisory.Int64Key(-5560419505042474287); got != want {
		t.Errorf("SQLx(sqlx's example) = %s, want %s", got, want)
	}
	// goose lock/session_locker_options.go: DefaultLockID is the CRC-32 of "goose".
	if got, want := Goose(), advisory.Int64Key(int64(crc32.ChecksumIEEE([]byte("goose")))); got != want {
		t.Errorf("Goose() = %s, want crc32(\"goose\") = %s", got, want)
	}
}

// TestKeySpaces checks the signedness and width details each tool implies:
// golang-migrate's uint32 is a non-negative bigint, Rails' and sqlx's
// products fit in 63 bits, with_advisory_lock's pair has no sign bit.
func TestKeySpaces(t *testing.T) {
	for _, name := range []string{"", "a", "app_production", "\xff\xfe invalid UTF-8"} {
		for _, k := range []advisory.Key{GolangMigrate(name, "s", "t"), Rails(name), SQLxMigrate(name)} {
			v, ok := k.Int64()
			if !ok || v < 0 {
				t.Errorf("%q: %s, want a non-negative bigint key", name, k)
			}
		}
		if v, _ := GolangMigrate(name, "s", "t").Int64(); v > 1<<32-1 {
			t.Errorf("GolangMigrate(%q) = %d, above uint32", name, v)
		}
		for _, prefix := range []int32{0, 1, -1, -1 << 31, 1<<31 - 1} {
			a, b, ok := WithAdvisoryLock(name, prefix).Pair()
			if !ok || a < 0 || b < 0 || b != prefix&0x7fffffff {
				t.Errorf("WithAdvisoryLock(%q, %d) = %s, want a non-negative pair ending in %d", name, prefix, WithAdvisoryLock(name, prefix), prefix&0x7fffffff)
			}
		}
	}
	// The argument order matters: golang-migrate hashes schema, table, database.
	if GolangMigrate("a", "b", "c") == GolangMigrate("c", "a", "b") {
		t.Error("GolangMigrate ignores its argument order")
	}
}

// The keys of other tools are named for errors, traces and log lines.
func TestKeyNames(t *testing.T) {
	for key, want := range map[advisory.Key]string{
		Goose(): "goose",
		GolangMigrate("app", "public", "schema_migrations"): "golang-migrate app public.schema_migrations",
		Rails("app"):                "rails app",
		SQLxMigrate("app"):          "sqlx-migrate app",
		SQLx("jobs"):                "sqlx jobs",
		WithAdvisoryLock("jobs", 0): "with_advisory_lock jobs",
		DjangoPglocks("jobs"):       "django-pglocks jobs",
	} {
		if key.Name() != want {
			t.Errorf("%v is named %q; want %q", key, key.Name(), want)
		}
	}
}
