#!/usr/bin/env python3
"""Calling replicast from a Python service with grpcio.

replicast runs as a sidecar next to every replica of a workload. An
application broadcasts a message through its own sidecar (usually
``127.0.0.1:7420``) and every replica's sidecar hands it to the local
subscribers.

Use it as a library::

    from replicast_client import ReplicastClient, ReplicastError

    with ReplicastClient("127.0.0.1:7420") as client:
        try:
            response = client.broadcast("cache.invalidate", b"user:42", ack="all", timeout=2.0)
        except ReplicastError as err:
            print(err)                      # code and server message
            if err.response is not None:    # the receipts, from the status details
                print(format_receipts(err.response))

        for delivery in client.subscribe(["cache.*"]):
            handle(delivery.message.payload)

        # Many messages in flight on one stream (the Publish RPC):
        with client.publisher(window=256) as publisher:
            futures = [publisher.publish("cache.invalidate", key) for key in keys]
            for future in futures:
                future.result()             # the BroadcastResponse, or raises ReplicastError

or from a shell::

    python replicast_client.py --to 127.0.0.1:7420 broadcast --topic demo --data hello
    printf 'a\nb\n' | python replicast_client.py --to 127.0.0.1:7420 publish --topic demo
    python replicast_client.py --to 127.0.0.1:7420 subscribe --topic 'demo*' --count 10
    python replicast_client.py --to 127.0.0.1:7420 health
    python replicast_client.py --to 127.0.0.1:7420 selftest

Stubs are not checked in: on import this module compiles ``proto/`` (two
directories up, or ``$REPLICAST_PROTO_DIR``) with ``grpc_tools.protoc`` into a
cache directory keyed by the .proto contents and the tool versions
(``$REPLICAST_STUBS_DIR``, else ``$XDG_CACHE_HOME/replicast/python-stubs``,
else a temp directory), so the first import takes about a second and later
ones reuse the result. Requirements: ``requirements.txt`` beside this file.
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import itertools
import getpass
import hashlib
import importlib
import importlib.metadata
import json
import os
import queue
import re
import shutil
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

DEFAULT_TARGET = os.environ.get("REPLICAST_TO", "127.0.0.1:7420")
PROTO_FILE = "replicast/v1/replicast.proto"


# --------------------------------------------------------------------------
# Stub generation
# --------------------------------------------------------------------------


def _proto_dir() -> Path:
    explicit = os.environ.get("REPLICAST_PROTO_DIR")
    if explicit:
        return Path(explicit).resolve()
    return (Path(__file__).resolve().parent / ".." / ".." / "proto").resolve()


def _cache_roots() -> list[Path]:
    """Where generated stubs may live, most preferred first."""
    explicit = os.environ.get("REPLICAST_STUBS_DIR")
    if explicit:
        return [Path(explicit)]
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return [
        Path(cache) / "replicast" / "python-stubs",
        Path(tempfile.gettempdir()) / f"replicast-python-stubs-{getpass.getuser()}",
    ]


def _generate_stubs() -> Path:
    """Compiles the .proto files once per content and tool version; returns the output dir."""
    import grpc_tools
    from grpc_tools import protoc

    proto_dir = _proto_dir()
    protos = sorted(p.relative_to(proto_dir).as_posix() for p in proto_dir.rglob("*.proto"))
    if PROTO_FILE not in protos:
        raise RuntimeError(f"{PROTO_FILE} not found under {proto_dir} (set REPLICAST_PROTO_DIR)")

    key = hashlib.sha256()
    for dist in ("grpcio-tools", "protobuf"):
        key.update(f"{dist}={importlib.metadata.version(dist)}\n".encode())
    for rel in protos:
        key.update(rel.encode() + b"\0" + (proto_dir / rel).read_bytes() + b"\0")
    name = key.hexdigest()[:16]

    wkt_include = Path(grpc_tools.__file__).resolve().parent / "_proto"
    errors = []
    for root in _cache_roots():
        out = root / name
        if (out / "replicast" / "v1" / "replicast_pb2_grpc.py").is_file():
            return out
        try:
            root.mkdir(parents=True, exist_ok=True)
            # Generate beside the final directory, then rename it into place, so a
            # concurrent import never sees half-written stubs.
            tmp = Path(tempfile.mkdtemp(prefix=".gen-", dir=root))
        except OSError as err:
            errors.append(f"{root}: {err}")
            continue
        try:
            status = protoc.main(
                [
                    "grpc_tools.protoc",
                    f"-I{proto_dir}",
                    f"-I{wkt_include}",
                    f"--python_out={tmp}",
                    f"--grpc_python_out={tmp}",
                    *protos,
                ]
            )
            if status != 0:
                raise RuntimeError(f"grpc_tools.protoc failed (exit {status}) on {proto_dir}")
            try:
                tmp.rename(out)
            except OSError:
                if not out.is_dir():  # not a lost race with another process
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return out
    raise RuntimeError("no writable directory for the generated stubs: " + "; ".join(errors))


def _load_stubs():
    out = str(_generate_stubs())
    if out not in sys.path:
        sys.path.insert(0, out)
    return (
        importlib.import_module("replicast.v1.replicast_pb2"),
        importlib.import_module("replicast.v1.replicast_pb2_grpc"),
    )


pb, pb_grpc = _load_stubs()


# --------------------------------------------------------------------------
# Client
# --------------------------------------------------------------------------

_CODES = {code.value[0]: code for code in grpc.StatusCode}
AckArg = str | int  # "all", "quorum", "one", "none", or a pb.AckPolicy value


class ReplicastError(Exception):
    """A failed call: the gRPC code, the server's message, and for a Broadcast
    whose ack policy was not met (UNAVAILABLE / DEADLINE_EXCEEDED) the full
    BroadcastResponse decoded from the status details, when the server sent it."""

    def __init__(self, code: grpc.StatusCode, message: str, response=None):
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.response = response  # pb.BroadcastResponse or None

    @classmethod
    def from_rpc_error(cls, err: grpc.RpcError) -> ReplicastError:
        return cls(err.code(), err.details() or "", _broadcast_response_from_details(err))


class SubscriptionEnded(ReplicastError):
    """A Subscribe stream ended with an error.

    ``resume_after`` is the ``after_sequence`` to resubscribe with, taken from
    the server's message:

    * RESOURCE_EXHAUSTED: this subscriber fell more than --subscriber-buffer
      deliveries behind; resubscribing with ``resume_after`` (the last
      sequence it received) continues with no gap and no duplicate.
    * OUT_OF_RANGE: ``after_sequence`` is older than the replay ring
      (``resume_after`` skips to the oldest retained message; what lies in
      between is lost) or ahead of the replica's last sequence (the replica
      restarted: ``resume_after`` is 0, live only).
    * UNAVAILABLE: the replica is shutting down. Sequence numbers are per
      replica and per process, so on another replica start from 0.
    """

    _RESUME = re.compile(r"(?:resubscribe|resume|subscribe) with after_sequence\s*(?:=|>=)\s*(\d+)")

    def __init__(self, code, message, last_sequence: int):
        super().__init__(code, message)
        self.last_sequence = last_sequence
        match = self._RESUME.search(message)
        if match:
            self.resume_after: int | None = int(match.group(1))
        elif code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            self.resume_after = last_sequence
        else:
            self.resume_after = None


def _broadcast_response_from_details(err: grpc.RpcError):
    """Decodes the BroadcastResponse a failed Broadcast carries.

    The server attaches a google.rpc.Status (trailer ``grpc-status-details-bin``)
    whose ``details`` hold an ``Any`` of type replicast.v1.BroadcastResponse:
    one receipt per replica, so the caller sees which replicas got the message.
    """
    try:
        status = rpc_status.from_call(err)
    except ValueError:  # details inconsistent with the call's own code/message
        return None
    if status is None:
        return None
    for detail in status.details:
        if detail.Is(pb.BroadcastResponse.DESCRIPTOR):
            response = pb.BroadcastResponse()
            detail.Unpack(response)
            return response
    return None


class Publisher:
    """One Publish stream: many messages in flight, each answered by its tag.

    :meth:`publish` returns a :class:`concurrent.futures.Future` that resolves
    to the message's BroadcastResponse, or raises :class:`ReplicastError` with
    the code the unary Broadcast would have had (its ``response`` holds the
    receipts when the ack policy was not met). At most ``window`` messages are
    unanswered at once; :meth:`publish` blocks beyond that, as the server stops
    reading past its own ``--publish-window``. If the stream ends (the replica
    drains or goes away), every unanswered message fails with the stream's
    status: publish them again, to another replica, with the same ids.
    """

    def __init__(self, stub, window: int = 1024):
        self._requests: queue.Queue = queue.Queue()
        self._pending: dict[int, concurrent.futures.Future] = {}
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(window)
        self._tags = itertools.count(1)
        self._ended: ReplicastError | None = None
        self._call = stub.Publish(self._outgoing())
        self._reader = threading.Thread(target=self._read, name="replicast-publish", daemon=True)
        self._reader.start()

    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        ack: AckArg = "all",
        timeout: float | None = None,
        headers: Mapping[str, str] | None = None,
        id: str = "",
    ) -> concurrent.futures.Future:
        """Queues one message; ``timeout`` (seconds) is its own deadline."""
        self._slots.acquire()
        future: concurrent.futures.Future = concurrent.futures.Future()
        request = pb.PublishRequest(
            tag=next(self._tags),
            broadcast=pb.BroadcastRequest(
                topic=topic, payload=payload, headers=dict(headers or {}), id=id, ack=_ack_policy(ack)
            ),
        )
        if timeout is not None:
            request.timeout.FromNanoseconds(int(timeout * 1e9))
        with self._lock:
            if self._ended is not None:
                self._slots.release()
                future.set_exception(self._ended)
                return future
            self._pending[request.tag] = future
        self._requests.put(request)
        return future

    def close(self) -> None:
        """Ends the stream after every queued message is answered."""
        self._requests.put(None)
        self._reader.join()

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _outgoing(self) -> Iterator:
        while (request := self._requests.get()) is not None:
            yield request

    def _read(self) -> None:
        ended = ReplicastError(grpc.StatusCode.UNAVAILABLE, "the Publish stream ended before answering")
        try:
            for response in self._call:
                with self._lock:
                    future = self._pending.pop(response.tag, None)
                if future is None:
                    continue
                self._slots.release()
                if response.code == 0:
                    future.set_result(response.response)
                else:
                    code = _CODES.get(response.code, grpc.StatusCode.UNKNOWN)
                    received = response.response if response.HasField("response") else None
                    future.set_exception(ReplicastError(code, response.error, received))
        except grpc.RpcError as err:
            ended = ReplicastError.from_rpc_error(err)
        with self._lock:
            self._ended = ended
            unanswered, self._pending = self._pending, {}
        for future in unanswered.values():
            self._slots.release()
            future.set_exception(ended)


def _ack_policy(ack: AckArg) -> int:
    if isinstance(ack, int):
        return ack
    return pb.AckPolicy.Value("ACK_POLICY_" + ack.upper().removeprefix("ACK_POLICY_"))


class Subscription:
    """An open Subscribe stream: iterate it for ``pb.Delivery`` messages.

    Keep ``last_sequence`` (the sequence of the last delivery you processed)
    and ``incarnation`` (the replica process it came from): resubscribing to
    the same replica with ``after_sequence=last_sequence,
    incarnation=incarnation`` replays what you missed, then continues live; if
    the replica restarted meanwhile, that fails with FAILED_PRECONDITION
    instead of replaying the wrong messages. Iteration raises
    :class:`SubscriptionEnded` when the server ends the stream with an error;
    its ``resume_after`` says where to pick up.
    """

    def __init__(self, call, after_sequence: int, incarnation: int = 0):
        self._call = call
        self._cancelled = False
        self.last_sequence = after_sequence
        self.incarnation = incarnation

    def wait_attached(self) -> None:
        """Blocks until the replica has attached the subscriber (it answers with
        response headers only after that), so a message broadcast afterwards is
        sure to reach it. Raises :class:`SubscriptionEnded` if the call failed
        instead. Bounded by the call's timeout, or by :meth:`cancel` from
        another thread."""
        self._call.initial_metadata()
        if self._call.done() and self._call.code() != grpc.StatusCode.OK:
            raise SubscriptionEnded(self._call.code(), self._call.details() or "", self.last_sequence)

    def cancel(self) -> None:
        self._cancelled = True
        self._call.cancel()

    def __iter__(self) -> Iterator:
        try:
            for delivery in self._call:
                self.last_sequence = delivery.sequence
                self.incarnation = delivery.incarnation
                yield delivery
        except grpc.RpcError as err:
            if self._cancelled and err.code() == grpc.StatusCode.CANCELLED:
                return
            raise SubscriptionEnded(err.code(), err.details() or "", self.last_sequence) from None

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc) -> None:
        self.cancel()


class _BearerToken(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds ``authorization: Bearer <token>`` to every call (replicas started
    with --tokens-file need it on Broadcast, Publish, Subscribe, ListPeers)."""

    def __init__(self, token: str):
        self._metadata = ("authorization", f"Bearer {token}")

    def _with_token(self, details):
        metadata = list(details.metadata or []) + [self._metadata]
        return details._replace(metadata=metadata)

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._with_token(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._with_token(details), request)

    def intercept_stream_unary(self, continuation, details, requests):
        return continuation(self._with_token(details), requests)

    def intercept_stream_stream(self, continuation, details, requests):
        return continuation(self._with_token(details), requests)


