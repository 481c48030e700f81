"""A Subscribe stream that stays up: reconnects, resumes where it left off,
and starts afresh in every process that starts it (fork-safe).

The shape web apps need: a gunicorn worker starts one :class:`Subscriber`
(``replicast.gunicorn.post_worker_init``), and its handler runs for every
message delivered to the worker's replica, in order, in a background thread
(a greenlet when gevent has patched the process). Each worker process has
its own stream, so each worker's in-memory cache hears every message; a
webhook, by contrast, reaches one worker per pod.
"""

from __future__ import annotations

import logging
import os
import random
import threading
from collections.abc import Callable, Iterable

import grpc

from .client import DEFAULT_TARGET, Client, Subscription
from .errors import SubscriptionEnded

log = logging.getLogger("replicast")

Handler = Callable[[object], None]
GapHandler = Callable[[SubscriptionEnded], None]

_registered: list[Subscriber] = []
_registered_lock = threading.Lock()


def registered() -> list[Subscriber]:
    """The subscribers created with ``register=True`` (the default), which
    ``replicast.gunicorn``'s hooks start in each worker."""
    with _registered_lock:
        return list(_registered)


class Subscriber:
    """Calls ``handler(delivery)`` for every message delivered to the replica
    at ``target`` whose topic matches ``topics``, from :meth:`start` until
    :meth:`stop`, across reconnects and replica restarts.

    * **Resumes.** It keeps the sequence number and incarnation of the last
      delivery it handled and resubscribes after it, so a broken stream
      loses nothing the replica still holds. When messages were lost to it
      (the replica restarted, or the resume point left its ring),
      ``on_gap(error)`` runs before it goes on from what is there: a cache
      should drop everything then.
    * **Bounded backoff** between attempts: ``backoff_initial`` doubling to
      ``backoff_max`` seconds, with jitter; reset once a stream attaches.
    * **Fork-safe.** Nothing gRPC exists until :meth:`start`, which creates
      the channel and the thread in the calling process. Started again in a
      forked child, it runs there anew (threads do not survive a fork).
    * **gevent-aware.** In a process gevent has patched, the first channel
      calls ``grpc.experimental.gevent.init_gevent()`` (and logs it), and
      the background thread is a greenlet.

    A handler that raises is logged and the stream goes on: one bad message
    does not stop the others.
    """

    def __init__(
        self,
        handler: Handler,
        topics: Iterable[str] = (),
        *,
        target: str = DEFAULT_TARGET,
        on_gap: GapHandler | None = None,
        token: str | None = None,
        backoff_initial: float = 0.1,
        backoff_max: float = 5.0,
        name: str = "replicast-subscriber",
        register: bool = True,
        **client_options,
    ):
        self._handler = handler
        self._on_gap = on_gap
        self.topics = list(topics)
        self.target = target
        self._client_args = dict(token=token, **client_options)
        self._backoff = (backoff_initial, backoff_max)
        self._name = name
        self._lock = threading.Lock()
        self._pid: int | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._attached = threading.Event()
        self._subscription: Subscription | None = None
        #: Resume point: the last delivery handled, and its replica's process.
        self.last_sequence = 0
        self.incarnation = 0
        if register:
            with _registered_lock:
                _registered.append(self)

    def start(self) -> Subscriber:
        """Starts receiving in this process (idempotent; after a fork, starts
        anew in the child)."""
        with self._lock:
            pid = os.getpid()
            if self._pid == pid and self._thread is not None and self._thread.is_alive():
                return self
            self._pid = pid
            self._stopping = threading.Event()
            self._attached = threading.Event()
            self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
            self._thread.start()
            log.info(
                "replicast: subscriber %s started in pid %d for topics %s at %s",
                self._name,
                pid,
                self.topics or ["*"],
                self.target,
            )
            return self

    def stop(self, timeout: float = 5.0) -> None:
        """Ends the stream and waits for the thread (at most ``timeout``)."""
        with self._lock:
            if self._pid != os.getpid() or self._thread is None:
                return
            self._stopping.set()
            subscription = self._subscription
            thread = self._thread
        if subscription is not None:
            subscription.cancel()
        thread.join(timeout)

    def wait_attached(self, timeout: float | None = None) -> bool:
        """Whether a stream is attached (waiting up to ``timeout``): from
        then on every message broadcast reaches this subscriber."""
        return self._attached.wait(timeout)

    def _run(self) -> None:
        client = Client(self.target, **self._client_args)
        delay = self._backoff[0]
        try:
            while not self._stopping.is_set():
                try:
                    subscription = client.subscribe(self.topics, self.last_sequence, self.incarnation)
                    with self._lock:
                        self._subscription = subscription
                    if self._stopping.is_set():
                        subscription.cancel()
                        break
                    subscription.wait_attached()
                    self._attached.set()
                    delay = self._backoff[0]
                    for delivery in subscription:
                        self._handle(delivery)
                    if self._stopping.is_set():
                        break
                    log.info("replicast: subscription to %s ended; resubscribing", self.target)
                except SubscriptionEnded as ended:
                    self._attached.clear()
                    if self._stopping.is_set():
                        break
                    self._after(ended)
                except Exception:
                    self._attached.clear()
                    log.exception("replicast: subscription to %s failed; retrying with backoff", self.target)
                self._stopping.wait(delay * random.uniform(0.5, 1.0))
                delay = min(self._backoff[1], delay * 2)
        finally:
            client.close()

    def _handle(self, delivery) -> None:
        try:
            self._handler(delivery)
        except Exception:
            log.exception("replicast: the handler failed on message %s; going on", delivery.message.id)
        # Handled (or failed): not replayed on resume.
        self.last_sequence = delivery.sequence
        self.incarnation = delivery.incarnation

    def _after(self, ended: SubscriptionEnded) -> None:
        """Where to resume after ``ended``."""
        code = ended.code
        if code == grpc.StatusCode.FAILED_PRECONDITION or (code == grpc.StatusCode.OUT_OF_RANGE and ended.resume_after == 0):
            # The replica restarted: its sequence numbers mean nothing now.
            self.last_sequence, self.incarnation = 0, 0
        elif ended.resume_after is not None:
            self.last_sequence = ended.resume_after
        if ended.gap:
            log.warning("replicast: messages were lost to this subscriber (%s); resuming from what the replica holds", ended)
            if self._on_gap is not None:
                try:
                    self._on_gap(ended)
                except Exception:
                    log.exception("replicast: on_gap failed")
        elif code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED):
            log.info("replicast: subscription ended (%s); resuming after sequence %d", ended, self.last_sequence)
        else:
            # Credentials, permissions, a bad filter: a person must act.
            log.error("replicast: subscription refused (%s); retrying with backoff", ended)
