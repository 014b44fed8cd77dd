"""
What the measures share: the processes the suite starts (and always stops),
waiting for a log line, reading a broker's database and /proc, statistics,
and a description of the machine.

Every process is started in its own session with its output in a log file
in a temporary folder, and is stopped by its pid: SIGTERM, then SIGKILL
after a timeout.  Nothing here kills by name.
"""

import math
import os
import platform
import re
import socket
import sqlite3
import subprocess
import sys
import time
from contextlib import closing

from taskbroker import _daemons
from taskbroker._daemons import DaemonError

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

BIN = os.path.dirname(sys.executable)
TWISTD = os.path.join(BIN, "twistd")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
#: A wait for tasks gives up when none finished for this long (seconds).
STALL = 60.0


class BenchError(Exception):
    """
    An expected failure (a daemon did not start, a task failed, a time-out):
    reported as one line, never as a traceback.
    """


class Skip(BenchError):
    """
    A measure that cannot run here (no Redis, no comparison virtualenv):
    noted in the report, not a failure.
    """


# -- processes -----------------------------------------------------------


def child_env(extra=None):
    """
    The environment for a started process: ours, without any
    ``TASKBROKER_*`` or ``TASKWORKER_*`` variable, so that the daemons run
    with their built-in defaults.
    """
    return _daemons.clean_environment(extra)


class Process(_daemons.Daemon):
    """
    A started process (see :mod:`taskbroker._daemons`, which the demo and
    the integration tests use too), in a session of its own so that a
    Ctrl-C in the terminal reaches the suite alone, which then stops
    everything in order; its output goes to ``NAME.log`` in its folder.
    Its errors are :class:`BenchError` s.
    """

    server = False

    def __init__(self, name, argv, folder, env=None):
        try:
            _daemons.Daemon.__init__(
                self,
                name,
                argv,
                folder,
                env=child_env() if env is None else env,
                log_path=os.path.join(folder, f"{name}.log"),
                new_session=True,
            )
        except DaemonError as e:
            raise BenchError(str(e)) from None

    def check(self):
        """
        :raises BenchError: if the process has exited.
        """
        try:
            _daemons.Daemon.check(self)
        except DaemonError as e:
            raise BenchError(str(e)) from None

    def wait_for(self, pattern, timeout, what=None, watched=()):
        """
        Wait until a line of its output after the last one found matches
        ``pattern``.

        :param watched: other processes that must stay alive meanwhile.
        :returns: the match.
        :raises BenchError: if the process (or a watched one) exits first,
            or time runs out.
        """
        try:
            return _daemons.Daemon.wait_for(
                self,
                pattern,
                timeout,
                start=self.after_match,
                what=what,
                watched=watched,
            )
        except DaemonError as e:
            raise BenchError(str(e)) from None

    def wait_exit(self, timeout):
        """
        Wait for the process to exit by itself.

        :returns: its exit status.
        :raises BenchError: on time-out.
        """
        try:
            return _daemons.Daemon.wait_exit(self, timeout)
        except DaemonError as e:
            raise BenchError(str(e)) from None


class Processes:
    """
    Everything the suite started; :meth:`stop_all` stops what is still
    running, however the suite ends.
    """

    def __init__(self):
        self._running = []

    def start(self, name, argv, folder, env=None):
        process = Process(name, argv, folder, env)
        self._running.append(process)
        return process

    def stop(self, *processes, timeout=10.0):
        """
        SIGTERM each, wait up to ``timeout`` seconds for all, then SIGKILL
        those left (and anything left in their sessions, such as a Celery
        pool's children).
        """
        _daemons.stop_all(processes, timeout)
        for process in processes:
            if process in self._running:
                self._running.remove(process)

    def stop_all(self):
        if self._running:
            self.stop(*reversed(self._running), timeout=5.0)


