"""
Tests for how the worker runs one task of a handler that does not block:
``run_handler`` (taskbroker.worker.runner) and ``RunningTask``.

They need no reactor: handlers, time limits and cancellation all run on a
``Clock``.  Blocking handlers run in child processes, which
tests/unit/test_children.py covers.
"""

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.python import threadable
from twisted.python.failure import Failure

from taskbroker.errors import PermanentFailure
from taskbroker.testing import result_of
from taskbroker.worker.children import Outcome
from taskbroker.worker.runner import run_handler
from taskbroker.worker.task import RunningTask

BODY = {
    "id": 12,
    "handler": "h",
    "payload": {"n": 1},
    "priority": "high",
    "attempt": 2,
    "max_attempts": 5,
    "token": 31,
    "time_limit": 0.5,
}


class Handler:
    """
    A handler whose ``run`` is the given function.
    """

    name = "h"
    blocking = False

    def __init__(self, run):
        self.run = run


def run_now(function):
    return result_of(
        run_handler(Handler(function), RunningTask(BODY, Clock()), Clock())
    )


def pending():
    """
    A handler that returns a Deferred which has not fired, the Deferred,
    and the list its canceller appends it to.
    """
    cancelled = []
    d = defer.Deferred(cancelled.append)
    return Handler(lambda task: d), d, cancelled


def start(handler, clock, time_limit=None):
    return run_handler(handler, RunningTask(BODY, clock), clock, time_limit)


def failed(outcome):
    """
    The fields of a failed outcome that do not depend on source lines.
    """
    return (outcome.state, outcome.result, outcome.error, outcome.permanent)


def nested(depth):
    value = []
    for _ in range(depth):
        value = [value]
    return value


class Oops(Exception):
    pass


class NoSuchCustomer(PermanentFailure):
    pass


# -- RunningTask -----------------------------------------------------------------


def test_running_task_fields():
    clock = Clock()
    task = RunningTask(BODY, clock)
    assert (
        task.id,
        task.handler,
        task.payload,
        task.priority,
        task.attempt,
        task.max_attempts,
        task.clock,
    ) == (12, "h", {"n": 1}, "high", 2, 5, clock)
    assert repr(task) == "<task 12 h attempt 2>"


def test_running_task_payload_defaults_to_none():
    body = dict(BODY)
    del body["payload"]
    assert RunningTask(body, Clock()).payload is None


def test_running_task_needs_no_time_limit():
    body = dict(BODY)
    del body["time_limit"]
    assert RunningTask(body, Clock()).id == 12


# -- values and exceptions -----------------------------------------------------------


@pytest.mark.parametrize("value", [None, 0, "x", [1, {"a": 2.5}], {"é": "ü"}])
def test_value_succeeds(value):
    assert run_now(lambda task: value) == Outcome("succeeded", value, None)


def test_success_has_no_traceback_and_is_not_permanent():
    outcome = run_now(lambda task: 1)
    assert (outcome.traceback, outcome.permanent) == (None, False)


def test_handler_sees_the_task():
    assert run_now(lambda task: [task.id, task.payload, task.attempt]) == (
        Outcome("succeeded", [12, {"n": 1}, 2], None)
    )


def test_runs_in_the_calling_thread():
    assert run_now(lambda task: threadable.isInIOThread()) == (
        Outcome("succeeded", threadable.isInIOThread(), None)
    )


def test_a_handler_marked_blocking_still_runs_here():
    # Choosing child processes for blocking handlers is the worker's job.
    handler = Handler(lambda task: "here")
    handler.blocking = True
    assert result_of(start(handler, Clock())) == Outcome(
        "succeeded", "here", None
    )


def test_raising_fails_with_one_line():
    def run(task):
        raise ValueError("bad\n  payload")

    assert failed(run_now(run)) == (
        "failed",
        None,
        "ValueError: bad payload",
        False,
    )


def test_raising_without_message():
    def run(task):
        raise Oops()

    assert failed(run_now(run)) == ("failed", None, "Oops", False)


def test_raising_gives_the_traceback():
    def run(task):
        raise ValueError("bad\n  payload")

    outcome = run_now(run)
    assert outcome.permanent is False
    assert isinstance(outcome.traceback, str)
    assert outcome.traceback.startswith("Traceback")
    assert ", in run\n" in outcome.traceback
    assert 'raise ValueError("bad\\n  payload")' in outcome.traceback
    # Unlike the error, it keeps the message's own lines.
    assert outcome.traceback.rstrip().endswith("ValueError: bad\n  payload")


