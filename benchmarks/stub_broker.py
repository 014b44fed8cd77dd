"""
A stub broker for the "worker alone" measure: a ROUTER socket that answers
HELLO with WELCOME, every credit at once with a TASK (an ``echo`` whose
payload is its id), every RESULT with ACK, and sends a HEARTBEAT to its
workers every second.  A credit is a READY, or a RESULT that carries
``"ready": true`` (a finished slot asking for its next task in the same
message, docs/protocol.rst).  No storage, no queue: the worker is the only thing
measured.

Prints ``listening on ENDPOINT``, ``warmed up`` once a tenth of
``--tasks`` results have come back, and then, once all have, a ``result
{json}`` line with the rate over the rest (``rate``) and over all from
the first TASK sent (``rate_all``).  Then it keeps answering (handing out no more
tasks) until it is stopped.

    python benchmarks/stub_broker.py --tasks 20000
"""

import argparse
import json
import signal
import sys
import time
import uuid

import zmq

from taskbroker.protocol.codec import SIGNATURE

DUMPS = json.JSONEncoder(separators=(",", ":")).encode


class Stop(Exception):
    pass


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=20_000)
    parser.add_argument("--listen", default="tcp://127.0.0.1:*")
    parser.add_argument("--heartbeat", type=float, default=1.0)
    args = parser.parse_args()

    def stop(signum, frame):
        raise Stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)

    instance = uuid.uuid4().hex[:12]
    context = zmq.Context()
    router = context.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.setsockopt(zmq.SNDHWM, 100_000)
    router.setsockopt(zmq.RCVHWM, 100_000)
    router.bind(args.listen)
    endpoint = router.getsockopt(zmq.LAST_ENDPOINT).decode("ascii")
    print(f"listening on {endpoint}", flush=True)

    welcome = DUMPS(
        {
            "broker": instance,
            "priorities": ["high", "normal", "low"],
            "heartbeat": args.heartbeat,
            "time_limit": None,
        }
    ).encode("utf-8")
    heartbeat = DUMPS({"broker": instance}).encode("utf-8")
    peers = set()
    sent = received = 0
    # The first tenth is a warm-up; the rate is that of the rest.
    warmup = max(1, args.tasks // 10)
    marked = None
    first_sent = None
    reported = False
    next_beat = time.monotonic() + args.heartbeat
    counters = {
        "hellos": 0,
        "readies": 0,
        "results": 0,
        "failed": 0,
        "heartbeats": 0,
        "other": 0,
    }

    def give(peer):
        nonlocal sent, first_sent
        if sent >= args.tasks:
            return
        sent += 1
        if first_sent is None:
            first_sent = time.perf_counter()
        router.send_multipart(
            [
                peer,
                SIGNATURE,
                b"TASK",
                (
                    b'{"id":%d,"handler":"echo","payload":%d,"priority":"normal",'
                    b'"attempt":1,"max_attempts":3,"token":1,"time_limit":null}'
                    % (sent, sent)
                ),
            ]
        )

    # Blocking reads with a time-out (for heartbeats, and so that SIGTERM
    # is seen even when a ZeroMQ thread received it): one call per
    # message, the cheapest loop pyzmq offers, since the stub's own cost
    # is part of every round trip the worker makes.
    router.setsockopt(zmq.RCVTIMEO, 200)
    recv = router.recv_multipart
    send = router.send_multipart
    loads = json.loads
    try:
        while True:
            try:
                peer, signature, command, body = recv()
            except zmq.Again:
                frames = None
            except ValueError:
                counters["other"] += 1
                continue
            else:
                frames = True
            now = time.monotonic()
            if now >= next_beat:
                next_beat = now + args.heartbeat
                for known in peers:
                    send([known, SIGNATURE, b"HEARTBEAT", heartbeat])
            if frames is None:
                continue
            if signature != SIGNATURE:
                counters["other"] += 1
            elif command == b"RESULT":
                result = loads(body)
                if result.get("ready"):
                    # The slot asks for its next task in the RESULT: the
                    # task goes first, the ACK is not on the worker's path.
                    counters["readies"] += 1
                    give(peer)
                counters["results"] += 1
                if result.get("state") != "succeeded":
                    counters["failed"] += 1
                send(
                    [
                        peer,
                        SIGNATURE,
                        b"ACK",
                        b'{"id":%d,"token":%d}'
                        % (result["id"], result["token"]),
                    ]
                )
                received += 1
                if received == warmup:
                    marked = time.perf_counter()
                    print(f"warmed up after {warmup} tasks", flush=True)
                elif received == args.tasks and not reported:
                    reported = True
                    ended = time.perf_counter()
                    measured = args.tasks - warmup
                    print(
                        "result "
                        + json.dumps(
                            dict(
                                counters,
                                tasks=received,
                                warmup=warmup,
                                seconds=ended - marked,
                                rate=measured / (ended - marked),
                                rate_all=received / (ended - first_sent),
                            )
                        ),
                        flush=True,
                    )
            elif command == b"READY":
                counters["readies"] += 1
                give(peer)
            elif command == b"HELLO":
                counters["hellos"] += 1
                peers.add(peer)
                send([peer, SIGNATURE, b"WELCOME", welcome])
            elif command == b"HEARTBEAT":
                counters["heartbeats"] += 1
            elif command == b"BYE":
                peers.discard(peer)
            else:
                counters["other"] += 1
    except Stop:
        pass
    router.close()
    context.term()
    return 0


if __name__ == "__main__":
    sys.exit(main())
