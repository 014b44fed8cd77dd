"""
The broker's core alone: :class:`taskbroker.broker.core.Broker` with the
real SQLite store (default settings, every change committed) and the real
reactor, but no sockets.  Workers and the client are functions in the same
process that answer at once, each on a later reactor turn, as over a
socket.  A diagnostic, not one of the suite's measures: it shows how much
of a figure is the broker and its database, and how much the transport,
the worker and the client.

    python benchmarks/broker_core.py [--tasks 10000] [--runs 3]

Prints, per run, the throughput of N ``echo`` tasks submitted in batches
of 1,000 to 2 one-slot workers, and for tasks one at a time the times from
the SUBMIT to its reply, to the TASK, and to the result's ACK (p50/p99);
and the CPU of each of the process's threads.
"""

import argparse
import glob
import json
import os
import statistics
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.internet import defer, reactor  # noqa: E402

from taskbroker.broker.core import Broker  # noqa: E402
from taskbroker.config import BrokerConfig  # noqa: E402
from taskbroker.protocol import codec  # noqa: E402
from taskbroker.store.sqlite import SQLiteStore  # noqa: E402
from taskbroker.transport.zmq import Sender  # noqa: E402

WORKERS = (b"w1/x", b"w2/x")


class Harness:
    """
    A broker whose ``send`` plays the workers and the client.
    """

    def __init__(self, store):
        self.broker = Broker(
            BrokerConfig(), store, reactor, self.send, monotonic=time.monotonic
        )
        self.acked = 0
        self.on_ack = None
        self.on_task = None
        self.on_reply = None

    def send(self, identity, frames):
        command = frames[1]
        if command == b"TASK":
            body = json.loads(frames[2])
            if self.on_task:
                self.on_task()
            reactor.callLater(
                0,
                self.broker.handle,
                Sender(identity),
                codec.encode(
                    b"RESULT",
                    {
                        "id": body["id"],
                        "token": body["token"],
                        "state": "succeeded",
                        "result": body["payload"],
                        "ready": True,
                    },
                ),
            )
        elif command == b"ACK":
            self.acked += 1
            if self.on_ack:
                self.on_ack()
        elif command == b"REPLY" and self.on_reply:
            self.on_reply()
        return True

    def start_workers(self):
        for identity in WORKERS:
            self.broker.handle(
                Sender(identity),
                codec.encode(
                    b"HELLO",
                    {
                        "name": identity.decode().split("/")[0],
                        "handlers": ["echo"],
                        "slots": 1,
                        "heartbeat": 1.0,
                    },
                ),
            )
            self.broker.handle(Sender(identity), codec.encode(b"READY", {}))


def submit(broker, payloads):
    broker.handle(
        Sender(b"client"),
        codec.encode(
            b"SUBMIT",
            {
                "req": "r",
                "tasks": [{"handler": "echo", "payload": p} for p in payloads],
            },
        ),
    )


async def throughput(harness, n):
    done = defer.Deferred()
    harness.on_ack = lambda: harness.acked == n and done.callback(None)
    began = time.perf_counter()
    for start in range(0, n, 1000):
        submit(harness.broker, range(start, min(n, start + 1000)))
    await done
    return n / (time.perf_counter() - began)


async def one_at_a_time(harness, n):
    marks = {"reply": [], "task": [], "ack": []}
    for i in range(n):
        done = defer.Deferred()
        t0 = time.perf_counter()
        harness.on_reply = lambda t0=t0: marks["reply"].append(
            time.perf_counter() - t0
        )
        harness.on_task = lambda t0=t0: marks["task"].append(
            time.perf_counter() - t0
        )

        def acked(done=done, t0=t0):
            marks["ack"].append(time.perf_counter() - t0)
            done.callback(None)

        harness.on_ack = acked
        submit(harness.broker, [i])
        await done
    return marks


def percentile(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p / 100))]


def thread_cpu():
    """
    :returns: ``{thread name: CPU seconds}`` for this process's threads.
    """
    names = {t.native_id: t.name for t in threading.enumerate()}
    ticks = os.sysconf("SC_CLK_TCK")
    cpu = {}
    for task in glob.glob("/proc/self/task/*"):
        with open(task + "/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        name = names.get(int(os.path.basename(task)), "other")
        cpu[name] = (
            cpu.get(name, 0) + (int(fields[11]) + int(fields[12])) / ticks
        )
    return cpu


async def run(folder, tasks, latency_tasks):
    store = SQLiteStore(os.path.join(folder, "tasks.sqlite"), reactor)
    await store.open()
    try:
        harness = Harness(store)
        await harness.broker.load()
        harness.start_workers()
        before = thread_cpu()
        began = time.perf_counter()
        rate = await throughput(harness, tasks)
        elapsed = time.perf_counter() - began
        after = thread_cpu()
        marks = await one_at_a_time(harness, latency_tasks)
        harness.broker.stop()
    finally:
        await store.close()
    cpu = {
        name: 100.0 * (after.get(name, 0) - before.get(name, 0)) / elapsed
        for name in after
    }
    return rate, marks, cpu


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=10000)
    parser.add_argument("--latency-tasks", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    results = []

    async def all_runs():
        for i in range(args.runs):
            with tempfile.TemporaryDirectory() as folder:
                rate, marks, cpu = await run(
                    folder, args.tasks, args.latency_tasks
                )
            results.append(rate)
            times = "  ".join(
                f"{name} p50 {1e3 * percentile(v, 50):.2f} / "
                f"p99 {1e3 * percentile(v, 99):.2f} ms"
                for name, v in marks.items()
            )
            threads = ", ".join(
                f"{name} {value:.0f} %"
                for name, value in sorted(cpu.items())
                if value >= 1
            )
            print(
                f"run {i + 1}: {rate:,.0f} tasks/s (threads: {threads}); "
                f"one at a time, SUBMIT -> {times}",
                flush=True,
            )

    def finished(result):
        reactor.stop()
        return result

    reactor.callWhenRunning(
        lambda: (
            defer.ensureDeferred(all_runs())
            .addBoth(finished)
            .addErrback(lambda f: print(f.getTraceback(), file=sys.stderr))
        )
    )
    reactor.run()
    if results:
        print(
            f"median of {len(results)}: "
            f"{statistics.median(results):,.0f} tasks/s"
        )


if __name__ == "__main__":
    main()
