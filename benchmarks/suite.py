"""
The command line: choose measures, run each ``--runs`` times, print the
table and write it, as text and JSON, to ``--output``.
"""

import argparse
import dataclasses
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import UTC, datetime
from urllib.parse import urlsplit

from benchmarks import measures, postgresql
from benchmarks._util import (
    ROOT,
    TWISTD,
    BenchError,
    Processes,
    Skip,
    child_env,
    daemon_defaults,
    machine,
)
from benchmarks.report import summarise, table


@dataclasses.dataclass
class Params:
    runs: int = 3
    throughput: int = 20_000
    latency: int = 1_000
    warmup: int = 20
    priority_low: int = 10_000
    priority_high: int = 100
    many_connections: int = 1_000
    many_tasks: int = 10_000
    idle_seconds: float = 10.0
    deep: int = 1_000_000
    deep_drain: int = 10_000
    alone: int = 20_000
    floor: int = 20_000
    compare: int = 5_000
    pg_throughput: int = 20_000
    pg_priority_low: int = 100_000
    pg_priority_high: int = 200
    pg_compare: int = 20_000
    pg_history: int = 60_000
    pg_retention_seconds: float = 10.0
    redis: str = "redis://127.0.0.1:6379/11"
    postgres: str = "postgresql://postgres@127.0.0.1:5432/test"
    compare_venv: str = os.path.join(ROOT, "bench-results", ".venv-compare")


#: --quick: one run of smaller workloads, for development.
QUICK = dict(
    runs=1,
    throughput=3_000,
    latency=200,
    priority_low=2_000,
    priority_high=30,
    many_tasks=2_000,
    idle_seconds=3.0,
    deep=100_000,
    deep_drain=3_000,
    alone=3_000,
    floor=5_000,
    compare=1_000,
    pg_history=30_000,
    pg_retention_seconds=5.0,
    pg_throughput=10_000,
    pg_priority_low=20_000,
    pg_priority_high=50,
    pg_compare=10_000,
)

#: name -> (function, one line), in the order they run.
MEASURES = {
    "floor": (
        measures.run_floor,
        "7: the floor, a storage-less ZeroMQ load-balancing broker",
    ),
    "throughput": (
        measures.run_throughput,
        "1: echo tasks/s, bulk API and one SQL transaction",
    ),
    "latency": (
        measures.run_latency,
        "2: one task at a time, submit->dispatch/result p50/p99",
    ),
    "priority": (
        measures.run_priority,
        "3: wait of high tasks behind a deep low queue",
    ),
    "many-workers": (
        measures.run_many_workers,
        "4: 1,000 worker connections: idle CPU, throughput",
    ),
    "deep-queue": (
        measures.run_deep_queue,
        "5: 1,000,000 queued: RSS, first dispatch, drain rate",
    ),
    "worker-alone": (
        measures.run_worker_alone,
        "6: one worker fed by a stub broker",
    ),
    "latency-hog": (
        measures.run_latency_hog,
        "14: the latency workload of the floor, taskbroker and Celery "
        "beside a CPU hog",
    ),
    "celery": (
        measures.run_celery,
        "7: Celery + Redis, throughput and latency workloads",
    ),
    "rq": (measures.run_rq, "7: RQ + Redis, throughput and latency workloads"),
    "pg-throughput": (
        postgresql.run_pg_throughput,
        "8: echo tasks/s on PostgreSQL, 1, 2 and 3 brokers",
    ),
    "pg-latency": (
        postgresql.run_pg_latency,
        "9: one task at a time on PostgreSQL, 1 and 2 brokers",
    ),
    "pg-priority": (
        postgresql.run_pg_priority,
        "10: high tasks behind 100,000 low ones on PostgreSQL",
    ),
    "pg-retention": (
        postgresql.run_pg_retention,
        "13: retention deleting while tasks flow at 80 % of the maximum, "
        "two brokers on PostgreSQL",
    ),
    "procrastinate": (
        postgresql.run_procrastinate,
        "8-9: procrastinate on the same PostgreSQL server",
    ),
    "pgqueuer": (
        postgresql.run_pgqueuer,
        "8-9: pgqueuer on the same PostgreSQL server",
    ),
    "curve": (
        measures.run_curve,
        "11: throughput and latency with CURVE on, and off",
    ),
    "status-site": (
        measures.run_status_site,
        "12: dashboard refresh and /metrics scrape, deep queue "
        "and many workers",
    ),
}

