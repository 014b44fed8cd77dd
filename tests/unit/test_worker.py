"""
Tests for taskbroker.worker.service.WorkerService, driven by a Clock and a
fake socket: announcing, credits, results kept until acknowledged, and
noticing a restarted broker.
"""

import json

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.plugin import IPlugin
from zope.interface import implementer

from taskbroker.config import WorkerConfig
from taskbroker.failover import start_position
from taskbroker.interfaces import ITaskHandler
from taskbroker.protocol import codec
from taskbroker.testing import result_of
from taskbroker.worker.service import WorkerService


@implementer(IPlugin, ITaskHandler)
class Manual:
    """
    A handler whose tasks end when the test says so.
    """

    name = "manual"
    blocking = False

    def __init__(self):
        self.pending = {}

    def run(self, task):
        d = self.pending[task.id] = defer.Deferred()
        return d


class FakeSocket:
    def __init__(self, on_message, endpoint=None):
        self.on_message = on_message
        self.endpoint = endpoint
        self.sent = []
        self.closed = False

    def send(self, frames):
        assert not self.closed, "sent on a closed socket"
        self.sent.append((frames[1], json.loads(frames[2])))
        return True

    def close(self):
        self.closed = True

    def take(self, command=None):
        taken = [m for m in self.sent if command is None or m[0] == command]
        self.sent = [m for m in self.sent if m not in taken]
        return taken

    def deliver(self, command, body):
        self.on_message(codec.encode(command, body))


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def handler():
    return Manual()


@pytest.fixture
def worker(clock, handler):
    sockets = []

    def connect(endpoint, on_message):
        sockets.append(FakeSocket(on_message, endpoint))
        return sockets[-1]

    w = WorkerService(
        WorkerConfig(name="w", concurrency=2),
        {"manual": handler, "echo": _Echo()},
        clock,
        connect=connect,
    )
    w.refused = []
    w.on_fatal = w.refused.append
    w.startService()
    w.fake = sockets[0]
    yield w
    stopped = w.stopService()
    clock.advance(w.config.grace)
    result_of(stopped)


@implementer(IPlugin, ITaskHandler)
class _Echo:
    name = "echo"
    blocking = False

    def run(self, task):
        return task.payload


def welcome(worker, instance="b1"):
    worker.fake.deliver(
        b"WELCOME",
        {
            "broker": instance,
            "priorities": ["high", "normal", "low"],
            "heartbeat": 1.0,
        },
    )


def task(
    task_id,
    handler="manual",
    attempt=1,
    payload=None,
    token=None,
    time_limit=None,
):
    return {
        "id": task_id,
        "handler": handler,
        "payload": payload,
        "priority": "normal",
        "attempt": attempt,
        "max_attempts": 3,
        "token": token or attempt,
        "time_limit": time_limit,
    }


def test_announces_until_welcomed_then_sends_a_credit_per_slot(worker, clock):
    [(_, hello)] = worker.fake.take(b"HELLO")
    assert hello["name"] == "w" and hello["slots"] == 2
    assert hello["handlers"] == ["echo", "manual"]
    assert hello["priorities"] is None and hello["running"] == []
    clock.advance(0.05)
    clock.advance(0.1)
    assert len(worker.fake.take(b"HELLO")) == 2  # repeated, backing off
    welcome(worker)
    assert len(worker.fake.take(b"READY")) == 2
    for _ in range(10):
        clock.advance(1)
        worker.fake.deliver(b"HEARTBEAT", {"broker": "b1"})
    assert worker.fake.take(b"HELLO") == []
    assert len(worker.fake.take(b"HEARTBEAT")) == 10


def test_result_is_kept_until_acknowledged(worker, handler):
    welcome(worker)
    worker.fake.take()
    worker.fake.deliver(b"TASK", task(7))
    handler.pending[7].callback({"ok": 1})
    [(_, result)] = worker.fake.take(b"RESULT")
    # The slot is free at once, before the broker acknowledges: its
    # credit rides with the result.
    assert result == {
        "id": 7,
        "token": 1,
        "state": "succeeded",
        "result": {"ok": 1},
        "error": None,
        "traceback": None,
        "permanent": False,
        "ready": True,
    }
    assert worker.fake.take(b"READY") == []
    # Re-welcomed (say the broker restarted): the result goes again, without
    # a credit (WELCOME is followed by one READY per free slot).
    welcome(worker, "b2")
    [(_, again)] = worker.fake.take(b"RESULT")
    assert "ready" not in again
    assert len(worker.fake.take(b"READY")) == 2
    worker.fake.deliver(b"ACK", {"id": 7, "token": 1})
    welcome(worker, "b3")
    assert worker.fake.take(b"RESULT") == []


