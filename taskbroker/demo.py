# -*- test-case-name: tests.integration.test_demo -*-
"""
``make demo``: a broker and three workers on this machine, a mixed batch of
``sleep`` tasks, live progress, and a timeline that shows what priorities
and reserved capacity buy.

It runs real ``twistd`` daemons in ``demo-run/`` (wiped at each start, kept
at the end for their logs), talks to the broker with
:class:`~taskbroker.client.blocking.BlockingClient`, and stops every daemon
it started, by pid, whatever happens.
"""

import argparse
import os
import random
import re
import shutil
import signal
import statistics
import sys
import textwrap
import time
from datetime import datetime

from taskbroker import _daemons
from taskbroker.client.blocking import BlockingClient

RUN_DIR = "demo-run"
LEVELS = ("high", "normal", "low")
#: (name, extra arguments): two workers for all levels, one kept for urgent
#: work.
WORKERS = (
    ("general-1", ()),
    ("general-2", ()),
    ("reserved-high", ("--priorities", "high")),
)
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
REFRESH = 0.25
#: (level, count, shortest, longest): the batch of sleep tasks, in seconds.
BATCH = (("low", 12, 2, 4), ("normal", 8, 1, 2), ("high", 3, 0.5, 0.5))
#: How many high tasks of 0.5 s come one at a time, 2.5 s apart.
LATE = 4


class DemoError(Exception):
    """A reason to stop, told to the user in one line."""


class Stopped(BaseException):
    """SIGTERM: stop as on Ctrl-C, so that the daemons are stopped too."""


#: Seconds the daemons stay up after the demo, on a terminal, so that a
#: person can look at the dashboard.
LINGER = 60.0