#: kombu's Redis transport needs packages of the "redis" extra.
COMPARE_PACKAGES = ("celery[redis]", "redis", "rq")
#: The PostgreSQL queues, pinned: their figures in docs/performance.rst
#: are for these versions.
PG_COMPARE_PACKAGES = (
    "procrastinate==3.10.0",
    "pgqueuer==1.6.0",
    "psycopg[binary,pool]",
    "asyncpg",
)


class Context:
    """
    What a measure gets: the parameters, the process registry, a folder
    per run, and the comparison virtualenv (set up on first use).
    """

    def __init__(self, params, procs, root, quiet=False, chosen=()):
        self.params = params
        self.procs = procs
        self.root = root
        self.notes = []
        self.quiet = quiet
        #: the names of the measures this suite runs, so that a measure
        #: can reuse another's baseline rather than measure it again.
        self.chosen = frozenset(chosen)
        self._compare = None
        self._compare_pg = None
        self.compare_python = os.path.join(
            params.compare_venv, "bin", "python"
        )
        self.compare_versions = None
        self.compare_pg_versions = None

    def folder(self, name):
        return tempfile.mkdtemp(prefix=name + "-", dir=self.root)

    def compare_env(self):
        return child_env({"PYTHONDONTWRITEBYTECODE": "1"})

    def compare_setup(self):
        """
        :returns: ``None`` when Redis answers and the comparison
            virtualenv has its packages, else why not (and the measure is
            skipped).
        """
        if self._compare is None:
            self._compare = (
                _redis_problem(self.params.redis) or self._venv_problem() or ""
            )
        return self._compare or None

    def compare_setup_pg(self):
        """
        :returns: ``None`` when PostgreSQL answers and the comparison
            virtualenv has procrastinate and pgqueuer, else why not (and
            the measure is skipped).
        """
        if self._compare_pg is None:
            self._compare_pg = (
                postgresql.server_problem(self.params.postgres)
                or self._venv_problem_pg()
                or ""
            )
        return self._compare_pg or None

    def _venv_problem_pg(self):
        check = [
            self.compare_python,
            "-c",
            "from importlib.metadata import version as v; "
            "import procrastinate, pgqueuer, psycopg, psycopg_pool, "
            "asyncpg; "
            "print(v('procrastinate'), v('pgqueuer'), v('psycopg'))",
        ]
        problem = self._install(check, PG_COMPARE_PACKAGES)
        if problem:
            return problem
        procrastinate, pgqueuer, psycopg = _runs(check).split()
        self.compare_pg_versions = (
            f"procrastinate {procrastinate}, pgqueuer {pgqueuer}, psycopg "
            f"{psycopg}, PostgreSQL server "
            f"{postgresql.server_version(self.params.postgres)}"
        )
        return None

    def _venv_problem(self):
        check = [
            self.compare_python,
            "-c",
            "import celery, redis, rq, kombu.transport.redis; "
            "print(celery.__version__, redis.__version__, "
            "rq.__version__)",
        ]
        problem = self._install(check, COMPARE_PACKAGES)
        if problem:
            return problem
        celery, redis_py, rq = _runs(check).split()
        server = _redis_version(self.params.redis)
        self.compare_versions = (
            f"Celery {celery}, RQ {rq}, redis-py {redis_py}, Redis server "
            f"{server} at {_redis_address(self.params.redis)} (in "
            f"{self.params.compare_venv})"
        )
        return None

    def _install(self, check, packages):
        """
        Make the comparison virtualenv if need be, and install
        ``packages`` into it unless ``check`` already runs there.

        :returns: ``None``, or why the packages cannot be used.
        """
        venv = self.params.compare_venv
        if not _runs(check):
            progress(
                f"setting up the comparison virtualenv {venv} "
                f"(pip install {' '.join(packages)})"
            )
            try:
                if not os.path.exists(self.compare_python):
                    subprocess.run(
                        [sys.executable, "-m", "venv", venv],
                        check=True,
                        capture_output=True,
                        text=True,
                        timeout=300,
                    )
            except subprocess.CalledProcessError as e:
                last = (e.stderr or e.stdout or "").strip().splitlines()
                return (
                    f"cannot create the virtualenv {venv}: "
                    f"{last[-1] if last else e}"
                )
            except (OSError, subprocess.SubprocessError) as e:
                return f"cannot create the virtualenv {venv}: {e}"
            try:
                subprocess.run(
                    [
                        self.compare_python,
                        "-m",
                        "pip",
                        "install",
                        "--quiet",
                        "--disable-pip-version-check",
                        *packages,
                    ],
                    check=True,
                    capture_output=True,
                    text=True,
                    timeout=900,
                )
            except subprocess.CalledProcessError as e:
                last = (e.stderr or e.stdout or "").strip().splitlines()
                return (
                    f"cannot install {', '.join(packages)} into "
                    f"{venv}: {last[-1] if last else e}"
                )
            except (OSError, subprocess.SubprocessError) as e:
                return f"cannot install {', '.join(packages)} into {venv}: {e}"
        if not _runs(check):
            return f"{venv} cannot import {', '.join(packages)}"
        return None