class ReplicastClient:
    """A connection to one replica. Cheap to keep for the life of a process.

    ``token`` (default: the REPLICAST_TOKEN environment variable) is sent as
    ``authorization: Bearer <token>`` on every call."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        options: Iterable = (),
        token: str | None = os.environ.get("REPLICAST_TOKEN"),
    ):
        # The sidecar is on loopback or in-cluster: never route it through an
        # http_proxy / grpc_proxy from the environment.
        self.target = target
        self._channel = grpc.insecure_channel(target, options=[("grpc.enable_http_proxy", 0), *options])
        calls = grpc.intercept_channel(self._channel, _BearerToken(token)) if token else self._channel
        self._stub = pb_grpc.ReplicastStub(calls)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> ReplicastClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def broadcast(
        self,
        topic: str,
        payload: bytes,
        *,
        ack: AckArg = "all",
        timeout: float = 5.0,
        headers: Mapping[str, str] | None = None,
        id: str = "",
    ):
        """Delivers ``payload`` to every replica; returns the BroadcastResponse.

        ``ack`` is "all", "quorum", "one" or "none" (or a pb.AckPolicy value).
        ``timeout`` (seconds) is the call's deadline, which also bounds how long
        the replica waits for acknowledgements. Pass an ``id`` and reuse it
        when retrying: replicas that already have it report ``duplicate`` and do
        not deliver it twice.

        Raises :class:`ReplicastError`; when the ack policy was not met its
        ``response`` holds every receipt.
        """
        request = pb.BroadcastRequest(
            topic=topic, payload=payload, headers=dict(headers or {}), id=id, ack=_ack_policy(ack)
        )
        try:
            return self._stub.Broadcast(request, timeout=timeout)
        except grpc.RpcError as err:
            raise ReplicastError.from_rpc_error(err) from None

    def publisher(self, *, window: int = 1024) -> Publisher:
        """Opens a Publish stream (see :class:`Publisher`)."""
        return Publisher(self._stub, window=window)

    def subscribe(
        self,
        topics: Iterable[str] = (),
        after_sequence: int = 0,
        incarnation: int = 0,
        *,
        timeout: float | None = None,
    ) -> Subscription:
        """Streams this replica's deliveries (all topics when ``topics`` is
        empty; "cache.*" matches a prefix). ``after_sequence`` > 0 first replays
        every retained delivery after it; 0 means live only. Pass the
        ``incarnation`` of the delivery ``after_sequence`` came from, so a
        restarted replica refuses the resume. No timeout by default: a
        subscription is meant to stay open."""
        request = pb.SubscribeRequest(
            topics=list(topics), after_sequence=after_sequence, incarnation=incarnation
        )
        return Subscription(self._stub.Subscribe(request, timeout=timeout), after_sequence, incarnation)

    def list_peers(self, *, timeout: float = 5.0):
        """This replica's view of the cluster (pb.ListPeersResponse)."""
        try:
            return self._stub.ListPeers(pb.ListPeersRequest(), timeout=timeout)
        except grpc.RpcError as err:
            raise ReplicastError.from_rpc_error(err) from None

    def health(self, service: str = "", *, timeout: float = 5.0) -> str:
        """grpc.health.v1 Check: "SERVING", "NOT_SERVING", ... ("" = the whole
        server; "replicast.v1.Replicast" = the replicast service)."""
        try:
            response = self._health.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as err:
            raise ReplicastError.from_rpc_error(err) from None
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


