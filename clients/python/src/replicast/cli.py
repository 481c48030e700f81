"""``python -m replicast``: broadcast, publish, subscribe, health, and an
end-to-end selftest of a running cluster.

    python -m replicast --to 127.0.0.1:7420 broadcast --topic demo --data hello
    printf 'a\nb\n' | python -m replicast --to 127.0.0.1:7420 publish --topic demo
    python -m replicast --to 127.0.0.1:7420 subscribe --topic 'demo*' --count 10
    python -m replicast --to 127.0.0.1:7420 health
    python -m replicast --to 127.0.0.1:7420 selftest
"""

from __future__ import annotations

import argparse
import json
import queue
import sys
import threading
import time
import uuid
from pathlib import Path

import grpc

from .client import DEFAULT_TARGET, Client, Subscription, delivery_json, format_receipts
from .errors import ReplicastError, SubscriptionEnded


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

    with Client(target) as client:
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

        clients = [Client(addr) for addr in peers]
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



def _cmd_broadcast(args) -> int:
    if args.data.startswith("@"):
        payload = Path(args.data[1:]).read_bytes()
    else:
        payload = args.data.encode()
    headers = dict(args.header)
    with Client(args.to) as client:
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
    with Client(args.to) as client, client.publisher(window=args.window) as publisher:
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
    with Client(args.to) as client, client.subscribe(args.topic, args.after, args.incarnation) as sub:
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
    with Client(args.to) as client:
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
    parser = argparse.ArgumentParser(prog="python -m replicast", description="replicast from Python: broadcast, publish, subscribe, health, selftest", parents=[common])
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
    p.add_argument(
        "--incarnation", type=int, default=0, help="the replica process --after belongs to (decimal, as printed)"
    )
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