def test_restarted_broker_is_noticed_from_its_heartbeat(worker, handler):
    welcome(worker)
    worker.fake.deliver(b"TASK", task(3))
    worker.fake.take()
    worker.fake.deliver(b"HEARTBEAT", {"broker": "b1"})
    assert worker.fake.take(b"HELLO") == []
    worker.fake.deliver(b"HEARTBEAT", {"broker": "b2"})
    [(_, hello)] = worker.fake.take(b"HELLO")
    assert hello["running"] == [{"id": 3, "token": 1}]
    welcome(worker, "b2")
    # One slot is busy with task 3: one credit.
    assert len(worker.fake.take(b"READY")) == 1


def test_answers_the_brokers_heartbeat_when_its_own_is_due_first(
    worker, clock
):
    worker.fake.deliver(b"HEARTBEAT", {"broker": "b1"})
    assert worker.fake.take(b"HEARTBEAT") == []  # not welcomed yet
    welcome(worker)
    worker.fake.take()
    clock.advance(0.6)
    # Its own is due in 0.4 s, before the broker's next: it goes now.
    worker.fake.deliver(b"HEARTBEAT", {"broker": "b1"})
    assert worker.fake.take(b"HEARTBEAT") == [(b"HEARTBEAT", {"running": []})]
    # The next one is a whole interval later, not at the old time.
    clock.advance(0.9)
    assert worker.fake.take(b"HEARTBEAT") == []
    clock.advance(0.1)
    assert len(worker.fake.take(b"HEARTBEAT")) == 1


def test_a_heartbeat_that_crossed_the_brokers_is_not_sent_again(worker, clock):
    welcome(worker)
    worker.fake.take()
    clock.advance(1.0)
    assert len(worker.fake.take(b"HEARTBEAT")) == 1
    clock.advance(0.05)
    worker.fake.deliver(b"HEARTBEAT", {"broker": "b1"})
    assert worker.fake.take(b"HEARTBEAT") == []


#: The clock's step in _beats_against; a timer runs at the end of the step
#: in which it falls due, so times measured there are up to a step late.
STEP = 0.01


def _beats_against(worker, clock, arrivals, until):
    """
    Deliver the broker's heartbeats at the times ``arrivals`` while the
    clock runs to ``until`` in steps of STEP; return the times at which
    the worker sent heartbeats.
    """
    beats = []
    arrivals = list(arrivals)
    for _ in range(int(round(until / STEP))):
        clock.advance(STEP)
        if arrivals and clock.seconds() >= arrivals[0] - 1e-9:
            arrivals.pop(0)
            worker.fake.deliver(b"HEARTBEAT", {"broker": "b1"})
        for _ in worker.fake.take(b"HEARTBEAT"):
            beats.append(clock.seconds())
    return beats


def test_one_heartbeat_per_interval_whether_the_brokers_is_early_or_late(
    worker, clock
):
    welcome(worker)
    worker.fake.take()
    # The broker's heartbeats come every second, give or take 30 ms.
    arrivals = [0.7, 1.72, 2.69, 3.71, 4.70, 5.73, 6.68, 7.70]
    beats = _beats_against(worker, clock, arrivals, 8.0)
    assert len(beats) == len(arrivals)
    # Never more than an interval apart, and each one close to a broker's
    # heartbeat: the workers' heartbeats reach the broker together.
    assert all(b - a <= 1.0 + STEP for a, b in zip(beats, beats[1:]))
    assert all(min(abs(b - a) for a in arrivals) <= 0.03 for b in beats)


