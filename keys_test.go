package advisory

import (
	"errors"
	"math"

	"github.com/cespare/xxhash/v2"
	"testing"
)

// The string hash is public contract: these vectors never change. They were
// checked with `printf '%s' NAME | xxhsum -H1`.
var stringKeyVectors = []struct {
	name string
	hash uint64
}{
	{"", 0xef46db3751d8e999},
	{"migrations", 0x23f88320627775ab},
	{"größe/日本", 0xe04b1d307aaa84c7},
}

func TestStringKeyVectors(t *testing.T) {
	newEnv(t)
	for _, v := range stringKeyVectors {
		got, ok := StringKey(v.name).Int64()
		if !ok || uint64(got) != v.hash {
			t.Errorf("StringKey(%q) = %#x, want %#x", v.name, uint64(got), v.hash)
		}
		if StringKey(v.name) != Int64Key(int64(v.hash)) {
			t.Errorf("StringKey(%q) != Int64Key(its hash)", v.name)
		}
	}
}

func TestKeyValues(t *testing.T) {
	newEnv(t)
	cases := []struct {
		key            Key
		str            string
		classid, objid uint32
		objsubid       int16
	}{
		{Int64Key(1), "int64:1", 0, 1, 1},
		{Int64Key(-1), "int64:-1", 0xffffffff, 0xffffffff, 1},
		{Int64Key(math.MinInt64), "int64:-9223372036854775808", 0x80000000, 0, 1},
		{Int64Key(0x123456789), "int64:4886718345", 1, 0x23456789, 1},
		{PairKey(1, 2), "pair:1,2", 1, 2, 2},
		{PairKey(-1, math.MinInt32), "pair:-1,-2147483648", 0xffffffff, 0x80000000, 2},
	}
	for _, c := range cases {
		if s := c.key.String(); s != c.str {
			t.Errorf("String() = %q, want %q", s, c.str)
		}
		classid, objid, objsubid := c.key.LockRow()
		if classid != c.classid || objid != c.objid || objsubid != c.objsubid {
			t.Errorf("%s: LockRow() = %d,%d,%d, want %d,%d,%d", c.key, classid, objid, objsubid, c.classid, c.objid, c.objsubid)
		}
		back, err := KeyFromLockRow(classid, objid, objsubid)
		if err != nil || back != c.key {
			t.Errorf("%s: KeyFromLockRow = %v, %v", c.key, back, err)
		}
	}
	if PairKey(0, 1) == Int64Key(1) {
		t.Error("PairKey(0, 1) == Int64Key(1): the key spaces must not collide")
	}
	if (Key{}).Valid() || (Key{}).String() != "invalid" {
		t.Errorf("zero Key: Valid() = true or String() = %q", Key{}.String())
	}
	for _, sub := range []int16{0, 3, -1} {
		if _, err := KeyFromLockRow(1, 2, sub); !errors.Is(err, ErrInvalidKey) {
			t.Errorf("KeyFromLockRow(objsubid %d) = %v, want ErrInvalidKey", sub, err)
		}
	}
	// Keys are map keys: equal keys collapse.
	m := map[Key]int{StringKey("migrations"): 1}
	m[Int64Key(0x23f88320627775ab)]++
	if len(m) != 1 || m[StringKey("migrations")] != 2 {
		t.Errorf("map keyed by Key: %v", m)
	}
}

func FuzzKeyRoundTrip(f *testing.F) {
	f.Add(int64(0), int32(0), int32(0), "")
	f.Add(int64(-1), int32(-1), int32(math.MaxInt32), "migrations")
	f.Add(int64(math.MinInt64), int32(math.MinInt32), int32(7), "größe/日本")
	f.Fuzz(func(t *testing.T, k int64, a, b int32, s string) {
		for _, key := range []Key{Int64Key(k), PairKey(a, b), StringKey(s)} {
			back, err := KeyFromLockRow(key.LockRow())
			if err != nil || back != key {
				t.Fatalf("%s: round trip gave %v, %v", key, back, err)
			}
		}
		if v, ok := Int64Key(k).Int64(); !ok || v != k {
			t.Fatalf("Int64Key(%d).Int64() = %d, %v", k, v, ok)
		}
		if x, y, ok := PairKey(a, b).Pair(); !ok || x != a || y != b {
			t.Fatalf("PairKey(%d, %d).Pair() = %d, %d, %v", a, b, x, y, ok)
		}
		if StringKey(s) != Int64Key(int64(xxhash.Sum64([]byte(s)))) {
			t.Fatalf("StringKey(%q) is not Int64Key of its XXH64", s)
		}
	})
}

func FuzzKeyFromLockRow(f *testing.F) {
	f.Add(uint32(0), uint32(0), int16(1))
	f.Add(uint32(math.MaxUint32), uint32(1), int16(2))
	f.Add(uint32(5), uint32(6), int16(0))
	f.Fuzz(func(t *testing.T, classid, objid uint32, objsubid int16) {
		key, err := KeyFromLockRow(classid, objid, objsubid)
		if objsubid != 1 && objsubid != 2 {
			if !errors.Is(err, ErrInvalidKey) || key.Valid() {
				t.Fatalf("objsubid %d: got %v, %v", objsubid, key, err)
			}
			return
		}
		c, o, s := key.LockRow()
		if err != nil || c != classid || o != objid || s != objsubid {
			t.Fatalf("round trip of %d,%d,%d gave %d,%d,%d, %v", classid, objid, objsubid, c, o, s, err)
		}
	})
}
