package advisory

import (
	"fmt"
	"strconv"
	"strings"
	"sync"

	"github.com/cespare/xxhash/v2"
)

// keySpace says which of PostgreSQL's two advisory key spaces a Key lives in.
// Its values are the pg_locks.objsubid of the space, so that a lock row and a
// Key compare directly. The zero value marks the invalid zero Key.
type keySpace int16

const (
	spaceInt64 keySpace = 1 // pg_advisory_*(bigint)
	spacePair  keySpace = 2 // pg_advisory_*(int4, int4)
)

// Key names one advisory lock. It is a small comparable value: use it as a
// map key, and compare with ==, which is true exactly when two Keys lock the
// same thing on the server (StringKey(s) == Int64Key(int64(xxhash(s)))).
//
// The zero Key is invalid: every function given it returns an error matching
// ErrInvalidKey before sending any SQL, so key 0 is never locked by accident.
type Key struct {
	space   keySpace
	classid uint32 // pg_locks.classid: high 32 bits of the int64, or the first int4
	objid   uint32 // pg_locks.objid: low 32 bits of the int64, or the second int4
}

// Int64Key is the key pg_advisory_lock(k) takes: one bigint. Its pg_locks row
// has classid = uint32(k>>32), objid = uint32(k), objsubid = 1.
func Int64Key(k int64) Key {
	return Key{space: spaceInt64, classid: uint32(uint64(k) >> 32), objid: uint32(k)}
}

// PairKey is the key pg_advisory_lock(a, b) takes: two int4. Its pg_locks row
// has classid = uint32(a), objid = uint32(b), objsubid = 2. This key space
// never collides with Int64Key's: PairKey(0, 1) and Int64Key(1) are different
// locks.
func PairKey(a, b int32) Key {
	return Key{space: spacePair, classid: uint32(a), objid: uint32(b)}
}

// StringKey is Int64Key(int64(XXH64(s))), where XXH64 is the 64-bit xxHash of
// the UTF-8 bytes of s with seed 0 (as `xxhsum -H1` prints it). The hash is
// part of the public contract and never changes: any program, in any
// language, that hashes the same way takes the same lock. StringKey("") is a
// valid key (0xef46db3751d8e999).
//
// Different strings may, with probability about n²/2⁶⁵ for n names, hash to
// the same key; such names then share one lock.
//
// The key keeps s as its name for errors, traces and log lines (see
// NameKey, which says how many names a process keeps).
func StringKey(s string) Key {
	k := hashKey(s)
	names.remember(k, s)
	return k
}

// hashKey is StringKey without recording a name.
func hashKey(s string) Key {
	return Int64Key(int64(xxhash.Sum64String(s)))
}

// KeyFromLockRow inverts Int64Key and PairKey: it reads the classid, objid and
// objsubid columns of a pg_locks row whose locktype is 'advisory' back into
// the Key that locks it. It returns an error matching ErrInvalidKey for an
// objsubid other than 1 or 2.
func KeyFromLockRow(classid, objid uint32, objsubid int16) (Key, error) {
	switch keySpace(objsubid) {
	case spaceInt64, spacePair:
		return Key{space: keySpace(objsubid), classid: classid, objid: objid}, nil
	}
	return Key{}, fmt.Errorf("%w: pg_locks objsubid %d is not an advisory key space (want 1 or 2)", ErrInvalidKey, objsubid)
}

// Valid reports whether k names a lock, that is whether it is not the zero Key.
func (k Key) Valid() bool { return k.space == spaceInt64 || k.space == spacePair }

// Int64 returns the bigint of a key in the int64 space (Int64Key, StringKey);
// ok is false for a PairKey or the zero Key.
func (k Key) Int64() (v int64, ok bool) {
	if k.space != spaceInt64 {
		return 0, false
	}
	return int64(uint64(k.classid)<<32 | uint64(k.objid)), true
}

// Pair returns the two int4 of a PairKey; ok is false for any other Key.
func (k Key) Pair() (a, b int32, ok bool) {
	if k.space != spacePair {
		return 0, 0, false
	}
	return int32(k.classid), int32(k.objid), true
}

// LockRow returns the classid, objid and objsubid columns of the pg_locks row
// that holding k produces. For the zero Key all three are 0.
func (k Key) LockRow() (classid, objid uint32, objsubid int16) {
	return k.classid, k.objid, int16(k.space)
}

