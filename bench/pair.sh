#!/usr/bin/env bash
# Runs the same benchmarks on two revisions, interleaved, ROUNDS rounds
# (default 3), and compares them with cmd/benchpair: each subject against
# its floor in the same `go test` run. Usage, from bench/:
#   ./pair.sh BEFORE AFTER        # git revisions, e.g. 56c0c66 HEAD
# With BENCH set, each round runs only `go test -bench "$BENCH" -benchtime
# "$BENCHTIME"` (default 1000x) a side, e.g.
#   BENCH='^BenchmarkInterleaved$/^handoff-split$' BENCHTIME=500x ./pair.sh A B
# Writes results/pair-{before,after}.txt, results/pair-load.txt (uptime
# before and after each round) and results/pair.md. Each revision is
# checked out in a temporary worktree, and AFTER's bench/ is copied into
# BEFORE's, so that both sides run the same benchmark code against their
# own library (bench/go.mod replaces the library with ../).
set -euo pipefail
cd "$(dirname "$0")"
before=$(git rev-parse "$1") after=$(git rev-parse "$2") rounds=${ROUNDS:-3}
here=$PWD tmp=$(mktemp -d)
trap 'git worktree remove --force "$tmp/before" >/dev/null 2>&1 || true; git worktree remove --force "$tmp/after" >/dev/null 2>&1 || true; rm -rf "$tmp"' EXIT
git worktree add --detach "$tmp/before" "$before" >/dev/null
git worktree add --detach "$tmp/after" "$after" >/dev/null
rm -rf "$tmp/before/bench" && cp -r "$tmp/after/bench" "$tmp/before/bench"
mkdir -p results
: >results/pair-before.txt; : >results/pair-after.txt
uptime >results/pair-load.txt
for round in $(seq "$rounds"); do
	for side in before after; do
		echo "# round $round" >>"results/pair-$side.txt"
		cd "$tmp/$side/bench"
		b() { go test -run '^$' -timeout 20m "$@" . 2>&1 | grep -E '^Benchmark' >>"$here/results/pair-$side.txt" || true; }
		if [ -n "${BENCH:-}" ]; then
			b -bench "$BENCH" -benchtime "${BENCHTIME:-1000x}" -count 1
			cd "$here"
			continue
		fi
		b -bench '^BenchmarkInterleaved$' -benchtime 1000x -count 1
		b -bench '^BenchmarkCycle$/^(raw-pgx|advisory-session|advisory-acquire|advisory-locktx)$' -benchtime 2s -benchmem -count 1
		b -bench '^BenchmarkHandoffLong$' -benchtime 10x -count 1
		b -bench '^BenchmarkContended$/^(raw-pgx|advisory-session|advisory-acquire|advisory-locktx)$' -benchtime 8000x -count 1
		b -bench '^BenchmarkContendedInterleaved$' -benchtime 20x -count 1
		b -bench '^BenchmarkFailover$' -benchtime 8x -count 1
		cd "$here"
	done
	uptime >>results/pair-load.txt
done
go run ./cmd/benchpair results/pair-before.txt results/pair-after.txt | tee results/pair.md
