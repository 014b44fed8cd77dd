"""
Tests for taskbroker.broker.core: the broker's message handling, driven
with a MemoryStore and a Clock, and a list in place of the socket.
"""

import pytest
from twisted.internet import defer

import taskbroker
from taskbroker.broker.core import Broker
from taskbroker.config import BrokerConfig
from taskbroker.errors import StoreError, WriteRefused
from taskbroker.protocol import codec
from taskbroker.testing import MemoryStore, result_of
from taskbroker.transport.zmq import Sender


@pytest.fixture
def owned_store(clock):
    """
    A store one broker owns: for what only a broker that claims ahead
    does (windows, polling, adopting every running row at start).
    """
    s = MemoryStore(clock)
    result_of(s.open())
    return s


def started_broker(store, clock, peers):
    b = Broker(BrokerConfig(), store, clock, peers.send, instance_id="b1")
    result_of(b.load())
    return b


@pytest.fixture
def broker(store, clock, peers):
    return started_broker(store, clock, peers)


@pytest.fixture
def owned_broker(owned_store, clock, peers):
    return started_broker(owned_store, clock, peers)


def send(broker, identity, command, body):
    broker.handle(Sender(identity), codec.encode(command, body))


def hello(broker, identity=b"w1/x", name="w1", **fields):
    body = {"name": name, "slots": 1, "handlers": ["echo"], "heartbeat": 1.0}
    body.update(fields)
    send(broker, identity, b"HELLO", body)


def submit(broker, *tasks, identity=b"client"):
    send(broker, identity, b"SUBMIT", {"req": "r", "tasks": list(tasks)})


def test_hello_is_welcomed(broker, peers):
    hello(broker)
    [(_, command, body)] = peers.take(b"w1/x")
    assert command == b"WELCOME"
    assert body == {
        "broker": "b1",
        "priorities": ["high", "normal", "low"],
        "heartbeat": 1.0,
        "time_limit": None,
        "progress": True,
        "version": taskbroker.__version__,
    }


def test_unknown_level_is_refused(broker, peers):
    hello(broker, priorities=["high", "urgent"])
    [(_, command, body)] = peers.take(b"w1/x")
    assert command == b"ERROR" and body["fatal"] is True
    assert "'urgent'" in body["message"]
    assert broker.dispatcher.worker(b"w1/x") is None


def test_duplicate_live_name_is_refused(broker, peers):
    hello(broker)
    hello(broker, identity=b"w1/y")
    [(_, command, body)] = peers.take(b"w1/y")
    assert command == b"ERROR" and "already connected" in body["message"]


def test_submit_is_answered_after_commit_then_dispatched(broker, peers, store):
    submit(broker, {"handler": "echo", "payload": {"a": 1}})
    [(_, _, reply)] = peers.take(b"client", b"REPLY")
    [task] = reply["tasks"]
    assert task["state"] == "queued" and task["priority"] == "normal"
    assert reply["unserved"] == ["echo"]
    hello(broker)
    send(broker, b"w1/x", b"READY", {})
    [(_, _, sent)] = peers.take(b"w1/x", b"TASK")
    assert sent == {
        "id": task["id"],
        "handler": "echo",
        "payload": {"a": 1},
        "priority": "normal",
        "attempt": 1,
        "max_attempts": 3,
        "token": 1,
        "time_limit": None,
    }
    assert result_of(store.get(task["id"])).state == "running"


def test_task_for_a_ready_worker_is_inserted_dispatched(broker, peers, store):
    hello(broker)
    send(broker, b"w1/x", b"READY", {})
    submit(
        broker,
        {"handler": "echo", "payload": {"a": 1}},
        {"handler": "echo", "payload": 2},
    )
    [(_, _, reply)] = peers.take(b"client", b"REPLY")
    first, second = reply["tasks"]
    # One commit: the first is inserted running, with its first dispatch.
    assert (first["state"], first["worker"], first["attempts"]) == (
        "running",
        "w1",
        1,
    )
    assert second["state"] == "queued"
    [(_, _, sent)] = peers.take(b"w1/x", b"TASK")
    assert (sent["id"], sent["token"], sent["attempt"]) == (first["id"], 1, 1)
    row = result_of(store.get(first["id"]))
    assert (row.state, row.token, row.worker, row.started_at) == (
        "running",
        1,
        "w1",
        row.created_at,
    )
    send(
        broker,
        b"w1/x",
        b"RESULT",
        {
            "id": first["id"],
            "token": 1,
            "state": "succeeded",
            "result": 1,
            "ready": True,
        },
    )
    # The freed slot's next task goes first, then the result's ACK.
    peers.take(b"w1/x", b"WELCOME")
    (_, task, sent), (_, ack, acked) = peers.take(b"w1/x")
    assert (task, sent["id"]) == (b"TASK", second["id"])
    assert (ack, acked) == (b"ACK", {"id": first["id"], "token": 1})


def test_a_claim_not_inserted_gives_its_credit_back(broker, peers, store):
    submit(broker, {"handler": "echo", "unique_key": "k"})
    [(_, _, reply)] = peers.take(b"client", b"REPLY")
    existing = reply["tasks"][0]["id"]
    hello(broker, handlers=["other", "echo"])
    send(broker, b"w1/x", b"READY", {})
    [(_, _, sent)] = peers.take(b"w1/x", b"TASK")
    assert sent["id"] == existing
    send(
        broker,
        b"w1/x",
        b"RESULT",
        {
            "id": existing,
            "token": 1,
            "state": "succeeded",
            "result": 1,
            "ready": True,
        },
    )
    peers.take()
    # Running again meanwhile: the key is free, but hold it with a delay.
    submit(broker, {"handler": "echo", "unique_key": "k2", "delay": 60})
    submit(broker, {"handler": "echo", "unique_key": "k2"})
    [_, (_, _, reply)] = peers.take(b"client", b"REPLY")
    assert reply["existing"] == [reply["tasks"][0]["id"]]
    # The credit the duplicate claimed came back: the next task takes it.
    assert peers.take(b"w1/x", b"TASK") == []
    submit(broker, {"handler": "other"})
    [(_, _, sent)] = peers.take(b"w1/x", b"TASK")
    assert sent["handler"] == "other"
    assert broker.dispatcher.worker(b"w1/x").busy == 1


