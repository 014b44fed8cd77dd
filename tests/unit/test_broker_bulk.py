"""
Tests for retention and the bulk requests (taskbroker.broker.bulk),
driven as tests/unit/test_broker drives the broker.
"""

import pytest
from twisted.logger import capturedLogs, formatEvent

from taskbroker.broker import bulk
from taskbroker.broker.core import Broker
from taskbroker.config import BrokerConfig
from taskbroker.testing import result_of
from tests.unit.test_broker import hello, send, submit
from tests.unit.test_broker_schedules import ask, tasks
from tests.unit.test_ownership import ALICE, BOB, peer_keys


def started(store, clock, peers, **config):
    broker = Broker(
        BrokerConfig(**config), store, clock, peers.send, instance_id="b1"
    )
    with capturedLogs() as events:
        result_of(broker.load())
    broker.started_with = [formatEvent(e) for e in events]
    return broker


@pytest.fixture
def broker(store, clock, peers):
    return started(store, clock, peers)


def finish_tasks(broker, peers, store, count, handler="echo"):
    """
    Submit ``count`` tasks and cancel them (the quickest way to end
    them), at the clock's time.
    """
    for _ in range(count):
        submit(broker, {"handler": handler})
    ids = [row.id for row in tasks(store) if row.state == "queued"]
    for task_id in ids:
        send(broker, b"client", b"CANCEL", {"req": "c", "id": task_id})
    peers.take()
    return ids


def test_a_new_database_keeps_a_week_and_says_so(broker, clock, peers, store):
    assert broker.bulk.keep_finished == 7 * 86400
    assert (
        "finished tasks are deleted 7d after they finish (the "
        "database's default; --keep-finished changes it)"
        in broker.started_with
    )
    finish_tasks(broker, peers, store, 3)
    clock.advance(7 * 86400 - 1)
    result_of(broker.bulk.retain())
    assert len(tasks(store)) == 3
    clock.advance(2)
    with capturedLogs() as events:
        result_of(broker.bulk.retain())
    assert tasks(store) == []
    assert [formatEvent(e) for e in events] == [
        "deleted 3 tasks that finished over 7d ago"
    ]
    # Counted out of the statistics, and into the metrics.
    assert broker.status.tasks.summary()[0].get("cancelled", {}) in (
        {},
        {"normal": 0},
    )
    assert b"taskbroker_tasks_deleted_total 3.0" in broker.metrics.render()


def test_an_upgraded_database_keeps_everything_unless_told(
    clock, peers, store
):
    store._settings["default_keep_finished"] = "none"
    broker = started(store, clock, peers)
    assert broker.bulk.keep_finished is None
    assert (
        "finished tasks are kept for ever (the database's default; "
        "--keep-finished changes it)" in broker.started_with
    )
    finish_tasks(broker, peers, store, 2)
    clock.advance(1000 * 86400)
    result_of(broker.bulk.retain())
    assert len(tasks(store)) == 2


@pytest.mark.parametrize(
    "given, kept, said",
    [
        (
            3600.0,
            3600.0,
            "finished tasks are deleted 1h after they finish "
            "(--keep-finished)",
        ),
        (
            float("inf"),
            None,
            "finished tasks are kept for ever (--keep-finished)",
        ),
    ],
)
def test_keep_finished_overrides_the_database(
    clock, peers, store, given, kept, said
):
    broker = started(store, clock, peers, keep_finished=given)
    assert broker.bulk.keep_finished == kept
    assert said in broker.started_with


def test_retention_goes_in_small_batches_while_tasks_flow(
    broker, clock, peers, store, monkeypatch
):
    monkeypatch.setattr(bulk, "PURGE_BATCH", 4)
    finish_tasks(broker, peers, store, 10)
    clock.advance(8 * 86400)
    batches = []
    original = store.purge

    def purge(*args, **kwargs):
        batches.append(kwargs.get("limit", args[-1] if args else None))
        # A task submitted between two batches is dispatched meanwhile.
        submit(broker, {"handler": "echo"})
        return original(*args, **kwargs)

    monkeypatch.setattr(store, "purge", purge)
    done = broker.bulk.retain()
    assert batches == [4]
    # The next batch waits its pause.
    clock.advance(bulk.PURGE_PAUSE - 0.01)
    assert batches == [4]
    clock.advance(0.01)
    assert batches == [4, 4]
    clock.advance(bulk.PURGE_PAUSE)
    assert batches == [4, 4, 4]
    result_of(done)
    assert [row.state for row in tasks(store)] == ["queued"] * 3


def test_running_and_queued_tasks_are_never_purged(
    broker, clock, peers, store
):
    hello(broker)
    send(broker, b"w1/x", b"READY", {})
    submit(broker, {"handler": "echo"}, {"handler": "echo"})
    peers.take()
    clock.advance(30 * 86400)
    assert ask(broker, peers, b"PURGE", {"older_than": 0}) == (
        b"REPLY",
        {"req": "r", "deleted": 0, "more": False},
    )
    assert [row.state for row in tasks(store)] == ["running", "queued"]


