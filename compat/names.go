package compat

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/binary"
	"hash/crc32"

	"github.com/seed0ad592b7/advisory"
)

// WithAdvisoryLock is the key the Ruby gem with_advisory_lock locks on
// PostgreSQL for the lock name name, given the integer value of the
// environment variable WITH_ADVISORY_LOCK_PREFIX (0 when it is unset or not
// a number). The formula is lock_keys_for in
// lib/with_advisory_lock/postgresql_advisory.rb with stable_hashcode in
// core_advisory.rb (with_advisory_lock 7.0; lock_keys in postgresql.rb of
// earlier versions computes the same): the pair
// (Zlib.crc32(name) & 0x7fffffff, prefix & 0x7fffffff) given to
// pg_try_advisory_lock(int4, int4). The key is a PairKey; both halves are
// non-negative, and names whose CRC-32 differ only in the top bit share it.
//
// A Ruby Integer lock name (allowed since 5.0) is used as the number itself
// instead of a CRC: for it use advisory.PairKey directly.
func WithAdvisoryLock(name string, prefix int32) advisory.Key {
	const mask = 0x7fffffff
	return advisory.NameKey(advisory.PairKey(int32(crc32.ChecksumIEEE([]byte(name))&mask), prefix&mask), "with_advisory_lock "+name)
}

// SQLx is the key Rust sqlx's PgAdvisoryLock::new(name) locks. The formula
// is PgAdvisoryLock::new in sqlx-postgres/src/advisory_lock.rs (read at
// launchbadge/sqlx main, on the way to 0.9; the type exists since 0.6, in
// sqlx-core/src/postgres/advisory_lock.rs then): HKDF-SHA256 (RFC 5869) with no salt, the bytes of name as
// input key material and the info "SQLx (Rust) Postgres advisory lock", 8
// bytes of output read as a little-endian i64, in the bigint key space.
// sqlx documents PgAdvisoryLock::new("my first Postgres advisory lock!") as
// BigInt(-5560419505042474287); so does this function.
func SQLx(name string) advisory.Key {
	const info = "SQLx (Rust) Postgres advisory lock"
	// HKDF-Extract with no salt: a salt of HashLen zero bytes.
	extract := hmac.New(sha256.New, make([]byte, sha256.Size))
	extract.Write([]byte(name))
	prk := extract.Sum(nil)
	// HKDF-Expand to 8 bytes: the first block, T(1) = HMAC(PRK, info || 0x01).
	expand := hmac.New(sha256.New, prk)
	expand.Write([]byte(info))
	expand.Write([]byte{1})
	okm := expand.Sum(nil)
	return advisory.NameKey(advisory.Int64Key(int64(binary.LittleEndian.Uint64(okm[:8]))), "sqlx "+name)
}

// DjangoPglocks is the key django-pglocks 2.0 advisory_lock(name) locks for
// a string name. The formula is resolve_lock_id in
// src/django_pglocks/_lock.py (django-pglocks 2.0.0; 2.1.0 re-exports
// django-pgware's, not checked here): the first 8 bytes of the SHA-256 of
// name's UTF-8 bytes, read big-endian as a signed 64-bit integer. Versions
// 1.x hashed names with CRC-32 and lock other keys; integer and pair lock ids
// are passed through, so use advisory.Int64Key or advisory.PairKey for them.
func DjangoPglocks(name string) advisory.Key {
	sum := sha256.Sum256([]byte(name))
	return advisory.NameKey(advisory.Int64Key(int64(binary.BigEndian.Uint64(sum[:8]))), "django-pglocks "+name)
}
