#!/usr/bin/env bash
# The fault suite (tests/faults/): five replicas as processes of the real
# binary, each in its own network namespace on a shared bridge, found through
# dnsmasq, under continuous load while replicas are killed, frozen, cut off,
# rolled and while DNS is down. Prints one accounting table per scenario.
#
# Needs root (network namespaces). Installs iproute2 and dnsmasq-base when
# they are missing (idempotent; dnsmasq-base starts no system service).
#   sudo -E bash .ci/faults.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [ "$(id -u)" != 0 ]; then
  echo "the fault suite creates network namespaces and needs root: sudo -E bash .ci/faults.sh" >&2
  exit 1
fi

have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || [ -x "/sbin/$1" ]; }
missing=()
have ip || missing+=(iproute2)
have dnsmasq || missing+=(dnsmasq-base)
if [ "${#missing[@]}" -gt 0 ]; then
  echo "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

cargo test --locked --test faults -- --ignored --nocapture --test-threads 1
