"""
What each metric means, and the table and JSON made of a suite's results.

Every metric is measured once per run; the table shows the median of the
runs and their spread (min-max), the ratio to the floor measured in the
same suite (throughput: taskbroker / floor, higher is better; latency:
taskbroker / floor, lower is better), and the issue's target where it
sets one.
"""

from dataclasses import dataclass

from benchmarks._util import median
from benchmarks.measures import SITE_REQUESTS


@dataclass(frozen=True)
class Metric:
    key: str
    section: str
    label: str
    unit: str
    #: the floor metric to quote a ratio of, if any
    floor: str | None = None
    #: ("max", x): median <= x; ("min", x): median >= x;
    #: ("floor", x): median / floor >= x; ("ratio", key, x[, label]):
    #: median / median of key >= x; ("plus", key, d, label): median <=
    #: median of key + d; ("times", key, x, label): median <= x *
    #: median of key; ("alone", m, x, f): median >= m, or median / floor
    #: >= x where the floor is below f; ("versus", key, label): the ratio
    #: to key, shown, never judged.  A key may be a tuple of keys: the
    #: first measured in this suite is used.
    target: tuple | None = None
    #: more targets of the same kinds, each judged and shown
    also: tuple = ()
    #: informative only: shown, never judged
    note: str = ""


