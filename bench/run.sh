#!/usr/bin/env bash
# Runs every benchmark of the bench module and writes, under results/:
#   bench.txt      raw `go test -bench` output (input for benchstat)
#   benchstat.txt  benchstat's summary of it
#   table.md       medians and ratios, as pasted into ../BENCHMARKS.md
# Each `go test` starts its own throw-away PostgreSQL (TestMain, through
# internal/pgtest: local binaries, or Docker, with
# max_locks_per_transaction=256). COUNT (default 6) sets -count.
# Takes about twenty minutes: one Lock per key on 10,000 keys alone is ~2 min.
set -euo pipefail
cd "$(dirname "$0")"
COUNT=${COUNT:-6}
export BENCH_FULL=1 # BenchmarkManyKeys: one Lock per key on 10,000 keys, not 1,000
mkdir -p results
: >results/bench.txt
bench() {
	echo "== go test -run '^\$' $*" >&2
	go test -run '^$' -timeout 30m "$@" . | tee -a results/bench.txt
}
bench -bench '^BenchmarkInterleaved$' -benchtime 1000x -count "$COUNT"
bench -bench '^BenchmarkCycle$' -benchtime 1s -count "$COUNT"
bench -bench '^BenchmarkCycleAblation$' -benchtime 2000x -count 3
bench -bench '^BenchmarkTxCycle$' -benchtime 1s -count "$COUNT"
bench -bench '^BenchmarkHandoff$/^(raw|pgxpool|advisory|migrate)' -benchtime 200x -count "$COUNT"
# goose polls every 5 s: 3 hand-offs per run (capped in the code), 2 runs.
bench -bench '^BenchmarkHandoff$/^goose' -benchtime 3x -count 2
bench -bench '^BenchmarkHandoffLong$' -benchtime 10x -count 3
bench -bench '^BenchmarkContended$' -benchtime 5000x -count "$COUNT"
bench -bench '^BenchmarkContendedInterleaved$' -benchtime 20x -count "$COUNT"
bench -bench '^BenchmarkContendedProcesses$' -benchtime 5x -count 2
bench -bench '^BenchmarkFailover$' -benchtime 40x -count "$COUNT" # 5 a run gave p50s from 0.8 to 3.9 ms
bench -bench '^BenchmarkManyKeys$/^LockMany' -benchtime 5x -count "$COUNT"
bench -bench '^BenchmarkManyKeys$/^Lock-per-key' -benchtime 1x -count 1
go run golang.org/x/perf/cmd/benchstat@latest results/bench.txt >results/benchstat.txt
go run ./cmd/benchtable <results/bench.txt >results/table.md
cat results/table.md
