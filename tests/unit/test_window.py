"""
Tests for taskbroker.broker.window: which queued tasks the broker holds in
memory, and for the broker's use of it with a store deeper than the window.
"""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock

from taskbroker.broker import backlog
from taskbroker.broker.core import Broker
from taskbroker.broker.window import Windows
from taskbroker.config import BrokerConfig
from taskbroker.protocol import codec
from taskbroker.testing import MemoryStore, result_of
from taskbroker.transport.zmq import Sender

KEY = (1, "echo")


def test_a_whole_queue_holds_new_tasks_until_full():
    w = Windows(4)
    assert KEY not in w
    for task_id, waiting in zip(range(1, 5), range(4)):
        assert w.hold(KEY, task_id - 1, waiting)
    assert not w.hold(KEY, 4, 4)
    assert KEY in w and w.truncated() == [KEY]
    # Later tasks stay in the store too, even when the window has room.
    assert not w.hold(KEY, 5, 0)


def test_a_load_starts_below_half_and_reads_after_the_cursor():
    w = Windows(4)
    w.leave(KEY, 10)
    assert w.start(KEY, 2) is None
    assert w.start(KEY, 1) == (10, 3)
    # One load at a time.
    assert w.start(KEY, 0) is None
    w.loaded(KEY, 13, exhausted=False)
    assert w.start(KEY, 0) == (13, 4)
    w.loaded(KEY, 15, exhausted=True)
    assert KEY not in w
    assert w.start(KEY, 0) is None
    assert w.hold(KEY, 20, 0)


def test_a_task_left_during_a_load_keeps_the_queue_truncated():
    w = Windows(4)
    w.leave(KEY, 0)
    assert w.start(KEY, 0) == (0, 4)
    # Submitted while the load reads: the load may not have seen it.
    assert not w.hold(KEY, 99, 0)
    w.loaded(KEY, 3, exhausted=True)
    assert KEY in w
    assert w.start(KEY, 0) == (99, 4)


def test_a_failed_load_keeps_its_cursor():
    w = Windows(4)
    w.leave(KEY, 7)
    w.start(KEY, 0)
    w.failed(KEY)
    assert w.start(KEY, 0) == (7, 4)


def test_positions_may_be_pairs():
    w = Windows(2)
    w.leave("delayed", (-float("inf"), 0))
    assert w.start("delayed", 0) == ((-float("inf"), 0), 2)
    w.loaded("delayed", (10.0, 4), exhausted=False)
    assert not w.hold("delayed", (5.0, 8), 0)
    assert w.start("delayed", 0) == ((5.0, 8), 2)


# -- the broker with a deep store ------------------------------------------


@pytest.fixture
def small_windows(monkeypatch):
    monkeypatch.setattr(backlog, "QUEUE_WINDOW", 4)
    monkeypatch.setattr(backlog, "DELAYED_WINDOW", 4)


class Peers:
    def __init__(self):
        self.sent = []

    def send(self, identity, frames):
        assert frames[0] == codec.SIGNATURE
        self.sent.append((identity, frames[1], json.loads(frames[2])))
        return True

    def tasks(self):
        found = [body for _, command, body in self.sent if command == b"TASK"]
        self.sent.clear()
        return found


def open_store():
    clock = Clock()
    store = MemoryStore(clock)
    result_of(store.open())
    return clock, store


def start_broker(store, clock, peers, **config):
    broker = Broker(
        BrokerConfig(**config), store, clock, peers.send, instance_id="b1"
    )
    result_of(broker.load())
    return broker


def worker(broker, name="w1", **fields):
    identity = f"{name}/x".encode()
    broker.handle(
        Sender(identity),
        codec.encode(
            b"HELLO",
            {
                "name": name,
                "handlers": ["echo", "other"],
                "slots": 1,
                "heartbeat": 1.0,
                **fields,
            },
        ),
    )
    return identity


def run_all(broker, peers, identity, limit=1000):
    """
    Let one worker run tasks until none is left: each TASK answered with a
    RESULT that asks for the next.
    """
    broker.handle(Sender(identity), codec.encode(b"READY", {}))
    ran = []
    for _ in range(limit):
        tasks = peers.tasks()
        if not tasks:
            return ran
        [task] = tasks
        ran.append(task["id"])
        broker.handle(
            Sender(identity),
            codec.encode(
                b"RESULT",
                {
                    "id": task["id"],
                    "token": task["token"],
                    "state": "succeeded",
                    "result": None,
                    "ready": True,
                },
            ),
        )
    raise AssertionError("still running")