def metrics(p):
    """
    The table's rows in order, labelled with the suite's parameters ``p``.
    """
    tp = "floor.throughput"
    S1 = (
        f"1 Throughput: {p.throughput:,} echo tasks, 2 workers x 1 slot, "
        "first submit -> last result committed"
    )
    S2 = (
        f"2 Latency: {p.latency:,} tasks one at a time (submit, then "
        "wait for the result)"
    )
    S3 = (
        f"3 Priority under load: {p.priority_low:,} low tasks queued, "
        "general workers busy with sleep tasks, 1 worker reserved for "
        f"high; {p.priority_high} high tasks one at a time"
    )
    S4 = (
        f"4 Many workers: one load process, {p.many_connections:,} "
        "worker connections x 1 slot, real protocol, default heartbeat"
    )
    S5 = (
        f"5 Deep queue: {p.deep:,} tasks inserted by SQL before the "
        "broker starts, 2 workers x 1 slot"
    )
    S6 = "6 Worker alone: twistd taskworker --concurrency 1, stub broker"
    S8 = (
        f"8 PostgreSQL throughput: {p.pg_throughput:,} echo tasks, 2 "
        "workers x 1 slot, brokers on one database (a fresh schema a "
        "run), first submit -> last result committed"
    )
    S9 = (
        f"9 PostgreSQL latency: {p.latency:,} tasks one at a time "
        "(submit, then wait for the result)"
    )
    S10 = (
        f"10 PostgreSQL priority: {p.pg_priority_low:,} low tasks "
        "inserted by SQL, general workers busy, 1 worker reserved for "
        f"high; {p.pg_priority_high} high tasks one at a time"
    )
    S11 = (
        f"11 CURVE: {p.throughput:,} echo tasks (2 workers x 1 slot) "
        f"and {p.latency:,} one at a time, every link encrypted and "
        "authenticated, then plain, in the same run"
    )
    S12 = (
        f"12 Status site: {p.deep:,} tasks in the store (not "
        f"runnable), {p.many_connections:,} worker connections; "
        f"{SITE_REQUESTS} requests of each kind"
    )
    S13 = (
        "13 Retention while tasks flow: 2 brokers on PostgreSQL, 2 "
        "workers x 1 slot, echo tasks at 80 % of the rate of "
        f"{p.pg_throughput:,} in bulk, before and while the brokers delete "
        f"{p.pg_history:,} tasks that finished 8 days ago"
    )
    S14 = (
        f"14 Latency beside a CPU hog: {p.latency:,} tasks one at a time "
        "(submit, then wait for the result), one process spinning on a "
        "core meanwhile"
    )
    pg_compare = (
        f" ({p.pg_compare:,} jobs)" if p.pg_compare != p.pg_throughput else ""
    )
    sqlite_rate = ("pg.throughput.sqlite", "tb.throughput.bulk")
    sqlite_p50 = ("pg.latency.sqlite_result_p50", "tb.latency.result_p50")
    compare_note = f"{p.compare:,} tasks" if p.compare != p.throughput else ""
    return [
        Metric(
            "tb.throughput.bulk",
            S1,
            "taskbroker, bulk API (BlockingClient.submit_many)",
            "tasks/s",
            tp,
            ("floor", 0.5),
        ),
        Metric(
            "tb.throughput.broker_cpu",
            S1,
            "  broker CPU meanwhile (% of one core)",
            "%",
        ),
        Metric(
            "tb.throughput.worker_cpu",
            S1,
            "  each worker's CPU meanwhile (mean)",
            "%",
        ),
        Metric(
            "tb.throughput.bulk_full",
            S1,
            "taskbroker, bulk API, --sqlite-synchronous full",
            "tasks/s",
            tp,
        ),
        Metric(
            "tb.throughput.sql",
            S1,
            "taskbroker, one SQL transaction (poller picks it up)",
            "tasks/s",
            tp,
            ("floor", 0.5),
        ),
        Metric(
            "tb.throughput.sql_pickup",
            S1,
            "  SQL commit -> first dispatch (poll-interval)",
            "ms",
        ),
        Metric(
            "floor.throughput",
            S1,
            "floor: ZeroMQ load-balancing broker, no storage",
            "tasks/s",
        ),
        Metric(
            "celery.throughput",
            S1,
            "Celery + Redis, prefork 2, prefetch 1, acks late"
            + (f" ({compare_note})" if compare_note else ""),
            "tasks/s",
            tp,
        ),
        Metric(
            "rq.throughput",
            S1,
            "RQ + Redis, 2 SimpleWorkers"
            + (f" ({compare_note})" if compare_note else ""),
            "tasks/s",
            tp,
        ),
        Metric(
            "tb.latency.dispatch_p50",
            S2,
            "taskbroker submit->start p50 (the handler's clock)",
            "ms",
            "floor.latency.start_p50",
            ("max", 0.5),
        ),
        Metric(
            "tb.latency.dispatch_p99",
            S2,
            "taskbroker submit->start p99",
            "ms",
            "floor.latency.start_p99",
        ),
        Metric(
            "tb.latency.result_p50",
            S2,
            "taskbroker submit->result p50 (client wall time)",
            "ms",
            "floor.latency.result_p50",
            ("times", "floor.latency.result_p50", 3.0, "floor"),
            also=(("times", "celery.latency.result_p50", 1.0, "Celery"),),
        ),
        Metric(
            "tb.latency.result_p99",
            S2,
            "taskbroker submit->result p99 (client wall time)",
            "ms",
            "floor.latency.result_p99",
            ("times", "floor.latency.result_p99", 4.0, "floor"),
            also=(("times", "celery.latency.result_p99", 1.0, "Celery"),),
        ),
        Metric(
            "tb.latency.finished_p50",
            S2,
            "taskbroker finished_at - created_at p50",
            "ms",
            "floor.latency.result_p50",
        ),
        Metric(
            "tb.latency.finished_p99",
            S2,
            "taskbroker finished_at - created_at p99",
            "ms",
            "floor.latency.result_p99",
        ),
        Metric("floor.latency.start_p50", S2, "floor submit->start p50", "ms"),
        Metric("floor.latency.start_p99", S2, "floor submit->start p99", "ms"),
        Metric(
            "floor.latency.result_p50", S2, "floor submit->result p50", "ms"
        ),
        Metric(
            "floor.latency.result_p99", S2, "floor submit->result p99", "ms"
        ),
        Metric(
            "celery.latency.start_p50",
            S2,
            "Celery submit->start p50",
            "ms",
            "floor.latency.start_p50",
        ),
        Metric(
            "celery.latency.start_p99",
            S2,
            "Celery submit->start p99",
            "ms",
            "floor.latency.start_p99",
        ),
        Metric(
            "celery.latency.result_p50",
            S2,
            "Celery submit->result p50",
            "ms",
            "floor.latency.result_p50",
        ),
        Metric(
            "celery.latency.result_p99",
            S2,
            "Celery submit->result p99",
            "ms",
            "floor.latency.result_p99",
        ),
        Metric(
            "rq.latency.start_p50",
            S2,
            "RQ submit->start p50",
            "ms",
            "floor.latency.start_p50",
        ),
        Metric(
            "rq.latency.start_p99",
            S2,
            "RQ submit->start p99",
            "ms",
            "floor.latency.start_p99",
        ),
        Metric(
            "rq.latency.result_p50",
            S2,
            "RQ submit->result p50",
            "ms",
            "floor.latency.result_p50",
        ),
        Metric(
            "rq.latency.result_p99",
            S2,
            "RQ submit->result p99",
            "ms",
            "floor.latency.result_p99",
        ),
        Metric(
            "tb.priority.wait_p50",
            S3,
            "high task submit->start p50",
            "ms",
            "floor.latency.start_p50",
        ),
        Metric(
            "tb.priority.wait_p99",
            S3,
            "high task submit->start p99",
            "ms",
            "floor.latency.start_p99",
            ("max", 2.0),
        ),
        Metric(
            "tb.priority.result_p50",
            S3,
            "high task submit->result p50 (client wall time)",
            "ms",
            "floor.latency.result_p50",
        ),
        Metric(
            "tb.priority.depth",
            S3,
            "  low tasks waiting meanwhile (broker STATS)",
            "tasks",
        ),
        Metric(
            "tb.many.idle_cpu",
            S4,
            "broker CPU while idle (% of one core)",
            "%",
            target=("max", 5.0),
        ),
        Metric(
            "tb.many.load_idle_cpu", S4, "  load process CPU meanwhile", "%"
        ),
        Metric(
            "tb.many.rate_many",
            S4,
            f"throughput, {p.many_connections:,} worker slots "
            f"({p.many_tasks:,} echo tasks)",
            "tasks/s",
            tp,
            ("ratio", "tb.many.rate_few", 0.8),
        ),
        Metric(
            "tb.many.rate_few",
            S4,
            "throughput, 10 worker slots (same load process)",
            "tasks/s",
            tp,
        ),
        Metric(
            "tb.many.load_busy_cpu",
            S4,
            f"  load process CPU during the {p.many_connections:,}-slot run",
            "%",
        ),
        Metric("tb.deep.listen", S5, "broker start -> listening", "s"),
        Metric(
            "tb.deep.first_dispatch",
            S5,
            "broker start -> first dispatch (workers launched when it "
            "listens)",
            "s",
            target=("max", 2.0),
        ),
        Metric(
            "tb.deep.worker_start",
            S5,
            "  of which: workers launched -> first dispatch",
            "s",
        ),
        Metric(
            "tb.deep.rss",
            S5,
            f"broker RSS after the first {p.deep_drain:,} drained",
            "MB",
            target=("max", 150.0),
        ),
        Metric("tb.deep.hwm", S5, "broker peak RSS (VmHWM)", "MB"),
        Metric(
            "tb.deep.drain",
            S5,
            f"drain rate of the first {p.deep_drain:,}",
            "tasks/s",
            tp,
            ("ratio", "tb.deep.drain_empty", 0.8),
        ),
        Metric(
            "tb.deep.drain_empty",
            S5,
            f"drain rate, empty queue ({p.deep_drain:,} submitted in bulk)",
            "tasks/s",
            tp,
        ),
        Metric(
            "tb.deep.rss_empty", S5, "  broker RSS, empty queue, after", "MB"
        ),
        Metric(
            "tb.alone.rate",
            S6,
            "no-op echo tasks (after a warm-up of a tenth)",
            "tasks/s",
            tp,
            ("alone", 5000.0, 0.65, 8000.0),
        ),
        Metric("tb.alone.worker_us", S6, "  the worker's CPU per task", "us"),
        Metric(
            "tb.alone.stub_us",
            S6,
            "  the stub's CPU per task (also on the round trip)",
            "us",
        ),
        Metric(
            "pg.throughput.b1",
            S8,
            "taskbroker, 1 broker (BlockingClient.submit_many)",
            "tasks/s",
            tp,
            ("ratio", sqlite_rate, 0.5, "SQLite"),
            also=(
                ("ratio", "procrastinate.pg.throughput", 3.0, "procrastinate"),
            ),
        ),
        Metric(
            "pg.throughput.b1_broker_cpu",
            S8,
            "  the broker's CPU meanwhile (% of one core)",
            "%",
        ),
        Metric(
            "pg.throughput.b1_worker_cpu",
            S8,
            "  each worker's CPU meanwhile (mean)",
            "%",
        ),
        Metric(
            "pg.throughput.b2",
            S8,
            "taskbroker, 2 brokers, a worker on each, submits on both",
            "tasks/s",
            tp,
            ("ratio", "pg.throughput.b1", 1.0, "1 broker"),
        ),
        Metric(
            "pg.throughput.b2_broker_cpu",
            S8,
            "  the brokers' CPU meanwhile (sum, % of one core)",
            "%",
        ),
        Metric(
            "pg.throughput.b3",
            S8,
            "taskbroker, 3 brokers (one without workers), submits on all",
            "tasks/s",
            tp,
            ("versus", "pg.throughput.b1", "1 broker"),
        ),
        Metric(
            "pg.throughput.b3_broker_cpu",
            S8,
            "  the brokers' CPU meanwhile (sum, % of one core)",
            "%",
        ),
        Metric(
            "pg.throughput.sqlite",
            S8,
            "taskbroker on SQLite, 1 broker, same workload (baseline)",
            "tasks/s",
            tp,
        ),
        Metric(
            "procrastinate.pg.throughput",
            S8,
            "procrastinate, 2 workers x concurrency 1, batch_defer"
            + pg_compare,
            "tasks/s",
            tp,
        ),
        Metric(
            "pgqueuer.pg.throughput",
            S8,
            "pgqueuer, 2 workers x batch_size 1, enqueue of lists"
            + pg_compare,
            "tasks/s",
            tp,
            ("versus", "pg.throughput.b1", "taskbroker"),
        ),
        Metric(
            "pg.latency.b1.start_p50",
            S9,
            "taskbroker, 1 broker: submit->start p50 (handler's clock)",
            "ms",
            "floor.latency.start_p50",
        ),
        Metric(
            "pg.latency.b1.start_p99",
            S9,
            "taskbroker, 1 broker: submit->start p99",
            "ms",
            "floor.latency.start_p99",
        ),
        Metric(
            "pg.latency.b1.result_p50",
            S9,
            "taskbroker, 1 broker: submit->result p50 (client wall)",
            "ms",
            "floor.latency.result_p50",
            ("plus", sqlite_p50, 1.0, "SQLite"),
        ),
        Metric(
            "pg.latency.b1.result_p99",
            S9,
            "taskbroker, 1 broker: submit->result p99",
            "ms",
            "floor.latency.result_p99",
        ),
        Metric(
            "pg.latency.b2.start_p50",
            S9,
            "taskbroker, 2 brokers: submit->start p50",
            "ms",
            "floor.latency.start_p50",
        ),
        Metric(
            "pg.latency.b2.start_p99",
            S9,
            "taskbroker, 2 brokers: submit->start p99",
            "ms",
            "floor.latency.start_p99",
        ),
        Metric(
            "pg.latency.b2.result_p50",
            S9,
            "taskbroker, 2 brokers: submit->result p50",
            "ms",
            "floor.latency.result_p50",
        ),
        Metric(
            "pg.latency.b2.result_p99",
            S9,
            "taskbroker, 2 brokers: submit->result p99",
            "ms",
            "floor.latency.result_p99",
        ),
        Metric(
            "pg.latency.sqlite_result_p50",
            S9,
            "taskbroker on SQLite: submit->result p50 (baseline)",
            "ms",
            "floor.latency.result_p50",
        ),
        Metric(
            "procrastinate.pg.latency.result_p50",
            S9,
            "procrastinate submit->result p50 (NOTIFY at success)",
            "ms",
            "floor.latency.result_p50",
            ("versus", "pg.latency.b1.result_p50", "taskbroker"),
        ),
        Metric(
            "procrastinate.pg.latency.result_p99",
            S9,
            "procrastinate submit->result p99",
            "ms",
            "floor.latency.result_p99",
        ),
        Metric(
            "pgqueuer.pg.latency.result_p50",
            S9,
            "pgqueuer submit->result p50 (NOTIFY at success)",
            "ms",
            "floor.latency.result_p50",
            ("versus", "pg.latency.b1.result_p50", "taskbroker"),
        ),
        Metric(
            "pgqueuer.pg.latency.result_p99",
            S9,
            "pgqueuer submit->result p99",
            "ms",
            "floor.latency.result_p99",
        ),
        Metric(
            "pg.priority.wait_p50",
            S10,
            "high task submit->start p50",
            "ms",
            "floor.latency.start_p50",
        ),
        Metric(
            "pg.priority.wait_p99",
            S10,
            "high task submit->start p99",
            "ms",
            "floor.latency.start_p99",
            ("max", 2.0),
        ),
        Metric(
            "pg.priority.result_p50",
            S10,
            "high task submit->result p50 (client wall time)",
            "ms",
            "floor.latency.result_p50",
        ),
        Metric(
            "pg.priority.depth",
            S10,
            "  low tasks queued meanwhile (SQL count)",
            "tasks",
        ),
        Metric(
            "curve.on.throughput",
            S11,
            "throughput with CURVE",
            "tasks/s",
            tp,
            ("versus", "curve.off.throughput", "plain"),
        ),
        Metric(
            "curve.on.broker_cpu",
            S11,
            "  the broker's CPU meanwhile (% of one core)",
            "%",
        ),
        Metric(
            "curve.off.throughput", S11, "throughput, plain", "tasks/s", tp
        ),
        Metric(
            "curve.off.broker_cpu",
            S11,
            "  the broker's CPU meanwhile (% of one core)",
            "%",
        ),
        Metric(
            "curve.on.result_p50",
            S11,
            "submit->result p50 with CURVE (client wall)",
            "ms",
            "floor.latency.result_p50",
            ("versus", "curve.off.result_p50", "plain"),
        ),
        Metric(
            "curve.on.result_p99",
            S11,
            "submit->result p99 with CURVE",
            "ms",
            "floor.latency.result_p99",
            ("versus", "curve.off.result_p99", "plain"),
        ),
        Metric(
            "curve.off.result_p50",
            S11,
            "submit->result p50, plain",
            "ms",
            "floor.latency.result_p50",
        ),
        Metric(
            "curve.off.result_p99",
            S11,
            "submit->result p99, plain",
            "ms",
            "floor.latency.result_p99",
        ),
        Metric(
            "site.overview_kib",
            S12,
            "dashboard refresh (/api/overview): size",
            "KiB",
            target=("max", 200.0),
        ),
        Metric(
            "site.overview_cpu_ms",
            S12,
            "  the broker's CPU for one",
            "ms",
            target=("max", 20.0),
        ),
        Metric("site.overview_ms", S12, "  its wall time (median)", "ms"),
        Metric("site.metrics_kib", S12, "/metrics scrape: size", "KiB"),
        Metric("site.metrics_cpu_ms", S12, "  the broker's CPU for one", "ms"),
        Metric("site.metrics_ms", S12, "  its wall time (median)", "ms"),
        Metric(
            "site.idle_cpu",
            S12,
            "the broker's CPU between requests (% of one core)",
            "%",
        ),
        Metric(
            "site.tasks", S12, "tasks in the store (the stats' count)", "tasks"
        ),
        Metric("pg.retention.max_rate", S13, "the maximum (bulk)", "tasks/s"),
        Metric(
            "pg.retention.rate_before",
            S13,
            "dispatch rate at 80 %, nothing to delete",
            "tasks/s",
        ),
        Metric(
            "pg.retention.rate_during",
            S13,
            "  the same while retention deletes",
            "tasks/s",
            target=("ratio", "pg.retention.rate_before", 0.9, "before"),
        ),
        Metric(
            "pg.retention.wait_p50_before",
            S13,
            "submit -> start p50, nothing to delete",
            "ms",
        ),
        Metric(
            "pg.retention.wait_p50_during",
            S13,
            "  the same while retention deletes",
            "ms",
            target=("versus", "pg.retention.wait_p50_before", "before"),
        ),
        Metric(
            "pg.retention.wait_p99_before",
            S13,
            "submit -> start p99, nothing to delete",
            "ms",
        ),
        Metric(
            "pg.retention.wait_p99_during",
            S13,
            "  the same while retention deletes",
            "ms",
            target=("versus", "pg.retention.wait_p99_before", "before"),
        ),
        Metric(
            "pg.retention.deleted_per_s",
            S13,
            "tasks deleted a second (both brokers)",
            "tasks/s",
        ),
        Metric(
            "hog.tb.latency.result_p50",
            S14,
            "taskbroker submit->result p50 (client wall time)",
            "ms",
            "hog.floor.latency.result_p50",
            ("times", "hog.floor.latency.result_p50", 3.0, "floor"),
            also=(("times", "hog.celery.latency.result_p50", 1.0, "Celery"),),
        ),
        Metric(
            "hog.tb.latency.result_p99",
            S14,
            "taskbroker submit->result p99",
            "ms",
            "hog.floor.latency.result_p99",
            ("times", "hog.floor.latency.result_p99", 4.0, "floor"),
            also=(("times", "hog.celery.latency.result_p99", 1.0, "Celery"),),
        ),
        Metric(
            "hog.floor.latency.result_p50",
            S14,
            "floor submit->result p50",
            "ms",
        ),
        Metric(
            "hog.floor.latency.result_p99",
            S14,
            "floor submit->result p99",
            "ms",
        ),
        Metric(
            "hog.celery.latency.result_p50",
            S14,
            "Celery submit->result p50",
            "ms",
            "hog.floor.latency.result_p50",
        ),
        Metric(
            "hog.celery.latency.result_p99",
            S14,
            "Celery submit->result p99",
            "ms",
            "hog.floor.latency.result_p99",
        ),
    ]


