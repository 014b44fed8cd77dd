# -*- test-case-name: tests.unit.test_worker -*-
"""
The task object a handler receives, shared by the worker process and its
handler processes (so it imports neither ZeroMQ nor the reactor).
"""

from zope.interface import implementer

from taskbroker.interfaces import ITask
from taskbroker.worker.progress import checked


@implementer(ITask)
class RunningTask:
    """
    What a handler receives, built from a ``TASK`` message's body.

    :param clock: the ``IReactorTime`` of the worker for handlers running
        in the reactor; in a handler process, where no reactor runs, an
        object offering only ``seconds()``.
    :param report: called with ``(fraction, message)`` for each
        :meth:`progress` report, from the thread that reports; or
        ``None`` to drop them.
    """

    __slots__ = (
        "id",
        "handler",
        "payload",
        "priority",
        "attempt",
        "max_attempts",
        "token",
        "clock",
        "_report",
    )

    def __init__(self, body, clock, report=None):
        self.id = body["id"]
        self.handler = body["handler"]
        self.payload = body.get("payload")
        self.priority = body["priority"]
        self.attempt = body["attempt"]
        self.max_attempts = body["max_attempts"]
        self.token = body.get("token", 0)
        self.clock = clock
        self._report = report

    def progress(self, fraction, message=None):
        """
        See :meth:`taskbroker.interfaces.ITask.progress`.
        """
        fraction, message = checked(fraction, message)
        if self._report is not None:
            self._report(fraction, message)

    def __repr__(self):
        return f"<task {self.id} {self.handler} attempt {self.attempt}>"
