"""
The measures.  Each ``run_*`` function does one run in fresh temporary
folders and returns ``{metric key: value}`` (see :mod:`benchmarks.report`
for what each key means), plus a ``"details"`` dict kept in the JSON.

taskbroker runs as real ``twistd`` daemons on loopback with their default
settings; only ``--listen``, ``--database``, ``--name`` and, for the
reserved worker, ``--priorities`` are given.
"""

import json
import os
import re
import shutil
import sqlite3
import statistics
import sys
import time
import urllib.request
from contextlib import closing
from datetime import datetime

from benchmarks._util import (
    HERE,
    TWISTD,
    BenchError,
    Skip,
    cpu_seconds,
    free_port,
    memory_kib,
    percentile,
    read_only,
    wait_done,
)

PYTHON = sys.executable
LOAD_WORKERS = os.path.join(HERE, "load_workers.py")
STUB_BROKER = os.path.join(HERE, "stub_broker.py")
FLOOR = os.path.join(HERE, "floor")
COMPARE = os.path.join(HERE, "compare")

#: Generous limits: a measure that takes this long is broken, not slow.
START_TIMEOUT = 60.0
#: Worker options that load the ``stamp`` handler (handlers/), for the
#: measures that time a task's start on its worker.
STAMP = ("--handlers-path", os.path.join(HERE, "handlers"))
DRAIN_TIMEOUT = 600.0


def _seconds(iso):
    return datetime.fromisoformat(iso).timestamp()


def _ms(seconds):
    return seconds * 1000.0


def _json(text, source):
    try:
        return json.loads(text)
    except ValueError:
        raise BenchError(
            f"{source} printed an unreadable result: {text[:100]!r}"
        ) from None


def _client(endpoint, timeout=60.0, **keys):
    """
    :param keys: ``curve_server_key`` and ``curve_secret_key``, for a
        broker with CURVE.
    """
    from taskbroker.client.blocking import BlockingClient

    return BlockingClient(endpoint, timeout=timeout, **keys)


class _Daemons:
    """
    Starting taskbroker's daemons for one run.
    """

    def __init__(self, ctx, folder):
        self.ctx = ctx
        self.folder = folder
        self.started = []

    def broker(
        self,
        db=None,
        listen="tcp://127.0.0.1:*",
        timeout=START_TIMEOUT,
        name="broker",
        extra=(),
        database=None,
    ):
        """
        :param db: the SQLite file (default: ``taskbroker.sqlite`` in the
            run's folder), unless ``database`` gives another URL (a
            PostgreSQL one); the process's ``db`` is then ``None``.
        """
        if database is None:
            db = db or os.path.join(self.folder, "taskbroker.sqlite")
            database = "sqlite:///" + db
        process = self.ctx.procs.start(
            name,
            [
                TWISTD,
                "--pidfile=",
                "-n",
                "taskbroker",
                "--listen",
                listen,
                "--database",
                database,
                *extra,
            ],
            self.folder,
        )
        self.started.append(process)
        process.server = True
        match = process.wait_for(
            r"listening on (\S+),", timeout, "the broker listening"
        )
        process.endpoint = match.group(1)
        process.db = db
        return process

    def workers(self, endpoint, names, extra=(), wait=True):
        processes = []
        for name in names:
            process = self.ctx.procs.start(
                name,
                [
                    TWISTD,
                    "--pidfile=",
                    "-n",
                    "taskworker",
                    "--broker",
                    endpoint,
                    "--name",
                    name,
                    *extra,
                ],
                self.folder,
            )
            self.started.append(process)
            processes.append(process)
        if wait:
            for process in processes:
                process.wait_for(
                    r"welcomed by broker",
                    START_TIMEOUT,
                    "a WELCOME from the broker",
                )
        return processes

    def process(self, name, argv, env=None, server=False):
        process = self.ctx.procs.start(name, argv, self.folder, env=env)
        process.server = server
        self.started.append(process)
        return process

    def stop(self, *processes, timeout=15.0):
        """
        Stop the given processes (default: all): clients and workers
        first, then brokers, so that a stopping worker still gets the ACKs
        of its last results (it waits for them up to its grace period).
        """
        chosen = list(processes) or list(reversed(self.started))
        for servers in (False, True):
            layer = [
                p for p in chosen if getattr(p, "server", False) == servers
            ]
            if layer:
                self.ctx.procs.stop(*layer, timeout=timeout)
        for process in chosen:
            if process in self.started:
                self.started.remove(process)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.stop()


def _client_errors():
    try:
        from taskbroker.client.errors import ClientError

        return ClientError
    except ImportError:
        return ()