# -- formatting ----------------------------------------------------------


def fmt(value, unit):
    if value is None:
        return "-"
    if unit in ("tasks/s", "tasks"):
        return f"{value:,.0f}"
    if unit == "ms":
        if value < 10:
            return f"{value:.2f}"
        if value < 100:
            return f"{value:.1f}"
        return f"{value:,.0f}"
    if unit == "%":
        return f"{value:.1f}"
    if unit == "us":
        return f"{value:,.0f}"
    if unit == "MB":
        return f"{value:,.0f}"
    if unit == "s":
        return f"{value:.2f}" if value < 100 else f"{value:,.0f}"
    return f"{value:g}"


def _target_text(metric, target):
    if target is None:
        return ""
    unit = {
        "tasks/s": "/s",
        "%": " %",
        "ms": " ms",
        "MB": " MB",
        "s": " s",
    }.get(metric.unit, "")
    kind = target[0]
    if kind == "max":
        return f"<= {fmt(target[1], metric.unit)}{unit}"
    if kind == "min":
        return f">= {fmt(target[1], metric.unit)}{unit}"
    if kind == "floor":
        return f">= {target[1]:g} x floor"
    if kind == "ratio":
        return f">= {target[2]:g} x {target[3] if len(target) > 3 else 'next'}"
    if kind == "plus":
        return f"<= {target[3]} + {fmt(target[2], metric.unit)}{unit}"
    if kind == "times":
        return f"<= {target[2]:g} x {target[3]}"
    if kind == "alone":
        return (
            f">= {fmt(target[1], metric.unit)}{unit} or {target[2]:g} x "
            f"a floor below {fmt(target[3], metric.unit)}{unit}"
        )
    return ""