def test_a_worker_out_of_step_falls_into_step(worker, clock):
    welcome(worker)
    worker.fake.take()
    # The broker's heartbeats come 0.4 s after the worker's own would.
    arrivals = [1.4 + k for k in range(5)]
    beats = _beats_against(worker, clock, arrivals, 6.0)
    # One extra heartbeat, once, then one per interval in step.
    assert len(beats) == 6
    assert beats[0] == pytest.approx(1.0, abs=STEP)
    assert beats[1:] == pytest.approx(arrivals, abs=STEP)


def test_a_slower_heartbeat_is_not_sent_more_often(handler, clock):
    sockets = []

    def connect(endpoint, on_message):
        sockets.append(FakeSocket(on_message, endpoint))
        return sockets[-1]

    w = WorkerService(
        WorkerConfig(name="w", heartbeat=5.0), {}, clock, connect=connect
    )
    w.startService()
    w.fake = sockets[0]
    welcome(w)  # the broker's interval is 1 s
    beats = _beats_against(w, clock, [k + 0.5 for k in range(20)], 20.0)
    # In step with the broker's, so at most one of its intervals early.
    assert 4 <= len(beats) <= 5
    assert all(
        4.0 - STEP <= b - a <= 5.0 + STEP for a, b in zip(beats, beats[1:])
    )
    result_of(w.stopService())


def test_other_messages_do_not_stand_in_for_a_heartbeat(
    worker, handler, clock
):
    welcome(worker)
    worker.fake.deliver(b"TASK", task(5))
    worker.fake.take()
    # The other slot sends a result every quarter of a second.
    for k in range(4):
        clock.advance(0.25)
        worker.fake.deliver(b"TASK", task(100 + k))
        handler.pending[100 + k].callback(k)
    # The heartbeat still goes: it alone tells the broker what runs here.
    [(_, beat)] = worker.fake.take(b"HEARTBEAT")
    assert beat["running"] == [{"id": 5, "token": 1}]


def test_silent_broker_is_presumed_lost(worker, clock):
    welcome(worker)
    worker.fake.take()
    clock.advance(1)
    assert worker.fake.take(b"HELLO") == []
    clock.advance(3)
    assert worker.fake.take(b"HELLO")
    assert worker.broker_instance is None


def test_rehello_makes_it_announce_again(worker):
    welcome(worker)
    worker.fake.take()
    worker.fake.deliver(b"REHELLO", {"broker": "b9"})
    assert len(worker.fake.take(b"HELLO")) == 1


def test_fatal_error_is_reported(worker):
    worker.fake.deliver(
        b"ERROR",
        {
            "code": "name_taken",
            "message": "a live worker named 'w'\nis here",
            "fatal": True,
        },
    )
    assert worker.refused == ["a live worker named 'w' is here"]


def test_unknown_handler_fails_the_attempt(worker):
    welcome(worker)
    worker.fake.take()
    worker.fake.deliver(b"TASK", task(4, handler="resize"))
    [(_, result)] = worker.fake.take(b"RESULT")
    assert result["state"] == "failed"
    assert "no handler 'resize'" in result["error"]


def test_bad_message_from_broker_is_ignored(worker):
    welcome(worker)
    worker.fake.take()
    worker.fake.on_message([b"junk"])
    worker.fake.on_message([codec.SIGNATURE, b"TASK", b'{"id": "x"}'])
    assert worker.fake.take() == []
    assert worker.tasks == {}


def nested(depth):
    value = 0
    for _ in range(depth):
        value = [value]
    return value


def test_a_task_it_cannot_read_fails_its_attempt_and_frees_the_slot(worker):
    welcome(worker)
    worker.fake.take()
    worker.fake.deliver(b"TASK", task(4, payload=nested(65), token=7))
    [(_, result)] = worker.fake.take(b"RESULT")
    assert result["id"] == 4 and result["token"] == 7
    assert result["state"] == "failed" and result["ready"] is True
    assert result["error"] == (
        "worker w could not read the task: TASK: field 'payload' is nested "
        "deeper than 64 levels"
    )
    assert worker.tasks == {} and worker.free_slots == 2
    # Kept until acknowledged, like every result.
    assert (4, 7) in worker.unacked


