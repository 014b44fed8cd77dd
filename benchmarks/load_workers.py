"""
Many workers in one light process, for the "many workers" measure.

Opens N DEALER connections to a broker, each a worker with its own name
and identity (``NAME/SESSION``, as real workers use) and one slot, that
speaks the real worker protocol (docs/protocol.rst): HELLO until WELCOME,
one READY per free slot after each WELCOME, a RESULT for every TASK (with
its token, and ``"ready": true``: the slot asks for its next task in the
same message, as taskworker does), results kept until ACKed and resent
after a WELCOME, a HEARTBEAT (``{"running": []}``: the tasks it runs, none
between messages) a whole ``--heartbeat`` interval after the previous one
(the first ones spread evenly over the interval, as workers started at
different times would be) or at once in answer to the broker's HEARTBEAT
when its own is due before the broker's next one and did not go within
the last tenth of the shorter of the two intervals, HELLO
again on REHELLO or when the broker's instance id changes, BYE on
SIGTERM.  Each task is an ``echo``: its result is its payload.

Plain pyzmq, one thread, epoll on the sockets' descriptors.  Prints ``ready N`` once every
connection is welcomed, and a ``result {json}`` line of counters when it
stops.

    python benchmarks/load_workers.py --broker tcp://127.0.0.1:5555 \\
        --connections 1000 [--name load] [--heartbeat 1.0]
"""

