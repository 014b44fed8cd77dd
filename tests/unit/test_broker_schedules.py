"""
Tests for periodic tasks in the broker (taskbroker.broker.schedules),
driven as tests/unit/test_broker drives the broker: a Clock, the
in-memory stores, and the requests as a client sends them.
"""

from datetime import UTC, datetime

import pytest
from twisted.logger import capturedLogs, formatEvent

from taskbroker.broker.core import Broker
from taskbroker.config import BrokerConfig
from taskbroker.protocol import codec
from taskbroker.store import ScheduleRow
from taskbroker.testing import SharedMemoryDatabase, result_of
from taskbroker.transport.zmq import Sender
from tests.unit.test_broker import hello, send, started_broker
from tests.unit.test_ownership import ADMIN, ALICE, peer_keys

# 2026-12-05 01:00:00 UTC, a Saturday.
START = datetime(2026, 12, 5, 1, 0, tzinfo=UTC).timestamp()


@pytest.fixture
def clock(clock):
    clock.advance(START)
    return clock


@pytest.fixture
def broker(store, clock, peers):
    return started_broker(store, clock, peers)


def ask(broker, peers, command, body, key=None):
    """
    A client's request and its answer: ``(command, body)``.
    """
    identity = b"client"
    broker.handle(
        Sender(identity, key), codec.encode(command, {"req": "r", **body})
    )
    [(_, answer, reply)] = peers.take(identity)
    return answer, reply


def add(broker, peers, **fields):
    answer, reply = ask(
        broker,
        peers,
        b"SCHEDULE_ADD",
        {"name": "every-minute", "handler": "echo", "every": 60, **fields},
    )
    assert answer == b"REPLY", reply
    return reply["schedule"]


def tasks(store):
    return result_of(store.list(None, None, 0, 1000))


def test_a_schedule_enqueues_each_tick_once(broker, peers, clock, store):
    schedule = add(broker, peers, payload={"n": 1}, priority="high")
    assert schedule["next_tick"] == "2026-12-05T01:01:00.000000+00:00"
    assert (schedule["every"], schedule["cron"], schedule["paused"]) == (
        60,
        None,
        False,
    )
    result_of(broker.schedules.tick())
    assert tasks(store) == []
    clock.advance(60)
    result_of(broker.schedules.tick())
    result_of(broker.schedules.tick())
    [task] = tasks(store)
    assert (
        task.handler,
        task.payload,
        task.priority,
        task.state,
        task.unique_key,
    ) == (
        "echo",
        '{"n":1}',
        "high",
        "queued",
        "schedule:every-minute:2026-12-05T01:01:00.000000+00:00",
    )
    # It is dispatched as any task is.
    hello(broker, priorities=["high"])
    send(broker, b"w1/x", b"READY", {})
    [(_, _, sent)] = peers.take(b"w1/x", b"TASK")
    assert sent["id"] == task.id
    _, listed = ask(broker, peers, b"SCHEDULE_LIST", {})
    [row] = listed["schedules"]
    assert (row["last_tick"], row["last_task_id"], row["next_tick"]) == (
        "2026-12-05T01:01:00.000000+00:00",
        task.id,
        "2026-12-05T01:02:00.000000+00:00",
    )


def test_ticks_missed_while_down_are_enqueued_once(
    broker, peers, clock, store
):
    add(broker, peers)
    clock.advance(3600 + 30)  # sixty ticks passed
    result_of(broker.schedules.tick())
    [task] = tasks(store)
    assert task.unique_key.endswith("T01:01:00.000000+00:00")
    [row] = result_of(store.schedules())
    # The next tick is the first still to come, on the minute as before.
    assert row.next_tick == START + 3660


def test_cron_runs_in_its_time_zone(broker, peers, clock, store):
    schedule = add(
        broker,
        peers,
        every=None,
        cron="30 9 * * mon-fri",
        timezone="Europe/Paris",
    )
    # Saturday: next Monday 09:30 in Paris is 08:30 UTC.
    assert schedule["next_tick"] == "2026-12-07T08:30:00.000000+00:00"
    assert schedule["timezone"] == "Europe/Paris"


