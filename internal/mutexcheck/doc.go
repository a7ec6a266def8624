// Package mutexcheck is a mutual-exclusion checker for package advisory: its
// tests start several OS processes (the test binary re-executing itself),
// each running several goroutines that take one of a few keys and do a
// read-modify-write on a counter row through a different connection, while
// every critical section records the server's clock_timestamp() at entry and
// exit on the lock's own session. The intervals and counters are then checked
// with SQL: completed sections never overlap (shared holders may overlap each
// other, never an exclusive holder), counters equal the completed sections,
// interrupted holders were told, and fenced writes of holders that lost their
// lock never landed. See RELIABILITY.md at the repository root.
//
// The package has no code outside its tests.
package mutexcheck