def _runs(argv):
    try:
        out = subprocess.run(
            argv, capture_output=True, text=True, timeout=120, env=child_env()
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _redis_address(url):
    parts = urlsplit(url)
    return f"{parts.hostname or '127.0.0.1'}:{parts.port or 6379}"


def _redis_command(url, command):
    parts = urlsplit(url)
    with socket.create_connection(
        (parts.hostname or "127.0.0.1", parts.port or 6379), timeout=2
    ) as s:
        s.sendall(command)
        data = b""
        s.settimeout(2)
        while (
            not data.endswith(b"\r\n")
            or data.startswith(b"$")
            and data.count(b"\r\n") < 2
        ):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        return data.decode("utf-8", "replace")


def _redis_problem(url):
    try:
        answer = _redis_command(url, b"PING\r\n")
    except OSError as e:
        return (
            f"Redis does not answer on {_redis_address(url)} "
            f"({e.strerror or e})"
        )
    if not answer.startswith("+PONG"):
        return (
            f"Redis on {_redis_address(url)} answered PING with "
            f"{answer.strip()[:80]!r}"
        )
    return None


def _redis_version(url):
    try:
        answer = _redis_command(url, b"INFO server\r\n")
    except OSError:
        return "unknown"
    match = re.search(r"redis_version:(\S+)", answer)
    return match.group(1) if match else "unknown"


_started = time.monotonic()


def progress(message):
    print(
        f"[{time.monotonic() - _started:6.1f}s] {message}",
        file=sys.stderr,
        flush=True,
    )


def _names(text, parser):
    names = []
    for part in text.split(","):
        name = part.strip().lower().replace("_", "-")
        if not name:
            continue
        if name == "compare":
            names += ["celery", "rq"]
        elif name == "postgresql":
            names += [n for n in MEASURES if n.startswith("pg-")] + [
                "procrastinate",
                "pgqueuer",
            ]
        elif name in MEASURES:
            names.append(name)
        else:
            parser.error(
                f"unknown measure {part.strip()!r} (choose from "
                + ", ".join(MEASURES)
                + ", compare, postgresql)"
            )
    return names


def parser():
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="taskbroker's benchmark suite: real twistd daemons on "
        "loopback with their default settings, side by side "
        "with a storage-less ZeroMQ floor and, where Redis "
        "answers, Celery and RQ; where PostgreSQL answers, "
        "taskbroker on PostgreSQL beside procrastinate and "
        "pgqueuer. Prints a table and writes it as text and "
        "JSON to --output.",
        epilog="measures (in the order they run): "
        + "; ".join(f"{name} ({line})" for name, (_, line) in MEASURES.items())
        + ". Run from the repository root; `make bench` runs the defaults "
        "in under 10 minutes on 2 cores, `make bench-quick` runs --quick.",
    )
    d = Params()
    p.add_argument(
        "--quick",
        action="store_true",
        help="one run of smaller workloads, for development",
    )
    p.add_argument(
        "--runs",
        type=int,
        help=f"runs of each measure (default {d.runs}; 1 with --quick)",
    )
    p.add_argument(
        "--only",
        metavar="NAME[,NAME]",
        help="run only these measures (names below; 'compare' "
        "means celery,rq; 'postgresql' the pg-* measures, "
        "procrastinate and pgqueuer)",
    )
    p.add_argument(
        "--skip", metavar="NAME[,NAME]", help="run all measures but these"
    )
    p.add_argument(
        "--list", action="store_true", help="list the measures and exit"
    )
    p.add_argument(
        "--output",
        default=os.path.join(ROOT, "bench-results"),
        metavar="DIR",
        help="where latest.json and latest.txt (and a dated "
        "copy of each) go (default: bench-results/)",
    )
    p.add_argument(
        "--keep",
        action="store_true",
        help="keep the temporary folders (databases, logs)",
    )
    p.add_argument(
        "--tasks",
        type=int,
        metavar="N",
        help=f"throughput tasks, taskbroker and floor (default "
        f"{d.throughput:,})",
    )
    p.add_argument(
        "--latency-tasks",
        type=int,
        metavar="N",
        help=f"latency tasks (default {d.latency:,})",
    )
    p.add_argument(
        "--deep",
        type=int,
        metavar="N",
        help=f"tasks in the deep queue (default {d.deep:,})",
    )
    p.add_argument(
        "--connections",
        type=int,
        metavar="N",
        help=f"worker connections of the many-workers measure "
        f"(default {d.many_connections:,})",
    )
    p.add_argument(
        "--compare-tasks",
        type=int,
        metavar="N",
        help=f"throughput tasks for Celery and RQ (default "
        f"{d.compare:,}: a rate, kept short for time)",
    )
    p.add_argument(
        "--redis",
        metavar="URL",
        help=f"Redis for Celery and RQ (default {d.redis}); "
        "their keys are named per run and deleted after",
    )
    p.add_argument(
        "--postgres",
        metavar="URL",
        help=f"PostgreSQL server for the pg-* measures, "
        f"procrastinate and pgqueuer (default {d.postgres}); "
        "each run creates a schema of its own and drops it "
        "after",
    )
    p.add_argument(
        "--pg-tasks",
        type=int,
        metavar="N",
        help=f"throughput tasks on PostgreSQL, taskbroker, "
        f"procrastinate and pgqueuer (default "
        f"{d.pg_throughput:,})",
    )
    p.add_argument(
        "--fail-on-miss",
        action="store_true",
        help="exit 1 when a judged target is missed (for CI)",
    )
    p.add_argument(
        "--compare-venv",
        metavar="DIR",
        help="the comparison virtualenv, created on demand "
        "(default bench-results/.venv-compare)",
    )
    return p