def test_worker_gone_while_its_task_was_inserted(broker, peers, store):
    class SlowStore:
        # Holds submissions until told, as a database thread would.
        def __init__(self, store):
            self.store, self.held = store, []

        def __getattr__(self, name):
            return getattr(self.store, name)

        def submit(self, tasks):
            d = defer.Deferred()
            self.held.append((d, tasks))
            return d

        def release(self):
            for d, tasks in self.held:
                self.store.submit(tasks).chainDeferred(d)

    slow = broker.store = SlowStore(store)
    hello(broker)
    send(broker, b"w1/x", b"READY", {})
    submit(broker, {"handler": "echo"})
    send(broker, b"w1/x", b"BYE", {})
    slow.release()
    assert peers.take(b"w1/x", b"TASK") == []
    row = result_of(store.get(1))
    # Back in the queue, the attempt not counted, the token spent.
    assert (row.state, row.attempts, row.token) == ("queued", 0, 1)
    hello(broker, identity=b"w2/x", name="w2")
    send(broker, b"w2/x", b"READY", {})
    [(_, _, sent)] = peers.take(b"w2/x", b"TASK")
    assert (sent["id"], sent["token"], sent["attempt"]) == (1, 2, 1)


def test_result_is_recorded_and_acknowledged(broker, peers, store):
    hello(broker)
    send(broker, b"w1/x", b"READY", {})
    submit(broker, {"handler": "echo", "payload": 7})
    peers.take()
    send(
        broker,
        b"w1/x",
        b"RESULT",
        {"id": 1, "token": 1, "state": "succeeded", "result": 7},
    )
    assert peers.take(b"w1/x", b"ACK")[0][2] == {"id": 1, "token": 1}
    row = result_of(store.get(1))
    assert (row.state, row.result) == ("succeeded", "7")
    assert broker.dispatcher.worker(b"w1/x").busy == 0


def test_stale_result_is_ignored_but_acknowledged(broker, peers, store):
    hello(broker)
    send(broker, b"w1/x", b"READY", {})
    submit(broker, {"handler": "echo"})
    send(
        broker,
        b"w1/x",
        b"RESULT",
        {"id": 1, "token": 2, "state": "succeeded", "result": 1},
    )
    assert peers.take(b"w1/x", b"ACK")
    assert result_of(store.get(1)).state == "running"
    assert broker.counters["stale_results"] == 1


def test_unknown_peer_is_asked_to_announce(broker, peers):
    send(broker, b"w9/z", b"READY", {})
    [(_, command, body)] = peers.take(b"w9/z")
    assert (command, body) == (b"REHELLO", {"broker": "b1"})


def test_lost_worker_task_is_requeued_at_the_front(broker, peers, clock):
    hello(broker)
    send(broker, b"w1/x", b"READY", {})
    submit(
        broker,
        {"handler": "echo", "payload": 1},
        {"handler": "echo", "payload": 2},
    )
    peers.take()
    clock.advance(3.5)
    broker.sweep()
    assert broker.counters["lost_workers"] == 1
    hello(broker, identity=b"w2/x", name="w2")
    send(broker, b"w2/x", b"READY", {})
    [(_, _, task)] = peers.take(b"w2/x", b"TASK")
    assert (task["id"], task["attempt"], task["token"]) == (1, 2, 2)


def test_heartbeats_keep_a_worker(broker, peers, clock):
    hello(broker)
    for _ in range(10):
        clock.advance(1)
        send(broker, b"w1/x", b"HEARTBEAT", {})
        broker.sweep()
    assert broker.counters["lost_workers"] == 0
    assert len(peers.take(b"w1/x", b"HEARTBEAT")) == 10


def test_heartbeats_say_whether_the_store_can_be_written(
    broker, store, peers, clock
):
    hello(broker)
    peers.take()
    broker.sweep()
    [(_, _, body)] = peers.take(b"w1/x", b"HEARTBEAT")
    assert body == {"broker": "b1", "store": "ok"}
    store.write_error = "database x: transaction failed: disk I/O error"
    clock.advance(1)
    send(broker, b"w1/x", b"HEARTBEAT", {})
    broker.sweep()
    [(_, _, body)] = peers.take(b"w1/x", b"HEARTBEAT")
    assert body == {"broker": "b1", "store": "failing"}
    store.write_error = None
    clock.advance(1)
    send(broker, b"w1/x", b"HEARTBEAT", {})
    broker.sweep()
    [(_, _, body)] = peers.take(b"w1/x", b"HEARTBEAT")
    assert body["store"] == "ok"


def test_rows_inserted_by_sql_are_validated(owned_broker, owned_store, peers):
    broker, store = owned_broker, owned_store
    good = store.insert_external("echo", '{"a": 1}').id
    bad_json = store.insert_external("echo", "{oops").id
    bad_level = store.insert_external("echo", "1", priority="urgent").id
    result_of(broker.poll())
    assert "not valid JSON" in result_of(store.get(bad_json)).error
    assert "'urgent'" in result_of(store.get(bad_level)).error
    hello(broker)
    send(broker, b"w1/x", b"READY", {})
    [(_, _, task)] = peers.take(b"w1/x", b"TASK")
    assert (task["id"], task["priority"], task["max_attempts"]) == (
        good,
        "normal",
        3,
    )
    # The dispatch fills in the broker's defaults for what SQL left NULL.
    row = result_of(store.get(good))
    assert (row.priority, row.max_attempts, row.state) == (
        "normal",
        3,
        "running",
    )


def test_poll_does_not_adopt_a_submitted_task_twice(owned_broker, peers):
    broker = owned_broker
    submit(broker, {"handler": "echo"})
    result_of(broker.poll())
    assert len(broker.dispatcher) == 1


def test_unknown_level_in_submit_is_an_error(broker, peers):
    submit(broker, {"handler": "echo", "priority": "urgent"})
    [(_, command, body)] = peers.take(b"client")
    assert command == b"ERROR" and body["code"] == "unknown_priority"
    assert body["req"] == "r"


def test_bad_message_from_a_client_gets_an_error(broker, peers):
    broker.handle(Sender(b"client"), [b"junk"])
    broker.handle(Sender(b"client"), [codec.SIGNATURE, b"SUBMIT", b"{"])
    broker.handle(Sender(b"client"), [codec.SIGNATURE, b"NOPE", b"{}"])
    codes = [body["code"] for _, _, body in peers.take(b"client")]
    assert codes == ["protocol", "bad_request", "unknown_command"]
    assert broker.counters["protocol_errors"] == 3


def test_bad_message_from_a_worker_is_dropped(broker, peers):
    hello(broker)
    peers.take()
    broker.handle(Sender(b"w1/x"), [codec.SIGNATURE, b"RESULT", b"{}"])
    assert peers.take() == []


def test_wait_answers_when_the_task_ends(broker, peers, clock):
    hello(broker)
    submit(broker, {"handler": "echo", "max_attempts": 1})
    peers.take()
    send(broker, b"client", b"WAIT", {"req": "w", "id": 1, "timeout": 10})
    assert peers.take(b"client") == []
    send(broker, b"w1/x", b"READY", {})
    send(
        broker,
        b"w1/x",
        b"RESULT",
        {"id": 1, "token": 1, "state": "failed", "error": "boom"},
    )
    [(_, _, reply)] = peers.take(b"client", b"REPLY")
    assert reply["task"]["state"] == "failed"
    assert reply["task"]["error"] == "boom"


