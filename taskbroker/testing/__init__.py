# -*- test-case-name: tests.unit.test_testing -*-
"""
Helpers for testing code that uses taskbroker: the broker's own tests, the
tests of handler plugins, of programs that talk to a broker, and of task
stores.

- for handler authors: :class:`FakeTask`, :func:`run_task`,
  :class:`RecordingHandler`, :func:`result_of`;
- for programs that talk to a broker: :mod:`taskbroker.testing.fakebroker`
  (:class:`~taskbroker.testing.fakebroker.FakeBroker`, a scripted broker
  on a real loopback socket);
- for store authors: :class:`MemoryStore`, :class:`SharedMemoryDatabase`
  and the contract suite, :mod:`taskbroker.testing.store_contract`.

Everything here is public API; see ``docs/testing.rst``.
"""

from dataclasses import dataclass, field

from twisted.internet.task import Clock
from twisted.plugin import IPlugin
from twisted.python.failure import Failure
from zope.interface import implementer

from taskbroker.interfaces import ITask, ITaskHandler
from taskbroker.store.memory import MemoryStore
from taskbroker.store.shared import SharedClaims, SharedMemoryDatabase
from taskbroker.worker.progress import checked

__all__ = [
    "FakeTask",
    "MemoryStore",
    "RecordingHandler",
    "SharedClaims",
    "SharedMemoryDatabase",
    "result_of",
    "run_task",
]


@implementer(ITask)
@dataclass
class FakeTask:
    """
    A task as a handler's ``run`` receives it, with a
    :class:`~twisted.internet.task.Clock` as its ``clock``: advance it to
    move the handler's time.

    :ivar reported: the ``(fraction, message)`` of each
        :meth:`progress` call, in order.
    """

    payload: object = None
    handler: str = "test"
    id: int = 1
    priority: str = "normal"
    attempt: int = 1
    max_attempts: int = 3
    token: int = 1
    clock: Clock = field(default_factory=Clock)
    reported: list = field(default_factory=list)

    def progress(self, fraction, message=None):
        """
        Check a report as the worker does, and record it.
        """
        self.reported.append(checked(fraction, message))


def run_task(handler, task, time_limit=None):
    """
    Run one task as the worker would and judge its outcome the same way: a
    result must be JSON-serialisable, an exception fails the attempt with
    its traceback, :class:`taskbroker.PermanentFailure` marks it
    permanent, and a time limit fails it when ``task.clock`` passes it.

    A handler with ``blocking = True`` is called here, in the test's
    thread (the worker runs it in a handler process).

    :param handler: an :class:`~taskbroker.interfaces.ITaskHandler`.
    :param task: an :class:`~taskbroker.interfaces.ITask`, such as a
        :class:`FakeTask`.
    :param time_limit: seconds, on ``task.clock``, or ``None``.
    :returns: a ``Deferred`` firing with an outcome whose ``state``
        (``"succeeded"`` or ``"failed"``), ``result``, ``error``,
        ``traceback`` and ``permanent`` are what the worker would report;
        cancel it to cancel the handler.
    """
    from taskbroker.worker.runner import run_handler

    return run_handler(handler, task, task.clock, time_limit)


@implementer(IPlugin, ITaskHandler)
class RecordingHandler:
    """
    A handler that records every task it runs, and answers with a fixed
    result (or fails with a fixed exception): a stand-in for a real
    handler where what matters is that a task reached one.

    :ivar tasks: the tasks run, in order.
    """

    blocking = False

    def __init__(self, name="record", result=None, error=None):
        self.name = name
        self.result = result
        self.error = error
        self.tasks = []

    def run(self, task):
        self.tasks.append(task)
        if self.error is not None:
            raise self.error
        return self.result


def result_of(d):
    """
    Return the result of a ``Deferred`` that has already fired, for tests
    that run without a reactor (with :class:`MemoryStore`, a ``Clock``
    and other fakes).

    A success stays in the ``Deferred`` for any later callbacks; a failure
    is consumed, so it is not also logged as unhandled.

    :param d: a :class:`twisted.internet.defer.Deferred`.
    :returns: its result.
    :raises: the exception it failed with.
    :raises AssertionError: if it has not fired yet.
    """
    # Checked first so that a Deferred that has not fired is left as it was.
    if not d.called:
        raise AssertionError(f"{d!r} has not fired yet")
    outcome = []

    def capture(result):
        outcome.append(result)
        return None if isinstance(result, Failure) else result

    d.addBoth(capture)
    if not outcome:
        # Fired, but paused while it waits for another Deferred.
        raise AssertionError(f"{d!r} is waiting for another Deferred")
    if isinstance(outcome[0], Failure):
        outcome[0].raiseException()
    return outcome[0]
