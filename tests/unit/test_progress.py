"""
Tests for handlers' progress reports: their checks and thinning out
(taskbroker.worker.progress), and what the broker keeps of them
(taskbroker.broker.progress), driven with a Clock.
"""

import math

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.plugin import IPlugin
from zope.interface import implementer

from taskbroker.broker.progress import WRITE_INTERVAL
from taskbroker.config import WorkerConfig
from taskbroker.interfaces import ITaskHandler
from taskbroker.protocol import codec
from taskbroker.testing import FakeTask, MemoryStore, result_of
from taskbroker.transport.zmq import Sender
from taskbroker.worker.progress import INTERVAL, Throttle, checked
from taskbroker.worker.service import WorkerService
from taskbroker.worker.task import RunningTask
from tests.unit.conftest import Peers
from tests.unit.test_broker import hello, send, started_broker
from tests.unit.test_worker import FakeSocket, task


@pytest.mark.parametrize("fraction", [0, 0.5, 1, 1.0])
def test_a_fraction_from_0_to_1_is_taken(fraction):
    assert checked(fraction, "m") == (float(fraction), "m")


@pytest.mark.parametrize(
    "fraction", [-0.01, 1.01, math.nan, math.inf, True, "0.5", None]
)
def test_anything_else_is_refused(fraction):
    with pytest.raises(
        ValueError, match="progress must be a number from 0 to 1"
    ):
        checked(fraction, None)


def test_a_message_is_a_string_cut_to_200_characters():
    fraction, message = checked(0.5, "x" * 500)
    assert len(message) == 200 and message.endswith("\u2026")
    assert checked(0.5, "x" * 200)[1] == "x" * 200
    with pytest.raises(TypeError, match="must be a string or None, not int"):
        checked(0.5, 3)


def test_a_task_reports_through_its_report_function():
    reports = []
    task = RunningTask(
        {
            "id": 1,
            "handler": "h",
            "priority": "normal",
            "attempt": 1,
            "max_attempts": 3,
        },
        Clock(),
        lambda *report: reports.append(report),
    )
    task.progress(0.25)
    task.progress(1, "done")
    assert reports == [(0.25, None), (1.0, "done")]
    with pytest.raises(ValueError):
        task.progress(2)
    # Without one (a task built by hand), reports are checked and dropped.
    RunningTask(
        {
            "id": 1,
            "handler": "h",
            "priority": "normal",
            "attempt": 1,
            "max_attempts": 3,
        },
        Clock(),
    ).progress(0.5)


def test_a_fake_task_records_its_reports():
    task = FakeTask()
    task.progress(0.5, "half")
    assert task.reported == [(0.5, "half")]


def throttled():
    clock = Clock()
    sent = []
    throttle = Throttle(
        lambda *report: sent.append((clock.seconds(), report)),
        clock.seconds,
        clock.callLater,
    )
    return clock, sent, throttle


def test_the_first_report_goes_at_once_and_the_last_one_always():
    clock, sent, throttle = throttled()
    throttle(0.1, "a")
    for n in range(1, 1000):
        throttle(n / 1000, None)
    assert sent == [(0, (0.1, "a"))]
    clock.advance(INTERVAL)
    assert sent[-1] == (INTERVAL, (0.999, None))
    # Nothing new: nothing more is sent.
    clock.advance(10 * INTERVAL)
    assert len(sent) == 2
    # Long after the last one, the next goes at once again.
    throttle(1, "end")
    assert sent[-1] == (11 * INTERVAL, (1, "end"))


def test_a_finished_throttle_sends_what_is_pending_at_once():
    clock, sent, throttle = throttled()
    throttle(0.1, None)
    throttle(0.5, None)
    throttle(1.0, "done")
    clock.advance(0.1)
    throttle.finish()
    assert sent == [(0, (0.1, None)), (0.1, (1.0, "done"))]
    clock.advance(INTERVAL)
    throttle(0.3, None)
    assert len(sent) == 2
    assert clock.getDelayedCalls() == []


def test_a_cancelled_throttle_sends_nothing_more():
    clock, sent, throttle = throttled()
    throttle(0.1, None)
    throttle(0.2, None)
    throttle.cancel()
    clock.advance(INTERVAL)
    throttle(0.3, None)
    assert [report for _, report in sent] == [(0.1, None)]
    assert clock.getDelayedCalls() == []


# -- the broker --------------------------------------------------------------


@pytest.fixture
def clock_and_store():
    clock = Clock()
    store = MemoryStore(clock)
    result_of(store.open())
    return clock, store


@pytest.fixture
def running(clock_and_store):
    """
    A broker whose worker w1 runs task 1 (token 1).
    """
    clock, store = clock_and_store
    peers = Peers()
    broker = started_broker(store, clock, peers)
    hello(broker)
    send(broker, b"w1/x", b"READY", {})
    send(
        broker,
        b"client",
        b"SUBMIT",
        {"req": "r", "tasks": [{"handler": "echo"}]},
    )
    assert 1 in broker.attempts
    return broker, store, clock