def test_a_result_is_encoded_once_and_sent_as_before(worker, monkeypatch):
    from taskbroker.worker import service

    def again(value, what):
        raise AssertionError("the result was encoded again")

    # The runner checked and encoded it; the RESULT reuses that text.
    monkeypatch.setattr(service, "encode_value", again)
    welcome(worker)
    worker.fake.take()
    payload = {"a": [1, 2.5, "\u00e9"], "b": None}
    worker.fake.deliver(b"TASK", task(4, handler="echo", payload=payload))
    [(_, result)] = worker.fake.take(b"RESULT")
    assert result == {
        "id": 4,
        "token": 1,
        "state": "succeeded",
        "result": payload,
        "error": None,
        "traceback": None,
        "permanent": False,
        "ready": True,
    }


def test_a_task_at_the_depth_limit_runs(worker):
    welcome(worker)
    worker.fake.take()
    worker.fake.deliver(b"TASK", task(4, handler="echo", payload=nested(64)))
    [(_, result)] = worker.fake.take(b"RESULT")
    assert result["state"] == "succeeded" and result["result"] == nested(64)


@pytest.mark.parametrize(
    "value, error",
    [
        (nested(65), "result is nested deeper than 64 levels"),
        (
            {1, 2},
            "result is not JSON-serialisable: Object of type set is not "
            "JSON serializable",
        ),
        (
            float("nan"),
            "result is not JSON-serialisable: Out of range float "
            "values are not JSON compliant",
        ),
    ],
)
def test_a_result_it_cannot_send_fails_the_attempt(
    worker, handler, value, error
):
    welcome(worker)
    worker.fake.deliver(b"TASK", task(10))
    worker.fake.take()
    handler.pending[10].callback(value)
    [(_, result)] = worker.fake.take(b"RESULT")
    assert (result["state"], result["result"]) == ("failed", None)
    assert result["error"] == error and result["ready"] is True


def test_stop_waits_for_running_tasks_and_their_acks(worker, handler, clock):
    welcome(worker)
    worker.fake.deliver(b"TASK", task(5))
    worker.fake.take()
    stopped = worker.stopService()
    clock.advance(1)
    assert not stopped.called
    worker.fake.take()
    handler.pending[5].callback("done")
    # No new credit while stopping, but the result goes out.
    assert [c for c, _ in worker.fake.take()] == [b"RESULT"]
    assert not stopped.called
    worker.fake.deliver(b"ACK", {"id": 5, "token": 1})
    assert stopped.called
    assert [c for c, _ in worker.fake.take()] == [b"BYE"]
    assert worker.fake.closed


def test_stop_hands_back_what_outlives_the_grace(worker, handler, clock):
    welcome(worker)
    worker.fake.deliver(b"TASK", task(5, token=4))
    worker.fake.take()
    stopped = worker.stopService()
    clock.advance(30)
    assert stopped.called
    sent = [m for m in worker.fake.take() if m[0] in (b"RESULT", b"BYE")]
    assert sent == [
        (b"RESULT", {"id": 5, "token": 4, "state": "released"}),
        (b"BYE", {}),
    ]
    assert handler.pending[5].called  # cancelled


def test_cancel_stops_the_handler_and_frees_the_slot(worker, handler):
    welcome(worker)
    worker.fake.deliver(b"TASK", task(6, token=2))
    worker.fake.take()
    worker.fake.deliver(b"CANCEL", {"id": 6, "token": 1})  # not this attempt
    assert 6 in worker.tasks
    worker.fake.deliver(b"CANCEL", {"id": 6, "token": 2})
    assert 6 not in worker.tasks
    assert handler.pending[6].called
    # No result goes back; the slot asks for work again.
    assert [c for c, _ in worker.fake.take()] == [b"READY"]


def test_time_limit_fails_the_attempt(worker, handler, clock):
    welcome(worker)
    worker.fake.deliver(b"TASK", task(8, time_limit=2.0))
    worker.fake.take()
    clock.advance(2.0)
    [(_, result)] = worker.fake.take(b"RESULT")
    assert result["state"] == "failed"
    assert result["error"] == "time limit of 2 s exceeded"


def test_unacknowledged_result_is_sent_again(worker, handler, clock):
    welcome(worker)
    worker.fake.deliver(b"TASK", task(9))
    handler.pending[9].callback(1)
    worker.fake.take()
    for _ in range(3):
        clock.advance(1)
        worker.fake.deliver(b"HEARTBEAT", {"broker": "b1"})
    assert worker.fake.take(b"RESULT") == []
    clock.advance(1)
    assert len(worker.fake.take(b"RESULT")) == 1


