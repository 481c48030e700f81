#!/usr/bin/env bash
# Runs every fuzz target (fuzz/, cargo-fuzz + libFuzzer, nightly toolchain)
# for a bounded time each and prints its executions; a crash fails the run
# and leaves the input in fuzz/artifacts/<target>/.
#
#   bash .ci/fuzz.sh [seconds per target]        (default 20)
#
# Installs cargo-fuzz from crates.io when missing (idempotent). Longer runs:
#   cargo +nightly fuzz run decode_requests -- -max_total_time=3600
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
SECONDS_EACH=${1:-20}

rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
command -v cargo-fuzz >/dev/null || cargo install --locked cargo-fuzz

cargo +nightly fuzz build
status=0
for target in $(cargo +nightly fuzz list); do
  log=$(mktemp)
  if cargo +nightly fuzz run "$target" -- -max_total_time="$SECONDS_EACH" -rss_limit_mb=2048 >"$log" 2>&1; then
    runs=$(grep -oE '#[0-9]+' "$log" | tail -1 | tr -d '#')
    echo "ok - fuzz $target: ${runs:-?} executions in ${SECONDS_EACH}s, no crash"
  else
    echo "not ok - fuzz $target"
    tail -40 "$log" | sed 's/^/    /'
    status=1
  fi
  rm -f "$log"
done
exit $status
