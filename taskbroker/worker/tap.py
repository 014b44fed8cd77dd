# -*- test-case-name: tests.unit.test_tap -*-
"""
``twistd taskworker``: the worker's command line.
"""

import os
import sys
import time

from taskbroker._tap import DaemonOptions, exit_with
from taskbroker.config import WORKER_SETTINGS, resolve, worker_config
from taskbroker.errors import ConfigError


class Options(DaemonOptions):
    """
    ``twistd taskworker [options]``: one option per field of
    :class:`taskbroker.config.WorkerConfig`.
    """

    synopsis = (
        "[options]\n\nRun tasks handed out by a taskbroker, one per free "
        "slot.\nEvery option can also be set with an environment variable "
        "TASKWORKER_<OPTION>\n(e.g. TASKWORKER_CONCURRENCY); the command "
        "line wins."
    )
    settings = WORKER_SETTINGS
    prefix = "TASKWORKER_"
    command = "taskworker"
    build_config = staticmethod(worker_config)

    def opt_list_handlers(self):
        """
        Print the handlers this worker would load, from where, and what
        failed to load, then exit (1 if anything failed); nothing starts.
        """
        [setting] = [s for s in self.settings if s.field == "handlers_path"]
        self._listing = setting

    # usage.Options shows a docstring's line breaks and indentation as
    # they are.
    opt_list_handlers.__doc__ = " ".join(
        (opt_list_handlers.__doc__ or "").split()
    )

    _listing = None

    def postOptions(self):
        if self._listing is None:
            return DaemonOptions.postOptions(self)
        # An action: only the folders matter, from the command line or
        # the environment, as the worker would take them.
        try:
            paths = resolve(
                [self._listing],
                self.prefix,
                {"handlers_path": self["handlers_path"]},
                os.environ,
            )["handlers_path"]
        except ConfigError as e:
            sys.stderr.write(f"twistd {self.command}: {e}\n")
            raise SystemExit(2) from None
        raise SystemExit(list_handlers(paths, sys.stdout))

    @staticmethod
    def load_curve(config):
        # Imported here: the keys bring zmq, which --help does not need.
        from taskbroker import curve

        return curve.load_peer_keys(
            config.curve_server_key, config.curve_secret_key, "worker"
        )


def list_handlers(paths, out):
    """
    Load the handlers of ``paths`` as the worker would, and print them and
    the problems met.

    :returns: the exit status: 0, or 1 if something failed to load.
    """
    from twisted.logger import LogLevel, capturedLogs, formatEvent

    from taskbroker.worker.handlers import load_handlers, origin

    with capturedLogs() as events:
        handlers = load_handlers(paths)
    rows = [("HANDLER", "KIND", "TIME LIMIT", "FROM")]
    for name in sorted(handlers):
        handler = handlers[name]
        limit = getattr(handler, "time_limit", None)
        rows.append(
            (
                name,
                "blocking" if handler.blocking else "in the reactor",
                "-" if limit is None else f"{limit:g} s",
                origin(handler),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        out.write(
            "  ".join(
                cell.ljust(width) for cell, width in zip(row, widths + [0])
            ).rstrip()
            + "\n"
        )
    problems = [
        (e["log_level"], formatEvent(e))
        for e in events
        if e.get("log_level") in (LogLevel.warn, LogLevel.error)
    ]
    for level, text in problems:
        out.write(f"{level.name}: {text}\n")
    return 1 if any(level == LogLevel.error for level, _ in problems) else 0


def makeService(options):
    """
    Load the handlers and make the worker service, bound to the real
    reactor.
    """
    from twisted.internet import reactor

    from taskbroker.worker.handlers import load_handlers
    from taskbroker.worker.service import make_worker_service

    config = options.config
    handlers = load_handlers(config.handlers_path)
    return make_worker_service(
        config,
        handlers,
        reactor,
        on_fatal=lambda message: exit_with(reactor, 1),
        monotonic=time.monotonic,
        curve=options.curve,
    )