def test_broker_silence_is_judged_by_its_announced_heartbeat(worker, clock):
    worker.fake.deliver(
        b"WELCOME",
        {"broker": "b1", "priorities": ["normal"], "heartbeat": 5.0},
    )
    worker.fake.take()
    clock.advance(10)
    assert worker.fake.take(b"HELLO") == []  # 10 s < 5 s x 3 misses
    clock.advance(6)
    assert worker.fake.take(b"HELLO")


def _not_welcomed(events):
    return [e for e in events if e["log_format"].startswith("not welcomed")]


def test_a_worker_nobody_welcomes_says_so_less_and_less_often(worker, clock):
    with capturedLogs() as events:
        for _ in range(13):
            clock.advance(1)
    # After an allowance (3 heartbeats of 1 s), then at each doubling.
    warnings = _not_welcomed(events)
    assert [e["waited"] for e in warnings] == [3.0, 6.0, 12.0]
    assert warnings[0]["endpoint"] == "tcp://127.0.0.1:5555"
    assert warnings[0]["log_level"].name == "warn"
    assert "CURVE" not in warnings[0]["log_format"]
    welcome(worker)
    with capturedLogs() as events:
        for _ in range(30):
            clock.advance(1)
            worker.fake.deliver(b"HEARTBEAT", {"broker": "b1"})
    assert _not_welcomed(events) == []


def test_with_curve_the_warning_names_the_keys(clock, handler):
    # A wrong server key or an unauthorized key fails ZeroMQ's handshake,
    # which the socket's user never hears of.
    w = WorkerService(
        WorkerConfig(name="w"),
        {"manual": handler},
        clock,
        connect=lambda endpoint, on_message: FakeSocket(on_message, endpoint),
        curve=(b"s" * 40, b"p" * 40, b"k" * 40),
    )
    w.startService()
    try:
        with capturedLogs() as events:
            clock.advance(1)
            clock.advance(1)
            clock.advance(1)
        [warning] = _not_welcomed(events)
        assert (
            "--curve-server-key is this broker's public key"
            in (warning["log_format"])
        )
    finally:
        stopped = w.stopService()
        clock.advance(w.config.grace)
        result_of(stopped)


def test_a_result_too_large_to_send_fails_the_attempt(worker, handler):
    welcome(worker)
    worker.fake.deliver(b"TASK", task(10))
    worker.fake.take()
    handler.pending[10].callback("x" * (2 * 1024 * 1024))
    [(_, result)] = worker.fake.take(b"RESULT")
    assert result["state"] == "failed" and result["result"] is None
    assert "exceeds the limit" in result["error"]


def test_a_long_error_is_cut_to_fit(worker, handler):
    welcome(worker)
    worker.fake.deliver(b"TASK", task(11))
    worker.fake.take()
    handler.pending[11].errback(ValueError("e" * 2_000_000))
    [(_, result)] = worker.fake.take(b"RESULT")
    assert len(result["error"]) < 70_000 and len(result["traceback"]) < 70_000


def test_stopping_worker_drops_its_credits_and_hands_back_late_tasks(
    worker, handler, clock
):
    welcome(worker)
    worker.fake.deliver(b"TASK", task(12))
    worker.fake.take()
    worker.stopService()
    [(_, hello)] = worker.fake.take(b"HELLO")
    assert hello["slots"] == 1 and hello["running"] == [{"id": 12, "token": 1}]
    # A task the broker sent before it heard goes straight back.
    worker.fake.deliver(b"TASK", task(13, token=5))
    assert worker.fake.take(b"RESULT") == [
        (b"RESULT", {"id": 13, "token": 5, "state": "released"})
    ]
    assert 13 not in worker.tasks


def test_stopping_without_a_broker_does_not_wait_for_acks(
    worker, handler, clock
):
    welcome(worker)
    worker.fake.deliver(b"TASK", task(14))
    handler.pending[14].callback(1)  # its result is never acknowledged
    stopped = worker.stopService()
    assert not stopped.called  # the broker may still acknowledge it
    for _ in range(4):
        clock.advance(1)  # the broker stays silent: presumed gone
    assert stopped.called