def test_permanent_failure():
    def run(task):
        raise PermanentFailure("no such customer")

    outcome = run_now(run)
    assert failed(outcome) == (
        "failed",
        None,
        "PermanentFailure: no such customer",
        True,
    )
    assert outcome.traceback.startswith("Traceback")
    assert 'raise PermanentFailure("no such customer")' in outcome.traceback
    assert outcome.traceback.rstrip().endswith(
        "PermanentFailure: no such customer"
    )


def test_subclass_of_permanent_failure_is_permanent():
    def run(task):
        raise NoSuchCustomer(7)

    outcome = run_now(run)
    assert failed(outcome) == ("failed", None, "NoSuchCustomer: 7", True)
    assert "raise NoSuchCustomer(7)" in outcome.traceback


def test_permanent_failure_of_a_deferred():
    d = defer.Deferred()
    outcome = start(Handler(lambda task: d), Clock())
    d.errback(PermanentFailure("gone"))
    outcome = result_of(outcome)
    assert failed(outcome) == ("failed", None, "PermanentFailure: gone", True)
    assert "PermanentFailure: gone" in outcome.traceback


@pytest.mark.parametrize(
    "value",
    [
        object(),
        float("nan"),
        {"x": float("inf")},
        {1, 2},
        b"bytes",
        # surrogateescape (os.fsdecode) makes such strings; UTF-8 cannot carry them.
        "\udcff",
    ],
)
def test_non_json_result_fails(value):
    outcome = run_now(lambda task: value)
    assert (outcome.state, outcome.result) == ("failed", None)
    assert outcome.error.startswith("result is not JSON-serialisable")
    assert "\n" not in outcome.error
    # The handler did not raise: nothing to show, and a retry may help.
    assert (outcome.traceback, outcome.permanent) == (None, False)


def test_result_nested_too_deeply_fails():
    d = defer.succeed(nested(100_000))
    try:
        outcome = start(Handler(lambda task: d), Clock())
        assert outcome.called, "run_handler's Deferred never fired"
        outcome = result_of(outcome)
        assert (outcome.state, outcome.result) == ("failed", None)
        assert outcome.error == "result is nested deeper than 64 levels"
    finally:
        d.addErrback(lambda _: None)  # no "Unhandled error" noise


def test_exception_that_cannot_be_shown():
    class Broken(Exception):
        def __str__(self):
            return self.detail  # never set: AttributeError

    d = defer.Deferred()
    try:
        outcome = start(Handler(lambda task: d), Clock())
        d.errback(Broken())
        assert outcome.called, "run_handler's Deferred never fired"
        outcome = result_of(outcome)
        assert (outcome.state, outcome.result) == ("failed", None)
        assert "Broken" in outcome.error
    finally:
        d.addErrback(lambda _: None)  # no "Unhandled error" noise


# -- Deferreds -------------------------------------------------------------------


def test_deferred_result():
    d = defer.Deferred()
    outcome = start(Handler(lambda task: d), Clock())
    assert not outcome.called
    d.callback({"done": True})
    assert result_of(outcome) == Outcome("succeeded", {"done": True}, None)


def test_failing_deferred():
    d = defer.Deferred()
    outcome = start(Handler(lambda task: d), Clock())
    d.errback(Oops("late"))
    outcome = result_of(outcome)
    assert failed(outcome) == ("failed", None, "Oops: late", False)
    assert "Oops: late" in outcome.traceback


def test_deferred_with_non_json_result():
    outcome = run_now(lambda task: defer.succeed(object()))
    assert outcome.state == "failed"
    assert "not JSON-serialisable" in outcome.error


def test_handler_waiting_on_the_task_clock():
    clock = Clock()

    def run(task):
        d = defer.Deferred()
        task.clock.callLater(3, d.callback, "waited")
        return d

    outcome = start(Handler(run), clock)
    clock.advance(2)
    assert not outcome.called
    clock.advance(1)
    assert result_of(outcome) == Outcome("succeeded", "waited", None)


# -- time limits -----------------------------------------------------------------


def test_time_limit_expires():
    clock = Clock()
    handler, d, cancelled = pending()
    outcome = start(handler, clock, time_limit=0.5)
    assert [call.getTime() for call in clock.getDelayedCalls()] == [0.5]
    clock.advance(0.4)
    assert not outcome.called
    assert cancelled == []
    clock.advance(0.1)
    assert result_of(outcome) == Outcome(
        "failed", None, "time limit of 0.5 s exceeded"
    )
    # The handler was told to stop; its CancelledError went nowhere.
    assert cancelled == [d]
    assert not isinstance(d.result, Failure)
    assert clock.getDelayedCalls() == []