// String prints the key space and value: "int64:-1234", "pair:1,2", or
// "invalid" for the zero Key.
func (k Key) String() string {
	switch k.space {
	case spaceInt64:
		v, _ := k.Int64()
		return fmt.Sprintf("int64:%d", v)
	case spacePair:
		a, b, _ := k.Pair()
		return fmt.Sprintf("pair:%d,%d", a, b)
	}
	return "invalid"
}

// Names of keys. A Key is a comparable value of three numbers, so that ==
// means "locks the same thing" (StringKey(s) == Int64Key(int64(XXH64(s))));
// the name a key was made from cannot be a field of it. The process keeps
// the names instead, in one table from key to name shared by the whole
// process: StringKey, NameKey, SemaphoreKeys and package compat fill it, and
// errors, traces and log lines read it. It holds at most maxKeyNames names:
// once full, a key made from a new name shows only its numbers, so a
// program that makes a key per entity (StringKey("order:" + id)) cannot
// grow it without limit. The first name given to a key is kept.

// maxKeyNames is how many key names a process keeps (see NameKey).
const maxKeyNames = 4096

// maxKeyNameLen is the longest name kept whole; a longer one is cut, and
// ends with "…".
const maxKeyNameLen = 200

// keyNames is the table of names.
type keyNames struct {
	mu sync.RWMutex
	m  map[Key]string
}

var names = keyNames{m: make(map[Key]string)}

// remember records name as k's name, unless k has one or the table is full.
func (t *keyNames) remember(k Key, name string) {
	t.mu.RLock()
	_, known := t.m[k]
	full := len(t.m) >= maxKeyNames
	t.mu.RUnlock()
	if known || full {
		return
	}
	if len(name) > maxKeyNameLen {
		name = strings.ToValidUTF8(name[:maxKeyNameLen], "") + "…"
	} else {
		name = strings.Clone(name) // not a part of a larger string the caller may drop
	}
	t.mu.Lock()
	if _, known := t.m[k]; !known && len(t.m) < maxKeyNames {
		t.m[k] = name
	}
	t.mu.Unlock()
}

func (t *keyNames) lookup(k Key) (string, bool) {
	t.mu.RLock()
	name, ok := t.m[k]
	t.mu.RUnlock()
	return name, ok
}

// NameKey records name as the name of k for this process's errors, traces
// and log lines, which then show k as "name" (int64:…) rather than only its
// numbers, and returns k. It does not change k: keys compare and lock by
// their numbers alone. StringKey(s) names its key s; package compat names
// the keys of other tools ("goose", …). Use NameKey for a key made from
// numbers that has a name in your program (PairKey(tenant, job)).
//
// The first name given to a key is kept; later ones are ignored. The
// process keeps at most 4096 names (at most about 4096 × 200 bytes): once
// that many keys have names, new names are not recorded and their keys
// show only their numbers, so a program that makes a key per entity cannot
// grow the table without limit. Names longer than 200 bytes are cut.
// An invalid key gets no name.
func NameKey(k Key, name string) Key {
	if k.Valid() {
		names.remember(k, name)
	}
	return k
}

// Name returns the name this process recorded for k (see NameKey): the
// string given to StringKey, the tool's name for a key of package compat,
// NAME#i for slot i of a semaphore on a named key; "" when k has none.
func (k Key) Name() string {
	name, _ := names.lookup(k)
	return name
}

// describe is k as errors, traces and log lines show it: "int64:…" or
// "pair:A,B", preceded by its quoted name when it has one:
// "scheduler" (int64:1675389942357680994).
func (k Key) describe() string {
	if name, ok := names.lookup(k); ok {
		return strconv.Quote(name) + " (" + k.String() + ")"
	}
	return k.String()
}

// args returns the SQL arguments that name k: one int64, or two int32, which
// pick the matching pg_advisory_* overload in every pgx query exec mode.
func (k Key) args() []any { return k.appendArgs(nil) }

// appendArgs appends k's SQL arguments (see args) to args.
func (k Key) appendArgs(args []any) []any {
	if a, b, ok := k.Pair(); ok {
		return append(args, a, b)
	}
	v, _ := k.Int64()
	return append(args, v)
}