import argparse
import heapq
import json
import resource
import select
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
    parser.add_argument("--broker", required=True)
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--name", default="load")
    parser.add_argument("--heartbeat", type=float, default=1.0)
    parser.add_argument("--hello-retry", type=float, default=2.0)
    args = parser.parse_args()
    count = args.connections

    # Each connection costs a TCP descriptor and a signalling one.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 3 * count + 256
    if soft < wanted:
        limit = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))

    def stop(signum, frame):
        raise Stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)

    context = zmq.Context()
    context.set(zmq.MAX_SOCKETS, count + 64)
    sockets = []
    hello = []
    # epoll on each socket's ZMQ_FD rather than zmq.Poller: a poll costs
    # what is active, not the number of connections.
    epoll = select.epoll(count + 16)
    by_fd = {}
    for i in range(count):
        name = f"{args.name}-{i}"
        sock = context.socket(zmq.DEALER)
        sock.setsockopt(
            zmq.IDENTITY, f"{name}/{uuid.uuid4().hex[:8]}".encode()
        )
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 10_000)
        sock.setsockopt(zmq.RCVHWM, 10_000)
        sock.connect(args.broker)
        sockets.append(sock)
        fd = sock.getsockopt(zmq.FD)
        by_fd[fd] = i
        epoll.register(fd, select.EPOLLIN)
        hello.append(
            DUMPS(
                {
                    "name": name,
                    "slots": 1,
                    "priorities": None,
                    "handlers": ["echo"],
                    "running": [],
                    "heartbeat": args.heartbeat,
                }
            ).encode("utf-8")
        )

    # Per connection: the broker instance that welcomed it (None while not
    # welcomed), when HELLO was last sent, and results not yet ACKed.
    instance = [None] * count
    hello_sent = [0.0] * count
    # The broker's heartbeat interval (from WELCOME), and when each
    # connection's next heartbeat is due.
    broker_beat = [args.heartbeat] * count
    beat_due = [0.0] * count
    unacked = [dict() for _ in range(count)]
    counters = {
        "hellos": 0,
        "welcomes": 0,
        "tasks": 0,
        "acks": 0,
        "rehellos": 0,
        "heartbeats_in": 0,
        "heartbeats_out": 0,
        "errors": 0,
        "cancels": 0,
        "bad": 0,
    }
    empty = b"{}"
    # What taskworker sends: the tasks it runs, none here, since each task
    # is answered as soon as it arrives.
    beat = b'{"running":[]}'
    # Connections sent on since their last drain: a send can consume the
    # descriptor's signal for a message that arrived meanwhile, so each
    # of them is drained again before the next wait.
    touched = set()

    def send(i, command, body):
        touched.add(i)
        try:
            sockets[i].send_multipart([SIGNATURE, command, body], zmq.NOBLOCK)
        except zmq.Again:
            counters["bad"] += 1

    def heartbeat(i, now):
        beat_due[i] = now + args.heartbeat
        counters["heartbeats_out"] += 1
        send(i, b"HEARTBEAT", beat)

    def say_hello(i, now):
        instance[i] = None
        hello_sent[i] = now
        counters["hellos"] += 1
        send(i, b"HELLO", hello[i])

    state = {"welcomed": 0}

    def drain(i):
        sock = sockets[i]
        while sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            frames = sock.recv_multipart(zmq.NOBLOCK)
            if len(frames) != 3 or frames[0] != SIGNATURE:
                counters["bad"] += 1
                continue
            command = frames[1]
            if command == b"TASK":
                body = json.loads(frames[2])
                counters["tasks"] += 1
                result = {
                    "id": body["id"],
                    "token": body["token"],
                    "state": "succeeded",
                    "result": body.get("payload"),
                    "error": None,
                    "traceback": None,
                    "permanent": False,
                }
                # Kept until ACKed; a resent result carries no credit.
                # The first one asks for the next task.
                unacked[i][(body["id"], body["token"])] = DUMPS(result).encode(
                    "utf-8"
                )
                result["ready"] = True
                send(i, b"RESULT", DUMPS(result).encode("utf-8"))
            elif command == b"ACK":
                body = json.loads(frames[2])
                unacked[i].pop((body["id"], body["token"]), None)
                counters["acks"] += 1
            elif command == b"HEARTBEAT":
                counters["heartbeats_in"] += 1
                body = json.loads(frames[2])
                if instance[i] is None:
                    continue
                now = time.monotonic()
                if body["broker"] != instance[i]:
                    state["welcomed"] -= 1
                    say_hello(i, now)
                else:
                    # Answered at once when due before the broker's next,
                    # unless one went within a tenth of the shorter
                    # interval, as taskworker does.
                    due_in = beat_due[i] - now
                    if (
                        due_in < broker_beat[i]
                        and args.heartbeat - due_in
                        >= min(args.heartbeat, broker_beat[i]) / 10
                    ):
                        heartbeat(i, now)
            elif command == b"WELCOME":
                body = json.loads(frames[2])
                counters["welcomes"] += 1
                if instance[i] is None:
                    state["welcomed"] += 1
                instance[i] = body["broker"]
                broker_beat[i] = body["heartbeat"]
                # Unacknowledged results first, then the credit.
                for result in unacked[i].values():
                    send(i, b"RESULT", result)
                send(i, b"READY", empty)
            elif command == b"REHELLO":
                counters["rehellos"] += 1
                if instance[i] is not None:
                    state["welcomed"] -= 1
                    say_hello(i, time.monotonic())
            elif command == b"CANCEL":
                counters["cancels"] += 1
            elif command == b"ERROR":
                counters["errors"] += 1
                body = json.loads(frames[2])
                print(
                    f"error from the broker to connection {i}: "
                    f"{body.get('message')}",
                    flush=True,
                )
            else:
                counters["bad"] += 1

    started = time.monotonic()
    for i in range(count):
        say_hello(i, started)
    announced = False
    per_beat = args.heartbeat / count
    # (time, connection): a connection's heartbeat is due no sooner; an
    # answer to the broker's moves beat_due[i] on, and the entry is put
    # back for that time when it comes up.
    due = []
    for i in range(count):
        beat_due[i] = started + args.heartbeat + i * per_beat
        due.append((beat_due[i], i))
    heapq.heapify(due)
    last_retry_scan = started

    try:
        while True:
            now = time.monotonic()
            # Heartbeats due by now go together at each wake.
            while due[0][0] <= now:
                _, i = due[0]
                if beat_due[i] <= now:
                    heartbeat(i, now)
                heapq.heapreplace(due, (beat_due[i], i))
            if now - last_retry_scan > 0.5:
                last_retry_scan = now
                for i in range(count):
                    if (
                        instance[i] is None
                        and now - hello_sent[i] > args.hello_retry
                    ):
                        say_hello(i, now)
            while touched:
                pending = list(touched)
                touched.clear()
                for i in pending:
                    drain(i)
            if not announced and state["welcomed"] >= count:
                announced = True
                print(
                    f"ready {count} after {time.monotonic() - started:.2f} s",
                    flush=True,
                )
            # Wake at least every 10 ms, for the heartbeats due by then.
            for fd, _ in epoll.poll(0.01):
                drain(by_fd[fd])
    except Stop:
        pass
    for i in range(count):
        if instance[i] is not None:
            send(i, b"BYE", empty)
    print("result " + json.dumps(counters), flush=True)
    # Give the BYEs a moment to leave, then go.
    for sock in sockets:
        sock.setsockopt(zmq.LINGER, 200)
        sock.close()
    context.term()
    return 0


if __name__ == "__main__":
    sys.exit(main())