def _first(medians, keys):
    """
    The first of ``keys`` (a key or a tuple of keys) measured, and its
    median; ``(None, None)`` if none was.
    """
    for key in (keys,) if isinstance(keys, str) else keys:
        if medians.get(key):
            return key, medians[key]
    return None, None


def _judge(metric, target, value, floor_ratio, medians):
    """
    :returns: ``(text, met)``: the target as shown, and whether the
        median meets it (``None``: not judged, or its baseline missing).
    """
    text = _target_text(metric, target)
    kind = target[0]
    if kind == "max":
        return text, value <= target[1]
    if kind == "min":
        return text, value >= target[1]
    if kind == "floor":
        return text, (
            None if floor_ratio is None else floor_ratio >= target[1]
        )
    if kind in ("ratio", "versus"):
        _, base = _first(medians, target[1])
        if base is None:
            return (text + " (not measured)" if text else ""), None
        ratio = value / base
        if kind == "versus":
            return f"{ratio:.2f} x {target[2]}", None
        return f"{text} ({ratio:.2f})", ratio >= target[2]
    if kind == "plus":
        _, base = _first(medians, target[1])
        if base is None:
            return text + " (not measured)", None
        return (
            f"{text} ({fmt(base + target[2], metric.unit)})",
            value <= base + target[2],
        )
    if kind == "times":
        _, base = _first(medians, target[1])
        if base is None:
            return text + " (not measured)", None
        return (
            f"{text} ({fmt(base * target[2], metric.unit)})",
            value <= base * target[2],
        )
    if kind == "alone":
        if value >= target[1]:
            return text, True
        floor = medians.get("floor.throughput")
        if not floor:
            return text + " (floor not measured)", False
        return text, floor < target[3] and value / floor >= target[2]
    return text, None


