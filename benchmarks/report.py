"""
What each metric means, and the table and JSON made of a suite's results.

Every metric is measured once per run; the table shows the median of the
runs and their spread (min-max), the ratio to the floor measured in the
same suite (throughput: taskbroker / floor, higher is better; latency:
taskbroker / floor, lower is better), and the issue's target where it
sets one.
"""

from dataclasses import dataclass
from typing import Optional

from benchmarks._util import median


@dataclass(frozen=True)
class Metric:
    key: str
    section: str
    label: str
    unit: str
    #: the floor metric to quote a ratio of, if any
    floor: Optional[str] = None
    #: ("max", x): median <= x; ("min", x): median >= x;
    #: ("floor", x): median / floor >= x; ("ratio", key, x): median /
    #: median of key >= x
    target: Optional[tuple] = None
    #: informative only: shown, never judged
    note: str = ""


def metrics(p):
    """
    The table's rows in order, labelled with the suite's parameters ``p``.
    """
    tp = "floor.throughput"
    S1 = (f"1 Throughput: {p.throughput:,} echo tasks, 2 workers x 1 slot, "
          "first submit -> last result committed")
    S2 = (f"2 Latency: {p.latency:,} tasks one at a time (submit, then "
          "wait for the result)")
    S3 = (f"3 Priority under load: {p.priority_low:,} low tasks queued, "
          "general workers busy with sleep tasks, 1 worker reserved for "
          f"high; {p.priority_high} high tasks one at a time")
    S4 = (f"4 Many workers: one load process, {p.many_connections:,} "
          "worker connections x 1 slot, real protocol, default heartbeat")
    S5 = (f"5 Deep queue: {p.deep:,} tasks inserted by SQL before the "
          "broker starts, 2 workers x 1 slot")
    S6 = "6 Worker alone: twistd taskworker --concurrency 1, stub broker"
    compare_note = (f"{p.compare:,} tasks" if p.compare != p.throughput
                    else "")
    return [
        Metric("tb.throughput.bulk", S1,
               "taskbroker, bulk API (BlockingClient.submit_many)",
               "tasks/s", tp, ("floor", 0.5)),
        Metric("tb.throughput.broker_cpu", S1,
               "  broker CPU meanwhile (% of one core)", "%"),
        Metric("tb.throughput.worker_cpu", S1,
               "  each worker's CPU meanwhile (mean)", "%"),
        Metric("tb.throughput.bulk_full", S1,
               "taskbroker, bulk API, --sqlite-synchronous full",
               "tasks/s", tp),
        Metric("tb.throughput.sql", S1,
               "taskbroker, one SQL transaction (poller picks it up)",
               "tasks/s", tp, ("floor", 0.5)),
        Metric("tb.throughput.sql_pickup", S1,
               "  SQL commit -> first dispatch (poll-interval)", "ms"),
        Metric("floor.throughput", S1,
               "floor: ZeroMQ load-balancing broker, no storage",
               "tasks/s"),
        Metric("celery.throughput", S1,
               "Celery + Redis, prefork 2, prefetch 1, acks late"
               + (f" ({compare_note})" if compare_note else ""),
               "tasks/s", tp),
        Metric("rq.throughput", S1,
               "RQ + Redis, 2 SimpleWorkers"
               + (f" ({compare_note})" if compare_note else ""),
               "tasks/s", tp),

        Metric("tb.latency.dispatch_p50", S2,
               "taskbroker submit->start p50 (the handler's clock)",
               "ms", "floor.latency.start_p50", ("max", 0.5)),
        Metric("tb.latency.dispatch_p99", S2,
               "taskbroker submit->start p99", "ms",
               "floor.latency.start_p99"),
        Metric("tb.latency.result_p50", S2,
               "taskbroker submit->result p50 (client wall time)", "ms",
               "floor.latency.result_p50", ("max", 1.0)),
        Metric("tb.latency.result_p99", S2,
               "taskbroker submit->result p99 (client wall time)", "ms",
               "floor.latency.result_p99", ("max", 3.0)),
        Metric("tb.latency.finished_p50", S2,
               "taskbroker finished_at - created_at p50", "ms",
               "floor.latency.result_p50"),
        Metric("tb.latency.finished_p99", S2,
               "taskbroker finished_at - created_at p99", "ms",
               "floor.latency.result_p99"),
        Metric("floor.latency.start_p50", S2, "floor submit->start p50", "ms"),
        Metric("floor.latency.start_p99", S2, "floor submit->start p99", "ms"),
        Metric("floor.latency.result_p50", S2, "floor submit->result p50",
               "ms"),
        Metric("floor.latency.result_p99", S2, "floor submit->result p99",
               "ms"),
        Metric("celery.latency.start_p50", S2, "Celery submit->start p50",
               "ms", "floor.latency.start_p50"),
        Metric("celery.latency.start_p99", S2, "Celery submit->start p99",
               "ms", "floor.latency.start_p99"),
        Metric("celery.latency.result_p50", S2, "Celery submit->result p50",
               "ms", "floor.latency.result_p50"),
        Metric("celery.latency.result_p99", S2, "Celery submit->result p99",
               "ms", "floor.latency.result_p99"),
        Metric("rq.latency.start_p50", S2, "RQ submit->start p50", "ms",
               "floor.latency.start_p50"),
        Metric("rq.latency.start_p99", S2, "RQ submit->start p99", "ms",
               "floor.latency.start_p99"),
        Metric("rq.latency.result_p50", S2, "RQ submit->result p50", "ms",
               "floor.latency.result_p50"),
        Metric("rq.latency.result_p99", S2, "RQ submit->result p99", "ms",
               "floor.latency.result_p99"),

        Metric("tb.priority.wait_p50", S3,
               "high task submit->start p50", "ms",
               "floor.latency.start_p50"),
        Metric("tb.priority.wait_p99", S3, "high task submit->start p99", "ms",
               "floor.latency.start_p99", ("max", 2.0)),
        Metric("tb.priority.result_p50", S3,
               "high task submit->result p50 (client wall time)", "ms",
               "floor.latency.result_p50"),
        Metric("tb.priority.depth", S3,
               "  low tasks waiting meanwhile (broker STATS)", "tasks"),

        Metric("tb.many.idle_cpu", S4,
               "broker CPU while idle (% of one core)", "%",
               target=("max", 5.0)),
        Metric("tb.many.load_idle_cpu", S4,
               "  load process CPU meanwhile", "%"),
        Metric("tb.many.rate_many", S4,
               f"throughput, {p.many_connections:,} worker slots "
               f"({p.many_tasks:,} echo tasks)", "tasks/s", tp,
               ("ratio", "tb.many.rate_few", 0.8)),
        Metric("tb.many.rate_few", S4,
               "throughput, 10 worker slots (same load process)",
               "tasks/s", tp),
        Metric("tb.many.load_busy_cpu", S4,
               f"  load process CPU during the {p.many_connections:,}-slot "
               "run", "%"),

        Metric("tb.deep.listen", S5, "broker start -> listening", "s"),
        Metric("tb.deep.first_dispatch", S5,
               "broker start -> first dispatch (workers launched when it "
               "listens)", "s", target=("max", 2.0)),
        Metric("tb.deep.worker_start", S5,
               "  of which: workers launched -> first dispatch", "s"),
        Metric("tb.deep.rss", S5,
               f"broker RSS after the first {p.deep_drain:,} drained", "MB",
               target=("max", 150.0)),
        Metric("tb.deep.hwm", S5, "broker peak RSS (VmHWM)", "MB"),
        Metric("tb.deep.drain", S5,
               f"drain rate of the first {p.deep_drain:,}", "tasks/s", tp,
               ("ratio", "tb.deep.drain_empty", 0.8)),
        Metric("tb.deep.drain_empty", S5,
               f"drain rate, empty queue ({p.deep_drain:,} submitted in "
               "bulk)", "tasks/s", tp),
        Metric("tb.deep.rss_empty", S5, "  broker RSS, empty queue, after",
               "MB"),

        Metric("tb.alone.rate", S6,
               "no-op echo tasks (after a warm-up of a tenth)", "tasks/s",
               tp, ("min", 5000.0)),
        Metric("tb.alone.worker_us", S6,
               "  the worker's CPU per task", "us"),
        Metric("tb.alone.stub_us", S6,
               "  the stub's CPU per task (also on the round trip)", "us"),
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


def _target_text(metric):
    target = metric.target
    if target is None:
        return ""
    unit = {"tasks/s": "/s", "%": " %", "ms": " ms", "MB": " MB",
            "s": " s"}.get(metric.unit, "")
    kind = target[0]
    if kind == "max":
        return f"<= {fmt(target[1], metric.unit)}{unit}"
    if kind == "min":
        return f">= {fmt(target[1], metric.unit)}{unit}"
    if kind == "floor":
        return f">= {target[1]:g} x floor"
    if kind == "ratio":
        return f">= {target[2]:g} x next"
    return ""


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
            "target": _target_text(metric) or None,
            "met": None,
        }
        floor = medians.get(metric.floor) if metric.floor else None
        if floor:
            row["floor_ratio"] = value / floor
        target = metric.target
        if target is not None:
            kind = target[0]
            if kind == "max":
                row["met"] = value <= target[1]
            elif kind == "min":
                row["met"] = value >= target[1]
            elif kind == "floor" and row["floor_ratio"] is not None:
                row["met"] = row["floor_ratio"] >= target[1]
            elif kind == "ratio" and medians.get(target[1]):
                ratio = value / medians[target[1]]
                row["ratio"] = ratio
                row["met"] = ratio >= target[2]
                row["target"] = f">= {target[2]:g} x next ({ratio:.2f})"
        rows.append(row)
    return rows


