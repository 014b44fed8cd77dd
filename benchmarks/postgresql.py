"""
The PostgreSQL measures: taskbroker's brokers on one shared database, and
procrastinate and pgqueuer on the same server in the same run.

Every run gets a schema of its own (``CREATE SCHEMA``, named after the
measure, the suite's pid and the time), which the brokers reach through
the ``search_path`` of their URL
(``...?options=-csearch_path%3D<schema>``) and which is dropped with
``DROP SCHEMA ... CASCADE`` once every process of the run has stopped.
The brokers get only ``--listen`` and ``--database``; times on tasks are
the brokers' own, read from the ``tasks`` table after the run.
"""

import os
import threading
import time
from contextlib import closing, contextmanager
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

from benchmarks._util import (
    STALL,
    BenchError,
    Skip,
    cpu_seconds,
    percentile,
)
from benchmarks.measures import (
    COMPARE,
    DRAIN_TIMEOUT,
    STAMP,
    _bulk,
    _bulk_throughput,
    _client,
    _Daemons,
    _guard,
    _json,
    _ms,
)


def _psycopg():
    try:
        import psycopg
    except ImportError:
        raise Skip(
            "psycopg is not installed in the suite's virtualenv "
            "(pip install 'taskbroker[postgresql]')"
        ) from None
    return psycopg


def server_problem(url):
    """
    :returns: ``None`` when the PostgreSQL server at ``url`` answers, else
        why not (and the measure is skipped).
    """
    psycopg = _psycopg()
    try:
        with closing(
            psycopg.connect(url, connect_timeout=5, autocommit=True)
        ) as db:
            db.execute("SELECT 1")
    except psycopg.Error as e:
        first = str(e).strip().splitlines()
        return (
            f"PostgreSQL does not answer at {_address(url)} "
            f"({first[0] if first else type(e).__name__})"
        )
    return None


def server_version(url):
    psycopg = _psycopg()
    try:
        with closing(
            psycopg.connect(url, connect_timeout=5, autocommit=True)
        ) as db:
            return db.execute("SHOW server_version").fetchone()[0]
    except psycopg.Error:
        return "unknown"


def _address(url):
    parts = urlsplit(url)
    return f"{parts.hostname or 'localhost'}:{parts.port or 5432}" + (
        parts.path or ""
    )


def with_search_path(url, schema):
    """
    ``url`` with ``options=-csearch_path=<schema>`` added to its query.
    """
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query) if k != "options"]
    query.append(("options", f"-csearch_path={schema}"))
    return urlunsplit(parts._replace(query=urlencode(query, quote_via=quote)))


class Schema:
    """
    A fresh schema for one run: ``url`` reaches it (through the
    ``search_path``), ``connect()`` opens an autocommit connection to it.
    """

    def __init__(self, ctx, label):
        self.ctx = ctx
        self.base = ctx.params.postgres
        self.name = (
            f"tbbench_{label.replace('-', '_')}_{os.getpid()}_"
            f"{int(time.time() * 1000)}"
        )
        self.url = with_search_path(self.base, self.name)

    def connect(self):
        psycopg = _psycopg()
        try:
            return psycopg.connect(
                self.url, autocommit=True, connect_timeout=10
            )
        except psycopg.Error as e:
            raise BenchError(f"PostgreSQL: {e}") from None

    def create(self):
        with closing(_psycopg().connect(self.base, autocommit=True)) as db:
            db.execute(f'CREATE SCHEMA "{self.name}"')

    def drop(self):
        psycopg = _psycopg()
        try:
            with closing(
                psycopg.connect(self.base, autocommit=True, connect_timeout=10)
            ) as db:
                db.execute(f'DROP SCHEMA IF EXISTS "{self.name}" CASCADE')
        except psycopg.Error as e:
            self.ctx.notes.append(
                f"could not drop the schema {self.name}: {str(e).strip()}"
            )


