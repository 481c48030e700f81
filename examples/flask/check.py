#!/usr/bin/env python3
"""Runs examples/flask/app.py against a real 3-replica ``replicast dev-cluster``,
three ways, each replica with its own app (gunicorn, 3 workers) on its own
address, as each pod would have; every check is made from outside, over HTTP.

  a. sync workers, receiving through the webhook, with --webhook-ack: one
     request to one pod invalidates the key in every pod, and the Broadcast's
     receipts already mean the apps processed it (checked at once);
  b. sync workers, each with its own Subscribe stream (the replicast
     package): the key is invalidated in every worker of every pod;
  c. gevent workers, publishing through the local HTTP API with requests and
     receiving through the package: every worker of every pod again;
  and a traced run: the app's Flask span (OpenTelemetry) is in the trace of
  the Broadcast that caused it.

    python3 examples/flask/check.py target/release/replicast

Needs: pip install -r examples/flask/requirements.txt ./clients/python
Prints one "ok -"/"not ok -" line per check; exits 1 if any failed.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

import replicast

HERE = Path(__file__).resolve().parent
IPS = ["127.0.0.1", "127.0.0.2", "127.0.0.3"]
WORKERS = 3
KEY = "user:42"
failures = 0


def ok(name: str) -> None:
    print(f"ok - {name}", flush=True)


def not_ok(name: str, why: str) -> None:
    global failures
    failures += 1
    print(f"not ok - {name}\n    {why}", flush=True)


def free_port() -> int:
    """A port free on every replica address."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind((IPS[0], 0))
            port = probe.getsockname()[1]
        try:
            for ip in IPS:
                with socket.socket() as s:
                    s.bind((ip, port))
            return port
        except OSError:
            continue
    raise RuntimeError("no port free on 127.0.0.1-3")


def eventually(what: str, within: float, condition):
    deadline = time.monotonic() + within
    last = None
    while time.monotonic() < deadline:
        last = condition()
        if last:
            return last
        time.sleep(0.1)
    raise AssertionError(f"{what}: not within {within}s (last: {last!r})")


class Processes:
    """Every process of one run, stopped (SIGTERM, then SIGKILL) at the end."""

    def __init__(self, work: Path):
        self.work = work
        self.started: list[tuple[str, subprocess.Popen, Path]] = []

    def start(self, name: str, argv: list[str], env: dict | None = None) -> subprocess.Popen:
        log = self.work / f"{name}.log"
        process = subprocess.Popen(
            argv,
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            cwd=HERE,
        )
        self.started.append((name, process, log))
        return process

    def tails(self) -> str:
        out = []
        for name, _, log in self.started:
            lines = log.read_text(errors="replace").splitlines()[-15:]
            out.append(f"--- {name} ({log})\n" + "\n".join(lines))
        return "\n".join(out)

    def stop(self) -> None:
        for _, process, _ in reversed(self.started):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for _, process, _ in reversed(self.started):
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def workers_of(ip: str, port: int, path: str, rounds: int = 60) -> dict[int, dict]:
    """Reaches every worker of one app from outside: rounds of concurrent
    requests that each hold their worker 100 ms, until WORKERS pids answered.
    Returns the newest answer of each pid."""
    seen: dict[int, dict] = {}
    with ThreadPoolExecutor(2 * WORKERS) as pool:
        for _ in range(rounds):
            answers = pool.map(
                lambda _: requests.get(f"http://{ip}:{port}{path}", params={"hold": 0.1}, timeout=5).json(),
                range(2 * WORKERS),
            )
            for answer in answers:
                seen[answer["pid"]] = answer
            if len(seen) >= WORKERS:
                return seen
    raise AssertionError(f"only {len(seen)} of {WORKERS} workers of {ip}:{port} answered: {seen}")