def free_port():
    """
    A TCP port on 127.0.0.1 that nothing listens on right now.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- /proc ---------------------------------------------------------------


def cpu_seconds(pid):
    """
    User plus system CPU time of a process so far (its own threads, not its
    children), from /proc/<pid>/stat.
    """
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        raise BenchError(
            f"cannot read /proc/{pid}/stat (process gone?)"
        ) from None
    # After the command name: state is field 3, utime 14, stime 15.
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def memory_kib(pid, key):
    """
    A ``VmRSS``/``VmHWM``-style value of /proc/<pid>/status, in KiB.
    """
    try:
        with open(f"/proc/{pid}/status") as f:
            text = f.read()
    except OSError:
        raise BenchError(
            f"cannot read /proc/{pid}/status (process gone?)"
        ) from None
    match = re.search(rf"^{key}:\s+(\d+) kB", text, re.M)
    return int(match.group(1)) if match else None


# -- the broker's database -----------------------------------------------


def read_only(path):
    """
    A read-only connection to a broker's SQLite file.  The broker keeps it
    in WAL mode, so reading it while the broker runs blocks nobody.
    """
    try:
        connection = sqlite3.connect(
            f"file:{path}?mode=ro",
            uri=True,
            timeout=30,
            isolation_level=None,
            check_same_thread=False,
        )
        connection.execute("PRAGMA busy_timeout = 30000")
    except sqlite3.Error as e:
        raise BenchError(f"cannot read the database {path}: {e}") from None
    return connection


def wait_done(path, expected, watched, timeout, poll=0.05):
    """
    Wait until ``expected`` tasks of the database at ``path`` have
    succeeded.

    :param watched: processes that must stay alive meanwhile.
    :returns: ``(min created_at, min started_at, max finished_at)`` of the
        succeeded tasks.
    :raises BenchError: a task failed, a process died, or time ran out.
    """
    progressed = time.monotonic()
    deadline = progressed + timeout
    last_done = -1
    with closing(read_only(path)) as db:
        while True:
            # Two range scans of the (state, id) index: cheap however
            # many tasks are queued.
            done = db.execute(
                "SELECT COUNT(*) FROM tasks WHERE state = 'succeeded'"
            ).fetchone()[0]
            bad = db.execute(
                "SELECT COUNT(*) FROM tasks "
                "WHERE state IN ('failed', 'cancelled')"
            ).fetchone()[0]
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
                    "SELECT MIN(created_at), MIN(started_at), "
                    "MAX(finished_at) FROM tasks WHERE state = 'succeeded'"
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


# -- statistics ----------------------------------------------------------


def percentile(values, q):
    """
    The ``q``-th percentile (0 to 100), linearly interpolated between the
    closest ranks (as numpy's default does).
    """
    if not values:
        return math.nan
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100.0
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def median(values):
    return percentile(values, 50)


# -- the machine ---------------------------------------------------------


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware")):
                    return " ".join(line.split(":", 1)[1].split())
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _memory_gib():
    try:
        with open("/proc/meminfo") as f:
            kib = int(re.search(r"MemTotal:\s+(\d+)", f.read()).group(1))
        return round(kib / 1024 / 1024, 1)
    except (OSError, AttributeError):
        return None


def _version(module_name, attribute="__version__"):
    try:
        module = __import__(module_name)
        return str(getattr(module, attribute))
    except Exception:
        return "unknown"


def _git(*args):
    # --no-optional-locks: reading never writes the index.
    try:
        out = subprocess.run(
            ["git", "--no-optional-locks", "-C", ROOT, *args],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _commit():
    """
    The commit measured, and whether taskbroker/ differs from it.
    """
    commit = _git("rev-parse", "--short", "HEAD")
    if commit is None:
        return None
    changed = _git(
        "status", "--porcelain", "--untracked-files=no", "--", "taskbroker"
    )
    return commit + (
        " + uncommitted changes in taskbroker/" if changed else ""
    )


def machine():
    """
    What the numbers depend on: the processor, the cores, the software.
    """
    import zmq

    try:
        from importlib.metadata import version

        taskbroker_version = version("taskbroker")
    except Exception:
        taskbroker_version = "unknown"
    try:
        cpus_usable = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus_usable = os.cpu_count()
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": cpus_usable,
        "memory_gib": _memory_gib(),
        "kernel": f"{platform.system()} {platform.release()}",
        "python": f"{platform.python_implementation()} "
        f"{platform.python_version()}",
        "sqlite": sqlite3.sqlite_version,
        "libzmq": zmq.zmq_version(),
        "pyzmq": zmq.__version__,
        "twisted": _version("twisted"),
        "taskbroker": taskbroker_version,
        "commit": _commit(),
    }


def daemon_defaults():
    """
    The broker's and the worker's built-in settings, as their option
    tables declare them (so a changed default shows up here by itself).
    """

    def table(settings):
        values = {}
        for setting in settings:
            value = setting.default
            if isinstance(value, tuple):
                value = ",".join(value) or "none"
            values[setting.option] = "unset" if value is None else value
        return values

    try:
        from taskbroker.config import BROKER_SETTINGS, WORKER_SETTINGS
    except Exception as e:
        return {"error": f"cannot read taskbroker.config: {e}"}
    return {"broker": table(BROKER_SETTINGS), "worker": table(WORKER_SETTINGS)}