def _guard(run):
    """
    Turn the client's errors (no answer, a refusal) into one-line
    :class:`BenchError` s.
    """

    def guarded(ctx):
        try:
            return run(ctx)
        except _client_errors() as e:
            raise BenchError(f"{type(e).__name__}: {e}") from None
        except sqlite3.Error as e:
            raise BenchError(f"database: {e}") from None

    guarded.__name__ = run.__name__
    guarded.__doc__ = run.__doc__
    return guarded


def _bulk(client, specs):
    submitted, _ = client.submit_many(specs)
    if len(submitted) != len(specs):
        raise BenchError(f"submitted {len(submitted)} of {len(specs)} tasks")
    return submitted


# -- 1. throughput -------------------------------------------------------


def _bulk_throughput(ctx, n, details, extra=(), curve=None):
    """
    N echo tasks submitted with the bulk API to a broker started with
    ``extra`` options, 2 workers x 1 slot.

    :param curve: a :class:`_CurveKeys`, for CURVE everywhere.
    """
    out = {}
    label = (
        "throughput-bulk"
        + "".join(extra).replace("-", "")
        + ("-curve" if curve else "")
    )
    with _Daemons(ctx, ctx.folder(label)) as daemons:
        broker = daemons.broker(extra=extra + (curve.broker if curve else ()))
        workers = daemons.workers(
            broker.endpoint, ["w1", "w2"], extra=curve.worker if curve else ()
        )
        with _client(
            broker.endpoint, **(curve.client if curve else {})
        ) as client:
            specs = [{"handler": "echo", "payload": i} for i in range(n)]
            cpu = [cpu_seconds(p.pid) for p in (broker, *workers)]
            began = time.time()
            submitted = _bulk(client, specs)
            details["bulk_submit_seconds"] = time.time() - began
            client.wait(submitted[-1]["id"], timeout=DRAIN_TIMEOUT)
        _, _, last = wait_done(broker.db, n, daemons.started, DRAIN_TIMEOUT)
        elapsed = time.time() - began
        used = [
            cpu_seconds(p.pid) - c for p, c in zip((broker, *workers), cpu)
        ]
        out["tb.throughput.bulk"] = n / (last - began)
        # Who is busy: a process near 100 % of a core is the bottleneck.
        out["tb.throughput.broker_cpu"] = 100.0 * used[0] / elapsed
        out["tb.throughput.worker_cpu"] = (
            100.0 * sum(used[1:]) / len(used[1:]) / elapsed
        )
    return out


@_guard
def run_throughput(ctx):
    """
    N echo tasks, 2 workers x 1 slot: submitted with the bulk API (with
    the default durability, then with --sqlite-synchronous full), then (on
    a fresh broker) inserted by one SQL transaction.
    """
    n = ctx.params.throughput
    out, details = {}, {}
    out.update(_bulk_throughput(ctx, n, details))
    full = _bulk_throughput(ctx, n, {}, ("--sqlite-synchronous", "full"))
    out["tb.throughput.bulk_full"] = full["tb.throughput.bulk"]
    with _Daemons(ctx, ctx.folder("throughput-sql")) as daemons:
        broker = daemons.broker()
        daemons.workers(broker.endpoint, ["w1", "w2"])
        # The documented way for other programs to enqueue work: priority
        # and max_attempts left NULL, for the broker's defaults.
        with closing(
            sqlite3.connect(broker.db, timeout=30, isolation_level=None)
        ) as db:
            began = time.time()
            db.execute("BEGIN IMMEDIATE")
            db.executemany(
                "INSERT INTO tasks (handler, payload, priority) "
                "VALUES ('echo', ?, NULL)",
                ((str(i),) for i in range(n)),
            )
            db.execute("COMMIT")
            committed = time.time()
        details["sql_insert_seconds"] = committed - began
        _, first, last = wait_done(
            broker.db, n, daemons.started, DRAIN_TIMEOUT
        )
        out["tb.throughput.sql"] = n / (last - began)
        out["tb.throughput.sql_pickup"] = _ms(first - committed)
    out["details"] = details
    return out


# -- 2. latency ----------------------------------------------------------


@_guard
def run_latency(ctx):
    """
    N tasks one at a time through the Python BlockingClient: submit, then
    wait for the result.  The tasks are ``stamp`` tasks (``echo`` that
    returns the time it ran), so that submit->start is when the handler
    started on the worker.
    """
    return _one_at_a_time(ctx, ctx.params.latency)