def run(binary: str, name: str, *, worker_class: str, receive: str, publish: str, traced: bool = False) -> None:
    work = Path(tempfile.mkdtemp(prefix=f"replicast-flask-{name}-"))
    processes = Processes(work)
    grpc_port, api_port, app_port = free_port(), free_port(), free_port()
    cluster = [binary, "dev-cluster", "--port", str(grpc_port), "--quiet", "--http-port", str(api_port)]
    if receive == "webhook":
        cluster += ["--webhook", f"http://{{ip}}:{app_port}/events#topics=cache.*", "--webhook-ack"]
    spans_file = work / "spans.jsonl"
    if traced:
        # One OTLP/HTTP collector for replicast and the apps, as a Jaeger or
        # Tempo would be: it writes every span it gets as a JSON line.
        collector_port = free_port()
        processes.start(
            "collector",
            [sys.executable, "-c", COLLECTOR, str(collector_port), str(spans_file)],
        )
        cluster += ["--otlp-endpoint", f"http://127.0.0.1:{collector_port}", "--otlp-protocol", "http/protobuf"]
    try:
        processes.start("dev-cluster", cluster)
        for ip in IPS:
            env = {
                "REPLICAST_TO": f"{ip}:{grpc_port}",
                "REPLICAST_HTTP": f"http://{ip}:{api_port}",
                "RECEIVE": receive,
                "PUBLISH": publish,
            }
            if traced:
                env["OTEL_EXPORTER_OTLP_ENDPOINT"] = f"http://127.0.0.1:{collector_port}"
                env["OTEL_SERVICE_NAME"] = f"flask-app-{ip}"
            processes.start(
                f"app-{ip}",
                [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "-k", worker_class,
                 "-b", f"{ip}:{app_port}", "app:app"],
                env,
            )
        for ip in IPS:
            with replicast.Client(f"{ip}:{grpc_port}") as client:
                eventually(f"replica {ip} SERVING", 30, lambda: _quiet(lambda: client.health() == "SERVING"))
            eventually(f"app {ip} up", 30, lambda: _quiet(lambda: requests.get(
                f"http://{ip}:{app_port}/healthz", timeout=2).ok))

        # Every worker of every pod caches the key (and, receiving through
        # Subscribe, has its stream attached).
        for ip in IPS:
            cached = workers_of(ip, app_port, f"/cache/{KEY}")
            assert len(cached) == WORKERS
            if receive == "subscribe":
                eventually(f"every worker of {ip} attached", 20,
                           lambda: all(w["attached"] for w in workers_of(ip, app_port, f"/state/{KEY}").values()))
        ok(f"{name}: 3 pods up, each with {WORKERS} {worker_class} workers holding {KEY!r}")

        # One request to one pod.
        answer = requests.post(f"http://{IPS[0]}:{app_port}/cache/{KEY}/invalidate", timeout=10)
        body = answer.json()
        assert answer.status_code == 200 and body["acked"] == 3, body
        ok(f"{name}: POST /cache/{KEY}/invalidate on pod 1 broadcast it (ack=ALL, 3 of 3, via {body['via']})")

        if receive == "webhook":
            # --webhook-ack: the receipts meant "processed by the app", so
            # every pod's app has it now, with no waiting. One worker per pod.
            for ip in IPS:
                states = workers_of(ip, app_port, f"/state/{KEY}")
                heard = {pid: s["heard"] for pid, s in states.items()}
                hearing = [pid for pid, n in heard.items() if n]
                assert len(hearing) == 1 and heard[hearing[0]] == 1, f"{ip}: {heard}"
                assert not states[hearing[0]]["cached"], f"{ip}: {states}"
            ok(f"{name}: every pod had invalidated it when the Broadcast answered "
               "(--webhook-ack), in one worker per pod, as a webhook reaches one")
        else:
            for ip in IPS:
                def all_heard():
                    states = workers_of(ip, app_port, f"/state/{KEY}")
                    return all(s["heard"] == 1 and not s["cached"] for s in states.values()) and states
                states = eventually(f"every worker of {ip} to invalidate {KEY}", 10, all_heard)
                assert len(states) == WORKERS
            ok(f"{name}: every one of the {WORKERS} workers of every pod invalidated it, once")

        if traced:
            trace_id, caller = secrets.token_hex(16), secrets.token_hex(8)
            answer = requests.post(
                f"http://{IPS[1]}:{api_port}/v1/broadcast",
                json={"topic": "cache.invalidate", "payload": base64.b64encode(b"traced").decode(),
                      "ack": "ACK_POLICY_ALL"},
                headers={"traceparent": f"00-{trace_id}-{caller}-01", "Grpc-Timeout": "2S"},
                timeout=5,
            )
            assert answer.status_code == 200, answer.text

            def trace_spans():
                if not spans_file.exists():
                    return None
                spans = [json.loads(line) for line in spans_file.read_text().splitlines()]
                ours = [s for s in spans if s["trace_id"] == trace_id]
                apps = [s for s in ours if s["service"].startswith("flask-app")]
                return ours if len(apps) == 3 and any(s["name"].startswith("process") for s in ours) else None

            spans = eventually("the whole trace at the collector: replicast's spans and each app's", 20, trace_spans)
            time.sleep(1.0)  # late spans of the same trace
            spans = trace_spans()
            by_id = {s["span_id"]: s for s in spans}
            api = [s for s in spans if s["name"] == "POST /v1/broadcast"]
            assert len(api) == 1 and api[0]["parent_span_id"] == caller, ("the API call continues the caller", spans)
            apps = [s for s in spans if s["service"].startswith("flask-app")]
            assert sorted(s["service"] for s in apps) == [f"flask-app-{ip}" for ip in IPS], apps
            for span in apps:
                assert span["name"] == "POST /events" and span["kind"] == "SERVER", span
                parent = by_id.get(span["parent_span_id"])
                assert parent is not None and parent["name"] == "process cache.invalidate", (
                    "each app's handler span is the child of its replica's delivery span", span, parent)
                assert parent["service"] == "replicast", parent
            ok(f"{name}: traced: one trace {trace_id} at the collector holds the API call, the fan-out, "
               "each replica's delivery and, under each, that pod's Flask handler span (POST /events)")
    except AssertionError as err:
        not_ok(f"{name}", f"{err}\n{processes.tails()}")
    finally:
        processes.stop()