def summarise(p, values):
    """
    :param values: ``{key: [value per run]}``.
    :returns: a list of row dicts for the metrics that have values.
    """
    medians = {key: median(v) for key, v in values.items() if v}
    rows = []
    for metric in metrics(p):
        runs = values.get(metric.key)
        if not runs:
            continue
        value = medians[metric.key]
        row = {
            "key": metric.key,
            "section": metric.section,
            "label": metric.label,
            "unit": metric.unit,
            "median": value,
            "min": min(runs),
            "max": max(runs),
            "runs": runs,
            "floor_ratio": None,
            "target": None,
            "met": None,
        }
        floor = medians.get(metric.floor) if metric.floor else None
        if floor:
            row["floor_ratio"] = value / floor
        targets = ([metric.target] if metric.target else []) + list(
            metric.also
        )
        texts, verdicts = [], []
        for target in targets:
            text, met = _judge(
                metric, target, value, row["floor_ratio"], medians
            )
            if met is not None:
                text += "  ok" if met else "  MISSED"
            texts.append(text)
            verdicts.append(met)
        if texts:
            row["target"] = "; ".join(texts)
            judged = [m for m in verdicts if m is not None]
            row["met"] = all(judged) if judged else None
        rows.append(row)
    return rows


def header_lines(report):
    m = report["machine"]
    p = report["params"]
    lines = [
        f"taskbroker benchmarks  {report['started_at']}  taskbroker "
        f"{m['taskbroker']}"
        + (f" (commit {m['commit']})" if m.get("commit") else "")
        + f"  {p['runs']} run(s) each: median and spread (min-max)"
        + ("  [--quick]" if report.get("quick") else ""),
        f"machine  {m['cpu']}, {m['cores']} cores"
        + (
            f" ({m['cores_usable']} usable)"
            if m.get("cores_usable") != m["cores"]
            else ""
        )
        + (f", {m['memory_gib']} GiB" if m.get("memory_gib") else "")
        + f", {m['kernel']}, {m['python']}, SQLite {m['sqlite']}, "
        f"libzmq {m['libzmq']} (pyzmq {m['pyzmq']}), Twisted {m['twisted']}",
    ]
    defaults = report.get("defaults", {})
    broker = defaults.get("broker")
    if broker:
        shown = ", ".join(
            f"{k} {v}"
            for k, v in broker.items()
            if k not in ("listen", "database")
        )
        lines.append(
            f"broker   defaults: {shown}; the suite sets only "
            "--listen tcp://127.0.0.1:<port> and --database <temp>"
        )
    worker = defaults.get("worker")
    if worker:
        shown = ", ".join(
            f"{k} {v}"
            for k, v in worker.items()
            if k not in ("broker", "name", "handlers-path")
        )
        lines.append(
            f"worker   defaults: {shown}; the suite sets --broker, "
            "--name, and --priorities high for the reserved worker"
        )
    if "error" in defaults:
        lines.append(f"settings {defaults['error']}")
    compare = report.get("compare")
    if compare:
        lines.append(f"compare  {compare}")
    compare_pg = report.get("compare_pg")
    if compare_pg:
        lines.append(
            f"compare  {compare_pg}, at "
            f"{_server(report['params'].get('postgres', ''))} (in "
            f"{report['params'].get('compare_venv')})"
        )
    return lines