def _one_at_a_time(ctx, n, curve=None):
    """
    The latency workload, on a broker with CURVE everywhere if ``curve``
    (a :class:`_CurveKeys`) is given.
    """
    dispatch, finished, wall = [], [], []
    with _Daemons(
        ctx, ctx.folder("latency" + ("-curve" if curve else ""))
    ) as daemons:
        broker = daemons.broker(extra=curve.broker if curve else ())
        daemons.workers(
            broker.endpoint,
            ["w1", "w2"],
            extra=STAMP + (curve.worker if curve else ()),
        )
        with _client(
            broker.endpoint, timeout=30, **(curve.client if curve else {})
        ) as client:
            for i in range(ctx.params.warmup):
                task, _ = client.submit("stamp", i)
                client.wait(task["id"], timeout=30)
            for i in range(n):
                submitted = time.time()
                t0 = time.perf_counter()
                task, _ = client.submit("stamp", i)
                done = client.wait(task["id"], timeout=30)
                t1 = time.perf_counter()
                if done["state"] != "succeeded":
                    raise BenchError(
                        f"task {task['id']} is {done['state']} "
                        f"after 30 s: {done.get('error')}"
                    )
                created = _seconds(done["created_at"])
                dispatch.append(done["result"] - submitted)
                finished.append(_seconds(done["finished_at"]) - created)
                wall.append(t1 - t0)
    return {
        "tb.latency.dispatch_p50": _ms(percentile(dispatch, 50)),
        "tb.latency.dispatch_p99": _ms(percentile(dispatch, 99)),
        "tb.latency.result_p50": _ms(percentile(wall, 50)),
        "tb.latency.result_p99": _ms(percentile(wall, 99)),
        "tb.latency.finished_p50": _ms(percentile(finished, 50)),
        "tb.latency.finished_p99": _ms(percentile(finished, 99)),
    }


# -- 3. priority under load ---------------------------------------------


@_guard
def run_priority(ctx):
    """
    The two general workers busy with ``sleep`` tasks, N ``low`` tasks
    queued behind them, one worker reserved for ``high``: how long each of
    M ``high`` tasks, submitted one at a time, waits to start.
    """
    low, high = ctx.params.priority_low, ctx.params.priority_high
    waits, wall = [], []
    details = {}
    with _Daemons(ctx, ctx.folder("priority")) as daemons:
        broker = daemons.broker()
        general = daemons.workers(broker.endpoint, ["w1", "w2"])
        reserved = daemons.workers(
            broker.endpoint,
            ["reserved"],
            extra=("--priorities", "high", *STAMP),
        )
        with _client(broker.endpoint) as client:
            sleepers = [
                client.submit("sleep", {"seconds": 3600})[0]["id"]
                for _ in general
            ]
            deadline = time.monotonic() + 30
            while any(client.get(i)["state"] != "running" for i in sleepers):
                if time.monotonic() > deadline:
                    raise BenchError("the sleep tasks did not start in 30 s")
                time.sleep(0.05)
            _bulk(
                client,
                [
                    {"handler": "echo", "payload": i, "priority": "low"}
                    for i in range(low)
                ],
            )
            stats = client.stats()
            details["low_waiting"] = stats.get("waiting", {}).get("echo")
            for i in range(ctx.params.warmup):
                task, _ = client.submit("stamp", i, priority="high")
                client.wait(task["id"], timeout=30)
            for i in range(high):
                submitted = time.time()
                t0 = time.perf_counter()
                task, _ = client.submit("stamp", i, priority="high")
                done = client.wait(task["id"], timeout=30)
                wall.append(time.perf_counter() - t0)
                if done["state"] != "succeeded":
                    raise BenchError(
                        f"high task {task['id']} is {done['state']} after 30 s"
                    )
                if done["worker"] != "reserved":
                    raise BenchError(
                        f"high task {task['id']} ran on "
                        f"{done['worker']}, not the reserved "
                        "worker"
                    )
                # Until the handler ran on the worker, by the client's
                # clock: the SUBMIT's trip to the broker included.
                waits.append(done["result"] - submitted)
            still = client.stats().get("waiting", {}).get("echo")
            details["low_waiting_after"] = still
            # Free the general workers so they stop at once (a worker
            # waits up to its grace period for running tasks).
            for i in sleepers:
                client.cancel(i)
        daemons.stop(*general, *reserved)
    return {
        "tb.priority.wait_p50": _ms(percentile(waits, 50)),
        "tb.priority.wait_p99": _ms(percentile(waits, 99)),
        "tb.priority.result_p50": _ms(percentile(wall, 50)),
        "tb.priority.depth": float(details["low_waiting"] or 0),
        "details": details,
    }


