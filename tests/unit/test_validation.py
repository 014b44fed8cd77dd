"""
Tests for taskbroker.broker.validation: whether a stored row can run.
"""

import pytest

from taskbroker.broker.validation import (
    invalid_queue,
    invalid_row,
    with_defaults,
)
from taskbroker.protocol import codec
from taskbroker.store import TaskRow

LEVELS = ("high", "normal", "low")


def row(**fields):
    values = dict(
        id=1,
        handler="echo",
        payload="null",
        priority=None,
        state="queued",
        attempts=0,
        max_attempts=None,
        worker=None,
        created_at=0.0,
        started_at=None,
        finished_at=None,
        result=None,
        error=None,
    )
    values.update(fields)
    return TaskRow(**values)


def test_a_plain_sql_row_is_valid():
    assert invalid_row(row(), LEVELS) is None
    assert (
        invalid_row(
            row(priority="low", max_attempts=5, run_at=10.0, time_limit=2),
            LEVELS,
        )
        is None
    )


@pytest.mark.parametrize(
    "fields, words",
    [
        ({"handler": ""}, "invalid handler name"),
        ({"handler": "a\nb"}, "invalid handler name"),
        ({"handler": "h" * (codec.MAX_NAME + 1)}, "invalid handler name"),
        ({"handler": 5}, "invalid handler name"),
        ({"priority": "urgent"}, "unknown priority level 'urgent'"),
        ({"priority": 1}, "unknown priority level 1"),
        ({"payload": b"null"}, "payload is not JSON text"),
        ({"payload": "{"}, "payload is not valid JSON"),
        (
            {"payload": '"' + "x" * codec.MAX_PAYLOAD_SIZE + '"'},
            "payload exceeds the limit",
        ),
        ({"max_attempts": 0}, "max_attempts must be"),
        ({"max_attempts": 1001}, "max_attempts must be"),
        ({"max_attempts": 2.0}, "max_attempts must be"),
        ({"run_at": "soon"}, "run_at must be"),
        ({"time_limit": 0}, "time_limit must be"),
        ({"time_limit": "1"}, "time_limit must be"),
    ],
)
def test_invalid_rows_say_why(fields, words):
    reason = invalid_row(row(**fields), LEVELS)
    assert reason is not None and words in reason
    assert "\n" not in reason


def test_a_row_at_every_limit_can_run():
    assert (
        invalid_row(
            row(
                payload="[" * 64 + "]" * 64,
                attempts=2**31 - 2,
                time_limit=0.001,
                token=2**53 - 2,
                id=2**53 - 2,
                run_at=253402300799,
            ),
            LEVELS,
        )
        is None
    )


def test_a_queue_check_lists_the_levels():
    assert invalid_queue("echo", "urgent", LEVELS) == (
        "unknown priority level 'urgent' (levels: high,normal,low)"
    )
    assert invalid_queue("echo", None, LEVELS) is None


def test_defaults_fill_only_what_sql_left_null():
    assert with_defaults(row(), "normal", 3)[3:7] == ("normal", "queued", 0, 3)
    kept = row(priority="low", max_attempts=7)
    assert with_defaults(kept, "normal", 3) is kept


@pytest.mark.parametrize(
    "fields, words",
    [
        ({"token": "abc"}, "token must be a whole number"),
        ({"token": 2**63 - 1}, "token must be a whole number"),
        ({"token": -1}, "token must be a whole number"),
        ({"attempts": "abc"}, "attempts must be a whole number"),
        ({"id": 2**63 - 1}, "id must be a whole number"),
        ({"created_at": "yesterday"}, "created_at must be a Unix time"),
        ({"created_at": 1e300}, "created_at must be a Unix time"),
        # What the worker's codec would refuse in the TASK made of the row.
        (
            {"attempts": -5},
            "attempts must be a whole number from 0 to 2147483646",
        ),
        ({"attempts": 2**31 - 1}, "attempts must be a whole number"),
        ({"time_limit": 1e300}, "time_limit must be a number from 0.001 to"),
        ({"time_limit": 1e-9}, "time_limit must be a number from 0.001 to"),
        (
            {"run_at": 1e300},
            "run_at must be a Unix time in seconds from 0 to 253402300799",
        ),
        ({"run_at": float("inf")}, "run_at must be a Unix time"),
        (
            {"payload": "[" * 65 + "]" * 65},
            "payload is nested deeper than 64 levels",
        ),
        ({"payload": "[" * 5000 + "]" * 5000}, "payload is not valid JSON"),
    ],
)
def test_columns_a_program_could_break_are_checked(fields, words):
    assert words in invalid_row(row(**fields), LEVELS)


def test_a_running_row_may_hold_the_highest_token_and_attempt():
    # It holds its current ones; a queued row must leave room for the next.
    top = dict(token=codec.MAX_EXACT, attempts=codec.MAX_ATTEMPT)
    assert invalid_row(row(state="running", **top), LEVELS) is None
    assert (
        "token must be a whole number from 0 to 9007199254740990"
        in invalid_row(row(**top), LEVELS)
    )
    assert (
        "token must be a whole number from 0 to 9007199254740991"
        in invalid_row(row(state="running", token=codec.MAX_EXACT + 1), LEVELS)
    )
    assert (
        "attempts must be a whole number from 0 to 2147483647"
        in invalid_row(
            row(state="running", attempts=codec.MAX_ATTEMPT + 1), LEVELS
        )
    )


def test_a_row_with_a_broken_token_fails_alone():
    from twisted.internet.task import Clock

    from taskbroker.broker.core import Broker
    from taskbroker.config import BrokerConfig
    from taskbroker.testing import MemoryStore, result_of
    from taskbroker.transport.zmq import Sender

    clock = Clock()
    store = MemoryStore(clock)
    result_of(store.open())
    sent = []
    broker = Broker(
        BrokerConfig(),
        store,
        clock,
        lambda identity, frames: sent.append(frames) or True,
    )
    result_of(broker.load())
    bad = store.insert_external("echo", "1")
    store._rows[bad.id] = store._rows[bad.id]._replace(token="abc")
    good = store.insert_external("echo", "2")
    broker.handle(
        Sender(b"w1/x"),
        codec.encode(
            b"HELLO",
            {"name": "w1", "slots": 1, "handlers": ["echo"], "heartbeat": 1.0},
        ),
    )
    broker.handle(Sender(b"w1/x"), codec.encode(b"READY", {}))
    result_of(broker.poll())
    row = result_of(store.get(bad.id))
    assert row.state == "failed" and "token" in row.error
    tasks = [frames for frames in sent if frames[1] == b"TASK"]
    assert len(tasks) == 1 and b'"id":%d' % good.id in tasks[0][2]
    assert not broker.dispatcher.paused