def test_purge_by_state_handler_and_age(broker, clock, peers, store):
    finish_tasks(broker, peers, store, 2, handler="a")
    clock.advance(3600)
    finish_tasks(broker, peers, store, 1, handler="b")
    clock.advance(60)
    assert (
        ask(broker, peers, b"PURGE", {"older_than": 3600, "state": "failed"})[
            1
        ]["deleted"]
        == 0
    )
    assert (
        ask(broker, peers, b"PURGE", {"older_than": 3600, "handler": "b"})[1][
            "deleted"
        ]
        == 0
    )
    assert ask(
        broker, peers, b"PURGE", {"older_than": 3600, "state": "cancelled"}
    )[1] == {"req": "r", "deleted": 2, "more": False}
    assert [row.handler for row in tasks(store)] == ["b"]


def test_a_purge_request_does_a_bounded_amount(
    broker, clock, peers, store, monkeypatch
):
    monkeypatch.setattr(bulk, "PURGE_BATCH", 2)
    monkeypatch.setattr(bulk, "PURGE_BATCHES_PER_REQUEST", 2)
    finish_tasks(broker, peers, store, 5)
    clock.advance(10)
    send(broker, b"client", b"PURGE", {"req": "r", "older_than": 1})
    clock.advance(bulk.PURGE_PAUSE)
    [(_, _, answer)] = peers.take(b"client")
    assert answer == {"req": "r", "deleted": 4, "more": True}
    assert ask(broker, peers, b"PURGE", {"older_than": 1})[1] == {
        "req": "r",
        "deleted": 1,
        "more": False,
    }


def test_cancel_many_counts_then_cancels(broker, clock, peers, store):
    for handler in ("a", "a", "b", "a"):
        submit(broker, {"handler": handler})
    peers.take()
    assert ask(broker, peers, b"CANCEL_MANY", {"handler": "a", "count": True})[
        1
    ] == {"req": "r", "count": 3}
    assert ask(broker, peers, b"CANCEL_MANY", {"handler": "a"})[1] == {
        "req": "r",
        "cancelled": 3,
        "refused": 0,
        "next": None,
    }
    assert [(row.handler, row.state) for row in tasks(store)] == [
        ("a", "cancelled"),
        ("a", "cancelled"),
        ("b", "queued"),
        ("a", "cancelled"),
    ]
    # Counted as cancelled one by one.
    assert broker.status.tasks.summary()[0]["cancelled"] == {"normal": 3}


def test_cancel_many_pages_through_big_queues(
    broker, clock, peers, store, monkeypatch
):
    monkeypatch.setattr(bulk, "BULK_LIMIT", 4)
    monkeypatch.setattr(bulk, "BULK_PAGE", 3)
    for _ in range(6):
        submit(broker, {"handler": "echo"})
    peers.take()
    first = ask(broker, peers, b"CANCEL_MANY", {})[1]
    assert first == {"req": "r", "cancelled": 4, "refused": 0, "next": 4}
    second = ask(broker, peers, b"CANCEL_MANY", {"after": 4})[1]
    assert second == {"req": "r", "cancelled": 2, "refused": 0, "next": None}
    assert {row.state for row in tasks(store)} == {"cancelled"}


def test_cancel_many_running_tells_the_workers(broker, peers, store):
    hello(broker)
    send(broker, b"w1/x", b"READY", {})
    submit(broker, {"handler": "echo"})
    peers.take()
    assert (
        ask(broker, peers, b"CANCEL_MANY", {"state": "running"})[1][
            "cancelled"
        ]
        == 1
    )
    [(_, _, cancel)] = peers.take(b"w1/x", b"CANCEL")
    assert cancel["id"] == 1


def test_retry_many_requeues_failed_tasks(broker, clock, peers, store):
    hello(broker, slots=3, handlers=["a", "b"])
    for handler in ("a", "a", "b"):
        send(broker, b"w1/x", b"READY", {})
        submit(broker, {"handler": handler, "max_attempts": 1})
    for task_id in (1, 2, 3):
        send(
            broker,
            b"w1/x",
            b"RESULT",
            {"id": task_id, "token": 1, "state": "failed", "error": "boom"},
        )
    peers.take()
    assert [row.state for row in tasks(store)] == ["failed"] * 3
    assert ask(broker, peers, b"RETRY_MANY", {"count": True})[1] == {
        "req": "r",
        "count": 3,
    }
    assert ask(broker, peers, b"RETRY_MANY", {"handler": "a"})[1] == {
        "req": "r",
        "retried": 2,
        "refused": 0,
        "next": None,
    }
    assert [row.state for row in tasks(store)] in (
        ["running", "running", "failed"],
        ["queued", "queued", "failed"],
        ["running", "queued", "failed"],
    )


def test_a_client_acts_on_its_own_tasks_only(broker, clock, peers, store):
    broker.peer_keys = peer_keys()
    for key in (ALICE, BOB, ALICE):
        ask(
            broker, peers, b"SUBMIT", {"tasks": [{"handler": "echo"}]}, key=key
        )
    assert (
        ask(broker, peers, b"CANCEL_MANY", {"count": True}, key=ALICE)[1][
            "count"
        ]
        == 2
    )
    assert (
        ask(broker, peers, b"CANCEL_MANY", {}, key=ALICE)[1]["cancelled"] == 2
    )
    assert [row.state for row in tasks(store)] == [
        "cancelled",
        "queued",
        "cancelled",
    ]
    ask(broker, peers, b"CANCEL_MANY", {}, key=BOB)
    clock.advance(10)
    assert (
        ask(broker, peers, b"PURGE", {"older_than": 1}, key=BOB)[1]["deleted"]
        == 1
    )
    assert [row.submitter for row in tasks(store)] == [ALICE.decode()] * 2
