"""
Handlers for the integration tests, loaded by workers started with
``--handlers-path tests/integration/handlers``.
"""

import os
import time

from twisted.internet.task import deferLater
from twisted.plugin import IPlugin
from zope.interface import implementer

from taskbroker.interfaces import ITaskHandler


@implementer(IPlugin, ITaskHandler)
class Record:
    """
    Waits ``payload["seconds"]`` (default 0) and reports who ran it, when.
    """

    name = "record"
    blocking = False

    def run(self, task):
        started = time.time()
        seconds = (task.payload or {}).get("seconds", 0)

        def done():
            return {"pid": os.getpid(), "attempt": task.attempt,
                    "started": started, "ended": time.time()}

        return deferLater(task.clock, seconds, done)


@implementer(IPlugin, ITaskHandler)
class BlockingSpin:
    """
    Blocks its thread for ``payload["seconds"]``.
    """

    name = "blocking-sleep"
    blocking = True

    def run(self, task):
        time.sleep(task.payload["seconds"])
        return task.payload["seconds"]


@implementer(IPlugin, ITaskHandler)
class Fail:
    """
    Always fails.
    """

    name = "fail"
    blocking = False

    def run(self, task):
        raise RuntimeError("failed on purpose")


record = Record()
blocking_sleep = BlockingSpin()
fail = Fail()
