package advisory

import (
	"errors"
	"math"
	"strconv"
	"strings"
	"unicode/utf8"

	"testing"

	"github.com/cespare/xxhash/v2"
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

// A key made from a name keeps it for errors, traces and log lines, without
// changing what == compares; a key made from numbers shows its numbers; the
// process keeps a bounded number of names.
func TestKeyNames(t *testing.T) {
	newEnv(t)
	freshKeyNames(t)
	k := StringKey("scheduler")
	if k != Int64Key(int64(xxhash.Sum64String("scheduler"))) {
		t.Fatal("a named StringKey is not == the Int64Key of its hash")
	}
	if k.Name() != "scheduler" {
		t.Errorf("StringKey(scheduler).Name() = %q", k.Name())
	}
	if got, want := keyError("lock", k, ErrTimeout, nil).Error(), `advisory: lock "scheduler" (`+k.String()+`): timed out`; !strings.HasPrefix(got, want) {
		t.Errorf("error = %q; want it to begin %q", got, want)
	}
	n := Int64Key(-4242)
	if got, want := keyError("lock", n, ErrTimeout, nil).Error(), "advisory: lock int64:-4242: timed out"; !strings.HasPrefix(got, want) || n.Name() != "" {
		t.Errorf("a numeric key: error %q, name %q; want it to begin %q, no name", got, n.Name(), want)
	}
	p := NameKey(PairKey(3, 7), "tenant 3 job 7")
	NameKey(PairKey(3, 7), "a later name")
	if p != PairKey(3, 7) || p.describe() != `"tenant 3 job 7" (pair:3,7)` {
		t.Errorf("NameKey(PairKey(3, 7)) = %v, shown %s; want the same key, shown with its first name", p, p.describe())
	}
	if NameKey(Key{}, "zero").Name() != "" {
		t.Error("the zero Key got a name")
	}
	slots := SemaphoreKeys(StringKey("exports"), 2)
	if slots[1] != hashKey(StringKey("exports").String()+"#1") || slots[1].Name() != "exports#1" {
		t.Errorf("slot 1 of exports = %v named %q; want the slot formula's key named exports#1", slots[1], slots[1].Name())
	}
	if got := SemaphoreKeys(Int64Key(-4243), 1)[0].Name(); got != "int64:-4243#0" {
		t.Errorf("slot 0 of a numeric key is named %q; want its StringKey's string", got)
	}

	// The bound: a table that is full takes no new name; a long name is cut.
	tbl := keyNames{m: make(map[Key]string)}
	for i := range maxKeyNames + 100 {
		tbl.remember(Int64Key(int64(i)), "entity:"+strconv.Itoa(i))
	}
	if len(tbl.m) != maxKeyNames {
		t.Errorf("the table holds %d names after %d keys; want the bound %d", len(tbl.m), maxKeyNames+100, maxKeyNames)
	}
	if _, ok := tbl.lookup(Int64Key(maxKeyNames)); ok {
		t.Error("a key named after the table was full has a name")
	}
	long := strings.Repeat("é", 150) // 300 bytes
	tbl = keyNames{m: make(map[Key]string)}
	tbl.remember(Int64Key(1), long)
	if got, _ := tbl.lookup(Int64Key(1)); len(got) > maxKeyNameLen+len("…") || !strings.HasSuffix(got, "…") || !utf8.ValidString(got) {
		t.Errorf("a 300-byte name is kept as %q (%d bytes); want it cut to %d bytes of valid UTF-8 and …", got, len(got), maxKeyNameLen)
	}
}

// freshKeyNames gives the test an empty table of key names, as a process
// that has just started has: the tests before it may have filled the
// table's 4096 names (LockMany's tests alone make thousands of keys), and a
// key named after that shows only its numbers.
func freshKeyNames(t *testing.T) {
	names.mu.Lock()
	saved := names.m
	names.m = make(map[Key]string)
	names.mu.Unlock()
	t.Cleanup(func() {
		names.mu.Lock()
		names.m = saved
		names.mu.Unlock()
	})
}