def test_a_wait_while_the_result_is_written_waits_for_it(broker, peers, store):
    hello(broker)
    send(broker, b"w1/x", b"READY", {})
    submit(broker, {"handler": "echo"})
    peers.take()
    writing = []
    finish = store.finish

    def held_finish(*args):
        writing.append((defer.Deferred(), args))
        return writing[-1][0]

    store.finish = held_finish
    send(
        broker,
        b"w1/x",
        b"RESULT",
        {"id": 1, "token": 1, "state": "succeeded", "result": 2},
    )
    asked = []
    get = store.get
    store.get = lambda task_id: asked.append(task_id) or get(task_id)
    if broker.claims.shared:
        watch = broker.claims.watch
        broker.claims.watch = lambda task_id: (
            asked.append(task_id) or watch(task_id)
        )
    send(broker, b"client", b"WAIT", {"req": "w", "id": 1, "timeout": 10})
    # Neither read nor watched: this broker is ending it.
    assert asked == []
    [(d, args)] = writing
    finish(*args).chainDeferred(d)
    [(_, _, reply)] = peers.take(b"client", b"REPLY")
    assert (reply["task"]["state"], reply["task"]["result"]) == (
        "succeeded",
        2,
    )


def test_wait_times_out_with_the_current_state(broker, peers, clock):
    submit(broker, {"handler": "echo"})
    peers.take()
    send(broker, b"client", b"WAIT", {"req": "w", "id": 1, "timeout": 5})
    clock.advance(5)
    [(_, _, reply)] = peers.take(b"client", b"REPLY")
    assert reply["task"]["state"] == "queued"


def test_cancel_a_queued_task(broker, peers):
    submit(broker, {"handler": "echo"})
    peers.take()
    send(broker, b"client", b"CANCEL", {"req": "c", "id": 1})
    [(_, _, reply)] = peers.take(b"client", b"REPLY")
    assert reply["task"]["state"] == "cancelled"
    assert len(broker.dispatcher) == 0
    # Cancelling again is harmless.
    send(broker, b"client", b"CANCEL", {"req": "c", "id": 1})
    assert peers.take(b"client")[0][2]["task"]["state"] == "cancelled"
    hello(broker)
    send(broker, b"w1/x", b"READY", {})
    submit(broker, {"handler": "echo"})
    send(
        broker,
        b"w1/x",
        b"RESULT",
        {"id": 2, "token": 1, "state": "succeeded", "result": 1},
    )
    peers.take()
    send(broker, b"client", b"CANCEL", {"req": "c", "id": 2})
    assert peers.take(b"client")[0][2]["code"] == "not_cancellable"
    send(broker, b"client", b"CANCEL", {"req": "c", "id": 99})
    assert peers.take(b"client")[0][2]["code"] == "not_found"


def test_restarted_broker_lets_workers_reclaim_running_attempts(
    owned_store, clock, peers
):
    store = owned_store
    first = Broker(BrokerConfig(), store, clock, peers.send, instance_id="b1")
    result_of(first.load())
    hello(first)
    send(first, b"w1/x", b"READY", {})
    submit(first, {"handler": "echo"}, {"handler": "echo"})
    peers.take()

    second = Broker(BrokerConfig(), store, clock, peers.send, instance_id="b2")
    result_of(second.load())
    hello(second, running=[{"id": 1, "token": 1}])
    clock.advance(10)  # past the reclaim allowance
    send(second, b"w1/x", b"HEARTBEAT", {})
    second.sweep()
    assert result_of(store.get(1)).state == "running"
    send(
        second,
        b"w1/x",
        b"RESULT",
        {"id": 1, "token": 1, "state": "succeeded", "result": None},
    )
    assert result_of(store.get(1)).state == "succeeded"


def test_unclaimed_running_attempts_are_requeued_after_the_reclaim_window(
    owned_store, clock, peers
):
    store = owned_store
    first = Broker(BrokerConfig(), store, clock, peers.send, instance_id="b1")
    result_of(first.load())
    hello(first)
    send(first, b"w1/x", b"READY", {})
    submit(first, {"handler": "echo"})

    second = Broker(BrokerConfig(), store, clock, peers.send, instance_id="b2")
    result_of(second.load())
    # The window: a reconnection (2 s) and an allowance (3 s) each side.
    assert result_of(store.get(1)).state == "running"
    clock.advance(7.9)
    second.sweep()
    assert result_of(store.get(1)).state == "running"
    clock.advance(0.2)
    second.sweep()
    row = result_of(store.get(1))
    assert (row.state, row.attempts) == ("queued", 0)  # not counted
    assert 1 in second.dispatcher


def running_row(store, handler="echo"):
    """
    A task a broker before this one dispatched (token 1), as the store
    has it.
    """
    row = store.insert_external(
        handler, '"x"', priority="normal", max_attempts=3
    )
    assert result_of(store.dispatch(row.id, 1, "w1", 1.0))
    return result_of(store.get(row.id))


def break_row(store, row, **columns):
    """
    Change a row's columns as another program's SQL could (in a database
    without schema 4's constraints).
    """
    broken = row._replace(**columns)
    del store._rows[row.id]
    store._rows[broken.id] = broken
    return broken


@pytest.mark.parametrize(
    "column, value",
    [
        ("token", "abc"),
        ("token", 2**63 - 1),
        ("attempts", "abc"),
        ("created_at", "yesterday"),
        ("id", 2**63 - 1),
        ("payload", "[" * 65 + "]" * 65),
        ("priority", "urgent"),
    ],
)
def test_a_broken_running_row_fails_alone_at_start(
    owned_store, clock, peers, column, value
):
    store = owned_store
    good = running_row(store)
    bad = break_row(store, running_row(store), **{column: value})
    queued = store.insert_external("echo", '"next"')
    broker = Broker(BrokerConfig(), store, clock, peers.send, instance_id="b2")
    result_of(broker.load())
    row = result_of(store.get(bad.id))
    assert row.state == "failed" and column in row.error, row
    assert row.finished_at == clock.seconds()
    assert bad.id not in broker.attempts
    # The good attempt waits for its worker, which claims it; and the
    # queued task goes to the next free slot.
    hello(broker, running=[{"id": good.id, "token": 1}], slots=2)
    send(broker, b"w1/x", b"READY", {})
    [(_, _, task)] = peers.take(b"w1/x", b"TASK")
    assert task["id"] == queued.id and not broker.dispatcher.paused
    send(
        broker,
        b"w1/x",
        b"RESULT",
        {"id": good.id, "token": 1, "state": "succeeded", "result": 1},
    )
    assert result_of(store.get(good.id)).state == "succeeded"


