"""Tests of the replicast package: the error model alone, then against real
replicas (``replicast serve`` on loopback; the binary from $REPLICAST_BIN):
receipts, fork safety, and a Subscriber that survives its replica's restart.

    REPLICAST_BIN=target/release/replicast python3 -m unittest discover -s clients/python/tests -v
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import unittest

import grpc

import replicast
from replicast.errors import SubscriptionEnded, error_for

BIN = os.environ.get("REPLICAST_BIN", "target/release/replicast")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def eventually(what: str, condition, within: float = 15.0):
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"{what}: not within {within}s")


class Replica:
    """One ``replicast serve`` process on 127.0.0.1:PORT."""

    def __init__(self, port: int, *extra: str):
        self.addr = f"127.0.0.1:{port}"
        self.process = subprocess.Popen(
            [BIN, "serve", "--listen", self.addr, "--drain-timeout", "200ms", *extra],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        with replicast.Client(self.addr) as client:
            eventually(f"{self.addr} SERVING", lambda: _serving(client))

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(20)


def _serving(client: replicast.Client) -> bool:
    try:
        return client.health(timeout=1) == "SERVING"
    except replicast.ReplicastError:
        return False


class ErrorModel(unittest.TestCase):
    def test_each_code_has_its_class_and_receipts_make_it_not_acknowledged(self):
        response = replicast.pb.BroadcastResponse(id="m", replicas=2, acked=1)
        self.assertIsInstance(error_for(grpc.StatusCode.UNAVAILABLE, "x", response), replicast.NotAcknowledged)
        self.assertIsInstance(error_for(grpc.StatusCode.DEADLINE_EXCEEDED, "x", response), replicast.NotAcknowledged)
        self.assertIsInstance(error_for(grpc.StatusCode.UNAVAILABLE, "draining"), replicast.Unavailable)
        self.assertIsInstance(error_for(grpc.StatusCode.INVALID_ARGUMENT, "x"), replicast.InvalidRequest)
        self.assertIsInstance(error_for(grpc.StatusCode.PERMISSION_DENIED, "x"), replicast.PermissionDenied)
        self.assertIsInstance(error_for(grpc.StatusCode.UNAUTHENTICATED, "x"), replicast.Unauthenticated)
        self.assertIsInstance(error_for(grpc.StatusCode.RESOURCE_EXHAUSTED, "x"), replicast.LimitReached)
        self.assertTrue(error_for(grpc.StatusCode.UNAVAILABLE, "x").retryable)
        self.assertFalse(error_for(grpc.StatusCode.INVALID_ARGUMENT, "x").retryable)

    def test_a_subscription_ending_says_where_to_resume_and_whether_messages_were_lost(self):
        lagged = SubscriptionEnded(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "subscriber fell more than 10 deliveries behind; resubscribe with after_sequence=41 to continue",
            41,
        )
        self.assertEqual((lagged.resume_after, lagged.gap), (41, False))
        evicted = SubscriptionEnded(
            grpc.StatusCode.OUT_OF_RANGE, "... resume with after_sequence >= 99 (messages in between are lost)", 7
        )
        self.assertEqual((evicted.resume_after, evicted.gap), (99, True))
        restarted = SubscriptionEnded(grpc.StatusCode.FAILED_PRECONDITION, "this replica restarted: ...", 7)
        self.assertTrue(restarted.gap)


class AgainstReplicas(unittest.TestCase):
    def test_a_policy_not_met_raises_not_acknowledged_with_every_receipt(self):
        dead = free_port()
        port = free_port()
        replica = Replica(port, "--static-peers", f"127.0.0.1:{port},127.0.9.1:{dead}")
        try:
            with replicast.Client(replica.addr) as client:
                ok = client.broadcast("t", b"x", ack="one", timeout=2)
                self.assertGreaterEqual(ok.acked, 1)
                with self.assertRaises(replicast.NotAcknowledged) as caught:
                    client.broadcast("t", b"x", ack="all", timeout=2)
                receipts = {r.peer: r for r in caught.exception.receipts}
                self.assertEqual(set(receipts), {replica.addr, f"127.0.9.1:{dead}"})
                self.assertEqual(receipts[replica.addr].code, 0)
                self.assertNotEqual(receipts[f"127.0.9.1:{dead}"].code, 0)
                with self.assertRaises(replicast.InvalidRequest):
                    client.broadcast("not a topic!", b"x")
        finally:
            replica.stop()

    def test_a_client_made_before_fork_works_in_the_child_and_the_parent(self):
        replica = Replica(free_port())
        try:
            client = replicast.Client(replica.addr)
            self.assertEqual(client.broadcast("t", b"parent", timeout=5).acked, 1)
            child = os.fork()
            if child == 0:  # the child: its own channel, created on first use
                code = 1
                try:
                    code = 0 if client.broadcast("t", b"child", timeout=5).acked == 1 else 1
                finally:
                    os._exit(code)
            _, status = os.waitpid(child, 0)
            self.assertEqual(os.waitstatus_to_exitcode(status), 0, "the child broadcast with the parent's client")
            self.assertEqual(client.broadcast("t", b"parent again", timeout=5).acked, 1)
            client.close()
        finally:
            replica.stop()

    def test_a_subscriber_resumes_across_its_replicas_restart_and_reports_the_gap(self):
        port = free_port()
        replica = Replica(port)
        got: list[bytes] = []
        gaps: list[SubscriptionEnded] = []
        lock = threading.Lock()

        def on_message(delivery):
            with lock:
                got.append(delivery.message.payload)

        subscriber = replicast.Subscriber(
            on_message, ["cache.*"], target=replica.addr, on_gap=gaps.append, backoff_max=0.5, register=False
        ).start()
        try:
            self.assertTrue(subscriber.wait_attached(10))
            with replicast.Client(replica.addr) as client:
                client.broadcast("cache.a", b"before", timeout=5)
                client.broadcast("other", b"not for it", timeout=5)
            eventually("the first message", lambda: got == [b"before"])
            first_incarnation = subscriber.incarnation
            self.assertNotEqual(first_incarnation, 0)

            replica.stop()
            replica = Replica(port)  # a new process: a new incarnation
            eventually("the subscriber to notice the restart", lambda: len(gaps) == 1)
            self.assertEqual(gaps[0].code, grpc.StatusCode.FAILED_PRECONDITION)
            eventually("the subscriber to attach again", lambda: subscriber.wait_attached(0))
            with replicast.Client(replica.addr) as client:
                client.broadcast("cache.b", b"after", timeout=5)
            eventually("the message after the restart", lambda: got == [b"before", b"after"])
            self.assertNotEqual(subscriber.incarnation, first_incarnation)
        finally:
            subscriber.stop()
            replica.stop()


if __name__ == "__main__":
    unittest.main(verbosity=2)
