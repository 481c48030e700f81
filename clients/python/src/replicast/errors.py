"""Typed errors, one class per thing a caller does differently.

Every failed call raises a :class:`ReplicastError` subclass carrying the gRPC
code and the replica's message (which names the field, limit or replicas
involved). A Broadcast whose ack policy was not met raises
:class:`NotAcknowledged` with every replica's receipt, decoded from the
status details (``google.rpc.Status``), so the caller knows which replicas
have the message. The README's "Errors" table is the contract.
"""

from __future__ import annotations

import re

import grpc
from grpc_status import rpc_status

from .v1 import replicast_pb2 as pb

CODES = {code.value[0]: code for code in grpc.StatusCode}


class ReplicastError(Exception):
    """A failed call: ``code`` (grpc.StatusCode), ``message`` (the replica's
    words) and, for a Broadcast, ``response`` (the BroadcastResponse with
    every receipt) when the replica sent it."""

    def __init__(self, code: grpc.StatusCode, message: str, response: pb.BroadcastResponse | None = None):
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.response = response

    @property
    def receipts(self) -> list:
        """One ``PeerOutcome`` per replica, when the replica sent them."""
        return list(self.response.outcomes) if self.response is not None else []

    @property
    def retryable(self) -> bool:
        """Whether retrying with the same ``id`` may succeed."""
        return self.code in (
            grpc.StatusCode.UNAVAILABLE,
            grpc.StatusCode.DEADLINE_EXCEEDED,
            grpc.StatusCode.RESOURCE_EXHAUSTED,
        )


class NotAcknowledged(ReplicastError):
    """The ack policy was not met (UNAVAILABLE, or DEADLINE_EXCEEDED when the
    deadline ran out first). ``receipts`` say which replicas have it: retry
    with the same ``id``, and replicas that have it answer ``duplicate``."""


class InvalidRequest(ReplicastError):
    """INVALID_ARGUMENT (or OUT_OF_RANGE, FAILED_PRECONDITION): fix the
    request as the message says; retrying it unchanged will not help."""


class Unauthenticated(ReplicastError):
    """UNAUTHENTICATED: no token, or one the replica does not know."""


class PermissionDenied(ReplicastError):
    """PERMISSION_DENIED: the token may not use this topic (both named)."""


class LimitReached(ReplicastError):
    """RESOURCE_EXHAUSTED: a limit (named by its flag) or a rate limit; back off."""


class Unavailable(ReplicastError):
    """UNAVAILABLE without receipts: the replica is draining or unreachable;
    retry, on another replica if it is draining."""


class DeadlineExceeded(ReplicastError):
    """DEADLINE_EXCEEDED without receipts: the call's deadline ran out."""


_BY_CODE = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequest,
    grpc.StatusCode.OUT_OF_RANGE: InvalidRequest,
    grpc.StatusCode.FAILED_PRECONDITION: InvalidRequest,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.RESOURCE_EXHAUSTED: LimitReached,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
}


def error_for(code: grpc.StatusCode, message: str, response: pb.BroadcastResponse | None = None) -> ReplicastError:
    """The error class for ``code``; with receipts, :class:`NotAcknowledged`."""
    if response is not None and code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return NotAcknowledged(code, message, response)
    return _BY_CODE.get(code, ReplicastError)(code, message, response)


def from_rpc_error(err: grpc.RpcError) -> ReplicastError:
    """The typed error for a failed call, with its receipts when present."""
    return error_for(err.code(), err.details() or "", broadcast_response_from_details(err))


def broadcast_response_from_details(err: grpc.RpcError) -> pb.BroadcastResponse | None:
    """The BroadcastResponse a failed Broadcast carries in its status
    details (trailer ``grpc-status-details-bin``), or None."""
    try:
        status = rpc_status.from_call(err)
    except ValueError:  # details inconsistent with the call's own code and message
        return None
    if status is None:
        return None
    for detail in status.details:
        if detail.Is(pb.BroadcastResponse.DESCRIPTOR):
            response = pb.BroadcastResponse()
            detail.Unpack(response)
            return response
    return None


class SubscriptionEnded(ReplicastError):
    """A Subscribe stream ended with an error.

    ``resume_after`` is the ``after_sequence`` to resubscribe with, from the
    replica's message: RESOURCE_EXHAUSTED (this subscriber fell behind:
    resuming there loses nothing), OUT_OF_RANGE (the resume point left the
    ring: resuming skips what is gone), FAILED_PRECONDITION (the replica
    restarted: 0, live only). ``gap`` says whether messages were lost to
    this subscriber (a cache should then drop what it holds).
    """

    _RESUME = re.compile(r"(?:resubscribe|resume|subscribe) with after_sequence\s*(?:=|>=)\s*(\d+)")

    def __init__(self, code: grpc.StatusCode, message: str, last_sequence: int):
        super().__init__(code, message)
        self.last_sequence = last_sequence
        match = self._RESUME.search(message)
        if match:
            self.resume_after: int | None = int(match.group(1))
        elif code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            self.resume_after = last_sequence
        else:
            self.resume_after = None
        self.gap = code in (grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.FAILED_PRECONDITION)
