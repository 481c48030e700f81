"""The client: Broadcast with receipts, Publish (many in flight on one
stream), Subscribe, ListPeers and health, against one replica (usually the
sidecar on 127.0.0.1:7420).

A :class:`Client` may be created at import time, before a server forks its
workers: its channel is created on first use, in the process that uses it,
and again in a forked child (see ``_runtime``).
"""

from __future__ import annotations

import base64
import concurrent.futures
import itertools
import os
import queue
import threading
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ._runtime import ProcessChannel
from .errors import CODES, ReplicastError, SubscriptionEnded, error_for, from_rpc_error
from .v1 import replicast_pb2 as pb
from .v1 import replicast_pb2_grpc as pb_grpc

DEFAULT_TARGET = os.environ.get("REPLICAST_TO", "127.0.0.1:7420")
AckArg = str | int  # "all", "quorum", "one", "none", or a pb.AckPolicy value


def ack_policy(ack: AckArg) -> int:
    """``"all"`` (or ``"ACK_POLICY_ALL"``, or the enum's number) as the enum."""
    if isinstance(ack, int):
        return ack
    return pb.AckPolicy.Value("ACK_POLICY_" + ack.upper().removeprefix("ACK_POLICY_"))


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
        return details._replace(metadata=[*(details.metadata or []), self._metadata])

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._with_token(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._with_token(details), request)

    def intercept_stream_unary(self, continuation, details, requests):
        return continuation(self._with_token(details), requests)

    def intercept_stream_stream(self, continuation, details, requests):
        return continuation(self._with_token(details), requests)


class Client:
    """A connection to one replica. Create one per process and keep it.

    ``token`` (default ``$REPLICAST_TOKEN``) is sent as a Bearer token on
    every call. With mTLS on, pass ``tls_ca`` (the CA bundle, a path) and, as
    the certificate holds the workload identity rather than an address,
    ``tls_server_name`` (a DNS name of the certificate, e.g. ``localhost`` in
    the sidecar); ``tls_cert``/``tls_key`` for a client certificate.
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        token: str | None = None,
        tls_ca: str | os.PathLike | None = None,
        tls_cert: str | os.PathLike | None = None,
        tls_key: str | os.PathLike | None = None,
        tls_server_name: str | None = None,
        options: Iterable = (),
    ):
        self.target = target
        self._token = token if token is not None else os.environ.get("REPLICAST_TOKEN")
        # The sidecar is on loopback or in-cluster: never through a proxy
        # from the environment.
        channel_options = [("grpc.enable_http_proxy", 0), *options]
        if tls_server_name:
            channel_options.append(("grpc.ssl_target_name_override", tls_server_name))
        if tls_ca is not None:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=Path(tls_ca).read_bytes(),
                private_key=Path(tls_key).read_bytes() if tls_key else None,
                certificate_chain=Path(tls_cert).read_bytes() if tls_cert else None,
            )
            factory = lambda: grpc.secure_channel(target, credentials, options=channel_options)  # noqa: E731
        else:
            factory = lambda: grpc.insecure_channel(target, options=channel_options)  # noqa: E731
        self._channel = ProcessChannel(factory)
        self._publisher: Publisher | None = None
        self._publisher_pid: int | None = None
        self._publisher_lock = threading.Lock()

    # --- per-process stubs -------------------------------------------------

    def _stub(self) -> pb_grpc.ReplicastStub:
        channel = self._channel.get()
        if self._token:
            channel = grpc.intercept_channel(channel, _BearerToken(self._token))
        return pb_grpc.ReplicastStub(channel)

    def close(self) -> None:
        with self._publisher_lock:
            publisher, self._publisher = self._publisher, None
        if publisher is not None and self._publisher_pid == os.getpid():
            publisher.close()
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- calls -------------------------------------------------------------

    def broadcast(
        self,
        topic: str,
        payload: bytes,
        *,
        ack: AckArg = "all",
        timeout: float = 5.0,
        headers: Mapping[str, str] | None = None,
        id: str = "",
    ) -> pb.BroadcastResponse:
        """Delivers ``payload`` to every replica; returns the receipts.

        ``ack`` is "all", "quorum", "one" or "none". ``timeout`` (seconds) is
        the call's deadline, which bounds the wait for acknowledgements. Pass
        an ``id`` and reuse it when retrying: replicas that have it answer
        ``duplicate`` and do not deliver it twice.

        Raises :class:`~replicast.errors.NotAcknowledged` (with ``receipts``)
        when the ack policy was not met, else another
        :class:`~replicast.errors.ReplicastError` subclass.
        """
        request = pb.BroadcastRequest(
            topic=topic, payload=payload, headers=dict(headers or {}), id=id, ack=ack_policy(ack)
        )
        try:
            return self._stub().Broadcast(request, timeout=timeout)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None

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
        """Sends one message on this process's Publish stream (opened on
        first use, and again if it ended); returns a Future of its receipts
        that raises as :meth:`broadcast` would. Many may be in flight."""
        with self._publisher_lock:
            if self._publisher is None or self._publisher.ended or self._publisher_pid != os.getpid():
                self._publisher = Publisher(self._stub())
                self._publisher_pid = os.getpid()
            publisher = self._publisher
        return publisher.publish(topic, payload, ack=ack, timeout=timeout, headers=headers, id=id)

    def publisher(self, *, window: int = 1024) -> Publisher:
        """A Publish stream of your own (see :class:`Publisher`)."""
        return Publisher(self._stub(), window=window)

    def subscribe(
        self,
        topics: Iterable[str] = (),
        after_sequence: int = 0,
        incarnation: int = 0,
        *,
        timeout: float | None = None,
    ) -> Subscription:
        """One Subscribe stream (all topics when ``topics`` is empty; "cache.*"
        matches a prefix). ``after_sequence`` > 0 first replays what the
        replica still holds after it. For a stream that reconnects and
        resumes by itself, use :class:`~replicast.Subscriber`."""
        request = pb.SubscribeRequest(topics=list(topics), after_sequence=after_sequence, incarnation=incarnation)
        return Subscription(self._stub().Subscribe(request, timeout=timeout), after_sequence, incarnation)

    def list_peers(self, *, timeout: float = 5.0) -> pb.ListPeersResponse:
        """This replica's view of the cluster."""
        try:
            return self._stub().ListPeers(pb.ListPeersRequest(), timeout=timeout)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None

    def health(self, service: str = "", *, timeout: float = 5.0) -> str:
        """grpc.health.v1 Check: "SERVING", "NOT_SERVING", ..."""
        try:
            response = health_pb2_grpc.HealthStub(self._channel.get()).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