def test_result_after_the_time_limit_changes_nothing():
    clock = Clock()
    # Without a canceller, cancelling makes Twisted ignore a later callback.
    d = defer.Deferred()
    outcome = start(Handler(lambda task: d), clock, time_limit=0.5)
    clock.advance(1)
    d.callback("too late")
    assert result_of(outcome) == Outcome(
        "failed", None, "time limit of 0.5 s exceeded"
    )


@pytest.mark.parametrize(
    "limit, text",
    [
        (0.001, "0.001"),
        (0.5, "0.5"),
        (2, "2"),
        (2.0, "2"),
        (1.25, "1.25"),
        (3600, "3600"),
    ],
)
def test_time_limit_error_names_the_limit(limit, text):
    clock = Clock()
    handler, _, _ = pending()
    outcome = start(handler, clock, time_limit=limit)
    clock.advance(limit)
    assert result_of(outcome).error == f"time limit of {text} s exceeded"


def test_time_limit_uses_the_given_clock():
    clock, task_clock = Clock(), Clock()
    handler, _, cancelled = pending()
    outcome = run_handler(handler, RunningTask(BODY, task_clock), clock, 1)
    assert task_clock.getDelayedCalls() == []
    task_clock.advance(5)
    assert not outcome.called
    clock.advance(1)
    assert result_of(outcome).error == "time limit of 1 s exceeded"


def test_handler_finishing_before_the_limit_cancels_the_timer():
    clock = Clock()
    handler, d, cancelled = pending()
    outcome = start(handler, clock, time_limit=0.5)
    clock.advance(0.3)
    d.callback("done")
    assert result_of(outcome) == Outcome("succeeded", "done", None)
    assert clock.getDelayedCalls() == []
    clock.advance(10)
    assert result_of(outcome) == Outcome("succeeded", "done", None)
    assert cancelled == []


def test_handler_failing_before_the_limit_cancels_the_timer():
    clock = Clock()
    handler, d, _ = pending()
    outcome = start(handler, clock, time_limit=0.5)
    d.errback(PermanentFailure("no"))
    assert failed(result_of(outcome)) == (
        "failed",
        None,
        "PermanentFailure: no",
        True,
    )
    assert clock.getDelayedCalls() == []


def test_synchronous_handler_starts_no_timer():
    clock = Clock()
    outcome = start(Handler(lambda task: "now"), clock, time_limit=0.5)
    assert result_of(outcome) == Outcome("succeeded", "now", None)
    assert clock.getDelayedCalls() == []


def test_no_time_limit_no_timer():
    clock = Clock()
    handler, d, cancelled = pending()
    outcome = start(handler, clock)
    assert clock.getDelayedCalls() == []
    clock.advance(366 * 24 * 3600)
    assert not outcome.called
    assert cancelled == []
    d.callback(1)
    assert result_of(outcome) == Outcome("succeeded", 1, None)


# -- cancellation ----------------------------------------------------------------


@pytest.mark.parametrize("time_limit", [None, 0.5])
def test_cancelling(time_limit):
    clock = Clock()
    handler, d, cancelled = pending()
    outcome = start(handler, clock, time_limit)
    clock.advance(0.2)
    outcome.cancel()
    assert result_of(outcome) == Outcome("cancelled", None, "cancelled")
    assert cancelled == [d]
    assert not isinstance(d.result, Failure)
    # The time limit cannot fire any more.
    assert clock.getDelayedCalls() == []
    clock.advance(10)
    assert result_of(outcome) == Outcome("cancelled", None, "cancelled")


def test_cancelling_a_handler_that_answers_cancellation_with_a_value():
    # A canceller may fire the handler's Deferred with a result; the run
    # was still cancelled.
    d = defer.Deferred(lambda d: d.callback("partial"))
    outcome = start(Handler(lambda task: d), Clock(), 5)
    outcome.cancel()
    assert result_of(outcome) == Outcome("cancelled", None, "cancelled")


def test_cancelling_after_the_end_changes_nothing():
    clock = Clock()
    handler, d, cancelled = pending()
    outcome = start(handler, clock, 0.5)
    d.callback("done")
    outcome.cancel()
    assert result_of(outcome) == Outcome("succeeded", "done", None)
    assert cancelled == []


def test_cancelling_after_the_time_limit_changes_nothing():
    clock = Clock()
    handler, d, cancelled = pending()
    outcome = start(handler, clock, 0.5)
    clock.advance(0.5)
    outcome.cancel()
    assert result_of(outcome) == Outcome(
        "failed", None, "time limit of 0.5 s exceeded"
    )
    assert cancelled == [d]