@contextmanager
def fresh_schema(ctx, label):
    """
    Create a schema for one run, and drop it however the run ends.  The
    run's processes must be stopped inside the block (a ``_Daemons``
    block within this one), so that nothing holds the schema's tables.
    """
    problem = server_problem(ctx.params.postgres)
    if problem:
        raise Skip(problem)
    schema = Schema(ctx, label)
    try:
        schema.create()
    except _psycopg().Error as e:
        raise BenchError(f"cannot create a schema: {e}") from None
    try:
        yield schema
    finally:
        # A failed measure may leave its processes running until the suite
        # stops them; stop them first, or DROP SCHEMA waits for their locks.
        ctx.procs.stop_all()
        schema.drop()


def wait_done_pg(schema, expected, watched, timeout, poll=0.05):
    """
    :func:`benchmarks._util.wait_done` on a PostgreSQL ``tasks`` table.

    :returns: ``(min created_at, min started_at, max finished_at)`` of the
        succeeded tasks.
    """
    progressed = time.monotonic()
    deadline = progressed + timeout
    last_done = -1
    with closing(schema.connect()) as db:
        while True:
            done, bad = db.execute(
                "SELECT count(*) FILTER (WHERE state = 'succeeded'), "
                "count(*) FILTER (WHERE state IN ('failed', 'cancelled')) "
                "FROM tasks"
            ).fetchone()
            if bad:
                error = db.execute(
                    "SELECT error FROM tasks WHERE state IN "
                    "('failed', 'cancelled') LIMIT 1"
                ).fetchone()[0]
                raise BenchError(
                    f"{bad} task(s) failed or were cancelled, e.g.: {error}"
                )
            if done >= expected:
                return db.execute(
                    "SELECT min(created_at), min(started_at), "
                    "max(finished_at) FROM tasks WHERE state = 'succeeded'"
                ).fetchone()
            for process in watched:
                process.check()
            now = time.monotonic()
            if done != last_done:
                last_done, progressed = done, now
            elif now - progressed > STALL:
                raise BenchError(
                    f"stalled: {done} of {expected} tasks succeeded, none in "
                    f"the last {STALL:g} s"
                )
            if now > deadline:
                raise BenchError(
                    f"only {done} of {expected} tasks succeeded within "
                    f"{timeout:g} s"
                )
            time.sleep(poll)


def _brokers(daemons, schema, count):
    """
    Start ``count`` brokers on one schema, one after the other (the first
    creates the tables).
    """
    return [
        daemons.broker(database=schema.url, name=f"broker{i + 1}")
        for i in range(count)
    ]


def _failover(brokers, first):
    """
    A failover list of every broker's endpoint, starting at ``first``.
    """
    ring = brokers[first:] + brokers[:first]
    return ",".join(b.endpoint for b in ring)


def _spread_workers(daemons, brokers, names, extra=()):
    """
    Workers with failover lists over all the brokers, the i-th starting
    at broker i (modulo their number).
    """
    workers = []
    for i, name in enumerate(names):
        workers += daemons.workers(
            _failover(brokers, i % len(brokers)), [name], extra=extra
        )
    return workers