# --------------------------------------------------------------------------
# Formatting
# --------------------------------------------------------------------------


def format_receipts(response) -> str:
    """One line per replica, like ``replicast send``."""
    policy = pb.AckPolicy.Name(response.ack).removeprefix("ACK_POLICY_")
    lines = [
        f"message {response.id}: {response.acked} of {response.replicas} replicas acknowledged "
        f"({response.required} required by {policy})"
    ]
    for o in response.outcomes:
        status = "PENDING" if o.pending else _CODES.get(o.code, grpc.StatusCode.UNKNOWN).name
        latency = f"{o.latency.ToTimedelta().total_seconds() * 1000:.1f}ms" if o.HasField("latency") else "-"
        notes = []
        if o.code == 0 and not o.pending:
            notes.append(f"seq={o.sequence}")
        if o.local:
            notes.append("local")
        if o.duplicate:
            notes.append("duplicate")
        if o.code != 0 and o.message:
            notes.append(o.message)
        lines.append(f"  {o.peer:<24} {status:<18} {latency:>9}  {' '.join(notes)}")
    if response.omitted_outcomes:
        lines.append(f"  ... and {response.omitted_outcomes} more receipts left out to keep the status under 8 KiB")
    return "\n".join(lines)


def delivery_json(delivery) -> dict:
    """A delivery as JSON-ready data, like ``replicast subscribe``: the payload
    as text when it is UTF-8, otherwise base64 under ``payload_base64``."""
    m = delivery.message
    out = {
        "sequence": delivery.sequence,
        "id": m.id,
        "topic": m.topic,
        "origin": m.origin,
        "sent_at": m.sent_at.ToJsonString() if m.HasField("sent_at") else None,
        "headers": dict(m.headers),
    }
    try:
        out["payload"] = m.payload.decode("utf-8")
    except UnicodeDecodeError:
        out["payload_base64"] = base64.b64encode(m.payload).decode("ascii")
    return out