def _server(url):
    # The address only: a URL may carry a password.
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    return f"{parts.hostname or 'localhost'}:{parts.port or 5432}{parts.path}"


def table(report):
    """
    The report as text: the header, then one line per metric under its
    section's title.
    """
    lines = header_lines(report)
    width = 66
    lines.append("")
    lines.append(
        f"{'':<{width}} {'unit':<7} {'median':>9} {'min-max':>17} "
        f"{'x floor':>7}  target"
    )
    section = None
    for row in report["rows"]:
        if row["section"] != section:
            section = row["section"]
            lines.append(section)
        unit = row["unit"]
        spread = f"{fmt(row['min'], unit)}-{fmt(row['max'], unit)}"
        ratio = row["floor_ratio"]
        ratio_text = (
            ""
            if ratio is None
            else (f"{ratio:.2f}" if ratio < 10 else f"{ratio:.0f}")
        )
        target = row["target"] or ""
        label = f"  {row['label']}"
        if len(label) > width:
            label = label[: width - 1] + "~"
        lines.append(
            f"{label:<{width}} {unit:<7} "
            f"{fmt(row['median'], unit):>9} {spread:>17} "
            f"{ratio_text:>7}  {target}".rstrip()
        )
    if report.get("interrupted"):
        lines.append("INTERRUPTED: the figures above are partial")
    for error in report["errors"]:
        lines.append(f"FAILED   {error}")
    for skipped in report["skipped"]:
        lines.append(f"skipped  {skipped}")
    for note in report["notes"]:
        lines.append(f"note     {note}")
    lines.append(f"total    {report['duration_s']:.0f} s")
    return "\n".join(lines)