def progress(broker, fraction, message=None, identity=b"w1/x", token=1):
    broker.handle(
        Sender(identity),
        codec.encode(
            b"PROGRESS",
            {
                "id": 1,
                "token": token,
                "fraction": fraction,
                "message": message,
            },
        ),
    )


def stored(store):
    row = store.get(1).result
    return row.progress, row.progress_message, row.progress_at


def test_the_broker_writes_a_report_at_once_then_once_a_second(running):
    broker, store, clock = running
    clock.advance(5)
    progress(broker, 0.1, "first")
    assert stored(store) == (0.1, "first", 5.0)
    for fraction in (0.2, 0.3, 0.4):
        clock.advance(0.1)
        progress(broker, fraction, None)
    assert stored(store)[0] == 0.1
    clock.advance(WRITE_INTERVAL)
    assert stored(store)[:2] == (0.4, None)
    assert stored(store)[2] == pytest.approx(5.3)


def test_only_the_current_attempts_holder_reports(running):
    broker, store, clock = running
    hello(broker, identity=b"w2/y", name="w2")
    progress(broker, 0.5, "not mine", identity=b"w2/y")
    progress(broker, 0.5, "an old dispatch", token=2)
    progress(broker, 0.5, "a stranger", identity=b"nobody")
    assert stored(store) == (None, None, None)


def test_what_is_unwritten_when_the_attempt_ends_is_written_with_the_end(
    running,
):
    broker, store, clock = running
    progress(broker, 0.1)
    progress(broker, 0.9, "late")
    assert stored(store)[:2] == (0.1, None)
    send(
        broker,
        b"w1/x",
        b"RESULT",
        {"id": 1, "token": 1, "state": "succeeded", "result": 1},
    )
    # A finished task keeps its handler's last report.
    assert stored(store)[:2] == (0.9, "late")
    assert store.get(1).result.state == "succeeded"
    assert clock.getDelayedCalls() == [] or all(
        call.func != broker.progress._due for call in clock.getDelayedCalls()
    )


# -- the worker --------------------------------------------------------------


@implementer(IPlugin, ITaskHandler)
class Reporting:
    """
    Keeps the tasks it runs, which end when the test says so.
    """

    name = "reporting"
    blocking = False

    def __init__(self):
        self.tasks = {}

    def run(self, task):
        task.progress(0, "starting")
        self.tasks[task.id] = (task, defer.Deferred())
        return self.tasks[task.id][1]


def progress_worker(clock, takes_progress):
    handler = Reporting()
    sockets = []
    worker = WorkerService(
        WorkerConfig(name="w"),
        {"reporting": handler},
        clock,
        connect=lambda endpoint, on_message: (
            sockets.append(FakeSocket(on_message, endpoint)) or sockets[-1]
        ),
    )
    worker.startService()
    welcome = {"broker": "b1", "priorities": ["normal"], "heartbeat": 1.0}
    if takes_progress:
        welcome["progress"] = True
    sockets[0].deliver(b"WELCOME", welcome)
    sockets[0].deliver(b"TASK", task(4, "reporting", token=6))
    for command in (b"HELLO", b"READY"):
        sockets[0].take(command)
    return worker, handler, sockets[0]


def test_a_worker_forwards_the_reports_of_a_running_task():
    clock = Clock()
    worker, handler, socket = progress_worker(clock, takes_progress=True)
    running, finish = handler.tasks[4]
    # Reported as its run() began: sent at once.
    assert socket.take(b"PROGRESS") == [
        (
            b"PROGRESS",
            {"id": 4, "token": 6, "fraction": 0, "message": "starting"},
        )
    ]
    clock.advance(INTERVAL)
    running.progress(0.1, "a")
    running.progress(0.2, "b")
    assert socket.take(b"PROGRESS") == [
        (b"PROGRESS", {"id": 4, "token": 6, "fraction": 0.1, "message": "a"})
    ]
    clock.advance(INTERVAL)
    assert [body["fraction"] for _, body in socket.take(b"PROGRESS")] == [0.2]
    # The result ends them: a report still pending goes first, and
    # nothing after.
    running.progress(0.9, None)
    finish.callback("done")
    clock.advance(INTERVAL)
    assert [body["fraction"] for _, body in socket.take(b"PROGRESS")] == [0.9]
    assert len(socket.take(b"RESULT")) == 1


def test_a_worker_keeps_reports_from_a_broker_that_does_not_take_them():
    # An older broker would count PROGRESS as a bad message.
    clock = Clock()
    worker, handler, socket = progress_worker(clock, takes_progress=False)
    handler.tasks[4][0].progress(0.5, "half")
    clock.advance(INTERVAL)
    assert socket.take(b"PROGRESS") == []