def stop_all(daemons):
    """
    SIGTERM by pid, SIGKILL after STOP_TIMEOUT; workers before the broker so
    that they leave cleanly instead of trying to reconnect.
    """
    # A second Ctrl-C or SIGTERM must not leave half of them running.
    previous = {
        sig: signal.signal(sig, signal.SIG_IGN)
        for sig in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        for group in (
            [d for d in daemons if d.name != "broker"],
            [d for d in daemons if d.name == "broker"],
        ):
            _daemons.stop_all(group, STOP_TIMEOUT)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def plan(scale):
    """The batch (shuffled, as work arrives in life) and the late highs."""
    rng = random.Random(2026)  # the same demo every time
    batch = [
        (level, round(rng.uniform(low, high) * scale, 3))
        for level, n, low, high in BATCH
        for _ in range(n)
    ]
    rng.shuffle(batch)
    late = [
        ((2.0 + 2.5 * i) * scale, "high", round(0.5 * scale, 3))
        for i in range(LATE)
    ]
    return batch, late


def describe_work(scale):
    kinds = ", ".join(
        f"{n} {level} of {low:g}" + (f"-{high:g}" * (high > low)) + " s"
        for level, n, low, high in BATCH
    )
    return textwrap.fill(
        f"Submitting {sum(k[1] for k in BATCH)} sleep tasks at once "
        f"({kinds}), then {LATE} more high ones one at a time while the "
        "general workers are busy"
        + (f"; all durations x {scale:g}." if scale != 1 else "."),
        78,
    )


class StatusLine:
    """One line rewritten in place on a terminal, a line a second otherwise."""

    def __init__(self, out):
        self.out, self.tty = out, out.isatty()
        self.last, self.shown = 0.0, False

    def show(self, text):
        if self.tty:
            width = shutil.get_terminal_size().columns - 1
            self.out.write("\r" + text[:width].ljust(width))
            self.shown = True
        elif time.monotonic() - self.last >= 1.0:
            self.out.write(text + "\n")
            self.last = time.monotonic()
        self.out.flush()

    def end(self):
        if self.shown:
            self.out.write("\n")
            self.out.flush()
            self.shown = False


def status_text(elapsed, stats, running, workers):
    counts = stats["tasks"]
    levels = "  ".join(
        f"{level} "
        + "/".join(
            str(sum(counts.get(s, {}).get(level, 0) for s in states))
            for states in (
                ("queued",),
                ("running",),
                ("succeeded", "failed", "cancelled"),
            )
        )
        for level in LEVELS
    )
    doing = "  ".join(
        f"{w['name']} "
        + (
            ", ".join(
                f"#{t['id']} {t['priority']}"
                for t in running
                if t["worker"] == w["name"]
            )
            or "idle"
        )
        for w in workers
    )
    return f"{elapsed:5.1f}s  {levels}  |  {doing}"


def run_tasks(client, scale, daemons, status):
    """Submit the work, show progress until all is final; return the tasks."""
    batch, late = plan(scale)
    _, unserved = client.submit_many(
        [
            {"handler": "sleep", "payload": {"seconds": s}, "priority": level}
            for level, s in batch
        ]
    )
    if unserved:
        raise DemoError(f"no worker has the handler(s) {sorted(unserved)}")
    start = time.monotonic()
    deadline = start + 30 + 2 * (sum(s for _, s in batch) + late[-1][0])
    late_ids = set()
    while True:
        elapsed = time.monotonic() - start
        while late and late[0][0] <= elapsed:
            _, level, seconds = late.pop(0)
            task, _ = client.submit(
                "sleep", {"seconds": seconds}, priority=level
            )
            late_ids.add(task["id"])
        for d in daemons:
            d.check()
        stats = client.stats()
        running = client.list(state="running", limit=None)
        status.show(status_text(elapsed, stats, running, client.workers()))
        if not late and not any(
            sum(stats["tasks"].get(s, {}).values())
            for s in ("queued", "running")
        ):
            break
        if time.monotonic() > deadline:
            raise DemoError(
                f"the tasks did not finish within {deadline - start:.0f} s"
            )
        time.sleep(REFRESH)
    status.end()
    return client.list(limit=None), late_ids


def busy_at(rows, worker, t):
    return sum(
        1 for r in rows if r["worker"] == worker and r["start"] <= t < r["end"]
    )


def idle_while_waiting(rows, workers):
    """
    Seconds, summed over workers, during which a worker had a free slot
    while a task it could run was queued: the broker promises ~0.  (Only a
    task's latest attempt is recorded; here every task has one.)
    """
    times = sorted({r[k] for r in rows for k in ("created", "start", "end")})
    total = 0.0
    for a, b in zip(times, times[1:]):
        mid = (a + b) / 2
        waiting = {
            r["priority"] for r in rows if r["created"] <= mid < r["start"]
        }
        total += (b - a) * sum(
            1
            for w in workers
            if waiting & set(w["priorities"])
            and busy_at(rows, w["name"], mid) < w["slots"]
        )
    return total


def inversions(rows, workers, latency=0.02):
    """
    (started, overtaken) pairs: a task started on a worker while a more
    urgent task it could run was queued and then kept waiting (longer than
    dispatch latency).
    """
    serves = {w["name"]: set(w["priorities"]) for w in workers}
    return [
        (lo, hi)
        for lo in rows
        for hi in rows
        if LEVELS.index(hi["priority"]) < LEVELS.index(lo["priority"])
        and hi["priority"] in serves[lo["worker"]]
        and hi["created"] <= lo["start"] < hi["start"] - latency
    ]


def report(tasks, late_ids, workers, out):
    """Print every task, the waits and the workers, and what they show."""

    def at(iso):
        return datetime.fromisoformat(iso).timestamp()

    for t in tasks:
        if t["state"] != "succeeded":
            raise DemoError(f"task {t['id']} {t['state']}: {t['error']}")
    rows = sorted(
        (
            dict(
                t,
                created=at(t["created_at"]),
                start=at(t["started_at"]),
                end=at(t["finished_at"]),
            )
            for t in tasks
        ),
        key=lambda r: (r["start"], r["id"]),
    )
    print_tasks(rows, late_ids, out)
    span, waits, share, idle = print_summary(rows, workers, out)
    print("\nWhat this shows:", file=out)
    for point in lessons(rows, late_ids, workers, span, waits, share, idle):
        print(
            textwrap.fill(
                point, 78, initial_indent="  - ", subsequent_indent="    "
            ),
            file=out,
        )


def print_tasks(rows, late_ids, out):
    print(
        f"\n{'id':>4}  {'priority':<8}  {'worker':<13}  {'waited':>6}  "
        f"{'ran':>5}  state",
        file=out,
    )
    for r in rows:
        r["waited"] = r["start"] - r["created"]
        mark = "*" if r["id"] in late_ids else " "
        print(
            f"{r['id']:>3}{mark}  {r['priority']:<8}  {r['worker']:<13}  "
            f"{r['waited']:6.2f}  {r['end'] - r['start']:5.2f}  "
            f"{r['state']}",
            file=out,
        )
    print("   * submitted on its own while the batch was running", file=out)


def print_summary(rows, workers, out):
    """
    :returns: the run's span, the waits by level, each worker's busy share
        and the idle time while tasks waited.
    """
    span = max(r["end"] for r in rows) - min(r["created"] for r in rows)
    waits = {
        level: [r["waited"] for r in rows if r["priority"] == level]
        for level in LEVELS
    }
    print(f"\nWaits over the {span:.1f} s run:", file=out)
    for level, w in waits.items():
        print(
            f"  {level:<8} {len(w):>3} tasks   median "
            f"{statistics.median(w):5.2f} s   max {max(w):5.2f} s",
            file=out,
        )
    print("Workers:", file=out)
    share = {}
    for w in workers:
        mine = [r for r in rows if r["worker"] == w["name"]]
        share[w["name"]] = sum(r["end"] - r["start"] for r in mine) / (
            span * w["slots"]
        )
        print(
            f"  {w['name']:<14} serves {','.join(w['priorities']):<16} "
            f"{len(mine):>3} tasks   busy {share[w['name']]:4.0%}",
            file=out,
        )
    idle = idle_while_waiting(rows, workers)
    print(
        f"Idle while a task it could run was queued: {idle:.2f} s "
        "(all workers together)",
        file=out,
    )
    return span, waits, share, idle


def lessons(rows, late_ids, workers, span, waits, share, idle):
    """The points the run makes, as sentences."""
    late = [r for r in rows if r["id"] in late_ids]
    general = [
        w["name"] for w in workers if len(w["priorities"]) == len(LEVELS)
    ]
    all_busy = sum(
        1 for r in late if all(busy_at(rows, g, r["created"]) for g in general)
    )
    points = [
        f"Urgent work does not queue behind busy workers: the {len(late)} "
        f"high tasks submitted on their own ({all_busy} of them while every "
        f"general worker was busy) started after at most "
        f"{max(r['waited'] for r in late):.3f} s, on "
        f"{', '.join(sorted({r['worker'] for r in late}))}.",
        "The queue is served by priority: median waits were "
        + ", ".join(
            f"{level} {statistics.median(w):.2f} s"
            for level, w in waits.items()
        )
        + ".",
        "No worker sat idle while a task it could run was queued"
        + (
            f" ({idle:.2f} s in all: message round trips)."
            if idle < 0.01 * span * len(workers)
            else f"... except for {idle:.2f} s in all, more than dispatch latency."
        ),
    ]
    if pairs := inversions(rows, workers):
        started = {lo["id"]: lo for lo, _ in pairs}.values()
        # Tasks of one SUBMIT share their created_at.
        why = (
            "; they came in the same SUBMIT, which the broker hands out "
            "in the order it was sent, not by priority"
            if all(lo["created"] == hi["created"] for lo, hi in pairs)
            else ""
        )
        points.append(
            "Not quite strict, though: "
            + ", ".join(f"#{r['id']} {r['priority']}" for r in started)
            + f" started while a more urgent task was queued{why}."
        )
    for name in (n for n in share if n not in general):
        ready = all(busy_at(rows, name, r["created"]) == 0 for r in late)
        points.append(
            f"The price of the reservation: {name} was busy only "
            f"{share[name]:.0%} of the time while low work waited for the "
            "general workers"
            + (
                "; in exchange it was free whenever an urgent task came."
                if ready
                else "."
            )
        )
    return points


def start_daemons(folder, daemons):
    """
    Start the broker and the workers in ``folder``, adding each to
    ``daemons`` as it starts.

    :returns: ``(endpoint, site)``: the broker's endpoint, once every
        worker is welcomed, and its status site's URL.
    """
    with open(os.path.join(folder, "pids.txt"), "w") as pids:

        def start(name, *args):
            # A session of its own keeps Ctrl-C away from the daemon, so
            # that stop_all can stop them in order (workers first).
            daemons.append(
                _daemons.Daemon(
                    name,
                    _daemons.twistd(*args),
                    folder,
                    log_path=os.path.join(folder, name + ".log"),
                    new_session=True,
                )
            )
            # Written at once, so that a test can check on every daemon
            # even if the demo dies.
            pids.write(f"{name} {daemons[-1].pid}\n")
            pids.flush()
            return daemons[-1]

        # Any free ports: a broker of the user's may hold the defaults.
        broker = start(
            "broker",
            "taskbroker",
            "--listen",
            "tcp://127.0.0.1:*",
            "--http",
            "tcp:0:interface=127.0.0.1",
            "--database",
            "sqlite:///demo.sqlite",
        )
        endpoint = broker.wait_for(
            r"taskbroker ready: listening on (\S+),",
            START_TIMEOUT,
            what="ready",
        ).group(1)
        # Logged before the broker says it is ready.
        site = re.search(r"status site at (\S+)", broker.output()).group(1)
        # Started together, awaited in turn: the starts overlap.
        for w in [
            start(
                name,
                "taskworker",
                "--broker",
                endpoint,
                "--name",
                name,
                "--concurrency",
                "1",
                *extra,
            )
            for name, extra in WORKERS
        ]:
            w.wait_for(
                r"welcomed by broker", START_TIMEOUT, what="welcomed by broker"
            )
    return endpoint, site


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m taskbroker.demo",
        description="Run a broker and three workers and show how tasks flow.",
    )
    parser.add_argument(
        "--scale",
        type=float,
        default=1.0,
        metavar="FACTOR",
        help="multiply every sleep by FACTOR (default 1.0)",
    )
    args = parser.parse_args(argv)
    if not 0 < args.scale <= 100:
        parser.error("--scale must be > 0 and <= 100")

    out = sys.stdout
    folder = os.path.abspath(RUN_DIR)
    daemons = []
    status = StatusLine(out)

    def stopped(signum, frame):
        raise Stopped()

    previous = signal.signal(signal.SIGTERM, stopped)
    try:
        if not os.path.exists(_daemons.TWISTD):
            raise DemoError(
                f"no twistd next to {sys.executable}: run the "
                "demo with the project's virtualenv (make demo)"
            )
        shutil.rmtree(folder, ignore_errors=True)
        os.makedirs(folder)
        print(
            f"Starting a broker (SQLite, {RUN_DIR}/demo.sqlite) and "
            "three workers...",
            file=out,
            flush=True,
        )
        endpoint, site = start_daemons(folder, daemons)
        print(
            f"Watch it on the broker's dashboard: {site}", file=out, flush=True
        )

        with BlockingClient(endpoint) as client:
            workers = client.workers()
            for w in workers:
                print(
                    f"  {w['name']:<14} serves {','.join(w['priorities'])}",
                    file=out,
                )
            print(describe_work(args.scale), file=out)
            print(
                "\nProgress: queued/running/done per level  |  what each "
                "worker runs",
                file=out,
                flush=True,
            )
            tasks, late_ids = run_tasks(client, args.scale, daemons, status)
        report(tasks, late_ids, workers, out)
        if out.isatty():
            # A person is watching: leave the dashboard up a while.
            print(
                f"\nThe dashboard stays up for {LINGER:.0f} s "
                "(Ctrl-C to stop now).",
                file=out,
                flush=True,
            )
            try:
                time.sleep(LINGER)
            except (KeyboardInterrupt, Stopped):
                pass  # the demo is done: stopping now is no interruption
        reason = None
    except (KeyboardInterrupt, Stopped):
        reason = "interrupted"
    except (DemoError, _daemons.DaemonError) as e:
        reason = str(e)
    except Exception as e:  # one line, not a traceback, for any surprise
        reason = f"{type(e).__name__}: {e}".splitlines()[0]
    finally:
        status.end()
        stop_all(daemons)
        signal.signal(signal.SIGTERM, previous)
    if reason is None:
        print(
            f"\nAll {len(daemons)} daemons stopped; their logs are in "
            f"{RUN_DIR}/*.log",
            file=out,
        )
        return 0
    print(f"demo: {reason} (logs: {RUN_DIR}/*.log)", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
