#!/usr/bin/env bash
# Server-side floor of contended locking, without any Go client: pgbench
# (a C client, simple protocol) runs each script with 16 clients on 4 keys
# for SECONDS (default 4) seconds, ROUNDS rounds (default 4) interleaved,
# against a throw-away PostgreSQL started here (initdb, as user postgres
# when run as root), and prints each script's tps per round and its median
# against raw.sql. Needs the PostgreSQL server binaries (pg_config
# --bindir, or /usr/lib/postgresql/*/bin).
set -euo pipefail
cd "$(dirname "$0")"
bindir=$(pg_config --bindir 2>/dev/null || ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
rounds=${ROUNDS:-4} seconds=${SECONDS_EACH:-4}
dir=$(mktemp -d) port=$((20000 + RANDOM % 20000))
as=()
if [ "$(id -u)" = 0 ]; then chown postgres "$dir"; as=(runuser -u postgres --); fi
"${as[@]}" "$bindir/initdb" -D "$dir/data" -A trust -U postgres >/dev/null
"${as[@]}" "$bindir/pg_ctl" -D "$dir/data" -l "$dir/log" -w \
	-o "-p $port -k $dir -c listen_addresses=127.0.0.1 -c fsync=off" start >/dev/null
trap '"${as[@]}" "$bindir/pg_ctl" -D "$dir/data" -m immediate stop >/dev/null; rm -rf "$dir"' EXIT
uptime
scripts=(raw slice-only try-slice try-slice-56c0c66)
declare -A tps
for r in $(seq "$rounds"); do
	for s in "${scripts[@]}"; do
		t=$("$bindir/pgbench" -h 127.0.0.1 -p "$port" -U postgres -n -M simple -f "$s.sql" \
			-T "$seconds" -c 16 -j 2 postgres 2>/dev/null | awk '/^tps/ {printf "%d", $3}')
		tps[$s]+="$t "
	done
done
uptime
for s in "${scripts[@]}"; do
	med=$(tr ' ' '\n' <<<"${tps[$s]}" | grep . | sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}')
	[ "$s" = raw ] && rawmed=$med
	awk -v s="$s" -v all="${tps[$s]}" -v m="$med" -v raw="$rawmed" \
		'BEGIN { printf "%-20s tps per round: %s median %s (%.2f x raw)\n", s, all, m, m / raw }'
done
