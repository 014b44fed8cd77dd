"""
Where one task's time goes: a per-message timeline of the latency
workload.  A broker and one worker run as real ``twistd`` daemons on their
default settings, each with probes that note the time each message
arrives and leaves and each group commit starts and ends; a client in
this process submits N ``echo`` tasks one at a time and waits for each.
A diagnostic, not one of the suite's measures.

    python benchmarks/timeline.py [--tasks 1000] [--database URL]

Prints, for each step of a task's path, the median and p99 of its
duration, in microseconds, and their sum beside the client's own
submit->result.  The probes cost about a microsecond each.
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

#: The steps of a task's path, in order: (name, from event, to event).
#: Events are (process, what, command): "b" the broker, "w" the worker,
#: "c" the client.
STEPS = (
    ("client SUBMIT -> broker reads it", "c.submit", "b.recv.SUBMIT"),
    ("broker: SUBMIT read -> commit begins", "b.recv.SUBMIT", "b.flush.1"),
    ("broker: insert and dispatch commit", "b.flush.1", "b.committed.1"),
    ("broker: committed -> TASK sent", "b.committed.1", "b.send.TASK"),
    ("TASK sent -> worker reads it", "b.send.TASK", "w.recv.TASK"),
    ("worker: TASK read -> RESULT sent", "w.recv.TASK", "w.send.RESULT"),
    ("RESULT sent -> broker reads it", "w.send.RESULT", "b.recv.RESULT"),
    ("broker: RESULT read -> commit begins", "b.recv.RESULT", "b.flush.2"),
    ("broker: finish commit", "b.flush.2", "b.committed.2"),
    ("broker: committed -> answer sent", "b.committed.2", "b.send.REPLY.2"),
    ("answer sent -> client has it", "b.send.REPLY.2", "c.done"),
)


#: Intervals shown below the steps, not part of their sum.
ALSO = (
    ("broker reads WAIT -> reads RESULT", "b.recv.WAIT", "b.recv.RESULT"),
    ("broker sends SUBMIT's answer -> TASK", "b.send.TASK", "b.send.REPLY.1"),
)


def probe(out):
    """
    In a daemon: note each message read and sent and each group commit,
    and write them to ``out`` as JSON when the reactor stops.
    """
    from twisted.internet import reactor

    from taskbroker.protocol.codec import SIGNATURE
    from taskbroker.store import _batches
    from taskbroker.transport import zmq as transport

    events = []
    note = events.append
    now = time.time

    def command(frames):
        try:
            return frames[frames.index(SIGNATURE) + 1].decode()
        except (ValueError, IndexError):
            return "?"

    init = transport._Connection.__init__

    def __init__(self, factory, socket_type, on_message, *args, **kwargs):
        def on(message, *rest):
            note((now(), "recv." + command(message)))
            return on_message(message, *rest)

        init(self, factory, socket_type, on, *args, **kwargs)

    send_frames = transport._Connection.send_frames

    def send(self, frames, identity=None):
        note((now(), "send." + command(frames)))
        return send_frames(self, frames, identity)

    flush = _batches.BatchedStore._flush
    flushed = _batches.BatchedStore._flushed

    def _flush(self):
        note((now(), "flush"))
        return flush(self)

    def _flushed(self, outcomes, batch):
        note((now(), "committed"))
        return flushed(self, outcomes, batch)

    transport._Connection.__init__ = __init__
    transport._Connection.send_frames = send
    _batches.BatchedStore._flush = _flush
    _batches.BatchedStore._flushed = _flushed

    def dump():
        with open(out, "w") as f:
            json.dump(events, f)

    reactor.addSystemEventTrigger("before", "shutdown", dump)


def daemon(out, argv):
    """
    Run ``twistd`` with the probes in place.
    """
    from twisted.scripts.twistd import run

    probe(out)
    sys.argv = ["twistd", *argv]
    run()


def start(folder, name, argv):
    out = os.path.join(folder, name + ".json")
    log = open(os.path.join(folder, name + ".log"), "w")
    process = subprocess.Popen(
        [sys.executable, __file__, "--daemon", out, "--", *argv],
        cwd=folder,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    return process, out, log.name


def wait_for(path, text, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(path) as f:
            for line in f:
                if text in line:
                    return line
        time.sleep(0.05)
    raise SystemExit(f"timed out waiting for {text!r} in {path}")


def stop(process):
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def timeline(events_of, client, n):
    """
    :returns: ``{step name: [seconds per task]}``, from each process's
        events (sorted lists of ``(time, what)``) and the client's
        ``(submit, done)`` times.
    """
    steps = {name: [] for name, _, _ in STEPS}
    steps["sum of the steps"] = []
    steps["client submit->result"] = []
    steps.update((name, []) for name, _, _ in ALSO)
    cursors = {p: 0 for p in events_of}
    for submitted, done in client[-n:]:
        marks = {"c.submit": submitted, "c.done": done}
        counts = {}
        for p, events in events_of.items():
            i = cursors[p]
            while i < len(events) and events[i][0] < submitted:
                i += 1
            while i < len(events) and events[i][0] <= done:
                t, what = events[i]
                if what in ("flush", "committed") or what.startswith(
                    "send.REPLY"
                ):
                    counts[what] = counts.get(what, 0) + 1
                    what = f"{what}.{counts[what]}"
                marks.setdefault(f"{p}.{what}", t)
                i += 1
            cursors[p] = i
        if all(a in marks and b in marks for _, a, b in STEPS):
            total = 0.0
            for name, a, b in STEPS:
                steps[name].append(marks[b] - marks[a])
                total += marks[b] - marks[a]
            steps["sum of the steps"].append(total)
            steps["client submit->result"].append(done - submitted)
            for name, a, b in ALSO:
                if a in marks and b in marks:
                    steps[name].append(marks[b] - marks[a])
    return steps


def percentile(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p / 100))]


def main():
    if len(sys.argv) > 2 and sys.argv[1] == "--daemon":
        return daemon(sys.argv[2], sys.argv[4:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument(
        "--database",
        help="a database URL (default: a SQLite file in a temporary folder)",
    )
    args = parser.parse_args()
    from taskbroker.client.blocking import BlockingClient

    with tempfile.TemporaryDirectory() as folder:
        database = args.database or "sqlite:///" + os.path.join(
            folder, "tasks.sqlite"
        )
        broker, broker_out, broker_log = start(
            folder,
            "broker",
            [
                "--pidfile=",
                "-n",
                "taskbroker",
                "--listen",
                "tcp://127.0.0.1:*",
                "--database",
                database,
            ],
        )
        processes = [broker]
        try:
            line = wait_for(broker_log, "listening on ")
            endpoint = line.split("listening on ")[1].split(",")[0].strip()
            worker, worker_out, worker_log = start(
                folder,
                "worker",
                [
                    "--pidfile=",
                    "-n",
                    "taskworker",
                    "--broker",
                    endpoint,
                    "--name",
                    "w1",
                ],
            )
            processes.insert(0, worker)
            wait_for(worker_log, "welcomed by broker")
            client_times = []
            with BlockingClient(endpoint, timeout=30) as client:
                for i in range(args.warmup + args.tasks):
                    t0 = time.time()
                    task, _ = client.submit("echo", i)
                    client.wait(task["id"], timeout=30)
                    client_times.append((t0, time.time()))
        finally:
            for process in processes:
                stop(process)
        events_of = {}
        for p, out in (("b", broker_out), ("w", worker_out)):
            with open(out) as f:
                events_of[p] = sorted(tuple(e) for e in json.load(f))
    steps = timeline(events_of, client_times, args.tasks)
    matched = len(steps["sum of the steps"])
    print(f"{matched} of {args.tasks} tasks matched; microseconds:")
    print(f"  {'step':<44} {'p50':>7} {'p99':>7}")
    for name, values in steps.items():
        if values:
            print(
                f"  {name:<44} {1e6 * percentile(values, 50):7.0f} "
                f"{1e6 * percentile(values, 99):7.0f}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