def _quiet(check):
    with contextlib.suppress(Exception):
        return check()
    return False


COLLECTOR = """
import http.server, json, sys, threading
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
lock = threading.Lock()
out = open(sys.argv[2], "a", buffering=1)
class Collector(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        request = ExportTraceServiceRequest.FromString(self.rfile.read(int(self.headers.get("content-length", 0))))
        with lock:
            for resource_spans in request.resource_spans:
                service = next((a.value.string_value for a in resource_spans.resource.attributes
                                if a.key == "service.name"), "")
                for scope in resource_spans.scope_spans:
                    for span in scope.spans:
                        out.write(json.dumps({
                            "service": service, "name": span.name, "trace_id": span.trace_id.hex(),
                            "span_id": span.span_id.hex(), "parent_span_id": span.parent_span_id.hex(),
                            "kind": ["UNSPECIFIED", "INTERNAL", "SERVER", "CLIENT", "PRODUCER", "CONSUMER"][span.kind],
                        }) + "\\n")
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Collector).serve_forever()
"""


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    binary = str(Path(sys.argv[1]).resolve())
    run(binary, "a (sync workers, webhook)", worker_class="sync", receive="webhook", publish="grpc", traced=True)
    run(binary, "b (sync workers, Subscribe per worker)", worker_class="sync", receive="subscribe", publish="grpc")
    run(binary, "c (gevent workers, HTTP API in, Subscribe per worker)", worker_class="gevent",
        receive="subscribe", publish="http")
    print(f"flask examples: {'all passed' if not failures else f'{failures} failed'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
