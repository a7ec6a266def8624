// Package bench holds the benchmarks of github.com/seed0ad592b7/advisory
// against the floor (raw pgx on one connection, a naive pgxpool cycle) and
// the peers (goose's Postgres session locker, golang-migrate's pgx/v5
// driver). It is a module of its own, never published, so that the peers
// stay out of the library's go.mod. Everything is in the _test.go files;
// run.sh runs it all and writes the table in ../BENCHMARKS.md's format. See
// ../BENCHMARKS.md.
package bench
