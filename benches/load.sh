#!/usr/bin/env bash
# The load benchmark: keygate against HAProxy and nginx doing the same job,
# on one core each, with ../shared/bench/anchors.sh, for 10,000 and
# 1,000,000 keys. Also measures cold start to first proxied request and
# memory per cached key with 1,000,000 keys.
#
#   benches/load.sh                  # both key counts, 10 s x 3 rounds
#   KEY_COUNTS=10000 DURATION=5s ROUNDS=1 benches/load.sh
#
# Needs haproxy, nginx and wrk (anchors.sh installs them from Debian).
set -euo pipefail
cd "$(dirname "$0")/.."
ANCHORS=${ANCHORS:-../shared/bench/anchors.sh}
cargo build --release --bin keygate
export KEYGATE_BIN="$PWD/target/release/keygate"
export SUBJECT_CMD="bash $PWD/benches/subject.sh"

for keys in ${KEY_COUNTS:-10000 1000000}; do
  echo "== $keys keys"
  KEYS=$keys bash "$ANCHORS"
done

if [ "${SKIP_MEMORY:-}" = "" ]; then
  python3 benches/cold_start_memory.py "$KEYGATE_BIN" "${MEMORY_KEYS:-1000000}"
fi