def test_a_running_row_keeps_its_attempt_at_start(owned_store, clock, peers):
    # The highest token and attempt a message carries are a running row's
    # to hold; its next dispatch would go past them, and fails it then.
    store = owned_store
    row = break_row(
        store,
        running_row(store),
        token=codec.MAX_EXACT,
        attempts=codec.MAX_ATTEMPT,
        priority=None,
    )
    broker = Broker(BrokerConfig(), store, clock, peers.send, instance_id="b2")
    result_of(broker.load())
    assert broker.attempts.get(row.id).row.priority == "normal"
    hello(broker, running=[{"id": row.id, "token": codec.MAX_EXACT}])
    assert broker.attempts.get(row.id).session == b"w1/x"


def test_a_submit_the_database_refuses_is_answered_refused(
    broker, peers, store
):
    real_submit = store.submit
    store.submit = lambda tasks: defer.fail(
        WriteRefused("submit failed: CHECK constraint failed: id")
    )
    hello(broker)
    send(broker, b"w1/x", b"READY", {})
    submit(broker, {"handler": "echo"})
    [(_, command, body)] = peers.take(b"client")
    assert command == b"ERROR" and body["code"] == "refused"
    assert body["message"] == (
        "the database refused it: submit failed: CHECK constraint failed: id"
    )
    # Not database trouble: nothing paused, the credit still free.
    assert broker.counters["store_errors"] == 0
    assert not broker.dispatcher.paused
    store.submit = real_submit
    submit(broker, {"handler": "echo"})
    assert len(peers.take(b"w1/x", b"TASK")) == 1


def test_a_dispatch_the_database_refuses_fails_that_task_alone(
    broker, peers, store, clock
):
    submit(broker, {"handler": "echo"}, {"handler": "echo"})
    [(_, _, reply)] = peers.take(b"client", b"REPLY")
    refused, other = [task["id"] for task in reply["tasks"]]
    real_dispatch = store.dispatch

    def dispatch(task_id, token, *args):
        if task_id == refused:
            return defer.fail(
                WriteRefused("dispatch failed: CHECK constraint failed: token")
            )
        return real_dispatch(task_id, token, *args)

    store.dispatch = dispatch
    hello(broker)
    send(broker, b"w1/x", b"READY", {})
    # The credit goes on to the next task at once, and dispatch goes on.
    [(_, _, task)] = peers.take(b"w1/x", b"TASK")
    assert task["id"] == other
    assert not broker.dispatcher.paused
    assert broker.counters["store_errors"] == 0
    row = result_of(store.get(refused))
    assert (row.state, row.error) == (
        "failed",
        "dispatch failed: CHECK constraint failed: token",
    )
    assert refused not in broker.attempts and refused not in broker.dispatcher


def test_stats_and_workers(broker, peers):
    hello(broker, slots=2, handlers=["echo", "sleep"])
    send(broker, b"w1/x", b"READY", {})
    submit(broker, {"handler": "resize"})
    peers.take()
    send(broker, b"client", b"STATS", {"req": "s"})
    stats = peers.take(b"client")[0][2]["stats"]
    assert stats["tasks"] == {"queued": {"normal": 1}}
    assert stats["waiting"] == {"resize": 1}
    assert stats["unserved"] == ["resize"]
    assert (stats["workers"], stats["slots"], stats["free_slots"]) == (1, 2, 1)
    send(broker, b"client", b"WORKERS", {"req": "w"})
    [worker] = peers.take(b"client")[0][2]["workers"]
    assert worker["name"] == "w1" and worker["busy"] == 0
    assert worker["handlers"] == ["echo", "sleep"]
    assert worker["key"] is None  # no CURVE here


def test_a_batch_is_handed_out_most_urgent_first(broker, peers):
    hello(broker)
    send(broker, b"w1/x", b"READY", {})
    submit(
        broker,
        {"handler": "echo", "priority": "low"},
        {"handler": "echo", "priority": "high"},
    )
    [(_, _, sent)] = peers.take(b"w1/x", b"TASK")
    assert sent["priority"] == "high"


def test_polled_rows_are_handed_out_most_urgent_first(broker, peers, store):
    hello(broker)
    send(broker, b"w1/x", b"READY", {})
    store.insert_external("echo", "1", priority="low")
    store.insert_external("echo", "2")
    store.insert_external("echo", "3", priority="high")
    result_of(broker.poll())
    [(_, _, sent)] = peers.take(b"w1/x", b"TASK")
    assert sent["payload"] == 3


# -- reliability -------------------------------------------------------------


def start_one(broker, peers, **spec):
    """
    A worker w1 with one credit, and one submitted task dispatched to it.

    :returns: the TASK body sent.
    """
    hello(broker)
    send(broker, b"w1/x", b"READY", {})
    submit(broker, {"handler": "echo", **spec})
    [(_, _, sent)] = peers.take(b"w1/x", b"TASK")
    peers.take()
    return sent


def fail(broker, sent, identity=b"w1/x", **fields):
    body = {
        "id": sent["id"],
        "token": sent["token"],
        "state": "failed",
        "error": "ValueError: boom",
        "traceback": "Traceback ...",
    }
    body.update(fields)
    send(broker, identity, b"RESULT", body)


def test_failed_attempt_is_retried_after_a_backoff(
    broker, peers, store, clock
):
    sent = start_one(broker, peers)
    fail(broker, sent)
    assert peers.take(b"w1/x", b"ACK")
    row = result_of(store.get(1))
    assert (row.state, row.attempts, row.error) == (
        "queued",
        1,
        "ValueError: boom",
    )
    # First retry after retry_delay (1 s) with equal jitter: 0.5 to 1 s.
    assert 0.5 <= row.run_at - clock.seconds() <= 1.0
    send(broker, b"w1/x", b"READY", {})
    assert peers.take(b"w1/x", b"TASK") == []
    clock.advance(1.0)
    [(_, _, again)] = peers.take(b"w1/x", b"TASK")
    assert (again["attempt"], again["token"]) == (2, 2)


def test_backoff_doubles_up_to_the_maximum(broker):
    for attempt, high in ((1, 1), (2, 2), (3, 4), (12, 300)):
        delay = broker.outcomes.policy.backoff(attempt)
        assert high / 2 <= delay <= high


def test_last_attempt_fails_the_task_with_its_traceback(broker, peers, store):
    sent = start_one(broker, peers, max_attempts=1)
    fail(broker, sent)
    row = result_of(store.get(1))
    assert (row.state, row.error, row.traceback) == (
        "failed",
        "ValueError: boom",
        "Traceback ...",
    )


def test_permanent_failure_is_not_retried(broker, peers, store):
    sent = start_one(broker, peers)
    fail(broker, sent, permanent=True)
    assert result_of(store.get(1)).state == "failed"


