"""
Real ``twistd taskbroker`` and ``twistd taskworker`` processes for the
integration tests, started with :mod:`taskbroker._daemons` (as the demo
and the benchmarks start theirs).

Tests wait for log lines with :meth:`Daemon.wait_for`, which blocks on a
condition variable until the line arrives (or a timeout fails the test),
never on a fixed sleep.  Processes are stopped by pid, always, by the
fixture that started them.
"""

import os
import subprocess
import sys

from taskbroker import _daemons
from taskbroker._daemons import DaemonError, clean_environment

BIN = os.path.dirname(sys.executable)
CLI = os.path.join(BIN, "taskbroker")
HANDLERS = os.path.join(os.path.dirname(__file__), "handlers")

#: How long a test waits for a daemon's log line before failing.
WAIT = _daemons.WAIT


class Daemon(_daemons.Daemon):
    """
    A daemon whose failed waits fail the test with its last lines.
    """

    def wait_for(self, pattern, timeout=WAIT, start=0):
        try:
            return _daemons.Daemon.wait_for(self, pattern, timeout, start)
        except DaemonError as e:
            raise AssertionError(f"{e}\n{e.output}") from None

    def wait_exit(self, timeout=WAIT):
        try:
            return _daemons.Daemon.wait_exit(self, timeout)
        except DaemonError as e:
            raise AssertionError(f"{e}\n{e.output}") from None


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

    def start_broker(
        self,
        *args,
        listen="tcp://127.0.0.1:*",
        wait=True,
        database=None,
        prefix=(),
    ):
        """
        Start a broker; by default wait until it listens and remember its
        endpoint.

        :param prefix: a command line to run it under, such as
            ``setpriv`` with its options.
        """
        if not any(
            arg.startswith("--http") and arg != "--http-token-file"
            for arg in args
        ):
            # A port of its own: tests run side by side.
            args = ("--http", "tcp:0:interface=127.0.0.1", *args)
        argv = [
            *prefix,
            *_daemons.twistd(
                "taskbroker",
                "--listen",
                listen,
                "--database",
                database or self.database,
                *args,
            ),
        ]
        daemon = Daemon("broker", argv, self.folder)
        self.daemons.append(daemon)
        if wait:
            match = daemon.wait_for(r"taskbroker ready: listening on (\S+),")
            self.endpoint = match.group(1)
            self.broker = daemon
        return daemon

    def start_worker(
        self, *args, name=None, wait=True, handlers=True, env=None
    ):
        """
        Start a worker of the current broker; by default wait until the
        broker has welcomed it.
        """
        argv = _daemons.twistd("taskworker", "--broker", self.endpoint)
        if name is not None:
            argv += ["--name", name]
        if handlers:
            argv += ["--handlers-path", HANDLERS]
        argv += list(args)
        daemon = Daemon(
            f"worker {name}", argv, self.folder, clean_environment(env)
        )
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
            [CLI, "--broker", self.endpoint, *args],
            cwd=self.folder,
            env=clean_environment(),
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
        )

    def stop_all(self):
        for daemon in reversed(self.daemons):
            daemon.stop()
