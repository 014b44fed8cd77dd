# -*- test-case-name: tests.unit.test_tap -*-
"""
``twistd taskbroker``: the broker's command line.
"""

import faulthandler
import signal
import sys

from taskbroker._tap import DaemonOptions, exit_with
from taskbroker.config import BROKER_SETTINGS, broker_config


class Options(DaemonOptions):
    """
    ``twistd taskbroker [options]``: one option per field of
    :class:`taskbroker.config.BrokerConfig`.
    """

    synopsis = (
        "[options]\n\nKeep tasks in a database and hand each one to a worker "
        "that asked for work.\nEvery option can also be set with an "
        "environment variable TASKBROKER_<OPTION>\n(e.g. "
        "TASKBROKER_DATABASE); the command line wins."
    )
    settings = BROKER_SETTINGS
    prefix = "TASKBROKER_"
    command = "taskbroker"
    build_config = staticmethod(broker_config)

    @staticmethod
    def load_curve(config):
        # Imported here: the keys bring zmq, which --help does not need.
        from taskbroker.broker import keys

        return keys.load(config)


def makeService(options):
    """
    Turn parsed options into the broker service, bound to the real reactor.
    """
    from twisted.internet import reactor

    from taskbroker.broker.service import BrokerService
    from taskbroker.store import store_from_url

    config = options.config
    _report_crashes()
    store = store_from_url(
        config.database,
        reactor,
        synchronous=config.sqlite_synchronous,
        create_database=config.create_database,
        levels=config.priorities,
        default_priority=config.default_priority,
        lease=config.lease,
    )
    service = BrokerService(
        config,
        store,
        reactor,
        on_fatal=lambda message: exit_with(reactor, 1),
        curve=options.curve,
    )
    # SIGHUP: read the authorization folders now.
    signal.signal(
        signal.SIGHUP,
        lambda signum, frame: reactor.callFromThread(service.reload_keys),
    )
    return service


def _report_crashes():
    """
    Have Python write every thread's stack to standard error if the
    process dies of a fault in C code.  SQLite maps the database's -shm
    file into memory: when another program truncates that file, the
    broker's next look at it ends the process with ``SIGBUS`` at once,
    with no chance to log a line.
    """
    try:
        faulthandler.enable(file=sys.__stderr__, all_threads=True)
    except (AttributeError, ValueError, OSError):
        pass  # no standard error to write to (a closed descriptor)