# --------------------------------------------------------------------------
# Self-check
# --------------------------------------------------------------------------


class SelftestFailure(Exception):
    pass


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise SelftestFailure(message)


def selftest(target: str, timeout: float = 15.0) -> None:
    """End-to-end check of a running cluster, reached through ``target``.

    Subscribes on every replica ListPeers names, broadcasts one message with
    ack ALL, rebroadcasts it with the same id (every receipt must say
    duplicate), then broadcasts an end marker. Each subscriber must see the
    message exactly once, with the right payload, before the marker (each
    replica delivers in sequence order, so no sleep is needed to rule out a
    late duplicate). Finally an invalid topic must fail with INVALID_ARGUMENT.
    Raises :class:`SelftestFailure`.
    """
    deadline = time.monotonic() + timeout

    def left() -> float:
        return max(0.1, deadline - time.monotonic())

    with ReplicastClient(target) as client:
        for service in ("", "replicast.v1.Replicast"):
            status = client.health(service, timeout=left())
            _check(status == "SERVING", f"{target}: health of {service!r} is {status}")
        view = client.list_peers(timeout=left())
        peers = [p.address for p in view.peers]
        _check(bool(peers), f"{target}: ListPeers returned no peers")
        print(f"selftest: {target} is {view.self}, peers {', '.join(peers)} (source {view.source})")

        run = uuid.uuid4().hex
        topic = f"selftest.{run}"
        payload = b"replicast selftest \x00\xff " + run.encode()
        message_id = f"selftest-{run}"
        marker_id = f"selftest-{run}-end"

        clients = [ReplicastClient(addr) for addr in peers]
        subscriptions = [c.subscribe([topic], timeout=left()) for c in clients]
        received: dict[str, queue.Queue] = {addr: queue.Queue() for addr in peers}
        attached = {addr: threading.Event() for addr in peers}
        failures: dict[str, Exception] = {}

        def read(addr: str, sub: Subscription) -> None:
            try:
                sub.wait_attached()
                attached[addr].set()
                for delivery in sub:
                    received[addr].put(delivery)
                failures[addr] = SelftestFailure(f"{addr}: subscription ended early")
            except ReplicastError as err:
                failures[addr] = SelftestFailure(f"{addr}: subscription failed: {err}")
            finally:
                received[addr].put(None)  # wakes up the reader below
                attached[addr].set()

        threads = [
            threading.Thread(target=read, args=(addr, sub), daemon=True)
            for addr, sub in zip(peers, subscriptions, strict=True)
        ]
        try:
            for t in threads:
                t.start()
            for addr in peers:
                _check(attached[addr].wait(left()), f"{addr}: subscription not attached in time")
                if addr in failures:
                    raise failures[addr]
            print(f"selftest: subscribed to {topic} on {len(peers)} replicas")

            try:
                response = client.broadcast(topic, payload, ack="all", id=message_id, timeout=left())
            except ReplicastError as err:
                detail = "\n" + format_receipts(err.response) if err.response is not None else ""
                raise SelftestFailure(f"broadcast failed: {err}{detail}") from None
            print(format_receipts(response))
            _check(response.id == message_id, f"broadcast answered id {response.id!r}, sent {message_id!r}")
            _check(
                response.replicas == len(peers) and response.acked == len(peers),
                f"broadcast: {response.acked} of {response.replicas} acked, expected {len(peers)} of {len(peers)}",
            )
            _check(
                sorted(o.peer for o in response.outcomes) == sorted(peers),
                f"receipts are for {[o.peer for o in response.outcomes]}, peers are {peers}",
            )
            bad = [o.peer for o in response.outcomes if o.code != 0 or o.pending or o.duplicate]
            _check(not bad, f"receipts not delivered cleanly: {bad}")

            again = client.broadcast(topic, payload, ack="all", id=message_id, timeout=left())
            _check(
                all(o.duplicate and o.code == 0 for o in again.outcomes) and again.acked == len(peers),
                "a retry with the same id was not reported duplicate by every replica:\n" + format_receipts(again),
            )
            print(f"selftest: retry with the same id reported duplicate by all {len(peers)} replicas")
            client.broadcast(topic, b"end", ack="all", id=marker_id, timeout=left())

            for addr in peers:
                got = []
                while True:
                    try:
                        item = received[addr].get(timeout=left())
                    except queue.Empty:
                        raise SelftestFailure(
                            f"{addr}: no end marker within {timeout}s; got {len(got)} deliveries"
                        ) from None
                    if item is None:
                        raise failures.get(addr) or SelftestFailure(f"{addr}: subscription ended")
                    if item.message.id == marker_id:
                        break
                    got.append(item)
                ours = [d for d in got if d.message.id == message_id]
                _check(len(ours) == 1, f"{addr}: got the message {len(ours)} times, expected exactly once")
                _check(len(got) == 1, f"{addr}: unexpected extra deliveries {[d.message.id for d in got]}")
                m = ours[0].message
                _check(m.payload == payload, f"{addr}: payload {m.payload!r}, expected {payload!r}")
                _check(m.topic == topic, f"{addr}: topic {m.topic!r}, expected {topic!r}")
                _check(m.origin == view.self, f"{addr}: origin {m.origin!r}, expected {view.self!r}")
                print(f"selftest: {addr} delivered it once (seq {ours[0].sequence})")
        finally:
            for sub in subscriptions:
                sub.cancel()
            for t in threads:
                t.join(timeout=5)
            for c in clients:
                c.close()

        # Publish: many in flight on one stream, each answered by its tag; a
        # bad message fails alone.
        with client.publisher(window=32) as publisher:
            futures = [publisher.publish(f"selftest.publish.{run}", str(i).encode(), ack="all") for i in range(200)]
            bad = publisher.publish("not a valid topic!", b"x")
            for i, future in enumerate(futures):
                response = future.result(timeout=left())
                _check(
                    response.acked == len(peers),
                    f"published message {i}: {response.acked} of {response.replicas} acked",
                )
            try:
                bad.result(timeout=left())
            except ReplicastError as err:
                _check(err.code == grpc.StatusCode.INVALID_ARGUMENT, f"bad published message: {err.code.name}")
            else:
                raise SelftestFailure("a published message with an invalid topic succeeded")
        print(f"selftest: 200 messages published on one stream, each acked by all {len(peers)} replicas")

        try:
            client.broadcast("not a valid topic!", b"x", timeout=left())
        except ReplicastError as err:
            _check(
                err.code == grpc.StatusCode.INVALID_ARGUMENT,
                f"invalid topic answered {err.code.name}, expected INVALID_ARGUMENT",
            )
            print(f"selftest: invalid topic rejected: {err}")
        else:
            raise SelftestFailure("a broadcast with an invalid topic succeeded")


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------