def header_lines(report):
    m = report["machine"]
    p = report["params"]
    lines = [
        f"taskbroker benchmarks  {report['started_at']}  taskbroker "
        f"{m['taskbroker']}" + (f" (commit {m['commit']})" if m.get("commit")
                                else "")
        + f"  {p['runs']} run(s) each: median and spread (min-max)"
        + ("  [--quick]" if report.get("quick") else ""),
        f"machine  {m['cpu']}, {m['cores']} cores"
        + (f" ({m['cores_usable']} usable)"
           if m.get("cores_usable") != m["cores"] else "")
        + (f", {m['memory_gib']} GiB" if m.get("memory_gib") else "")
        + f", {m['kernel']}, {m['python']}, SQLite {m['sqlite']}, "
        f"libzmq {m['libzmq']} (pyzmq {m['pyzmq']}), Twisted {m['twisted']}",
    ]
    defaults = report.get("defaults", {})
    broker = defaults.get("broker")
    if broker:
        shown = ", ".join(f"{k} {v}" for k, v in broker.items()
                          if k not in ("listen", "database"))
        lines.append(f"broker   defaults: {shown}; the suite sets only "
                     "--listen tcp://127.0.0.1:<port> and --database <temp>")
    worker = defaults.get("worker")
    if worker:
        shown = ", ".join(f"{k} {v}" for k, v in worker.items()
                          if k not in ("broker", "name", "handlers-path"))
        lines.append(f"worker   defaults: {shown}; the suite sets --broker, "
                     "--name, and --priorities high for the reserved worker")
    if "error" in defaults:
        lines.append(f"settings {defaults['error']}")
    compare = report.get("compare")
    if compare:
        lines.append(f"compare  {compare}")
    return lines


def table(report):
    """
    The report as text: the header, then one line per metric under its
    section's title.
    """
    lines = header_lines(report)
    width = 66
    lines.append("")
    lines.append(f"{'':<{width}} {'unit':<7} {'median':>9} {'min-max':>17} "
                 f"{'x floor':>7}  target")
    section = None
    for row in report["rows"]:
        if row["section"] != section:
            section = row["section"]
            lines.append(section)
        unit = row["unit"]
        spread = f"{fmt(row['min'], unit)}-{fmt(row['max'], unit)}"
        ratio = row["floor_ratio"]
        ratio_text = "" if ratio is None else (
            f"{ratio:.2f}" if ratio < 10 else f"{ratio:.0f}")
        target = row["target"] or ""
        if row["met"] is not None:
            target += "  ok" if row["met"] else "  MISSED"
        label = f"  {row['label']}"
        if len(label) > width:
            label = label[:width - 1] + "~"
        lines.append(f"{label:<{width}} {unit:<7} "
                     f"{fmt(row['median'], unit):>9} {spread:>17} "
                     f"{ratio_text:>7}  {target}".rstrip())
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