class Publisher:
    """One Publish stream: many messages in flight, each answered by its tag.

    :meth:`publish` returns a Future of the message's BroadcastResponse, or
    raising the error the unary Broadcast would have had. At most ``window``
    messages are unanswered at once; :meth:`publish` blocks beyond that. If
    the stream ends (the replica drains or goes away), every unanswered
    message fails with the stream's status: publish them again with the same
    ids.
    """

    def __init__(self, stub: pb_grpc.ReplicastStub, window: int = 1024):
        self._requests: queue.Queue = queue.Queue()
        self._pending: dict[int, concurrent.futures.Future] = {}
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(window)
        self._tags = itertools.count(1)
        self._ended: ReplicastError | None = None
        self._call = stub.Publish(self._outgoing())
        self._reader = threading.Thread(target=self._read, name="replicast-publish", daemon=True)
        self._reader.start()

    @property
    def ended(self) -> bool:
        return self._ended is not None

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
                topic=topic, payload=payload, headers=dict(headers or {}), id=id, ack=ack_policy(ack)
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
        ended: ReplicastError = error_for(grpc.StatusCode.UNAVAILABLE, "the Publish stream ended before answering")
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
                    code = CODES.get(response.code, grpc.StatusCode.UNKNOWN)
                    received = response.response if response.HasField("response") else None
                    future.set_exception(error_for(code, response.error, received))
        except grpc.RpcError as err:
            ended = from_rpc_error(err)
        with self._lock:
            self._ended = ended
            unanswered, self._pending = self._pending, {}
        for future in unanswered.values():
            self._slots.release()
            future.set_exception(ended)


class Subscription:
    """One open Subscribe stream: iterate it for ``Delivery`` messages.

    ``last_sequence`` and ``incarnation`` track the last delivery read:
    resubscribing to the same replica with them replays what was missed, and
    fails with FAILED_PRECONDITION if the replica restarted meanwhile.
    Iteration raises :class:`~replicast.errors.SubscriptionEnded` when the
    replica ends the stream with an error.
    """

    def __init__(self, call, after_sequence: int, incarnation: int = 0):
        self._call = call
        self._cancelled = False
        self.last_sequence = after_sequence
        self.incarnation = incarnation

    def wait_attached(self) -> None:
        """Blocks until the replica attached the subscriber (it sends the
        response headers only then), so a message broadcast afterwards
        reaches it. Raises SubscriptionEnded if the call failed instead."""
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


def format_receipts(response: pb.BroadcastResponse) -> str:
    """One line per replica, like ``replicast send``."""
    policy = pb.AckPolicy.Name(response.ack).removeprefix("ACK_POLICY_")
    lines = [
        f"message {response.id}: {response.acked} of {response.replicas} replicas acknowledged "
        f"({response.required} required by {policy})"
    ]
    for o in response.outcomes:
        status = "PENDING" if o.pending else CODES.get(o.code, grpc.StatusCode.UNKNOWN).name
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
    """A delivery as JSON-ready data, like ``replicast subscribe``: the
    payload as text when it is UTF-8, else base64 under ``payload_base64``."""
    m = delivery.message
    out = {
        "sequence": delivery.sequence,
        "incarnation": str(delivery.incarnation),
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
