"""
Handlers for the integration tests, loaded by workers started with
``--handlers-path tests/integration/handlers``.
"""

import json
import os
import time

from twisted.internet.task import deferLater
from twisted.plugin import IPlugin
from zope.interface import implementer

from taskbroker import handler
from taskbroker.interfaces import ITaskHandler


def _log(event, task, **fields):
    """
    Append an event to $TASKBROKER_TEST_RECORD/<pid>.jsonl, when set: the
    fault-injection tests read every start and end of every attempt.
    """
    folder = os.environ.get("TASKBROKER_TEST_RECORD")
    if folder:
        line = json.dumps(
            {
                "event": event,
                "task": task.id,
                "attempt": task.attempt,
                "token": task.token,
                "pid": os.getpid(),
                "time": time.time(),
                **fields,
            }
        )
        with open(os.path.join(folder, f"{os.getpid()}.jsonl"), "a") as f:
            f.write(line + "\n")


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
        _log("start", task)

        def done():
            _log("end", task)
            return {
                "pid": os.getpid(),
                "attempt": task.attempt,
                "token": task.token,
                "started": started,
                "ended": time.time(),
            }

        return deferLater(task.clock, seconds, done)


@implementer(IPlugin, ITaskHandler)
class Flaky:
    """
    Fails until attempt ``payload["succeed_on"]``.
    """

    name = "flaky"
    blocking = False

    def run(self, task):
        if task.attempt < task.payload["succeed_on"]:
            raise RuntimeError(f"attempt {task.attempt} fails on purpose")
        return task.attempt


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
flaky = Flaky()
blocking_sleep = BlockingSpin()
fail = Fail()


def _reported_steps(task):
    """
    Report each of ``payload["steps"]`` (``[fraction, message]`` pairs).
    """
    for fraction, message in task.payload["steps"]:
        task.progress(fraction, message)


@implementer(IPlugin, ITaskHandler)
class Progress:
    """
    Reports ``payload["steps"]``, then runs until the file
    ``payload["until"]`` exists.
    """

    name = "progress"
    blocking = False

    def run(self, task):
        _reported_steps(task)

        def wait():
            if os.path.exists(task.payload["until"]):
                return "done"
            return deferLater(task.clock, 0.05, wait)

        return wait()


@implementer(IPlugin, ITaskHandler)
class BlockingProgress:
    """
    :class:`Progress`, in a handler process.
    """

    name = "progress-blocking"
    blocking = True

    def run(self, task):
        _reported_steps(task)
        while not os.path.exists(task.payload["until"]):
            time.sleep(0.05)
        return "done"


progress = Progress()
blocking_progress = BlockingProgress()


@handler("decorated-sum", blocking=True, time_limit=60)
def decorated_sum(task):
    """
    The short way, in a handler process: the sum of the payload's numbers.
    """
    return sum(task.payload)
