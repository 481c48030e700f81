"""replicast for Python: Broadcast with a receipt per replica, Publish, and a
Subscribe stream that is fork-safe, gevent-aware and resumes by itself.

    import replicast

    client = replicast.Client("127.0.0.1:7420")          # the sidecar
    try:
        receipts = client.broadcast("cache.invalidate", b"user:42", ack="all", timeout=2.0)
    except replicast.NotAcknowledged as err:
        for receipt in err.receipts:                     # which replicas have it
            print(receipt.peer, receipt.code, receipt.message)

    subscriber = replicast.Subscriber(on_message, topics=["cache.*"])
    subscriber.start()                                   # or replicast.gunicorn.post_worker_init

The gRPC stubs (``replicast.v1``) were generated from the repository's
``proto/`` when this package was built.
"""

from ._runtime import gevent_patched, prepare
from .client import DEFAULT_TARGET, Client, Publisher, Subscription, ack_policy, delivery_json, format_receipts
from .errors import (
    DeadlineExceeded,
    InvalidRequest,
    LimitReached,
    NotAcknowledged,
    PermissionDenied,
    ReplicastError,
    SubscriptionEnded,
    Unauthenticated,
    Unavailable,
)
from .subscriber import Subscriber
from .v1 import replicast_pb2 as pb

__all__ = [
    "DEFAULT_TARGET",
    "Client",
    "DeadlineExceeded",
    "InvalidRequest",
    "LimitReached",
    "NotAcknowledged",
    "PermissionDenied",
    "Publisher",
    "ReplicastError",
    "Subscriber",
    "Subscription",
    "SubscriptionEnded",
    "Unauthenticated",
    "Unavailable",
    "ack_policy",
    "delivery_json",
    "format_receipts",
    "gevent_patched",
    "pb",
    "prepare",
]
