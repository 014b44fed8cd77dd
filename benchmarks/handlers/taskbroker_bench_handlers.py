"""
A handler for the benchmarks' latency measures, loaded by their workers
with ``--handlers-path benchmarks/handlers``.

``stamp`` is ``echo`` that also says when it started: its result is the
worker's ``time.time()`` as the handler ran.  The suite compares that with
the client's clock (one machine) to measure submit->start as a worker sees
it, not as the store's ``started_at`` records the broker's decision.
"""

import time

from twisted.plugin import IPlugin
from zope.interface import implementer

from taskbroker.interfaces import ITaskHandler


@implementer(IPlugin, ITaskHandler)
class Stamp:
    """
    Returns the time it ran, as a Unix time in seconds.
    """

    name = "stamp"
    blocking = False

    def run(self, task):
        return time.time()


stamp = Stamp()