def test_released_attempt_is_requeued_without_counting(broker, peers, store):
    sent = start_one(broker, peers)
    send(
        broker,
        b"w1/x",
        b"RESULT",
        {"id": 1, "token": sent["token"], "state": "released"},
    )
    row = result_of(store.get(1))
    assert (row.state, row.attempts, row.token) == ("queued", 0, 1)
    send(broker, b"w1/x", b"READY", {})
    [(_, _, again)] = peers.take(b"w1/x", b"TASK")
    assert (again["attempt"], again["token"]) == (1, 2)


def test_bye_hands_back_running_tasks_without_counting(broker, peers, store):
    start_one(broker, peers)
    send(broker, b"w1/x", b"BYE", {})
    row = result_of(store.get(1))
    assert (row.state, row.attempts) == ("queued", 0)


def test_lost_worker_on_its_last_attempt_fails_the_task(
    broker, peers, store, clock
):
    start_one(broker, peers, max_attempts=1)
    clock.advance(3.5)
    broker.sweep()
    row = result_of(store.get(1))
    assert row.state == "failed" and "was lost" in row.error


def test_delayed_task_waits_for_its_time(broker, peers, clock):
    hello(broker)
    send(broker, b"w1/x", b"READY", {})
    submit(broker, {"handler": "echo", "delay": 5})
    [(_, _, reply)] = peers.take(b"client")
    assert reply["tasks"][0]["run_at"] is not None
    assert peers.take(b"w1/x", b"TASK") == []
    clock.advance(4.9)
    assert peers.take(b"w1/x", b"TASK") == []
    clock.advance(0.1)
    assert len(peers.take(b"w1/x", b"TASK")) == 1


def test_cancel_a_delayed_task(broker, peers, clock):
    submit(broker, {"handler": "echo", "delay": 5})
    send(broker, b"client", b"CANCEL", {"req": "c", "id": 1})
    assert (
        peers.take(b"client", b"REPLY")[-1][2]["task"]["state"] == "cancelled"
    )
    hello(broker)
    send(broker, b"w1/x", b"READY", {})
    clock.advance(10)
    assert peers.take(b"w1/x", b"TASK") == []


def test_cancel_a_running_task_tells_its_worker(broker, peers, store):
    sent = start_one(broker, peers)
    send(broker, b"client", b"CANCEL", {"req": "c", "id": 1})
    [(_, _, reply)] = peers.take(b"client", b"REPLY")
    assert reply["task"]["state"] == "cancelled"
    [(_, _, cancel)] = peers.take(b"w1/x", b"CANCEL")
    assert cancel == {"id": 1, "token": sent["token"]}
    assert broker.dispatcher.worker(b"w1/x").busy == 0
    # Its late result is stale and changes nothing.
    send(
        broker,
        b"w1/x",
        b"RESULT",
        {"id": 1, "token": sent["token"], "state": "succeeded", "result": 1},
    )
    assert result_of(store.get(1)).state == "cancelled"
    assert broker.counters["stale_results"] == 1


def test_retry_a_failed_task(broker, peers, store):
    sent = start_one(broker, peers, max_attempts=1)
    fail(broker, sent)
    send(broker, b"w1/x", b"READY", {})
    peers.take()
    send(broker, b"client", b"RETRY", {"req": "r", "id": 1})
    [(_, _, reply)] = peers.take(b"client", b"REPLY")
    assert reply["task"]["state"] == "queued"
    [(_, _, again)] = peers.take(b"w1/x", b"TASK")
    assert (again["attempt"], again["token"]) == (1, 2)
    # A resent RETRY answers with the task, now running again.
    send(broker, b"client", b"RETRY", {"req": "r", "id": 1})
    assert peers.take(b"client")[0][2]["task"]["state"] == "running"
    send(
        broker,
        b"w1/x",
        b"RESULT",
        {"id": 1, "token": 2, "state": "succeeded", "result": 1},
    )
    send(broker, b"client", b"RETRY", {"req": "r", "id": 1})
    assert peers.take(b"client", b"ERROR")[0][2]["code"] == "not_retryable"


def test_resent_submit_with_the_same_request_id_is_not_duplicated(
    owned_broker, peers
):
    broker = owned_broker
    for _ in range(2):
        send(
            broker,
            b"client",
            b"SUBMIT",
            {
                "req": "a",
                "request_id": "r-1",
                "tasks": [{"handler": "echo"}, {"handler": "echo"}],
            },
        )
    first, second = [body for _, _, body in peers.take(b"client")]
    assert [t["id"] for t in first["tasks"]] == [1, 2]
    assert [t["id"] for t in second["tasks"]] == [1, 2]
    assert second["replayed"] and second["existing"] == []
    assert not first["replayed"]
    assert len(broker.dispatcher) == 2


def test_unique_key_answers_with_the_live_task(broker, peers):
    submit(broker, {"handler": "echo", "unique_key": "nightly"})
    submit(broker, {"handler": "echo", "unique_key": "nightly"})
    first, second = [body for _, _, body in peers.take(b"client")]
    assert second["tasks"][0]["id"] == first["tasks"][0]["id"]
    assert second["existing"] == [first["tasks"][0]["id"]]


def test_stale_attempt_announced_by_a_worker_is_stopped(broker, peers, clock):
    sent = start_one(broker, peers)
    clock.advance(3.5)
    broker.sweep()  # w1 presumed lost; the task is requeued
    # w1 comes back (it was only frozen) still running the old attempt.
    hello(broker, running=[{"id": 1, "token": sent["token"]}])
    [(_, _, cancel)] = peers.take(b"w1/x", b"CANCEL")
    assert cancel == {"id": 1, "token": sent["token"]}


def test_store_failure_pauses_dispatch_then_resumes(
    broker, peers, store, clock
):
    hello(broker)
    submit(broker, {"handler": "echo"})
    peers.take()
    real_dispatch = store.dispatch
    failures = []

    def broken(*args):
        failures.append(args)
        from twisted.internet.defer import fail

        return fail(StoreError("disk I/O error"))

    store.dispatch = broken
    send(broker, b"w1/x", b"READY", {})
    assert len(failures) == 1 and broker.dispatcher.paused
    assert peers.take(b"w1/x", b"TASK") == []
    clock.advance(0.5)  # the first backoff: tries again, fails again
    assert len(failures) == 2
    store.dispatch = real_dispatch
    clock.advance(0.5)
    assert len(failures) == 2  # backed off to 1 s
    clock.advance(0.5)
    [(_, _, sent)] = peers.take(b"w1/x", b"TASK")
    assert sent["token"] == 1 and not broker.dispatcher.paused


def test_a_flood_of_bad_messages_is_logged_once(broker, peers):
    from twisted.logger import LogLevel, capturedLogs

    with capturedLogs() as events:
        for _ in range(100):
            broker.handle(Sender(b"flood"), [b"junk"])
    warnings = [e for e in events if e["log_level"] == LogLevel.warn]
    assert len(warnings) == 1
    assert broker.counters["protocol_errors"] == 100
    assert broker.router.bad_messages.suppressed == 99


