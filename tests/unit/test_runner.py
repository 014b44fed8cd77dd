"""
Tests for how the worker runs one task: ``run_handler`` and
``RunningTask`` in taskbroker.worker.service.

Non-blocking handlers need no reactor; blocking ones run in a real
``ThreadPool`` under the real reactor (pytest-twisted), because that is
what they are about.
"""

import threading

import pytest
import pytest_twisted
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.python import threadable
from twisted.python.threadpool import ThreadPool

from taskbroker.worker.service import RunningTask, run_handler

BODY = {"id": 12, "handler": "h", "payload": {"n": 1}, "priority": "high",
        "attempt": 2, "max_attempts": 5}


class Handler:
    """
    A handler whose ``run`` is the given function.
    """

    name = "h"

    def __init__(self, run, blocking=False):
        self.run = run
        self.blocking = blocking


def result_of(d):
    results = []
    d.addBoth(results.append)
    assert len(results) == 1, "the Deferred has not fired"
    return results[0]


def run_now(function):
    return result_of(run_handler(
        Handler(function), RunningTask(BODY, Clock()), None, None))


class Oops(Exception):
    pass


# -- RunningTask -----------------------------------------------------------------


def test_running_task_fields():
    clock = Clock()
    task = RunningTask(BODY, clock)
    assert (task.id, task.handler, task.payload, task.priority, task.attempt,
            task.max_attempts, task.clock) == (
        12, "h", {"n": 1}, "high", 2, 5, clock)
    assert repr(task) == "<task 12 h attempt 2>"


def test_running_task_payload_defaults_to_none():
    body = dict(BODY)
    del body["payload"]
    assert RunningTask(body, Clock()).payload is None


# -- non-blocking handlers -----------------------------------------------------------


@pytest.mark.parametrize("value", [None, 0, "x", [1, {"a": 2.5}], {"é": "ü"}])
def test_value_succeeds(value):
    assert run_now(lambda task: value) == ("succeeded", value, None)


def test_handler_sees_the_task():
    assert run_now(lambda task: [task.id, task.payload, task.attempt]) == (
        "succeeded", [12, {"n": 1}, 2], None)


def test_runs_in_the_calling_thread():
    assert run_now(lambda task: threadable.isInIOThread()) == (
        "succeeded", threadable.isInIOThread(), None)


def test_raising_fails_with_one_line():
    def run(task):
        raise ValueError("bad\n  payload")

    assert run_now(run) == ("failed", None, "ValueError: bad payload")


def test_raising_without_message():
    def run(task):
        raise Oops()

    assert run_now(run) == ("failed", None, "Oops")


@pytest.mark.parametrize("value", [
    object(), float("nan"), {"x": float("inf")}, {1, 2}, b"bytes",
    # surrogateescape (os.fsdecode) makes such strings; UTF-8 cannot carry them.
    "\udcff",
])
def test_non_json_result_fails(value):
    state, result, error = run_now(lambda task: value)
    assert (state, result) == ("failed", None)
    assert error.startswith("result is not JSON-serialisable")
    assert "\n" not in error


def test_deferred_result():
    d = defer.Deferred()
    outcome = run_handler(Handler(lambda task: d), RunningTask(BODY, Clock()),
                          None, None)
    results = []
    outcome.addBoth(results.append)
    assert results == []
    d.callback({"done": True})
    assert results == [("succeeded", {"done": True}, None)]


def test_failing_deferred():
    d = defer.Deferred()
    outcome = run_handler(Handler(lambda task: d), RunningTask(BODY, Clock()),
                          None, None)
    d.errback(Oops("late"))
    assert result_of(outcome) == ("failed", None, "Oops: late")


def test_deferred_with_non_json_result():
    state, _, error = run_now(lambda task: defer.succeed(object()))
    assert state == "failed" and "not JSON-serialisable" in error


def test_handler_waiting_on_the_task_clock():
    clock = Clock()

    def run(task):
        d = defer.Deferred()
        task.clock.callLater(3, d.callback, "waited")
        return d

    outcome = run_handler(Handler(run), RunningTask(BODY, clock), None, None)
    results = []
    outcome.addBoth(results.append)
    clock.advance(2)
    assert results == []
    clock.advance(1)
    assert results == [("succeeded", "waited", None)]


# -- blocking handlers ---------------------------------------------------------


@pytest.fixture
def threadpool():
    pool = ThreadPool(minthreads=0, maxthreads=2, name="test-runner")
    pool.start()
    yield pool
    pool.stop()


@pytest_twisted.inlineCallbacks
def test_blocking_handler_runs_in_the_pool_while_the_reactor_serves(threadpool):
    from twisted.internet import reactor

    released = threading.Event()
    seen = {}

    def run(task):
        seen["thread"] = threading.current_thread()
        seen["io_thread"] = threadable.isInIOThread()
        # Ask the reactor for a timer, then block until it fires: this
        # returns only if the reactor keeps running while we block.
        reactor.callFromThread(reactor.callLater, 0, released.set)
        if not released.wait(10):
            raise RuntimeError("the reactor was blocked")
        return {"thread": threading.current_thread().name}

    outcome = yield run_handler(Handler(run, blocking=True),
                                RunningTask(BODY, reactor), reactor, threadpool)
    assert outcome == ("succeeded", {"thread": seen["thread"].name}, None)
    assert seen["io_thread"] is False
    assert seen["thread"] is not threading.current_thread()
    assert "test-runner" in seen["thread"].name


@pytest_twisted.inlineCallbacks
def test_blocking_handler_raising(threadpool):
    from twisted.internet import reactor

    def run(task):
        raise Oops("in a thread")

    outcome = yield run_handler(Handler(run, blocking=True),
                                RunningTask(BODY, reactor), reactor, threadpool)
    assert outcome == ("failed", None, "Oops: in a thread")


@pytest_twisted.inlineCallbacks
def test_blocking_handler_non_json_result(threadpool):
    from twisted.internet import reactor

    outcome = yield run_handler(Handler(lambda task: object(), blocking=True),
                                RunningTask(BODY, reactor), reactor, threadpool)
    assert outcome[:2] == ("failed", None)
    assert "not JSON-serialisable" in outcome[2]