def test_two_brokers_on_one_database_enqueue_a_tick_once(clock, peers):
    database = SharedMemoryDatabase(clock)
    first, second = (
        Broker(
            BrokerConfig(), database.store, clock, peers.send, instance_id=name
        )
        for name in ("b1", "b2")
    )
    result_of(database.store.open())
    for broker in (first, second):
        result_of(broker.load())
    add(first, peers)
    for _ in range(3):
        clock.advance(60)
        for broker in (second, first):
            result_of(broker.schedules.tick())
    assert [task.unique_key[-21:] for task in tasks(database.store)] == [
        "01:01:00.000000+00:00",
        "01:02:00.000000+00:00",
        "01:03:00.000000+00:00",
    ]


def test_skip_if_running(broker, peers, clock, store):
    add(broker, peers, skip_if_running=True)
    clock.advance(60)
    result_of(broker.schedules.tick())
    with capturedLogs() as events:
        for _ in range(3):
            clock.advance(60)
            result_of(broker.schedules.tick())
    [first] = tasks(store)
    [row] = result_of(store.schedules())
    assert (row.last_tick, row.last_task_id) == (START + 240, first.id)
    # Said once, when the skipping starts.
    assert [
        formatEvent(e) for e in events if "skipping" in formatEvent(e)
    ] == [
        "schedule every-minute: skipping ticks while its last task 1 is "
        "queued or running (from the tick of "
        "2026-12-05T01:02:00.000000+00:00)"
    ]
    ask(broker, peers, b"CANCEL", {"id": first.id})
    clock.advance(60)
    result_of(broker.schedules.tick())
    assert len(tasks(store)) == 2


def test_pause_and_resume(broker, peers, clock, store):
    add(broker, peers)
    answer, reply = ask(
        broker, peers, b"SCHEDULE_PAUSE", {"name": "every-minute"}
    )
    assert reply["schedule"]["paused"] is True
    clock.advance(600)
    result_of(broker.schedules.tick())
    assert tasks(store) == []
    # Resumed, it comes due at its next tick from now; the ticks missed
    # while paused are not made up.
    answer, reply = ask(
        broker, peers, b"SCHEDULE_RESUME", {"name": "every-minute"}
    )
    assert reply["schedule"]["paused"] is False
    assert reply["schedule"]["next_tick"] == "2026-12-05T01:11:00.000000+00:00"
    result_of(broker.schedules.tick())
    assert tasks(store) == []


def test_remove(broker, peers, clock, store):
    add(broker, peers)
    assert ask(
        broker, peers, b"SCHEDULE_REMOVE", {"name": "every-minute"}
    ) == (b"REPLY", {"req": "r", "removed": "every-minute"})
    clock.advance(60)
    result_of(broker.schedules.tick())
    assert tasks(store) == []
    for command in (b"SCHEDULE_REMOVE", b"SCHEDULE_PAUSE", b"SCHEDULE_RESUME"):
        answer, reply = ask(broker, peers, command, {"name": "every-minute"})
        assert (answer, reply["code"]) == (b"ERROR", "not_found")
        assert reply["message"] == "no schedule named 'every-minute'"


