"""gunicorn hooks that give every worker process its own Subscribe stream.

In ``gunicorn.conf.py``::

    from replicast.gunicorn import post_worker_init, worker_exit  # noqa: F401

and in the app, at import time (nothing connects until a worker starts it)::

    subscriber = replicast.Subscriber(on_message, topics=["cache.*"], on_gap=clear_cache)

Why ``post_worker_init`` and not ``post_fork``: gunicorn calls ``post_fork``
before the worker has loaded the app (unless ``--preload``), so the app's
subscribers do not exist yet; ``post_worker_init`` runs once the app is
loaded, in the worker, with and without ``--preload``, and in a gevent worker
after gevent patched it (so ``init_gevent()`` comes first). The master never
creates a gRPC object.

Every worker gets every message: a cache per worker stays right. A webhook
(``replicast serve --webhook``) reaches one worker per pod instead.
"""

from __future__ import annotations

from .subscriber import registered


def post_worker_init(worker) -> None:
    """Starts every registered :class:`~replicast.Subscriber` in this worker."""
    for subscriber in registered():
        subscriber.start()


def worker_exit(server, worker) -> None:
    """Stops them when the worker exits (the stream ends cleanly)."""
    for subscriber in registered():
        subscriber.stop(timeout=2.0)