# -- failover lists ------------------------------------------------------------

BROKERS = (
    "tcp://127.0.0.1:5001",
    "tcp://127.0.0.1:5002",
    "tcp://127.0.0.1:5003",
)


@pytest.fixture
def fleet_worker(clock, handler):
    """
    A worker of a failover list of three brokers; ``w.sockets`` holds
    every socket it made, in order.
    """
    sockets = []

    def connect(endpoint, on_message):
        sockets.append(FakeSocket(on_message, endpoint))
        return sockets[-1]

    w = WorkerService(
        WorkerConfig(
            name="w", concurrency=2, broker=BROKERS, failover_after=10.0
        ),
        {"manual": handler},
        clock,
        connect=connect,
    )
    w.sockets = sockets
    w.startService()
    yield w
    stopped = w.stopService()
    clock.advance(w.config.grace)
    result_of(stopped)


def welcome_on(worker, instance):
    worker.fake = worker.sockets[-1]
    welcome(worker, instance)


def expected_order(name, count=3):
    start = start_position(name, count)
    return [BROKERS[(start + i) % count] for i in range(count + 1)]


def test_a_worker_starts_on_the_broker_its_name_points_to(clock, handler):
    for name in ("w", "alpha", "worker-12", "x"):
        sockets = []

        def connect(endpoint, on_message, sockets=sockets):
            sockets.append(FakeSocket(on_message, endpoint))
            return sockets[-1]

        w = WorkerService(
            WorkerConfig(name=name, broker=BROKERS), {}, clock, connect=connect
        )
        w.startService()
        assert [s.endpoint for s in sockets] == [expected_order(name)[0]]
        assert w.endpoint == sockets[0].endpoint
        assert sockets[0].take(b"HELLO")
        result_of(w.stopService())


def test_a_lost_broker_is_left_for_the_next_with_tasks_and_results(
    fleet_worker, handler, clock
):
    w = fleet_worker
    with capturedLogs() as events:
        welcome_on(w, "b1")
        w.fake.deliver(b"TASK", task(7))
        w.fake.deliver(b"TASK", task(8, token=4))
        handler.pending[7].callback("done")  # its ACK never comes
        first = w.sockets[0]
        first.take()
        # Three heartbeat intervals of silence, and a bit.
        clock.advance(1)
        clock.advance(1)
        clock.advance(1)
        assert len(w.sockets) == 1
        clock.advance(1)
    assert first.closed
    [second] = w.sockets[1:]
    assert second.endpoint == expected_order("w")[1]
    [(_, hello)] = second.take(b"HELLO")
    # The new broker may adopt the attempt that still runs here.
    assert hello["running"] == [{"id": 8, "token": 4}]
    [moved] = [
        e for e in events if e["log_format"].startswith("leaving broker")
    ]
    assert (moved["previous"], moved["endpoint"]) == tuple(
        expected_order("w")[:2]
    )
    assert "silent" in moved["log_format"]
    # The result that was never acknowledged goes to the new broker.
    welcome_on(w, "b2")
    [(_, result)] = second.take(b"RESULT")
    assert (result["id"], result["token"], result["result"]) == (7, 1, "done")
    assert len(second.take(b"READY")) == 1


def test_moves_go_round_the_list(fleet_worker, clock):
    w = fleet_worker
    seen = [w.sockets[-1].endpoint]
    for k in range(3):
        welcome_on(w, f"b{k}")
        for _ in range(4):
            clock.advance(1)
        seen.append(w.sockets[-1].endpoint)
    assert seen == expected_order("w")
    assert all(s.closed for s in w.sockets[:-1])


def test_a_broker_that_never_answers_is_left_after_an_allowance(
    fleet_worker, clock
):
    w = fleet_worker
    for _ in range(3):
        clock.advance(1)
    assert len(w.sockets) == 1
    clock.advance(1)
    assert [s.endpoint for s in w.sockets] == expected_order("w")[:2]
    assert w.sockets[1].take(b"HELLO")


