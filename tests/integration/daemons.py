"""
Real ``twistd taskbroker`` and ``twistd taskworker`` processes for the
integration tests.

Each process's output is read by a thread; tests wait for log lines with
:meth:`Daemon.wait_for`, which blocks on a condition variable until the
line arrives (or a timeout fails the test), never on a fixed sleep.
Processes are stopped by pid, always, by the fixture that started them.
"""

import os
import re
import signal
import subprocess
import sys
import threading
import time

BIN = os.path.dirname(sys.executable)
TWISTD = os.path.join(BIN, "twistd")
CLI = os.path.join(BIN, "taskbroker")
HANDLERS = os.path.join(os.path.dirname(__file__), "handlers")

#: How long a test waits for a daemon's log line before failing.
WAIT = 30.0


def clean_environment():
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("TASKBROKER_", "TASKWORKER_"))}
    env["PYTHONUNBUFFERED"] = "1"
    return env


class Daemon:
    """
    One running process and the lines it has written so far.
    """

    def __init__(self, name, argv, cwd, env=None):
        self.name = name
        self.argv = argv
        self.lines = []
        self._changed = threading.Condition()
        self.process = subprocess.Popen(
            argv, cwd=cwd, env=env or clean_environment(),
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, bufsize=1)
        self.pid = self.process.pid
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.process.stdout:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        self.process.wait()
        with self._changed:
            self._changed.notify_all()

    def wait_for(self, pattern, timeout=WAIT, start=0):
        """
        Wait until a line matching ``pattern`` (a regex) appears.

        :param start: ignore lines before this index.
        :returns: the ``re.Match``.
        """
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._changed:
            index = start
            while True:
                while index < len(self.lines):
                    match = regex.search(self.lines[index])
                    index += 1
                    if match:
                        return match
                if self.process.poll() is not None and not self._reader.is_alive():
                    raise AssertionError(
                        f"{self.name} exited ({self.process.returncode}) "
                        f"before logging {pattern!r}:\n" + self.output())
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"{self.name} did not log {pattern!r} within "
                        f"{timeout}s:\n" + self.output())
                self._changed.wait(left)

    def mark(self):
        """
        The index of the next line, for :meth:`wait_for` ``start``.
        """
        with self._changed:
            return len(self.lines)

    def output(self):
        with self._changed:
            return "\n".join(self.lines[-60:])

    def wait_exit(self, timeout=WAIT):
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"{self.name} did not exit within {timeout}s:\n"
                + self.output()) from None
        self._reader.join(timeout)
        return code

    def signal(self, signum):
        if self.process.poll() is None:
            os.kill(self.pid, signum)

    def stop(self, timeout=15.0):
        """
        SIGTERM, then SIGKILL if it does not exit in time.
        """
        if self.process.poll() is None:
            self.signal(signal.SIGCONT)
            self.signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.process.wait(timeout)
        self._reader.join(timeout)
        self.process.stdout.close()
        return self.process.returncode

    def alive(self):
        return self.process.poll() is None


class Cluster:
    """
    Starts brokers and workers in one folder and stops them all at the end.
    """

    def __init__(self, folder):
        self.folder = str(folder)
        self.daemons = []
        self.endpoint = None
        self.database = "sqlite:///tasks.sqlite"
        self.broker = None

    def start_broker(self, *args, listen="tcp://127.0.0.1:*", wait=True,
                     database=None):
        """
        Start a broker; by default wait until it listens and remember its
        endpoint.
        """
        argv = [TWISTD, "--pidfile=", "-n", "taskbroker",
                "--listen", listen, "--database", database or self.database,
                *args]
        daemon = Daemon("broker", argv, self.folder)
        self.daemons.append(daemon)
        if wait:
            match = daemon.wait_for(r"taskbroker ready: listening on (\S+),")
            self.endpoint = match.group(1)
            self.broker = daemon
        return daemon

    def start_worker(self, *args, name=None, wait=True, handlers=True,
                     env=None):
        """
        Start a worker of the current broker; by default wait until the
        broker has welcomed it.
        """
        argv = [TWISTD, "--pidfile=", "-n", "taskworker",
                "--broker", self.endpoint]
        if name is not None:
            argv += ["--name", name]
        if handlers:
            argv += ["--handlers-path", HANDLERS]
        argv += list(args)
        environment = clean_environment()
        environment.update(env or {})
        daemon = Daemon(f"worker {name}", argv, self.folder, environment)
        self.daemons.append(daemon)
        if wait:
            daemon.wait_for(r"welcomed by broker")
        return daemon

    def cli(self, *args, timeout=60, input=None):
        """
        Run the ``taskbroker`` command against the current broker.

        :returns: the ``CompletedProcess`` (text output).
        """
        return subprocess.run(
            [CLI, "--broker", self.endpoint, *args], cwd=self.folder,
            env=clean_environment(), capture_output=True, text=True,
            timeout=timeout, input=input)

    def stop_all(self):
        for daemon in reversed(self.daemons):
            daemon.stop()