def _submit_spread(brokers, specs):
    """
    Submit ``specs`` spread over the brokers: the k-th of N brokers gets
    every N-th slice of 1,000, each broker through its own client in its
    own thread, all at once.

    :returns: the ids of the last task each client submitted.
    """
    chunks = [specs[k : k + 1000] for k in range(0, len(specs), 1000)]
    lasts, errors = [None] * len(brokers), []

    def submit(index):
        try:
            with _client(brokers[index].endpoint) as client:
                for chunk in chunks[index :: len(brokers)]:
                    lasts[index] = _bulk(client, chunk)[-1]["id"]
        except BaseException as e:
            errors.append(e)

    threads = [
        threading.Thread(target=submit, args=(i,)) for i in range(len(brokers))
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return [i for i in lasts if i is not None]


# -- pg-throughput -------------------------------------------------------


def _pg_throughput(ctx, n, count):
    with fresh_schema(ctx, f"throughput{count}") as schema:
        with _Daemons(ctx, ctx.folder(f"pg-throughput-{count}")) as daemons:
            brokers = _brokers(daemons, schema, count)
            workers = _spread_workers(daemons, brokers, ["w1", "w2"])
            specs = [{"handler": "echo", "payload": i} for i in range(n)]
            watched = (*brokers, *workers)
            cpu = [cpu_seconds(p.pid) for p in watched]
            began = time.time()
            lasts = _submit_spread(brokers, specs)
            submitted = time.time() - began
            with _client(brokers[0].endpoint) as client:
                for task_id in lasts:
                    client.wait(task_id, timeout=DRAIN_TIMEOUT)
            _, _, last = wait_done_pg(
                schema, n, daemons.started, DRAIN_TIMEOUT
            )
            elapsed = time.time() - began
            used = [cpu_seconds(p.pid) - c for p, c in zip(watched, cpu)]
            with closing(schema.connect()) as db:
                per_broker = [
                    row[0]
                    for row in db.execute(
                        "SELECT count(*) FROM tasks GROUP BY worker ORDER BY 1"
                    )
                ]
    return {
        "rate": n / (last - began),
        "broker_cpu": 100.0 * sum(used[:count]) / elapsed,
        "worker_cpu": 100.0
        * sum(used[count:])
        / (len(used) - count)
        / elapsed,
        "submit_seconds": submitted,
        "tasks_per_worker": per_broker,
    }


@_guard
def run_pg_throughput(ctx):
    """
    N echo tasks, 2 workers x 1 slot, on 1, 2 and 3 brokers sharing one
    PostgreSQL database (a fresh schema each): tasks/s from the first
    submit to the last ``finished_at``.  Also SQLite on the same workload,
    unless the ``throughput`` measure runs it in this suite.
    """
    n = ctx.params.pg_throughput
    out, details = {}, {}
    for count in (1, 2, 3):
        result = _pg_throughput(ctx, n, count)
        out[f"pg.throughput.b{count}"] = result["rate"]
        out[f"pg.throughput.b{count}_broker_cpu"] = result["broker_cpu"]
        out[f"pg.throughput.b{count}_worker_cpu"] = result["worker_cpu"]
        details[f"b{count}"] = {
            k: result[k] for k in ("submit_seconds", "tasks_per_worker")
        }
    if not (
        "throughput" in ctx.chosen
        and ctx.params.throughput == ctx.params.pg_throughput
    ):
        sqlite = _bulk_throughput(ctx, n, details)
        out["pg.throughput.sqlite"] = sqlite["tb.throughput.bulk"]
    out["details"] = details
    return out


# -- pg-latency ----------------------------------------------------------


def one_at_a_time(client, n, warmup, priority=None, worker=None):
    """
    ``stamp`` tasks one at a time: submit, then wait for the result.

    :param worker: the worker every task must run on, if any.
    :returns: ``(submit->start, submit->result)`` lists of seconds, the
        start by the handler's clock, the result by the client's.
    """

    def one(i):
        submitted = time.time()
        t0 = time.perf_counter()
        task, _ = client.submit("stamp", i, priority=priority)
        done = client.wait(task["id"], timeout=30)
        t1 = time.perf_counter()
        if done["state"] != "succeeded":
            raise BenchError(
                f"task {task['id']} is {done['state']} after "
                f"30 s: {done.get('error')}"
            )
        if worker is not None and done["worker"] != worker:
            raise BenchError(
                f"task {task['id']} ran on {done['worker']}, not on {worker}"
            )
        return done["result"] - submitted, t1 - t0

    for i in range(warmup):
        one(i)
    start, result = [], []
    for i in range(n):
        s, r = one(i)
        start.append(s)
        result.append(r)
    return start, result


def _pg_latency(ctx, count):
    with fresh_schema(ctx, f"latency{count}") as schema:
        with _Daemons(ctx, ctx.folder(f"pg-latency-{count}")) as daemons:
            brokers = _brokers(daemons, schema, count)
            _spread_workers(daemons, brokers, ["w1", "w2"], extra=STAMP)
            with _client(brokers[0].endpoint, timeout=30) as client:
                return one_at_a_time(
                    client, ctx.params.latency, ctx.params.warmup
                )


@_guard
def run_pg_latency(ctx):
    """
    N ``stamp`` tasks one at a time through ``BlockingClient`` on
    PostgreSQL, with 1 broker and with 2 (a worker on each, the client on
    the first); and on SQLite, unless the ``latency`` measure runs in this
    suite.
    """
    out = {}
    for count in (1, 2):
        start, result = _pg_latency(ctx, count)
        out.update(
            {
                f"pg.latency.b{count}.start_p50": _ms(percentile(start, 50)),
                f"pg.latency.b{count}.start_p99": _ms(percentile(start, 99)),
                f"pg.latency.b{count}.result_p50": _ms(percentile(result, 50)),
                f"pg.latency.b{count}.result_p99": _ms(percentile(result, 99)),
            }
        )
    if "latency" not in ctx.chosen:
        with _Daemons(ctx, ctx.folder("pg-latency-sqlite")) as daemons:
            broker = daemons.broker()
            daemons.workers(broker.endpoint, ["w1", "w2"], extra=STAMP)
            with _client(broker.endpoint, timeout=30) as client:
                _, result = one_at_a_time(
                    client, ctx.params.latency, ctx.params.warmup
                )
        out["pg.latency.sqlite_result_p50"] = _ms(percentile(result, 50))
    return out


# -- pg-priority ---------------------------------------------------------


@_guard
def run_pg_priority(ctx):
    """
    One broker on PostgreSQL, its two general workers busy with ``sleep``
    tasks, N ``low`` tasks inserted by one ``INSERT ... SELECT
    generate_series``, one worker reserved for ``high``: how long each of
    M ``high`` tasks, one at a time, waits to start.
    """
    low, high = ctx.params.pg_priority_low, ctx.params.pg_priority_high
    details = {}
    with fresh_schema(ctx, "priority") as schema:
        with _Daemons(ctx, ctx.folder("pg-priority")) as daemons:
            (broker,) = _brokers(daemons, schema, 1)
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
                while any(
                    client.get(i)["state"] != "running" for i in sleepers
                ):
                    if time.monotonic() > deadline:
                        raise BenchError(
                            "the sleep tasks did not start in 30 s"
                        )
                    time.sleep(0.05)
                with closing(schema.connect()) as db:
                    began = time.time()
                    db.execute(
                        "INSERT INTO tasks (handler, payload, priority) "
                        "SELECT 'echo', to_json(i), 'low' "
                        "FROM generate_series(1, %s) AS i",
                        (low,),
                    )
                    details["insert_seconds"] = time.time() - began
                    depth = db.execute(
                        "SELECT count(*) FROM tasks WHERE state = 'queued' "
                        "AND priority = 'low'"
                    ).fetchone()[0]
                    waits, wall = one_at_a_time(
                        client,
                        high,
                        ctx.params.warmup,
                        priority="high",
                        worker="reserved",
                    )
                    details["low_queued_after"] = db.execute(
                        "SELECT count(*) FROM tasks WHERE state = 'queued' "
                        "AND priority = 'low'"
                    ).fetchone()[0]
                for i in sleepers:
                    client.cancel(i)
            daemons.stop(*general, *reserved)
    return {
        "pg.priority.wait_p50": _ms(percentile(waits, 50)),
        "pg.priority.wait_p99": _ms(percentile(waits, 99)),
        "pg.priority.result_p50": _ms(percentile(wall, 50)),
        "pg.priority.depth": float(depth),
        "details": details,
    }


# -- procrastinate and pgqueuer ------------------------------------------


def _compare_pg(ctx, system, worker_script, driver):
    """
    One PostgreSQL queue in the comparison virtualenv: its driver installs
    its schema into a fresh one, then 2 worker processes start, then the
    driver runs the throughput and latency workloads.
    """
    setup = ctx.compare_setup_pg()
    if setup is not None:
        raise Skip(setup)
    with fresh_schema(ctx, system) as schema:
        tag = schema.name
        env = dict(
            ctx.compare_env(),
            BENCH_QUEUE="bench",
            BENCH_SCHEMA=tag,
            BENCH_POSTGRES=schema.url,
            PYTHONPATH=COMPARE,
        )
        python = ctx.compare_python
        with _Daemons(ctx, ctx.folder(system)) as daemons:
            install = daemons.process(
                f"{system}-install",
                [python, os.path.join(COMPARE, driver), "--install"],
                env=env,
            )
            if install.wait_exit(120) != 0:
                raise BenchError(
                    f"{system}: installing its schema failed "
                    f"(see {install.log_path})"
                )
            workers = [
                daemons.process(
                    f"{system}-worker{i}",
                    [
                        python,
                        os.path.join(COMPARE, worker_script),
                        "--name",
                        f"w{i}",
                    ],
                    env=env,
                    server=True,
                )
                for i in (1, 2)
            ]
            for worker in workers:
                worker.wait_for(r"ready", 60, f"the {system} worker ready")
            client = daemons.process(
                f"{system}-driver",
                [
                    python,
                    os.path.join(COMPARE, driver),
                    "--tasks",
                    str(ctx.params.pg_compare),
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
                watched=workers,
            )
            if match.group(1) == "error:":
                raise BenchError(f"{system}: {match.group(2)}")
            client.wait_exit(60)
    result = _json(match.group(2), f"the {system} driver")
    wall = result["submit_to_result"]
    return {
        f"{system}.pg.throughput": result["throughput"],
        f"{system}.pg.latency.result_p50": _ms(percentile(wall, 50)),
        f"{system}.pg.latency.result_p99": _ms(percentile(wall, 99)),
        "details": {
            "submit_seconds": result.get("submit_seconds"),
            "jobs_per_worker": result.get("jobs_per_worker"),
        },
    }


@_guard
def run_procrastinate(ctx):
    """
    procrastinate: 2 worker processes with ``concurrency=1``, a no-op
    task, jobs deferred in bulk (``batch_defer_async``).
    """
    return _compare_pg(
        ctx,
        "procrastinate",
        "procrastinate_worker.py",
        "procrastinate_driver.py",
    )


@_guard
def run_pgqueuer(ctx):
    """
    pgqueuer: 2 worker processes claiming one job at a time
    (``batch_size=1``), a no-op entrypoint, jobs enqueued in bulk.
    """
    return _compare_pg(
        ctx, "pgqueuer", "pgqueuer_worker.py", "pgqueuer_driver.py"
    )


__all__ = [
    "run_pg_throughput",
    "run_pg_latency",
    "run_pg_priority",
    "run_procrastinate",
    "run_pgqueuer",
    "server_problem",
    "server_version",
    "wait_done_pg",
]


# -- pg-retention --------------------------------------------------------


def _paced(brokers, rate, seconds):
    """
    Submit echo tasks at ``rate`` a second for ``seconds``, in a batch
    every 50 ms, each broker through its own client and thread.

    :returns: how many were submitted.
    """
    tick = 0.05
    per_broker = rate / len(brokers)
    counts, errors = [0] * len(brokers), []

    def submit(index):
        try:
            with _client(brokers[index].endpoint) as client:
                began = time.monotonic()
                while True:
                    elapsed = time.monotonic() - began
                    if elapsed >= seconds:
                        return
                    due = int(per_broker * (elapsed + tick)) - counts[index]
                    if due > 0:
                        _bulk(
                            client, [{"handler": "echo", "payload": 0}] * due
                        )
                        counts[index] += due
                    time.sleep(
                        max(0.0, began + elapsed + tick - time.monotonic())
                    )
        except BaseException as e:
            errors.append(e)

    threads = [
        threading.Thread(target=submit, args=(i,)) for i in range(len(brokers))
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return sum(counts)


def _dispatch_in(db, since, until):
    """
    The echo tasks dispatched between ``since`` and ``until`` (Unix
    times): how many a second, and how long each waited to start.
    """
    rows = db.execute(
        "SELECT started_at - created_at FROM tasks WHERE handler = 'echo' "
        "AND started_at >= %s AND started_at < %s",
        (since, until),
    ).fetchall()
    waits = [wait for (wait,) in rows]
    return len(waits) / (until - since), waits


def _old_left(db):
    return db.execute(
        "SELECT count(*) FROM tasks WHERE handler = 'history'"
    ).fetchone()[0]


@_guard
def run_pg_retention(ctx):
    """
    Retention while tasks flow, on two brokers sharing a PostgreSQL
    database (default settings: a new database keeps a week): the same
    setup's maximum rate first (N tasks in bulk), then echo tasks paced
    at 80 % of it, before and while the brokers delete H tasks that
    finished eight days ago (inserted by one ``INSERT ... SELECT``).  The
    dispatch rate and wait of the tasks created while the deletion ran,
    against those created before it.
    """
    n, history = ctx.params.pg_throughput, ctx.params.pg_history
    maximum = _pg_throughput(ctx, n, 2)["rate"]
    rate = 0.8 * maximum
    with fresh_schema(ctx, "retention") as schema:
        with _Daemons(ctx, ctx.folder("pg-retention")) as daemons:
            brokers = _brokers(daemons, schema, 2)
            _spread_workers(daemons, brokers, ["w1", "w2"])
            with closing(schema.connect()) as db:
                # Before: a flow with nothing to delete.
                began = time.time()
                _paced(brokers, rate, ctx.params.pg_retention_seconds)
                before = _dispatch_in(db, began + 1, time.time() - 0.5)
                # The history, then a flow until it is gone: the brokers'
                # next round of retention deletes it.
                db.execute(
                    "INSERT INTO tasks (handler, state, attempts, created_at,"
                    " started_at, finished_at) SELECT 'history', "
                    "'succeeded', 1, t, t, t FROM (SELECT extract(epoch "
                    "FROM now()) - 8 * 86400 AS t) AS old, "
                    "generate_series(1, %s)",
                    (history,),
                )
                deleting, gone = [], []

                # Two brokers delete up to 2,000 a second; allow a quarter
                # of that, after a first round up to 10 s away.
                allowed = STALL + history / 500

                def watch():
                    deadline = time.monotonic() + allowed
                    with closing(schema.connect()) as watcher:
                        while time.monotonic() < deadline:
                            left = _old_left(watcher)
                            if left < history and not deleting:
                                deleting.append(time.time())
                            if left == 0:
                                gone.append(time.time())
                                return
                            time.sleep(0.25)

                watcher = threading.Thread(target=watch)
                watcher.start()
                flowing = time.time()
                while not gone and time.time() - flowing < allowed:
                    _paced(brokers, rate, 1.0)
                watcher.join()
                if not gone:
                    raise BenchError(
                        f"retention did not delete {history} "
                        f"old tasks within {allowed:g} s"
                    )
                during = _dispatch_in(db, deleting[0], gone[0])
    return {
        "pg.retention.max_rate": maximum,
        "pg.retention.offered": rate,
        "pg.retention.rate_before": before[0],
        "pg.retention.rate_during": during[0],
        "pg.retention.wait_p50_before": _ms(percentile(before[1], 50)),
        "pg.retention.wait_p50_during": _ms(percentile(during[1], 50)),
        "pg.retention.wait_p99_before": _ms(percentile(before[1], 99)),
        "pg.retention.wait_p99_during": _ms(percentile(during[1], 99)),
        "pg.retention.deleted_per_s": history / (gone[0] - deleting[0]),
    }
