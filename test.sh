#!/usr/bin/env bash
# The test command (README, and .ci/run calls it): provides what the tests
# need, then runs them with the race detector, one package at a time (each
# package starts its own PostgreSQL, and internal/mutexcheck its own worker
# processes, which on a small machine should not compete for the CPU).
#
#   ./test.sh                          every package (a few minutes)
#   ./test.sh -run 'TestDo|TestLead' .  arguments replace the default ./...
#
# The tests need, besides Go: PostgreSQL's server binaries (or
# ADVISORY_TEST_DSN, or a Docker engine), pgbouncer, tmux (a terminal for
# what pglock shows there), and a C compiler for the race detector. Run as
# root on Debian or Ubuntu, this installs whichever is missing with apt-get.
# Otherwise it says what is missing and how to install it: the race detector
# cannot run without a C compiler, so it stops there; the PgBouncer and
# terminal tests fail with the same advice (they never skip).
# TestNetworkCut needs root (it cuts a connection inside a network namespace
# of its own) and says so when it fails.
set -euo pipefail
cd "$(dirname "$0")"

have_postgres() {
  [ -n "${ADVISORY_TEST_DSN:-}" ] || command -v pg_ctl >/dev/null 2>&1 ||
    ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1
}
have_pgbouncer() { command -v pgbouncer >/dev/null 2>&1 || [ -x /usr/sbin/pgbouncer ]; }
have_cc() { command -v "$(go env CC)" >/dev/null 2>&1; }
have_tmux() { command -v tmux >/dev/null 2>&1; }

missing=() # Debian packages
have_postgres || missing+=(postgresql)
have_pgbouncer || missing+=(pgbouncer)
have_cc || missing+=(gcc libc6-dev)
have_tmux || missing+=(tmux)

if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "test.sh: installing ${missing[*]} (apt-get)" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    have_postgres || echo "test.sh: missing: PostgreSQL's server binaries (initdb, pg_ctl, postgres);" \
      "every test will fail. Install them with: sudo apt-get install -y postgresql" \
      "(or set ADVISORY_TEST_DSN to a server's URL, or start a Docker engine)" >&2
    have_pgbouncer || echo "test.sh: missing: pgbouncer; the PgBouncer tests will fail." \
      "Install it with: sudo apt-get install -y pgbouncer" >&2
    have_tmux || echo "test.sh: missing: tmux; the tests of what pglock shows in a terminal will fail." \
      "Install it with: sudo apt-get install -y tmux" >&2
    if ! have_cc; then
      echo "test.sh: missing: a C compiler ($(go env CC)), which the race detector (go test -race) needs." \
        "Install it with: sudo apt-get install -y gcc libc6-dev" >&2
      exit 1
    fi
  fi
fi

if [ $# -eq 0 ]; then
  set -- ./...
fi
exec go test -race -count=1 -p 1 "$@"