# -- 4. many workers -----------------------------------------------------


def _many_rate(ctx, daemons, connections, n, idle_seconds):
    broker = daemons.broker()
    load = daemons.process(
        f"load-{connections}",
        [
            PYTHON,
            LOAD_WORKERS,
            "--broker",
            broker.endpoint,
            "--connections",
            str(connections),
            "--name",
            f"load{connections}",
        ],
    )
    load.wait_for(
        rf"ready {connections}\b",
        120,
        f"{connections} connections welcomed",
        watched=[broker],
    )
    out = {}
    with _client(broker.endpoint) as client:
        stats = client.stats()
        if stats["workers"] != connections:
            raise BenchError(
                f"the broker counts {stats['workers']} workers, "
                f"not {connections}"
            )
        if idle_seconds:
            # Let the burst of connections settle (log lines, first
            # heartbeats) before measuring.
            time.sleep(2.0)
            b0, l0, t0 = (
                cpu_seconds(broker.pid),
                cpu_seconds(load.pid),
                time.monotonic(),
            )
            time.sleep(idle_seconds)
            b1, l1, t1 = (
                cpu_seconds(broker.pid),
                cpu_seconds(load.pid),
                time.monotonic(),
            )
            out["idle_cpu"] = 100.0 * (b1 - b0) / (t1 - t0)
            out["load_idle_cpu"] = 100.0 * (l1 - l0) / (t1 - t0)
        specs = [{"handler": "echo", "payload": i} for i in range(n)]
        l0 = cpu_seconds(load.pid)
        began = time.time()
        submitted = _bulk(client, specs)
        client.wait(submitted[-1]["id"], timeout=DRAIN_TIMEOUT)
        _, _, last = wait_done(broker.db, n, daemons.started, DRAIN_TIMEOUT)
        out["rate"] = n / (last - began)
        out["load_busy_cpu"] = (
            100.0 * (cpu_seconds(load.pid) - l0) / (time.time() - began)
        )
        stats = client.stats()
    out["counters"] = stats.get("counters", {})
    out["workers_after"] = stats.get("workers")
    # Let the last ACKs arrive, so that the load's counters add up.
    time.sleep(0.5)
    daemons.stop(load)
    match = load.wait_for(r"(?m)^result (\{.*\})$", 5, "the load's counters")
    out["load_counters"] = _json(match.group(1), "the load process")
    daemons.stop()
    return out


@_guard
def run_many_workers(ctx):
    """
    One light load process with 1,000 worker connections (1 slot each,
    the real protocol, default heartbeat): broker CPU while idle, and the
    throughput of echo tasks compared with 10 connections.
    """
    p = ctx.params
    with _Daemons(ctx, ctx.folder("many-workers")) as daemons:
        many = _many_rate(
            ctx, daemons, p.many_connections, p.many_tasks, p.idle_seconds
        )
    with _Daemons(ctx, ctx.folder("few-workers")) as daemons:
        few = _many_rate(ctx, daemons, 10, p.many_tasks, 0)
    for label, result in (("many", many), ("few", few)):
        counters = result["counters"]
        if counters.get("lost_workers") or result["workers_after"] != (
            p.many_connections if label == "many" else 10
        ):
            raise BenchError(
                f"the broker lost workers during the {label}-connection run "
                f"(lost_workers={counters.get('lost_workers')}, workers "
                f"left {result['workers_after']})"
            )
    return {
        "tb.many.idle_cpu": many["idle_cpu"],
        "tb.many.load_idle_cpu": many["load_idle_cpu"],
        "tb.many.rate_many": many["rate"],
        "tb.many.rate_few": few["rate"],
        "tb.many.load_busy_cpu": many["load_busy_cpu"],
        "details": {"many": many, "few": few},
    }


# -- 5. deep queue -------------------------------------------------------


def deep_template(ctx):
    """
    A database with ``deep`` queued echo tasks inserted by SQL, made once
    per suite (the broker creates the schema; the rows go in in one
    transaction with executemany) and copied for each run.
    """
    if getattr(ctx, "_deep_template", None):
        return ctx._deep_template
    rows = ctx.params.deep
    folder = ctx.folder("deep-template")
    with _Daemons(ctx, folder) as daemons:
        daemons.broker(db=os.path.join(folder, "template.sqlite"))
    path = os.path.join(folder, "template.sqlite")
    with closing(
        sqlite3.connect(path, timeout=30, isolation_level=None)
    ) as db:
        began = time.time()
        db.execute("BEGIN IMMEDIATE")
        # Every column the broker would otherwise fill is given, so that
        # the measure is about the depth of the queue: rows with a NULL
        # priority or max_attempts make the broker UPDATE each one as it
        # adopts it, which takes about three times as long to load.
        db.executemany(
            "INSERT INTO tasks (handler, payload, priority, max_attempts) "
            "VALUES ('echo', ?, 'normal', 3)",
            ((str(i),) for i in range(rows)),
        )
        db.execute("COMMIT")
        ctx.notes.append(
            f"deep queue: {rows:,} rows inserted in one transaction in "
            f"{time.time() - began:.1f} s (once; each run copies the file)"
        )
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    ctx._deep_template = path
    return path


