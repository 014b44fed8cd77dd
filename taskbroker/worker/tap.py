# -*- test-case-name: tests.unit.test_tap -*-
"""
``twistd taskworker``: the worker's command line.
"""

import time

from taskbroker._tap import DaemonOptions, exit_with
from taskbroker.config import WORKER_SETTINGS, worker_config


class Options(DaemonOptions):
    """
    ``twistd taskworker [options]``: one option per field of
    :class:`taskbroker.config.WorkerConfig`.
    """

    synopsis = (
        "[options]\n\nRun tasks handed out by a taskbroker, one per free "
        "slot.\nEvery option can also be set with an environment variable "
        "TASKWORKER_<OPTION>\n(e.g. TASKWORKER_CONCURRENCY); the command "
        "line wins.")
    settings = WORKER_SETTINGS
    prefix = "TASKWORKER_"
    command = "taskworker"
    build_config = staticmethod(worker_config)

    @staticmethod
    def load_curve(config):
        # Imported here: the keys bring zmq, which --help does not need.
        from taskbroker import curve

        return curve.load_peer_keys(config.curve_server_key,
                                    config.curve_secret_key, "worker")


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
    return make_worker_service(config, handlers, reactor,
                               on_fatal=lambda message: exit_with(reactor, 1),
                               monotonic=time.monotonic, curve=options.curve)