def test_a_result_can_carry_the_slots_next_credit(broker, peers):
    hello(broker)
    send(broker, b"w1/x", b"READY", {})
    submit(broker, {"handler": "echo"}, {"handler": "echo"})
    peers.take()
    send(
        broker,
        b"w1/x",
        b"RESULT",
        {
            "id": 1,
            "token": 1,
            "ready": True,
            "state": "succeeded",
            "result": 1,
        },
    )
    [(_, _, sent)] = peers.take(b"w1/x", b"TASK")
    assert sent["id"] == 2


def test_a_task_the_worker_never_got_is_requeued(broker, peers, store, clock):
    # A dropped connection that ZeroMQ re-established lost the TASK.
    start_one(broker, peers)
    clock.advance(1)
    send(broker, b"w1/x", b"HEARTBEAT", {"running": []})
    assert result_of(store.get(1)).state == "running"  # may be on its way
    clock.advance(1.5)
    send(broker, b"w1/x", b"HEARTBEAT", {"running": []})
    row = result_of(store.get(1))
    assert (row.state, row.attempts) == ("queued", 0)
    assert broker.dispatcher.worker(b"w1/x").busy == 0


def test_a_task_no_worker_ever_receives_uses_its_attempts_and_fails(
    broker, peers, store, clock
):
    # A TASK that is lost every time must not circle for ever: every
    # third loss in a row counts as a failed attempt.
    start_one(broker, peers, max_attempts=2)
    for loss in range(1, 7):
        clock.advance(2.5)
        send(broker, b"w1/x", b"HEARTBEAT", {"running": []})
        row = result_of(store.get(1))
        if loss < 6:
            assert (row.state, row.attempts) == ("queued", loss // 3)
            send(broker, b"w1/x", b"READY", {})
            clock.advance(2)  # a retry waits for its backoff
            peers.take(b"w1/x", b"TASK")
    assert row.state == "failed"
    assert row.error == (
        "workers never received it (3 times in a row, "
        "last w1) during attempt 2 of 2"
    )


def test_a_task_received_in_between_starts_the_count_again(
    broker, peers, store, clock
):
    sent = start_one(broker, peers)
    for _ in range(2):
        clock.advance(2.5)
        send(broker, b"w1/x", b"HEARTBEAT", {"running": []})
        send(broker, b"w1/x", b"READY", {})
        [(_, _, sent)] = peers.take(b"w1/x", b"TASK")
    clock.advance(0.5)
    send(
        broker,
        b"w1/x",
        b"HEARTBEAT",
        {"running": [{"id": 1, "token": sent["token"]}]},
    )
    send(
        broker,
        b"w1/x",
        b"RESULT",
        {"id": 1, "token": sent["token"], "state": "released", "ready": True},
    )
    [(_, _, sent)] = peers.take(b"w1/x", b"TASK")
    clock.advance(2.5)
    send(broker, b"w1/x", b"HEARTBEAT", {"running": []})
    row = result_of(store.get(1))
    assert (row.state, row.attempts) == ("queued", 0)


def test_a_task_the_worker_has_is_left_alone(broker, peers, store, clock):
    sent = start_one(broker, peers)
    for _ in range(5):
        clock.advance(1)
        send(
            broker,
            b"w1/x",
            b"HEARTBEAT",
            {"running": [{"id": 1, "token": sent["token"]}]},
        )
    assert result_of(store.get(1)).state == "running"
    assert peers.take(b"w1/x", b"CANCEL") == []


def test_a_stale_attempt_in_a_heartbeat_is_stopped(broker, peers):
    hello(broker)
    peers.take()
    send(broker, b"w1/x", b"HEARTBEAT", {"running": [{"id": 9, "token": 4}]})
    assert peers.take(b"w1/x", b"CANCEL")[0][2] == {"id": 9, "token": 4}


def test_a_waiting_client_gets_the_row_as_committed(broker, peers, store):
    sent = start_one(broker, peers)
    send(broker, b"client", b"WAIT", {"req": "w", "id": 1, "timeout": 10})
    send(
        broker,
        b"w1/x",
        b"RESULT",
        {"id": 1, "token": sent["token"], "state": "succeeded", "result": [1]},
    )
    [(_, _, reply)] = peers.take(b"client", b"REPLY")
    from taskbroker.protocol.objects import task_object

    assert reply["task"] == task_object(result_of(store.get(1)))


# -- who may report an attempt ---------------------------------------------


def test_a_result_from_a_peer_that_never_said_hello_records_nothing(
    broker, peers, store
):
    hello(broker)
    send(broker, b"w1/x", b"READY", {})
    submit(broker, {"handler": "echo"})
    [(_, _, sent)] = peers.take(b"w1/x", b"TASK")
    peers.take()
    # Guessing small tokens, as a forger would.
    for token in (1, 2, 3):
        send(
            broker,
            b"forger",
            b"RESULT",
            {
                "id": sent["id"],
                "token": token,
                "state": "succeeded",
                "result": "forged",
            },
        )
    assert [m[1] for m in peers.take(b"forger")] == [b"REHELLO"] * 3
    row = result_of(store.get(sent["id"]))
    assert (row.state, row.result) == ("running", None)


@pytest.mark.parametrize("state", ["succeeded", "released"])
def test_a_result_from_another_worker_is_not_taken(
    broker, peers, store, state
):
    hello(broker)
    hello(broker, identity=b"w2/y", name="w2")
    send(broker, b"w1/x", b"READY", {})
    submit(broker, {"handler": "echo"})
    [(_, _, sent)] = peers.take(b"w1/x", b"TASK")
    send(
        broker,
        b"w2/y",
        b"RESULT",
        {
            "id": sent["id"],
            "token": sent["token"],
            "state": state,
            "result": "forged",
        },
    )
    assert broker.counters["stale_results"] == 1
    row = result_of(store.get(sent["id"]))
    assert (row.state, row.token) == ("running", sent["token"])
    # Nothing was requeued: w2 gets no copy of it.
    send(broker, b"w2/y", b"READY", {})
    assert peers.take(b"w2/y", b"TASK") == []
    # The worker that holds it reports, and that counts.
    send(
        broker,
        b"w1/x",
        b"RESULT",
        {
            "id": sent["id"],
            "token": sent["token"],
            "state": "succeeded",
            "result": "real",
        },
    )
    assert result_of(store.get(sent["id"])).result == '"real"'


def test_after_a_restart_the_worker_of_that_name_reports_its_attempt(
    owned_store, clock, peers
):
    first = started_broker(owned_store, clock, peers)
    hello(first)
    send(first, b"w1/x", b"READY", {})
    submit(first, {"handler": "echo"})
    [(_, _, sent)] = peers.take(b"w1/x", b"TASK")
    first.stop()
    second = Broker(
        BrokerConfig(), owned_store, clock, peers.send, instance_id="b2"
    )
    result_of(second.load())
    # Another worker cannot report it; w1, back on a new route, can,
    # even before it lists the task in a HELLO.
    hello(second, identity=b"w2/y", name="w2")
    send(
        second,
        b"w2/y",
        b"RESULT",
        {
            "id": sent["id"],
            "token": sent["token"],
            "state": "succeeded",
            "result": "forged",
        },
    )
    assert result_of(owned_store.get(sent["id"])).state == "running"
    hello(second, identity=b"w1/z", name="w1")
    send(
        second,
        b"w1/z",
        b"RESULT",
        {
            "id": sent["id"],
            "token": sent["token"],
            "state": "succeeded",
            "result": "real",
        },
    )
    row = result_of(owned_store.get(sent["id"]))
    assert (row.state, row.result) == ("succeeded", '"real"')


# -- bounds on what a worker announces --------------------------------------


@pytest.mark.parametrize("heartbeat", [0.05, 10.5, 3600])
def test_a_heartbeat_outside_the_bounds_is_refused(broker, peers, heartbeat):
    hello(broker, heartbeat=heartbeat)
    [(_, command, body)] = peers.take(b"w1/x")
    assert command == b"ERROR" and body["code"] == "bad_request"
    assert (
        body["fatal"] is True and "--max-worker-heartbeat" in body["message"]
    )
    assert broker.dispatcher.worker(b"w1/x") is None
    # The name is not held: a worker with a sound heartbeat takes it.
    hello(broker, identity=b"w1/y", heartbeat=10)
    [(_, command, _)] = peers.take(b"w1/y")
    assert command == b"WELCOME"


def test_the_longest_heartbeat_is_the_brokers_to_choose(store, clock, peers):
    broker = Broker(
        BrokerConfig(max_worker_heartbeat=60.0),
        store,
        clock,
        peers.send,
        instance_id="b1",
    )
    result_of(broker.load())
    hello(broker, heartbeat=60)
    assert peers.take(b"w1/x")[0][1] == b"WELCOME"


def test_more_running_tasks_than_slots_is_refused(broker, peers):
    hello(
        broker, slots=1, running=[{"id": 1, "token": 1}, {"id": 2, "token": 1}]
    )
    [(_, command, body)] = peers.take(b"w1/x")
    assert (command, body["code"]) == (b"ERROR", "bad_request")
    assert "2 running tasks announced for 1 slots" in body["message"]


def test_a_heartbeat_listing_more_than_its_slots_is_dropped(broker, peers):
    hello(broker, slots=1)
    peers.take()
    running = [{"id": i, "token": 1} for i in range(1, 1001)]
    send(broker, b"w1/x", b"HEARTBEAT", {"running": running})
    # Not reconciled: no CANCEL for each of the thousand.
    assert peers.take(b"w1/x") == []
    assert broker.counters["protocol_errors"] == 1


def test_a_hello_listing_too_many_handlers_is_refused(broker, peers):
    handlers = [f"h{i}" for i in range(codec.MAX_NAMES + 1)]
    hello(broker, handlers=handlers)
    [(_, command, body)] = peers.take(b"w1/x")
    assert command == b"ERROR" and "at most 1000 names" in body["message"]


# -- bounds on client work -------------------------------------------------


def test_requests_over_the_bound_are_refused_busy_unread(broker, peers, store):
    held = defer.Deferred()
    store.get = lambda task_id: held  # a read that takes its time
    broker.admission.max_pending = 2
    for req in ("g1", "g2", "g3"):
        send(broker, b"client", b"GET", {"req": req, "id": 1})
    [(_, command, body)] = peers.take(b"client")
    assert (command, body["req"], body["code"]) == (b"ERROR", "g3", "busy")
    # Refused before it was decoded: even a malformed body says busy.
    broker.handle(Sender(b"client"), [codec.SIGNATURE, b"SUBMIT", b"junk"])
    assert peers.take(b"client")[0][2]["code"] == "busy"
    # Looking at the broker is never refused.
    send(broker, b"client", b"STATS", {"req": "s"})
    [(_, _, stats)] = peers.take(b"client", b"REPLY")
    assert stats["stats"]["counters"]["busy"] == 2
    assert stats["stats"]["counters"]["requests_in_progress"] == 2
    held.callback(None)
    assert broker.admission.pending == broker.admission.pending_bytes == 0
    assert len(peers.take(b"client", b"ERROR")) == 2  # not_found, twice


def test_requests_are_bounded_by_what_they_cost(broker, peers):
    from taskbroker.broker.admission import cost

    # A SUBMIT costs its body and the reply it may make; a LIST, a page.
    assert cost(b"SUBMIT", b"x" * 10) == 10 + codec.MAX_MESSAGE_SIZE
    assert cost(b"LIST", b"x") == (
        1 + codec.MAX_LIST_BYTES + codec.MAX_MESSAGE_SIZE
    )
    broker.admission.max_pending_bytes = codec.MAX_MESSAGE_SIZE + 100
    submit(broker, {"handler": "echo", "payload": "x" * 100})
    [(_, command, body)] = peers.take(b"client")
    assert (command, body["code"]) == (b"ERROR", "busy")
    submit(broker, {"handler": "echo", "payload": "x"})
    assert peers.take(b"client")[0][1] == b"REPLY"
    assert broker.admission.pending_bytes == 0


def test_waits_held_open_are_bounded(broker, peers):
    start_one(broker, peers)
    broker.admission.max_waits = 1
    for req in ("w1", "w2"):
        send(broker, b"client", b"WAIT", {"req": req, "id": 1, "timeout": 9})
    [(_, _, refused)] = peers.take(b"client")
    assert (refused["req"], refused["code"]) == ("w2", "busy")
    assert broker.admission.waits == 1
    send(
        broker,
        b"w1/x",
        b"RESULT",
        {"id": 1, "token": 1, "state": "succeeded", "result": 2},
    )
    assert peers.take(b"client", b"REPLY")[0][2]["req"] == "w1"
    assert broker.admission.waits == 0 and broker.admission.pending == 0


def test_a_list_page_ends_at_a_size(broker, peers):
    from taskbroker.protocol.codec import MAX_LIST_BYTES

    big = "x" * (MAX_LIST_BYTES // 2)
    for _ in range(3):
        submit(broker, {"handler": "echo", "payload": big})
    peers.take()
    send(broker, b"client", b"LIST", {"req": "l", "limit": 100})
    [(_, _, page)] = peers.take(b"client", b"REPLY")
    assert [t["id"] for t in page["tasks"]] == [1, 2] and page["next"] == 2
    send(broker, b"client", b"LIST", {"req": "l", "after": 2})
    [(_, _, page)] = peers.take(b"client", b"REPLY")
    assert [t["id"] for t in page["tasks"]] == [3] and page["next"] is None


def test_what_a_peer_repeats_at_will_is_logged_once_per_interval(
    broker, peers, clock
):
    from twisted.logger import capturedLogs

    hello(broker)
    with capturedLogs() as events:
        for _ in range(100):
            hello(broker, identity=b"w1/other")  # name taken
            send(
                broker,
                b"w1/x",
                b"RESULT",
                {"id": 7, "token": 3, "state": "failed"},
            )
            send(
                broker,
                b"w1/x",
                b"HEARTBEAT",
                {"running": [{"id": 9, "token": 4}]},
            )
    assert len(events) == 3
    assert len(peers.take(b"w1/other", b"ERROR")) == 100
    assert len(peers.take(b"w1/x", b"CANCEL")) == 100
    assert broker.counters["stale_results"] == 100
    clock.advance(10)
    with capturedLogs() as events:
        hello(broker, identity=b"w1/other")
    assert len(events) == 1


def test_a_large_payload_waits_in_the_store_not_in_memory(owned_broker, peers):
    from taskbroker.broker.backlog import HELD_PAYLOAD

    broker = owned_broker
    large = "x" * HELD_PAYLOAD
    submit(
        broker,
        {"handler": "echo", "payload": large},
        {"handler": "echo", "payload": "small"},
    )
    peers.take()
    held = {task_id: broker.backlog.withdraw(task_id) for task_id in (1, 2)}
    assert held[1].payload is None and held[2].payload == '"small"'
    for row in held.values():
        broker.backlog.enqueue(row)


def test_a_large_payload_is_read_when_its_task_is_dispatched(broker, peers):
    from taskbroker.broker.backlog import HELD_PAYLOAD

    large = "x" * HELD_PAYLOAD
    submit(broker, {"handler": "echo", "payload": large})
    send(broker, b"client", b"WAIT", {"req": "w", "id": 1, "timeout": 9})
    peers.take()
    hello(broker)
    send(broker, b"w1/x", b"READY", {})
    [(_, _, sent)] = peers.take(b"w1/x", b"TASK")
    assert sent["id"] == 1 and sent["payload"] == large
    send(
        broker,
        b"w1/x",
        b"RESULT",
        {"id": 1, "token": 1, "state": "succeeded", "result": 1},
    )
    [(_, _, reply)] = peers.take(b"client", b"REPLY")
    assert reply["task"]["payload"] == large


def test_a_worker_gone_while_its_dispatch_commits_gets_nothing(
    broker, peers, store
):
    # The requeue that its leaving issues may commit before the dispatch
    # (two writers): the task must still end up queued, and no TASK go out.
    submit(broker, {"handler": "echo"})
    peers.take()
    held = []
    # (A shared store's broker claims and dispatches in one write.)
    owner = broker.claims if broker.claims.shared else store
    name = "dispatch_for" if broker.claims.shared else "dispatch"
    dispatch = getattr(owner, name)

    def slow_dispatch(*args):
        held.append((defer.Deferred(), args))
        return held[-1][0]

    setattr(owner, name, slow_dispatch)
    hello(broker)
    send(broker, b"w1/x", b"READY", {})
    [(pending, args)] = held
    send(broker, b"w1/x", b"BYE", {})  # its requeue finds nothing running
    setattr(owner, name, dispatch)
    dispatch(*args).chainDeferred(pending)  # the dispatch commits after
    assert peers.take(b"w1/x", b"TASK") == []
    row = result_of(store.get(1))
    assert (row.state, row.attempts) == ("queued", 0)


def test_list_newest_first_by_priority_and_echoes_its_order(broker, peers):
    for priority in ("high", "low", "high"):
        submit(broker, {"handler": "echo", "priority": priority})
    peers.take()
    send(
        broker,
        b"client",
        b"LIST",
        {"req": "l", "order": "newest", "priority": "high", "limit": 1},
    )
    [(_, _, reply)] = peers.take(b"client")
    assert [t["id"] for t in reply["tasks"]] == [3]
    assert (reply["next"], reply["order"]) == (3, "newest")
    send(
        broker,
        b"client",
        b"LIST",
        {"req": "l", "order": "newest", "priority": "high", "before": 3},
    )
    [(_, _, reply)] = peers.take(b"client")
    assert ([t["id"] for t in reply["tasks"]], reply["next"]) == ([1], None)
    # A client from before 'order' gets what it always did.
    send(broker, b"client", b"LIST", {"req": "l"})
    [(_, _, reply)] = peers.take(b"client")
    assert [t["id"] for t in reply["tasks"]] == [1, 2, 3]
    assert reply["order"] == "oldest"


def test_a_worker_with_one_slot_is_logged_as_such(broker, peers):
    from twisted.logger import formatEvent, globalLogPublisher

    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        hello(broker, slots=1)
        hello(broker, identity=b"w2/y", name="w2", slots=4)
    finally:
        globalLogPublisher.removeObserver(events.append)
    texts = [formatEvent(e) for e in events if "connected" in formatEvent(e)]
    assert "worker w1 connected: 1 slot, levels" in texts[0]
    assert "worker w2 connected: 4 slots, levels" in texts[1]


def test_a_submit_for_an_unserved_handler_suggests_a_served_one(broker, peers):
    hello(broker, handlers=["echo", "resize"])
    peers.take()
    submit(
        broker, {"handler": "ecoh"}, {"handler": "report"}, {"handler": "echo"}
    )
    [(_, _, reply)] = peers.take(b"client")
    assert reply["unserved"] == ["ecoh", "report"]
    assert reply["suggestions"] == {"ecoh": "echo"}


def test_a_worker_of_another_version_is_logged(broker, peers):
    from twisted.logger import capturedLogs, formatEvent

    with capturedLogs() as events:
        hello(broker, version="0.0.9")
        hello(
            broker, identity=b"w2/y", name="w2", version=taskbroker.__version__
        )
        hello(broker, identity=b"w3/z", name="w3")  # older: says none
    texts = [
        formatEvent(e) for e in events if "runs taskbroker" in formatEvent(e)
    ]
    assert texts == [
        f"worker w1 runs taskbroker 0.0.9, this broker "
        f"{taskbroker.__version__}: upgrade them together "
        '(docs/operations.rst, "Upgrades")',
        f"worker w3 runs taskbroker older than 0.1.0, this broker "
        f"{taskbroker.__version__}: upgrade them together "
        '(docs/operations.rst, "Upgrades")',
    ]
    send(broker, b"client", b"WORKERS", {"req": "w"})
    [(_, _, reply)] = peers.take(b"client", b"REPLY")
    assert [w["version"] for w in reply["workers"]] == [
        "0.0.9",
        taskbroker.__version__,
        None,
    ]