def held(broker):
    return len(broker.dispatcher) + len(broker.backlog.delayed)


def test_start_holds_one_window_of_a_deep_queue(small_windows):
    clock, store = open_store()
    ids = [store.insert_external("echo", str(i)).id for i in range(30)]
    peers = Peers()
    broker = start_broker(store, clock, peers)
    assert len(broker.dispatcher) == 4
    ran = run_all(broker, peers, worker(broker))
    # Every task ran once, oldest first, the window refilled as it drained.
    assert ran == ids
    assert all(result_of(store.get(i)).state == "succeeded" for i in ids)


def test_submitted_tasks_beyond_the_window_wait_in_the_store(small_windows):
    clock, store = open_store()
    peers = Peers()
    broker = start_broker(store, clock, peers)
    for i in range(10):
        broker.handle(
            Sender(b"client"),
            codec.encode(
                b"SUBMIT",
                {"req": str(i), "tasks": [{"handler": "echo", "payload": i}]},
            ),
        )
    assert len(broker.dispatcher) == 4
    assert run_all(broker, peers, worker(broker)) == list(range(1, 11))


def test_a_high_task_found_behind_a_deep_low_queue_runs_first(small_windows):
    clock, store = open_store()
    for i in range(20):
        store.insert_external("echo", str(i), priority="low")
    peers = Peers()
    broker = start_broker(store, clock, peers)
    urgent = store.insert_external("echo", "1", priority="high").id
    result_of(broker.poll())
    assert run_all(broker, peers, worker(broker))[0] == urgent


def test_invalid_queues_are_failed_at_start_without_reading_them(
    small_windows,
):
    clock, store = open_store()
    bad = [
        store.insert_external("echo", "1", priority="urgent").id
        for _ in range(10)
    ]
    good = store.insert_external("echo", "1").id
    peers = Peers()
    broker = start_broker(store, clock, peers)
    for task_id in bad:
        row = result_of(store.get(task_id))
        assert row.state == "failed" and "'urgent'" in row.error
    assert run_all(broker, peers, worker(broker)) == [good]


def test_delayed_tasks_beyond_their_window_come_in_time(small_windows):
    clock, store = open_store()
    clock.advance(1000)
    ids = [
        store.insert_external("echo", str(i), run_at=1000.0 + 10 * i).id
        for i in reversed(range(12))
    ][::-1]
    peers = Peers()
    broker = start_broker(store, clock, peers)
    # The first is due now: it waits for a worker, the next three for
    # their time.
    assert (len(broker.dispatcher), len(broker.backlog.delayed)) == (1, 3)
    identity = worker(broker)
    broker.handle(Sender(identity), codec.encode(b"READY", {}))
    ran = []
    for step in range(12):
        [task] = peers.tasks()
        assert clock.seconds() == 1000.0 + 10 * step
        ran.append(task["id"])
        broker.handle(
            Sender(identity),
            codec.encode(
                b"RESULT",
                {
                    "id": task["id"],
                    "token": task["token"],
                    "state": "succeeded",
                    "result": None,
                    "ready": True,
                },
            ),
        )
        assert held(broker) <= 4
        clock.advance(10)
    assert ran == ids


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["sql", "submit", "run", "poll", "cancel"]),
            st.sampled_from(["high", "normal", "low", None]),
            st.sampled_from(["echo", "other"]),
        ),
        max_size=60,
    )
)
def test_every_queued_task_runs_once_however_the_window_moves(steps):
    """
    Whatever mix of SQL inserts, submissions, polls, cancels and work, the
    broker never holds much more than its windows, and in the end every
    queued task ran exactly once.
    """
    original = backlog.QUEUE_WINDOW
    backlog.QUEUE_WINDOW = 3
    try:
        clock, store = open_store()
        for i in range(5):
            store.insert_external("echo", str(i), priority="low")
        peers = Peers()
        broker = start_broker(store, clock, peers)
        identity = worker(broker)
        ran = []
        for n, (action, priority, handler) in enumerate(steps):
            if action == "sql":
                store.insert_external(handler, str(n), priority=priority)
            elif action == "submit":
                broker.handle(
                    Sender(b"client"),
                    codec.encode(
                        b"SUBMIT",
                        {
                            "req": str(n),
                            "tasks": [
                                {
                                    "handler": handler,
                                    "payload": n,
                                    "priority": priority or "normal",
                                }
                            ],
                        },
                    ),
                )
            elif action == "poll":
                result_of(broker.poll())
            elif action == "cancel":
                queued = result_of(store.list("queued", None, 0, 1))
                if queued:
                    broker.handle(
                        Sender(b"client"),
                        codec.encode(
                            b"CANCEL", {"req": str(n), "id": queued[0].id}
                        ),
                    )
            else:
                broker.handle(Sender(identity), codec.encode(b"READY", {}))
                for task in peers.tasks():
                    ran.append(task["id"])
                    broker.handle(
                        Sender(identity),
                        codec.encode(
                            b"RESULT",
                            {
                                "id": task["id"],
                                "token": task["token"],
                                "state": "succeeded",
                                "result": None,
                            },
                        ),
                    )
            # Three levels x two handlers, a window each, plus what one
            # step can add before the window is checked.
            assert len(broker.dispatcher) <= 6 * (3 + 1) + 1
        result_of(broker.poll())
        ran.extend(run_all(broker, peers, identity))
        queued = result_of(store.list("queued", None, 0, 1000))
        assert queued == []
        succeeded = [
            row.id for row in result_of(store.list("succeeded", None, 0, 1000))
        ]
        assert sorted(ran) == sorted(succeeded)
        assert len(ran) == len(set(ran))
    finally:
        backlog.QUEUE_WINDOW = original