def test_a_single_broker_is_never_left(worker, clock):
    welcome(worker)
    for _ in range(30):
        clock.advance(1)
        worker.fake.deliver(b"HEARTBEAT", {"broker": "b1", "store": "failing"})
    clock.advance(10)
    assert not worker.fake.closed
    assert worker.endpoint == "tcp://127.0.0.1:5555"


def test_a_failing_store_for_failover_after_seconds_moves_the_worker(
    fleet_worker, clock
):
    w = fleet_worker
    welcome_on(w, "b1")
    with capturedLogs() as events:
        for _ in range(10):
            w.fake.deliver(b"HEARTBEAT", {"broker": "b1", "store": "failing"})
            clock.advance(1)
        assert len(w.sockets) == 1
        w.fake.deliver(b"HEARTBEAT", {"broker": "b1", "store": "failing"})
    assert [s.endpoint for s in w.sockets] == expected_order("w")[:2]
    [warned, moved] = [e for e in events if e["log_level"].name == "warn"]
    assert warned["log_format"].startswith("broker {endpoint} cannot write")
    assert moved["log_format"].startswith("leaving broker")
    assert "database has been failing" in moved["log_format"]
    assert moved["failing"] == 10.0


def test_a_store_that_recovers_in_time_keeps_the_worker(fleet_worker, clock):
    w = fleet_worker
    welcome_on(w, "b1")
    for _ in range(3):
        for _ in range(9):
            w.fake.deliver(b"HEARTBEAT", {"broker": "b1", "store": "failing"})
            clock.advance(1)
        # An older broker's heartbeat, without the field, counts as ok.
        w.fake.deliver(b"HEARTBEAT", {"broker": "b1"})
        clock.advance(1)
    assert len(w.sockets) == 1


def test_a_new_broker_is_judged_afresh(fleet_worker, clock):
    w = fleet_worker
    welcome_on(w, "b1")
    for _ in range(11):
        w.fake.deliver(b"HEARTBEAT", {"broker": "b1", "store": "failing"})
        clock.advance(1)
    assert len(w.sockets) == 2
    welcome_on(w, "b2")
    for _ in range(10):
        w.fake.deliver(b"HEARTBEAT", {"broker": "b2", "store": "failing"})
        clock.advance(1)
    assert len(w.sockets) == 2
    w.fake.deliver(b"HEARTBEAT", {"broker": "b2", "store": "failing"})
    assert [s.endpoint for s in w.sockets] == expected_order("w")[:3]


def test_a_stopping_worker_may_move_and_leaves_no_timer_behind(clock, handler):
    sockets = []

    def connect(endpoint, on_message):
        sockets.append(FakeSocket(on_message, endpoint))
        return sockets[-1]

    w = WorkerService(
        WorkerConfig(name="w", broker=BROKERS, grace=30.0),
        {"manual": handler},
        clock,
        connect=connect,
    )
    w.startService()
    w.fake = sockets[0]
    welcome(w)
    w.fake.deliver(b"TASK", task(3))
    stopped = w.stopService()
    for _ in range(4):
        clock.advance(1)
    # The broker went silent while the task ran: its result goes to the
    # next broker instead.
    assert len(sockets) == 2
    w.fake = sockets[1]
    welcome(w, "b2")
    handler.pending[3].callback("late")
    [(_, result)] = w.fake.take(b"RESULT")
    assert result["id"] == 3
    w.fake.deliver(b"ACK", {"id": 3, "token": 1})
    result_of(stopped)
    assert w.fake.closed
    assert clock.getDelayedCalls() == []


def test_a_worker_stopped_while_announcing_leaves_no_timer_behind(
    clock, handler
):
    sockets = []

    def connect(endpoint, on_message):
        sockets.append(FakeSocket(on_message, endpoint))
        return sockets[-1]

    w = WorkerService(
        WorkerConfig(name="w", broker=BROKERS, grace=5.0),
        {"manual": handler},
        clock,
        connect=connect,
    )
    w.startService()
    w.fake = sockets[0]
    welcome(w)
    w.fake.deliver(b"TASK", task(3))
    stopped = w.stopService()
    for _ in range(5):
        clock.advance(1)
    assert len(sockets) == 2  # moved, and no broker answers there
    result_of(stopped)
    assert sockets[-1].closed
    assert clock.getDelayedCalls() == []
