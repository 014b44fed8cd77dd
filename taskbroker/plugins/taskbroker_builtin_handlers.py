# -*- test-case-name: tests.unit.test_handlers -*-
"""
The handlers every worker has: ``echo`` and ``sleep``.

(The module's unusual name keeps it from clashing with, and silently
hiding, a user's handler module in a ``--handlers-path`` folder.)
"""

from twisted.internet.task import deferLater
from twisted.plugin import IPlugin
from zope.interface import implementer

from taskbroker.interfaces import ITaskHandler

#: The longest ``sleep`` accepts (seconds).
MAX_SLEEP = 24 * 3600


@implementer(IPlugin, ITaskHandler)
class Echo:
    """
    Returns its payload: a no-op for tests and benchmarks.
    """

    name = "echo"
    blocking = False

    def run(self, task):
        return task.payload


@implementer(IPlugin, ITaskHandler)
class Sleep:
    """
    Waits ``{"seconds": N}`` without blocking and returns the time slept.
    """

    name = "sleep"
    blocking = False

    def run(self, task):
        payload = task.payload
        seconds = payload.get("seconds") if isinstance(payload, dict) else None
        if (
            isinstance(seconds, bool)
            or not isinstance(seconds, (int, float))
            or not 0 <= seconds <= MAX_SLEEP
        ):
            raise ValueError(
                'sleep needs a payload {"seconds": N} with 0 <= N <= '
                f"{MAX_SLEEP}"
            )
        clock = task.clock
        started = clock.seconds()
        return deferLater(clock, seconds, lambda: clock.seconds() - started)


echo = Echo()
sleep = Sleep()
