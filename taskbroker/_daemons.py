"""
Starting, watching and stopping child processes such as ``twistd
taskbroker`` and ``twistd taskworker``: the one way the demo, the
integration tests and the benchmarks run the daemons.

A thread reads each process's output (standard output and error
together), copies it to a log file if asked, and keeps its lines; a caller
waits for a line with :meth:`Daemon.wait_for`, which blocks on a condition
variable until the line comes, never on a fixed sleep.  Processes are
stopped by pid, and with their whole session when they have one.
"""

import os
import re
import signal
import subprocess
import sys
import threading
import time

#: The ``twistd`` of the Python running this.
TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")

#: How long a wait for a line lasts unless told otherwise, in seconds.
WAIT = 30.0


class DaemonError(Exception):
    """
    A process exited, or did not say what was waited for in time.  The
    message is one line; :attr:`output` has the process's last lines.
    """

    def __init__(self, message, output=""):
        Exception.__init__(self, message)
        self.output = output


def clean_environment(extra=None):
    """
    This process's environment without any ``TASKBROKER_*`` or
    ``TASKWORKER_*`` variable, so that daemons run with their built-in
    defaults, and with unbuffered Python output.
    """
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("TASKBROKER_", "TASKWORKER_"))
    }
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def twistd(command, *args):
    """
    The command line of a daemon in the foreground, without a pidfile (so
    that several can share a folder), logging to its standard output.
    """
    return [TWISTD, "--pidfile=", "-n", command, *args]


class Daemon:
    """
    One started process and the lines it has written so far.

    :param name: what messages call it.
    :param argv: its command line.
    :param cwd: its working folder.
    :param env: its environment (default :func:`clean_environment`).
    :param log_path: a file to copy its output to, or ``None``.
    :param new_session: start it in a session of its own, so that a
        Ctrl-C in the terminal reaches only the caller (which then stops
        everything in order), and :meth:`stop` stops what it started too.
    :raises DaemonError: if it cannot be started.
    """

    def __init__(
        self, name, argv, cwd, env=None, log_path=None, new_session=False
    ):
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self.lines = []
        #: The index of the line after the last one :meth:`wait_for` found.
        self.after_match = 0
        self._new_session = new_session
        self._changed = threading.Condition()
        try:
            self.process = subprocess.Popen(
                argv,
                cwd=cwd,
                env=clean_environment() if env is None else env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=new_session,
            )
        except OSError as e:
            raise DaemonError(
                f"cannot start {name} ({argv[0]}): {e.strerror}"
            ) from None
        self.pid = self.process.pid
        self._log = open(log_path, "ab") if log_path is not None else None
        self._reader = threading.Thread(
            target=self._read, daemon=True, name=f"output of {name}"
        )
        self._reader.start()

    def __repr__(self):
        return f"<Daemon {self.name} pid {self.pid}>"

    def _read(self):
        try:
            for raw in self.process.stdout:
                if self._log is not None:
                    self._log.write(raw)
                    self._log.flush()
                with self._changed:
                    self.lines.append(
                        raw.decode("utf-8", "replace").rstrip("\r\n")
                    )
                    self._changed.notify_all()
        finally:
            self.process.wait()
            if self._log is not None:
                self._log.close()
            with self._changed:
                self._changed.notify_all()

    def wait_for(self, pattern, timeout=WAIT, start=0, what=None, watched=()):
        """
        Wait until a line matching ``pattern`` (a regex) appears.

        :param start: ignore lines before this index (see :meth:`mark`).
        :param what: how to name the line in an error (default the
            pattern).
        :param watched: other :class:`Daemon` s that must stay alive
            meanwhile.
        :returns: the ``re.Match``.
        :raises DaemonError: if this process (or a watched one) exits
            first, or time runs out.
        """
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        index = start
        with self._changed:
            while True:
                while index < len(self.lines):
                    match = regex.search(self.lines[index])
                    index += 1
                    if match:
                        self.after_match = index
                        return match
                if not self._reader.is_alive():
                    raise DaemonError(
                        f"{self.name} exited with status "
                        f"{self.process.returncode} before it said "
                        f"{what or pattern!r}: {self.last_line()}",
                        self.output(),
                    )
                for other in watched:
                    other.check()
                left = deadline - time.monotonic()
                if left <= 0:
                    raise DaemonError(
                        f"{self.name} did not say {what or pattern!r} within "
                        f"{timeout:g} s (last output: {self.last_line()})",
                        self.output(),
                    )
                # Watched processes are looked at every second.
                self._changed.wait(min(left, 1.0) if watched else left)

    def mark(self):
        """
        The index of the next line, for :meth:`wait_for`'s ``start``.
        """
        with self._changed:
            return len(self.lines)

    def output(self, count=60):
        """
        Its last ``count`` lines, as one text.
        """
        with self._changed:
            return "\n".join(self.lines[-count:])

    def last_line(self):
        """
        Its last line that says something, without twistd's time and
        logger prefix, for a one-line error.
        """
        with self._changed:
            lines = [line for line in self.lines[-20:] if line.strip()]
        if not lines:
            return "(no output)"
        return re.sub(r"^\S+ \[[^\]]*\] ", "", lines[-1]).strip()[:300]

    def alive(self):
        return self.process.poll() is None

    def check(self):
        """
        :raises DaemonError: if the process has exited.
        """
        code = self.process.poll()
        if code is not None:
            raise DaemonError(
                f"{self.name} exited with status {code}: {self.last_line()}",
                self.output(),
            )

    def wait_exit(self, timeout=WAIT):
        """
        Wait for the process to exit by itself.

        :returns: its exit status.
        :raises DaemonError: on time-out.
        """
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise DaemonError(
                f"{self.name} did not exit within {timeout:g} s (last "
                f"output: {self.last_line()})",
                self.output(),
            ) from None
        self._reader.join(timeout)
        return code

    def signal(self, signum):
        """
        Send a signal to the process, if it still runs.
        """
        if self.process.poll() is None:
            _kill(self.pid, signum)

    def stop(self, timeout=15.0):
        """
        ``SIGTERM``, then ``SIGKILL`` if it has not exited in time.

        :returns: its exit status.
        """
        return stop_all([self], timeout)[0]


def stop_all(daemons, timeout=15.0):
    """
    Stop several at once: ``SIGTERM`` to each, a shared deadline, then
    ``SIGKILL`` for those left (and for anything left in their sessions).

    :returns: their exit statuses, in order.
    """
    for daemon in daemons:
        daemon.signal(signal.SIGCONT)  # a stopped process cannot exit
        daemon.signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for daemon in daemons:
        try:
            daemon.process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _kill(daemon.pid, signal.SIGKILL)
            daemon.process.wait()
        if daemon._new_session:
            # The session's group id is the pid of the process started.
            _kill_group(daemon.pid, signal.SIGKILL)
        daemon._reader.join(timeout)
    return [daemon.process.returncode for daemon in daemons]


def _kill(pid, signum):
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def _kill_group(pgid, signum):
    try:
        os.killpg(pgid, signum)
    except (ProcessLookupError, PermissionError):
        pass