@pytest.mark.parametrize(
    "fields, code, message",
    [
        (
            {"cron": "0 3 * * *"},
            "bad_schedule",
            "a schedule has 'every' or 'cron', and not both",
        ),
        (
            {"every": None},
            "bad_schedule",
            "a schedule has 'every' or 'cron', and not both",
        ),
        (
            {"timezone": "Europe/Paris"},
            "bad_schedule",
            "'timezone' is for cron schedules; 'every' counts elapsed seconds",
        ),
        (
            {"every": None, "cron": "0 3 * * *", "timezone": "Mars/Olympus"},
            "bad_schedule",
            "unknown time zone 'Mars/Olympus' (an IANA name such as Europe/Paris "
            "or UTC)",
        ),
        (
            {"every": None, "cron": "0 0 31 2 *"},
            "bad_schedule",
            "cron expression '0 0 31 2 *' never comes due",
        ),
        (
            {"priority": "urgent"},
            "unknown_priority",
            "unknown priority level 'urgent' (levels: high,normal,low)",
        ),
        ({"every": 0.5}, "bad_request", None),
        ({"cron": "61 * * * *", "every": None}, "bad_request", None),
        ({"name": "no spaces"}, "bad_request", None),
    ],
)
def test_bad_schedules_are_refused(
    broker, peers, store, fields, code, message
):
    answer, reply = ask(
        broker,
        peers,
        b"SCHEDULE_ADD",
        {"name": "s", "handler": "echo", "every": 60, **fields},
    )
    assert (answer, reply["code"]) == (b"ERROR", code)
    if message is not None:
        assert reply["message"] == message
    assert result_of(store.schedules()) == []


def test_a_name_is_added_once_unless_replaced(broker, peers, store):
    add(broker, peers)
    answer, reply = ask(
        broker,
        peers,
        b"SCHEDULE_ADD",
        {"name": "every-minute", "handler": "other", "every": 5},
    )
    assert (answer, reply["code"]) == (b"ERROR", "exists")
    add(broker, peers, handler="other", every=5, replace=True)
    [row] = result_of(store.schedules())
    assert (row.handler, row.every) == ("other", 5)


def test_a_broken_schedule_is_reported_and_the_others_run(
    broker, peers, clock, store
):
    add(broker, peers)
    result_of(
        store.add_schedule(
            ScheduleRow(
                name="broken",
                handler="echo",
                payload="null",
                priority=None,
                max_attempts=None,
                time_limit=None,
                every=None,
                cron="not cron",
                timezone="UTC",
                skip_if_running=False,
                paused=False,
                next_tick=START,
                last_tick=None,
                last_task_id=None,
                created_at=START,
                submitter=None,
            )
        )
    )
    clock.advance(60)
    with capturedLogs() as events:
        result_of(broker.schedules.tick())
        result_of(broker.schedules.tick())
    assert len(tasks(store)) == 1
    warnings = [
        formatEvent(e)
        for e in events
        if "schedule broken cannot run" in formatEvent(e)
    ]
    assert warnings == [
        "schedule broken cannot run: cron expression "
        "'not cron' has 2 fields, not five "
        "(MIN HOUR DOM MON DOW)"
    ]


def test_schedules_are_for_admin_keys(broker, peers):
    broker.peer_keys = peer_keys()
    for command, body in (
        (b"SCHEDULE_ADD", {"name": "s", "handler": "echo", "every": 60}),
        (b"SCHEDULE_LIST", {}),
        (b"SCHEDULE_REMOVE", {"name": "s"}),
        (b"SCHEDULE_PAUSE", {"name": "s"}),
        (b"SCHEDULE_RESUME", {"name": "s"}),
    ):
        answer, reply = ask(broker, peers, command, body, key=ALICE)
        assert (answer, reply["code"]) == (b"ERROR", "forbidden")
    answer, reply = ask(
        broker,
        peers,
        b"SCHEDULE_ADD",
        {"name": "s", "handler": "echo", "every": 60},
        key=ADMIN,
    )
    assert answer == b"REPLY"
    assert reply["schedule"]["submitter"] == ADMIN.decode()


def test_a_tick_two_brokers_saw_due_is_enqueued_by_one(clock, peers):
    database = SharedMemoryDatabase(clock)
    result_of(database.store.open())
    brokers = [
        Broker(
            BrokerConfig(), database.store, clock, peers.send, instance_id=name
        )
        for name in ("b1", "b2")
    ]
    for broker in brokers:
        result_of(broker.load())
    add(brokers[0], peers)
    clock.advance(60)
    # Both read the schedule as due before either fires it: the store's
    # compare-and-set on next_tick lets one through.
    [due] = result_of(database.store.due_schedules(clock.seconds(), 10))
    for broker in brokers:
        result_of(broker.schedules._fire(due, clock.seconds()))
    assert len(tasks(database.store)) == 1
