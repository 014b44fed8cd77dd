# -*- test-case-name: tests.unit.test_testing -*-
"""
Tests for the public test helpers of taskbroker.testing.
"""

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock

from taskbroker.testing import MemoryStore, result_of


def test_memory_store_external_insert_reads_clock():
    clock = Clock()
    clock.advance(123.5)
    store = MemoryStore(clock)
    row = store.insert_external("echo", '{"a":1}')
    assert (row.created_at, row.priority, row.max_attempts) == (
        123.5,
        None,
        None,
    )
    result_of(store.open())
    assert result_of(store.list("queued", None, 0, 10)) == [row]


def test_result_of():
    assert result_of(defer.succeed(5)) == 5
    with pytest.raises(KeyError):
        result_of(defer.fail(KeyError("x")))
    with pytest.raises(AssertionError):
        result_of(defer.Deferred())


def test_run_task_judges_the_outcome_as_the_worker_does():
    from twisted.internet import task as twisted_task
    from zope.interface.verify import verifyObject

    from taskbroker import PermanentFailure
    from taskbroker.interfaces import ITask, ITaskHandler
    from taskbroker.testing import FakeTask, RecordingHandler, run_task

    task = FakeTask({"n": 2})
    assert verifyObject(ITask, task)
    handler = RecordingHandler(result={"ok": True})
    assert verifyObject(ITaskHandler, handler)
    outcome = result_of(run_task(handler, task))
    assert (outcome.state, outcome.result) == ("succeeded", {"ok": True})
    assert handler.tasks == [task]

    failing = RecordingHandler(error=PermanentFailure("no such user"))
    outcome = result_of(run_task(failing, FakeTask()))
    assert (outcome.state, outcome.permanent) == ("failed", True)
    assert "no such user" in outcome.error and outcome.traceback

    not_json = RecordingHandler(result=object())
    outcome = result_of(run_task(not_json, FakeTask()))
    assert outcome.state == "failed" and "JSON" in outcome.error

    class Slow:
        name, blocking = "slow", False

        def run(self, task):
            return twisted_task.deferLater(task.clock, 10, lambda: "done")

    slow_task = FakeTask()
    d = run_task(Slow(), slow_task, time_limit=5)
    slow_task.clock.advance(5)
    outcome = result_of(d)
    assert outcome.state == "failed" and "time limit" in outcome.error
