"""A Flask app with an in-memory cache that must hear about invalidations
from every pod: the problem replicast exists for.

Each pod runs this app (under gunicorn, several workers) next to its
replicast sidecar. ``POST /cache/<key>/invalidate`` on any pod broadcasts
``cache.invalidate`` to every replica; each replica hands it to its own app:

* ``RECEIVE=webhook``: replicast POSTs a CloudEvent to ``/events``. One
  worker per pod gets it (whichever accepts the connection): right for
  state the pod's workers share (a file, a local Redis), not for a cache per
  worker.
* ``RECEIVE=subscribe``: every worker holds its own Subscribe stream
  (``replicast.Subscriber``, started in each worker by
  ``replicast.gunicorn.post_worker_init``), so every worker's cache hears
  every invalidation.

It publishes through the sidecar's gRPC port (``PUBLISH=grpc``, the
``replicast`` package) or its local HTTP/JSON API (``PUBLISH=http``, plain
``requests``: nothing gRPC in the request path, which is what a gevent
worker wants).

Environment: ``REPLICAST_TO`` (the sidecar's gRPC address),
``REPLICAST_HTTP`` (its HTTP API, for PUBLISH=http), ``RECEIVE``,
``PUBLISH``, and the standard ``OTEL_EXPORTER_OTLP_ENDPOINT`` (and
``OTEL_SERVICE_NAME``) to export this app's spans (Flask's instrumentation).
"""

from __future__ import annotations

import base64
import logging
import os
import threading
import time

import requests
from flask import Flask, jsonify, request

import replicast

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(process)d %(name)s %(levelname)s %(message)s")

REPLICAST_TO = os.environ.get("REPLICAST_TO", "127.0.0.1:7420")
REPLICAST_HTTP = os.environ.get("REPLICAST_HTTP", "http://127.0.0.1:7480")
RECEIVE = os.environ.get("RECEIVE", "webhook")
PUBLISH = os.environ.get("PUBLISH", "grpc")
TOPIC = "cache.invalidate"

app = Flask(__name__)

# --- the cache: one per worker process ---------------------------------------

_lock = threading.Lock()
_cache: dict[str, str] = {}
_heard: dict[str, int] = {}


def _compute(key: str) -> str:
    return f"{key}@{time.time_ns()}"  # stands in for a database read


def invalidate_locally(key: str) -> None:
    with _lock:
        _cache.pop(key, None)
        _heard[key] = _heard.get(key, 0) + 1


def clear_all(_why=None) -> None:
    """Messages were lost to this worker (its replica restarted): nothing
    cached can be trusted."""
    with _lock:
        _cache.clear()


# --- receiving: a webhook, or a Subscribe stream per worker ------------------

subscriber = None
if RECEIVE == "subscribe":
    # Created at import, started in each worker by gunicorn.conf.py's
    # post_worker_init: nothing gRPC exists in the master.
    subscriber = replicast.Subscriber(
        lambda delivery: invalidate_locally(delivery.message.payload.decode()),
        topics=[TOPIC],
        target=REPLICAST_TO,
        on_gap=clear_all,
    )


@app.post("/events")
def cloud_event():
    """replicast's webhook: a CloudEvent in binary mode (the payload is the body)."""
    if request.headers.get("ce-subject") == TOPIC:
        invalidate_locally(request.get_data(as_text=True))
    return "", 204


# --- publishing --------------------------------------------------------------

client = replicast.Client(REPLICAST_TO)  # connects on first use, in the worker


@app.post("/cache/<key>/invalidate")
def invalidate(key: str):
    """Invalidates ``key`` in every pod: one Broadcast, ack=ALL, 2 s."""
    if PUBLISH == "http":
        answer = requests.post(
            f"{REPLICAST_HTTP}/v1/broadcast",
            json={"topic": TOPIC, "payload": base64.b64encode(key.encode()).decode(), "ack": "ACK_POLICY_ALL"},
            headers={"Grpc-Timeout": "2S"},
            timeout=5,
        )
        body = answer.json()
        if answer.status_code != 200:
            return jsonify(error=body.get("message"), status=answer.status_code), 502
        return jsonify(acked=body["acked"], replicas=body["replicas"], via="http")
    try:
        receipts = client.broadcast(TOPIC, key.encode(), ack="all", timeout=2.0)
    except replicast.NotAcknowledged as err:
        return jsonify(error=err.message, receipts=[r.peer for r in err.receipts if r.code == 0]), 502
    return jsonify(acked=receipts.acked, replicas=receipts.replicas, via="grpc")


# --- reading -----------------------------------------------------------------


@app.get("/cache/<key>")
def read(key: str):
    """The cached value, computed on a miss. ``?hold=SECONDS`` keeps the
    worker busy that long (so a check from outside reaches every worker)."""
    hold = float(request.args.get("hold", 0))
    if hold:
        time.sleep(min(hold, 1.0))
    with _lock:
        hit = key in _cache
        value = _cache.setdefault(key, _compute(key))
    return jsonify(pid=os.getpid(), key=key, value=value, hit=hit)


@app.get("/state/<key>")
def state(key: str):
    """This worker's view, without filling the cache: whether it holds
    ``key``, how many invalidations of it it heard, and whether its
    Subscribe stream is attached."""
    hold = float(request.args.get("hold", 0))
    if hold:
        time.sleep(min(hold, 1.0))
    with _lock:
        cached, heard = key in _cache, _heard.get(key, 0)
    attached = subscriber.wait_attached(0) if subscriber is not None else None
    return jsonify(pid=os.getpid(), cached=cached, heard=heard, attached=attached, receive=RECEIVE)


@app.get("/healthz")
def healthz():
    return "ok"


# --- tracing: the handler's span joins the Broadcast's trace -----------------

if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
    # Flask's OpenTelemetry instrumentation, exported over OTLP/HTTP (the
    # standard OTEL_* variables): the webhook POST carries the replica's W3C
    # traceparent, so this app's handler span lands in the Broadcast's trace.
    from opentelemetry import trace
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.instrumentation.flask import FlaskInstrumentor
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(), schedule_delay_millis=200))
    trace.set_tracer_provider(provider)
    FlaskInstrumentor().instrument_app(app)
