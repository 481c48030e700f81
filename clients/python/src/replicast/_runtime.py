"""What a gRPC channel needs from the process it lives in.

Two things break grpcio in the web servers replicast is for:

* **gevent.** A process that gevent has monkey-patched blocks its whole event
  loop in grpcio's C core unless ``grpc.experimental.gevent.init_gevent()``
  ran after the patching and before the first gRPC object was created.
  :func:`prepare` does that, once per process, when it sees gevent's patches,
  and says so in a log line. Every channel this package creates goes through
  it, and this package creates channels lazily, when first used: in a
  gunicorn gevent worker that is after the worker patched itself.
* **fork.** A channel created before ``fork()`` must not be used in the child
  (gunicorn forks its workers from the master). :class:`ProcessChannel`
  remembers the process that created its channel and creates another in any
  other process.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Callable

import grpc

log = logging.getLogger("replicast")

_prepared_in: int | None = None
_prepare_lock = threading.Lock()


def gevent_patched() -> bool:
    """Whether gevent has monkey-patched this process's sockets."""
    monkey = sys.modules.get("gevent.monkey")
    return monkey is not None and monkey.is_module_patched("socket")


def prepare() -> None:
    """Readies this process for gRPC: under gevent, runs ``init_gevent()``.

    Idempotent; called before every channel this package creates. Call it
    yourself if your code creates gRPC objects of its own before this
    package's first channel.
    """
    global _prepared_in
    pid = os.getpid()
    if _prepared_in == pid:
        return
    with _prepare_lock:
        if _prepared_in == pid:
            return
        if gevent_patched():
            from grpc.experimental import gevent as grpc_gevent

            grpc_gevent.init_gevent()
            log.info(
                "replicast: gevent has patched this process (pid %d): called "
                "grpc.experimental.gevent.init_gevent() before creating any gRPC object",
                pid,
            )
        _prepared_in = pid


class ProcessChannel:
    """A channel for the current process, created on first use and again in
    any process other than the one that created it (after a fork)."""

    def __init__(self, factory: Callable[[], grpc.Channel]):
        self._factory = factory
        self._lock = threading.Lock()
        self._pid: int | None = None
        self._channel: grpc.Channel | None = None

    def get(self) -> grpc.Channel:
        pid = os.getpid()
        if self._pid != pid:
            with self._lock:
                if self._pid != pid:
                    # A channel inherited through fork belongs to the parent's
                    # gRPC core: not closed here, only forgotten.
                    prepare()
                    self._channel = self._factory()
                    self._pid = pid
        assert self._channel is not None
        return self._channel

    def close(self) -> None:
        with self._lock:
            if self._channel is not None and self._pid == os.getpid():
                self._channel.close()
            self._channel, self._pid = None, None