def _nth_finished(db, n):
    row = db.execute(
        "SELECT finished_at FROM tasks WHERE state = 'succeeded' "
        "ORDER BY finished_at LIMIT 1 OFFSET ?",
        (n - 1,),
    ).fetchone()
    return row[0]


def _first_started(db):
    return db.execute(
        "SELECT MIN(started_at) FROM tasks "
        "WHERE state IN ('running', 'succeeded')"
    ).fetchone()[0]


@_guard
def run_deep_queue(ctx):
    """
    A million tasks queued (inserted by SQL before the broker starts), 2
    workers x 1 slot: time from the broker's start to listening and to the
    first dispatch, its RSS, and the drain rate of the first N tasks
    compared with N submitted to an empty broker.
    """
    p = ctx.params
    drain = p.deep_drain
    template = deep_template(ctx)
    out, details = {}, {}
    folder = ctx.folder("deep-queue")
    db_path = os.path.join(folder, "taskbroker.sqlite")
    shutil.copyfile(template, db_path)
    with _Daemons(ctx, folder) as daemons:
        # Workers start when the broker listens, so the port is chosen
        # here (--listen tcp://127.0.0.1:* would name it only then).
        listen = f"tcp://127.0.0.1:{free_port()}"
        began = time.time()
        broker = daemons.broker(
            db=db_path, listen=listen, timeout=DRAIN_TIMEOUT
        )
        out["tb.deep.listen"] = time.time() - began
        details["rss_at_listen_mb"] = memory_kib(broker.pid, "VmRSS") / 1024
        workers_began = time.time()
        daemons.workers(broker.endpoint, ["w1", "w2"], wait=False)
        with closing(read_only(db_path)) as db:
            deadline = time.monotonic() + DRAIN_TIMEOUT
            first = None
            while True:
                if first is None:
                    first = _first_started(db)
                if first is not None:
                    done = db.execute(
                        "SELECT COUNT(*) FROM tasks WHERE state = 'succeeded'"
                    ).fetchone()[0]
                    if done >= drain:
                        break
                for process in daemons.started:
                    process.check()
                if time.monotonic() > deadline:
                    raise BenchError(
                        f"the first {drain} tasks did not finish "
                        f"within {DRAIN_TIMEOUT:g} s"
                    )
                time.sleep(0.05)
            nth = _nth_finished(db, drain)
            bad = db.execute(
                "SELECT COUNT(*) FROM tasks WHERE state IN "
                "('failed', 'cancelled')"
            ).fetchone()[0]
            if bad:
                raise BenchError(f"{bad} deep-queue task(s) failed")
        out["tb.deep.first_dispatch"] = first - began
        out["tb.deep.worker_start"] = first - workers_began
        out["tb.deep.rss"] = memory_kib(broker.pid, "VmRSS") / 1024
        out["tb.deep.hwm"] = memory_kib(broker.pid, "VmHWM") / 1024
        out["tb.deep.drain"] = drain / (nth - first)
        stop_began = time.time()
        daemons.stop()
        details["stop_seconds"] = time.time() - stop_began

    with _Daemons(ctx, ctx.folder("deep-empty")) as daemons:
        broker = daemons.broker()
        daemons.workers(broker.endpoint, ["w1", "w2"])
        with _client(broker.endpoint) as client:
            submitted = _bulk(
                client,
                [{"handler": "echo", "payload": i} for i in range(drain)],
            )
            client.wait(submitted[-1]["id"], timeout=DRAIN_TIMEOUT)
        wait_done(broker.db, drain, daemons.started, DRAIN_TIMEOUT)
        with closing(read_only(broker.db)) as db:
            first = _first_started(db)
            nth = _nth_finished(db, drain)
        out["tb.deep.drain_empty"] = drain / (nth - first)
        out["tb.deep.rss_empty"] = memory_kib(broker.pid, "VmRSS") / 1024
    out["details"] = details
    return out


# -- 12. the status site -------------------------------------------------