def _cmd_broadcast(args) -> int:
    if args.data.startswith("@"):
        payload = Path(args.data[1:]).read_bytes()
    else:
        payload = args.data.encode()
    headers = dict(args.header)
    with ReplicastClient(args.to) as client:
        try:
            response = client.broadcast(
                args.topic, payload, ack=args.ack, timeout=args.timeout, headers=headers, id=args.id
            )
        except ReplicastError as err:
            if err.response is not None:
                print(format_receipts(err.response))
            print(f"broadcast failed: {err}", file=sys.stderr)
            return 1
    print(format_receipts(response))
    return 0


def _cmd_publish(args) -> int:
    """Publishes each line of standard input as one message."""
    failed = 0
    with ReplicastClient(args.to) as client, client.publisher(window=args.window) as publisher:
        futures = [
            publisher.publish(args.topic, line.rstrip(b"\n"), ack=args.ack, timeout=args.timeout)
            for line in sys.stdin.buffer
        ]
        for n, future in enumerate(futures, start=1):
            try:
                response = future.result()
                print(f"{n}: {response.id} acked by {response.acked} of {response.replicas}")
            except ReplicastError as err:
                failed += 1
                print(f"{n}: failed: {err}", file=sys.stderr)
    return 1 if failed else 0


def _cmd_subscribe(args) -> int:
    with ReplicastClient(args.to) as client, client.subscribe(args.topic, args.after) as sub:
        try:
            for n, delivery in enumerate(sub, start=1):
                print(json.dumps(delivery_json(delivery), sort_keys=True), flush=True)
                if args.count and n >= args.count:
                    return 0
        except SubscriptionEnded as err:
            print(f"subscription ended: {err}", file=sys.stderr)
            if err.resume_after is not None:
                print(f"resume with: --after {err.resume_after}", file=sys.stderr)
            return 1
    return 0


