# -*- test-case-name: tests.unit.test_tap -*-
"""
``twistd taskbroker``: the broker's command line.
"""

from taskbroker._tap import exit_with, options_class
from taskbroker.config import BROKER_SETTINGS, broker_config

Options = options_class(
    BROKER_SETTINGS, broker_config, "taskbroker",
    "[options]\n\nKeep tasks in a database and hand each one to a worker "
    "that asked for work.\nEvery option can also be set with an environment "
    "variable TASKBROKER_<OPTION>\n(e.g. TASKBROKER_DATABASE); the command "
    "line wins.",
)


def makeService(options):
    """
    Turn parsed options into the broker service, bound to the real reactor.
    """
    from twisted.internet import reactor

    from taskbroker.broker.service import BrokerService
    from taskbroker.store import store_from_url

    config = options.config
    store = store_from_url(config.database, reactor,
                           synchronous=config.sqlite_synchronous)
    return BrokerService(config, store, reactor,
                         on_fatal=lambda message: exit_with(reactor, 1))