#: Requests of each kind a run makes to the status site.
SITE_REQUESTS = 50


def _site_request(url, token):
    request = urllib.request.Request(
        url, headers={"Authorization": f"Bearer {token}"}
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return response.read()


@_guard
def run_status_site(ctx):
    """
    The status site with the deep queue's tasks in the store (none of
    them runnable, so the workers stay idle) and the many-workers
    measure's worker connections: the size of a dashboard refresh
    (/api/overview) and of a /metrics scrape, the wall time of each, and
    the broker's CPU for each beyond its idle work (its heartbeats).
    """
    p = ctx.params
    folder = ctx.folder("status-site")
    db_path = os.path.join(folder, "taskbroker.sqlite")
    shutil.copyfile(deep_template(ctx), db_path)
    with closing(sqlite3.connect(db_path, isolation_level=None)) as db:
        db.execute("UPDATE tasks SET handler = 'nobody'")
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    out = {}
    with _Daemons(ctx, folder) as daemons:
        # A free port for the site: a broker of the user's may hold 8642.
        broker = daemons.broker(
            db=db_path,
            timeout=DRAIN_TIMEOUT,
            extra=("--http", "tcp:0:interface=127.0.0.1"),
        )
        # Logged before the line that daemons.broker() waited for.
        site = re.search(
            r"status site at (\S+)\?token=(\S+)", broker.output(200)
        )
        if site is None:
            raise BenchError("the broker logged no status site URL")
        base, token = site.group(1), site.group(2)
        connections = p.many_connections
        load = daemons.process(
            f"load-{connections}",
            [
                PYTHON,
                LOAD_WORKERS,
                "--broker",
                broker.endpoint,
                "--connections",
                str(connections),
                "--name",
                "site",
            ],
        )
        load.wait_for(
            rf"ready {connections}\b",
            120,
            f"{connections} connections welcomed",
            watched=[broker],
        )
        # The first answer waits for the first count of the table.
        _site_request(base + "api/overview", token)
        time.sleep(2.0)
        c0, t0 = cpu_seconds(broker.pid), time.monotonic()
        time.sleep(3.0)
        idle = (cpu_seconds(broker.pid) - c0) / (time.monotonic() - t0)
        out["site.idle_cpu"] = 100.0 * idle
        for name, path in (
            ("overview", "api/overview"),
            ("metrics", "metrics"),
        ):
            sizes, walls = [], []
            c0, t0 = cpu_seconds(broker.pid), time.monotonic()
            for _ in range(SITE_REQUESTS):
                began = time.perf_counter()
                sizes.append(len(_site_request(base + path, token)))
                walls.append(time.perf_counter() - began)
            spent = cpu_seconds(broker.pid) - c0
            elapsed = time.monotonic() - t0
            out[f"site.{name}_kib"] = round(max(sizes) / 1024, 1)
            out[f"site.{name}_ms"] = 1000 * statistics.median(walls)
            out[f"site.{name}_cpu_ms"] = max(
                0.0, 1000 * (spent - idle * elapsed) / SITE_REQUESTS
            )
        stats = json.loads(_site_request(base + "api/stats", token))["stats"]
        if stats["workers"] != connections:
            raise BenchError(
                f"the broker counts {stats['workers']} workers, "
                f"not {connections}"
            )
        out["site.tasks"] = sum(
            n
            for by_level in stats["tasks"].values()
            for n in by_level.values()
        )
        daemons.stop()
    return out


# -- 6. worker alone -----------------------------------------------------


@_guard
def run_worker_alone(ctx):
    """
    One ``twistd taskworker --concurrency 1`` fed by the stub broker, which
    answers every credit at once: no-op tasks/s after a warm-up of a tenth
    of them, and the worker's own CPU time per task meanwhile.
    """
    n = ctx.params.alone
    with _Daemons(ctx, ctx.folder("worker-alone")) as daemons:
        stub = daemons.process(
            "stub-broker",
            [PYTHON, STUB_BROKER, "--tasks", str(n)],
            server=True,
        )
        endpoint = stub.wait_for(
            r"listening on (\S+)", START_TIMEOUT, "the stub listening"
        ).group(1)
        (worker,) = daemons.workers(
            endpoint, ["alone"], extra=("--concurrency", "1"), wait=False
        )
        stub.wait_for(
            r"warmed up",
            START_TIMEOUT,
            "the first tasks done",
            watched=[worker],
        )
        cpu = cpu_seconds(worker.pid), cpu_seconds(stub.pid)
        match = stub.wait_for(
            r"(?m)^result (\{.*\})$",
            60 + n / 500,
            f"{n} results",
            watched=[worker],
        )
        used = cpu_seconds(worker.pid) - cpu[0], cpu_seconds(stub.pid) - cpu[1]
    result = _json(match.group(1), "the stub broker")
    if result["failed"]:
        raise BenchError(f"{result['failed']} tasks failed on the worker")
    measured = result["tasks"] - result["warmup"]
    return {
        "tb.alone.rate": result["rate"],
        "tb.alone.worker_us": 1e6 * used[0] / measured,
        "tb.alone.stub_us": 1e6 * used[1] / measured,
        "details": result,
    }


# -- 7. the floor and the others -----------------------------------------


def _latency_keys(prefix, result):
    start = result["submit_to_start"]
    wall = result["submit_to_result"]
    return {
        f"{prefix}.latency.start_p50": _ms(percentile(start, 50)),
        f"{prefix}.latency.start_p99": _ms(percentile(start, 99)),
        f"{prefix}.latency.result_p50": _ms(percentile(wall, 50)),
        f"{prefix}.latency.result_p99": _ms(percentile(wall, 99)),
    }


@_guard
def run_floor(ctx):
    """
    The floor: the ZeroMQ guide's load-balancing broker in Python, no
    storage, 2 worker processes, one client process: N tasks at once,
    then M one at a time.
    """
    result = _floor(ctx, ctx.params.floor)
    out = {"floor.throughput": result["throughput"]}
    out.update(_latency_keys("floor", result))
    return out


def _floor(ctx, tasks, name="floor"):
    """
    :returns: the floor client's result: N tasks at once (none if
        ``tasks`` is 0), then the latency workload.
    """
    p = ctx.params
    with _Daemons(ctx, ctx.folder(name)) as daemons:
        broker = daemons.process(
            "floor-broker",
            [PYTHON, os.path.join(FLOOR, "broker.py")],
            server=True,
        )
        match = broker.wait_for(
            r"frontend (\S+) backend (\S+)",
            START_TIMEOUT,
            "the floor broker's endpoints",
        )
        frontend, backend = match.groups()
        workers = [
            daemons.process(
                f"floor-worker{i}",
                [
                    PYTHON,
                    os.path.join(FLOOR, "worker.py"),
                    "--backend",
                    backend,
                ],
            )
            for i in (1, 2)
        ]
        broker.wait_for(r"workers 2\b", START_TIMEOUT, "2 floor workers")
        client = daemons.process(
            "floor-client",
            [
                PYTHON,
                os.path.join(FLOOR, "client.py"),
                "--frontend",
                frontend,
                "--tasks",
                str(tasks),
                "--latency",
                str(p.latency),
                "--warmup",
                str(p.warmup),
            ],
        )
        match = client.wait_for(
            r"(?m)^result (\{.*\})$",
            DRAIN_TIMEOUT,
            "the floor client's result",
            watched=[broker, *workers],
        )
    return _json(match.group(1), "the floor client")


def _compare(ctx, system, workers, driver, tasks):
    """
    Run one comparison system: start its workers, run its driver, stop.
    """
    setup = ctx.compare_setup()
    if setup is not None:
        raise Skip(setup)
    tag = f"tbbench-{system}-{os.getpid()}-{int(time.time() * 1000)}"
    env = dict(
        ctx.compare_env(),
        BENCH_QUEUE=tag,
        BENCH_REDIS=ctx.params.redis,
        PYTHONPATH=COMPARE,
    )
    with _Daemons(ctx, ctx.folder(system)) as daemons:
        started = [
            daemons.process(f"{system}-worker{i + 1}", argv, env=env)
            for i, argv in enumerate(workers(tag))
        ]
        client = daemons.process(
            f"{system}-driver",
            [
                ctx.compare_python,
                os.path.join(COMPARE, driver),
                "--tasks",
                str(tasks),
                "--latency",
                str(ctx.params.latency),
                "--warmup",
                str(ctx.params.warmup),
            ],
            env=env,
        )
        match = client.wait_for(
            r"(?m)^(result|error:) (.*)$",
            DRAIN_TIMEOUT,
            f"the {system} driver's result",
            watched=started,
        )
        if match.group(1) == "error:":
            raise BenchError(f"{system}: {match.group(2)}")
        client.wait_exit(60)
    result = _json(match.group(2), f"the {system} driver")
    out = _latency_keys(system, result)
    if tasks:
        out[f"{system}.throughput"] = result["throughput"]
    out["details"] = {"submit_seconds": result.get("submit_seconds")}
    return out


@_guard
def run_celery(ctx):
    """
    Celery with Redis: prefetch multiplier 1, acks late, one worker with
    2 prefork processes, a no-op task.
    """
    return _celery(ctx, ctx.params.compare)


def _celery(ctx, tasks):
    celery = os.path.join(os.path.dirname(ctx.compare_python), "celery")
    return _compare(
        ctx,
        "celery",
        lambda tag: [
            [
                celery,
                "-A",
                "celery_tasks",
                "worker",
                "--loglevel",
                "WARNING",
                "--pool",
                "prefork",
                "--concurrency",
                "2",
                "--hostname",
                f"{tag}@%h",
                "--queues",
                tag,
            ]
        ],
        "celery_driver.py",
        tasks,
    )


# -- 14. latency beside a CPU hog ------------------------------------------

#: A process that keeps one core busy, as other work on a shared machine.
HOG = (PYTHON, "-c", "while True: pass")


@_guard
def run_latency_hog(ctx):
    """
    The latency workload of the floor, taskbroker and (where Redis and
    the comparison virtualenv are there) Celery, each with one process
    spinning on a core beside it: on two cores, the four processes of a
    task's path then share one.
    """
    out = {}
    with _Daemons(ctx, ctx.folder("hog")) as daemons:
        daemons.process("cpu-hog", list(HOG))
        floor = _floor(ctx, 0, name="floor-hog")
        out.update(
            (f"hog.{key}", value)
            for key, value in _latency_keys("floor", floor).items()
            if ".result_" in key
        )
        out.update(
            (f"hog.{key}", value)
            for key, value in _one_at_a_time(ctx, ctx.params.latency).items()
            if ".result_" in key
        )
        try:
            celery = _celery(ctx, 0)
        except Skip as e:
            out["details"] = {"celery": f"not run: {e}"}
        else:
            out.update(
                (f"hog.{key}", value)
                for key, value in celery.items()
                if ".result_" in key
            )
    return out


@_guard
def run_rq(ctx):
    """
    RQ with Redis: 2 workers (SimpleWorker: the job runs in the worker
    process, as taskbroker's echo does), a no-op job.
    """
    rq = os.path.join(os.path.dirname(ctx.compare_python), "rq")
    return _compare(
        ctx,
        "rq",
        lambda tag: [
            [
                rq,
                "worker",
                "--worker-class",
                "rq.worker.SimpleWorker",
                "--url",
                ctx.params.redis,
                "--path",
                COMPARE,
                "--logging_level",
                "WARNING",
                "--name",
                f"{tag}-w{i}",
                tag,
            ]
            for i in (1, 2)
        ],
        "rq_driver.py",
        ctx.params.compare,
    )


# -- 11. CURVE -------------------------------------------------------------


class _CurveKeys:
    """
    Key pairs for a broker, its workers (one pair for both) and a client,
    made in ``folder``, and the options that give them to each.
    """

    def __init__(self, folder):
        from taskbroker import curve

        for name in ("broker", "worker", "client"):
            curve.keygen(folder, name)
        for role, name in (("workers", "worker"), ("clients", "client")):
            os.mkdir(os.path.join(folder, role))
            shutil.copy(
                os.path.join(folder, name + ".key"), os.path.join(folder, role)
            )
        server = os.path.join(folder, "broker.key")
        self.broker = (
            "--curve-secret-key",
            os.path.join(folder, "broker.key_secret"),
            "--authorized-workers",
            os.path.join(folder, "workers"),
            "--authorized-clients",
            os.path.join(folder, "clients"),
        )
        self.worker = (
            "--curve-server-key",
            server,
            "--curve-secret-key",
            os.path.join(folder, "worker.key_secret"),
        )
        self.client = {
            "curve_server_key": server,
            "curve_secret_key": os.path.join(folder, "client.key_secret"),
        }


@_guard
def run_curve(ctx):
    """
    The throughput and latency workloads with CURVE on every link (the
    broker's keys, the workers' and the client's), and off, in the same
    run.
    """
    keys = _CurveKeys(ctx.folder("curve-keys"))
    out = {}
    for label, curve in (("on", keys), ("off", None)):
        bulk = _bulk_throughput(ctx, ctx.params.throughput, {}, curve=curve)
        out[f"curve.{label}.throughput"] = bulk["tb.throughput.bulk"]
        out[f"curve.{label}.broker_cpu"] = bulk["tb.throughput.broker_cpu"]
        latency = _one_at_a_time(ctx, ctx.params.latency, curve)
        for q in (50, 99):
            out[f"curve.{label}.result_p{q}"] = latency[
                f"tb.latency.result_p{q}"
            ]
    return out