def _cmd_health(args) -> int:
    services = args.service or ["", "replicast.v1.Replicast"]
    ok = True
    with ReplicastClient(args.to) as client:
        for service in services:
            try:
                status = client.health(service, timeout=args.timeout)
            except ReplicastError as err:
                status = str(err)
            print(f"{service or '(server)'}: {status}")
            ok = ok and status == "SERVING"
    return 0 if ok else 1


def _cmd_selftest(args) -> int:
    try:
        selftest(args.to, timeout=args.timeout)
    except (SelftestFailure, ReplicastError) as err:
        print(f"selftest FAILED against {args.to}: {err}", file=sys.stderr)
        return 1
    print(f"selftest: passed against {args.to}")
    return 0


def _header(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"header {text!r} is not KEY=VALUE")
    return key, value


def main(argv: list[str] | None = None) -> int:
    # --to is accepted before or after the subcommand.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--to", default=argparse.SUPPRESS, help=f"replica host:port (default $REPLICAST_TO or {DEFAULT_TARGET})"
    )
    parser = argparse.ArgumentParser(description="replicast Python client example", parents=[common])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("broadcast", parents=[common], help="broadcast one message and print the receipts")
    p.add_argument("--topic", required=True)
    p.add_argument("--data", default="", help="payload text, or @path to read a file")
    p.add_argument("--ack", choices=["all", "quorum", "one", "none"], default="all")
    p.add_argument("--timeout", type=float, default=2.0, help="deadline in seconds (default 2)")
    p.add_argument("--header", action="append", default=[], type=_header, metavar="KEY=VALUE")
    p.add_argument("--id", default="", help="idempotency key (generated when empty)")
    p.set_defaults(func=_cmd_broadcast)

    p = sub.add_parser("publish", parents=[common], help="publish each line of stdin on one Publish stream")
    p.add_argument("--topic", required=True)
    p.add_argument("--ack", choices=["all", "quorum", "one", "none"], default="all")
    p.add_argument("--timeout", type=float, default=None, help="each message's deadline in seconds")
    p.add_argument("--window", type=int, default=1024, help="messages in flight at most")
    p.set_defaults(func=_cmd_publish)

    p = sub.add_parser("subscribe", parents=[common], help="print deliveries as JSON lines")
    p.add_argument("--topic", action="append", default=[], help="topic or prefix* (repeatable; none = all)")
    p.add_argument("--after", type=int, default=0, help="replay deliveries after this sequence first")
    p.add_argument("--count", type=int, default=0, help="exit after N deliveries (0 = run until stopped)")
    p.set_defaults(func=_cmd_subscribe)

    p = sub.add_parser("health", parents=[common], help="grpc.health.v1 Check (exit 1 unless SERVING)")
    p.add_argument(
        "--service", action="append", help='service name (repeatable; default "" and replicast.v1.Replicast)'
    )
    p.add_argument("--timeout", type=float, default=2.0)
    p.set_defaults(func=_cmd_health)

    p = sub.add_parser("selftest", parents=[common], help="end-to-end check of a running cluster")
    p.add_argument("--timeout", type=float, default=15.0, help="overall deadline in seconds (default 15)")
    p.set_defaults(func=_cmd_selftest)

    args = parser.parse_args(argv)
    if not hasattr(args, "to"):
        args.to = DEFAULT_TARGET
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