def test_a_short_delay_is_not_held_back_by_a_full_delayed_window(
    small_windows,
):
    clock, store = open_store()
    peers = Peers()
    broker = start_broker(store, clock, peers)
    for i in range(6):
        broker.handle(
            Sender(b"client"),
            codec.encode(
                b"SUBMIT",
                {"req": str(i), "tasks": [{"handler": "echo", "delay": 3600}]},
            ),
        )
    assert len(broker.backlog.delayed) == 4
    broker.handle(
        Sender(b"client"),
        codec.encode(
            b"SUBMIT",
            {"req": "soon", "tasks": [{"handler": "echo", "delay": 1}]},
        ),
    )
    soon = 7
    assert soon in broker.backlog.delayed and len(broker.backlog.delayed) == 4
    identity = worker(broker)
    broker.handle(Sender(identity), codec.encode(b"READY", {}))
    clock.advance(1)
    [task] = peers.tasks()
    assert task["id"] == soon
    # The ones pushed back to the store come in time too.
    ran = [task["id"]]
    broker.handle(
        Sender(identity),
        codec.encode(
            b"RESULT",
            {
                "id": soon,
                "token": task["token"],
                "state": "succeeded",
                "result": None,
                "ready": True,
            },
        ),
    )
    for _ in range(60):
        clock.advance(100)
        result_of(broker.poll())
        for task in peers.tasks():
            ran.append(task["id"])
            broker.handle(
                Sender(identity),
                codec.encode(
                    b"RESULT",
                    {
                        "id": task["id"],
                        "token": task["token"],
                        "state": "succeeded",
                        "result": None,
                        "ready": True,
                    },
                ),
            )
        assert held(broker) <= 4 + 1
    assert sorted(ran) == list(range(1, 8))


def test_due_rows_from_the_delayed_window_keep_to_their_queue_window(
    small_windows,
):
    clock, store = open_store()
    clock.advance(1000)
    for i in range(30):
        store.insert_external("echo", str(i), run_at=500.0 + i)
    peers = Peers()
    broker = start_broker(store, clock, peers)
    for _ in range(5):
        result_of(broker.poll())
        assert held(broker) <= 4 + 4
    ran = run_all(broker, peers, worker(broker))
    assert sorted(ran) == list(range(1, 31))


def test_retry_of_a_sql_row_with_null_priority(small_windows):
    clock, store = open_store()
    task_id = store.insert_external("echo", "1").id
    peers = Peers()
    broker = start_broker(store, clock, peers)
    broker.handle(
        Sender(b"client"), codec.encode(b"CANCEL", {"req": "c", "id": task_id})
    )
    broker.handle(
        Sender(b"client"), codec.encode(b"RETRY", {"req": "r", "id": task_id})
    )
    assert run_all(broker, peers, worker(broker)) == [task_id]


def test_a_run_at_that_is_no_time_is_rejected_at_start(small_windows):
    clock, store = open_store()
    bad = store.insert_external("echo", "1", run_at="tomorrow").id
    good = store.insert_external("echo", "2").id
    peers = Peers()
    broker = start_broker(store, clock, peers)
    row = result_of(store.get(bad))
    assert row.state == "failed" and "run_at" in row.error
    assert run_all(broker, peers, worker(broker)) == [good]