def params_from(args):
    values = dataclasses.asdict(Params())
    if args.quick:
        values.update(QUICK)
    for arg, field in (
        ("runs", "runs"),
        ("tasks", "throughput"),
        ("latency_tasks", "latency"),
        ("deep", "deep"),
        ("connections", "many_connections"),
        ("compare_tasks", "compare"),
        ("redis", "redis"),
        ("postgres", "postgres"),
        ("compare_venv", "compare_venv"),
    ):
        value = getattr(args, arg)
        if value is not None:
            values[field] = value
    if args.tasks is not None:
        values["floor"] = args.tasks
    if args.pg_tasks is not None:
        values["pg_throughput"] = values["pg_compare"] = args.pg_tasks
    values["compare_venv"] = os.path.abspath(values["compare_venv"])
    params = Params(**values)
    for field in (
        "runs",
        "throughput",
        "latency",
        "priority_high",
        "many_connections",
        "many_tasks",
        "deep_drain",
        "alone",
        "floor",
        "compare",
        "pg_throughput",
        "pg_priority_high",
        "pg_compare",
    ):
        if getattr(params, field) < 1:
            raise BenchError(f"--{field.replace('_', '-')} must be at least 1")
    if params.deep < params.deep_drain:
        params.deep_drain = params.deep
    return params


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt()


def main(argv=None):
    p = parser()
    args = p.parse_args(argv)
    if args.list:
        for name, (_, line) in MEASURES.items():
            print(f"{name:<14} {line}")
        return 0
    try:
        params = params_from(args)
    except BenchError as e:
        p.error(str(e))
    chosen = _names(args.only, p) if args.only else list(MEASURES)
    if args.skip:
        skipped = set(_names(args.skip, p))
        chosen = [name for name in chosen if name not in skipped]
    chosen = [name for name in MEASURES if name in chosen]
    if not os.path.exists(TWISTD):
        print(
            f"benchmarks: error: {TWISTD} not found; run the suite with "
            "the project's virtualenv (make install, then make bench)",
            file=sys.stderr,
        )
        return 2
    try:
        os.makedirs(args.output, exist_ok=True)
    except OSError as e:
        print(
            f"benchmarks: error: cannot create {args.output}: {e.strerror}",
            file=sys.stderr,
        )
        return 2

    # However the suite was started (a background job ignores SIGINT),
    # Ctrl-C, SIGTERM and SIGHUP stop it cleanly.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGHUP, _raise_interrupt)
    started_at = datetime.now(UTC)
    began = time.monotonic()
    procs = Processes()
    root = tempfile.mkdtemp(prefix="taskbroker-bench-")
    ctx = Context(params, procs, root, chosen=chosen)
    values, details, errors, skipped = {}, {}, [], []
    interrupted = False
    # Others may commit or edit while the suite runs: say so if they did.
    at_start = machine()
    progress(
        f"measures: {', '.join(chosen)}; {params.runs} run(s) each; "
        f"temporary folders in {root}"
    )
    try:
        for name in chosen:
            function = MEASURES[name][0]
            for run in range(params.runs):
                run_began = time.monotonic()
                try:
                    out = function(ctx)
                except Skip as e:
                    skipped.append(f"{name}: {e}")
                    progress(f"{name}: skipped: {e}")
                    break
                except BenchError as e:
                    errors.append(f"{name} (run {run + 1}): {e}")
                    progress(f"{name} run {run + 1}: FAILED: {e}")
                    break
                except Exception as e:
                    # A bug in the suite: say where, and go on with the
                    # other measures rather than lose their results.
                    errors.append(
                        f"{name} (run {run + 1}): internal error: "
                        f"{type(e).__name__}: {e}"
                    )
                    progress(
                        f"{name} run {run + 1}: internal error in the "
                        "suite:\n" + traceback.format_exc().rstrip()
                    )
                    break
                finally:
                    # A measure that failed half-way leaves nothing behind.
                    procs.stop_all()
                    # And what it wrote reaches the disk now, not while the
                    # next run is timed.
                    os.sync()
                details.setdefault(name, []).append(out.pop("details", None))
                for key, value in out.items():
                    values.setdefault(key, []).append(value)
                shown = ", ".join(
                    f"{key.split('.', 1)[1]} {value:,.2f}"
                    for key, value in out.items()
                )
                progress(
                    f"{name} run {run + 1}/{params.runs} "
                    f"({time.monotonic() - run_began:.0f} s): {shown}"
                )
    except KeyboardInterrupt:
        interrupted = True
        progress("interrupted: stopping every process the suite started")
    finally:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            procs.stop_all()
        finally:
            signal.signal(signal.SIGINT, previous)
        if args.keep:
            progress(f"temporary folders kept in {root}")
        elif errors:
            # The logs say what went wrong; the databases are large.
            _drop_databases(root)
            progress(f"logs kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)

    at_end = machine()
    if at_end.get("commit") != at_start.get("commit"):
        ctx.notes.append(
            f"the code changed during the run: commit {at_start['commit']} "
            f"at the start, {at_end['commit']} at the end"
        )
    report = {
        "started_at": started_at.strftime("%Y-%m-%d %H:%M UTC"),
        "duration_s": time.monotonic() - began,
        "quick": args.quick,
        "interrupted": interrupted,
        "measures": chosen,
        "params": dataclasses.asdict(params),
        "machine": at_start,
        "defaults": daemon_defaults(),
        "compare": ctx.compare_versions,
        "compare_pg": ctx.compare_pg_versions,
        "rows": summarise(params, values),
        "values": values,
        "details": details,
        "errors": errors,
        "skipped": skipped,
        "notes": ctx.notes,
    }
    if "floor" not in chosen:
        report["notes"].append("the floor was not run: no ratios")
    text = table(report)
    print(text)
    stamp = started_at.strftime("%Y%m%dT%H%M%SZ")
    for name in ("latest", stamp):
        with open(os.path.join(args.output, name + ".json"), "w") as f:
            json.dump(report, f, indent=1)
            f.write("\n")
        with open(os.path.join(args.output, name + ".txt"), "w") as f:
            f.write(text + "\n")
    progress(
        f"written to {os.path.join(args.output, 'latest.json')} and latest.txt"
    )
    if interrupted:
        return 130
    missed = [row["key"] for row in report["rows"] if row["met"] is False]
    if args.fail_on_miss and missed:
        progress("targets missed: " + ", ".join(missed))
        return 1
    return 1 if errors or (args.fail_on_miss and skipped) else 0


def _drop_databases(root):
    for folder, _, files in os.walk(root):
        for name in files:
            if ".sqlite" in name:
                try:
                    os.remove(os.path.join(folder, name))
                except OSError:
                    pass
