"""
Tests for taskbroker.broker.validation: whether a stored row can run.
"""

import pytest

from taskbroker.broker.validation import invalid_queue, invalid_row, with_defaults
from taskbroker.protocol import codec
from taskbroker.store import TaskRow

LEVELS = ("high", "normal", "low")


def row(**fields):
    values = dict(id=1, handler="echo", payload="null", priority=None,
                  state="queued", attempts=0, max_attempts=None, worker=None,
                  created_at=0.0, started_at=None, finished_at=None,
                  result=None, error=None)
    values.update(fields)
    return TaskRow(**values)


def test_a_plain_sql_row_is_valid():
    assert invalid_row(row(), LEVELS) is None
    assert invalid_row(row(priority="low", max_attempts=5, run_at=10.0,
                           time_limit=2), LEVELS) is None


@pytest.mark.parametrize("fields, words", [
    ({"handler": ""}, "invalid handler name"),
    ({"handler": "a\nb"}, "invalid handler name"),
    ({"handler": "h" * (codec.MAX_NAME + 1)}, "invalid handler name"),
    ({"handler": 5}, "invalid handler name"),
    ({"priority": "urgent"}, "unknown priority level 'urgent'"),
    ({"priority": 1}, "unknown priority level 1"),
    ({"payload": b"null"}, "payload is not JSON text"),
    ({"payload": "{"}, "payload is not valid JSON"),
    ({"payload": '"' + "x" * codec.MAX_PAYLOAD_SIZE + '"'},
     "payload exceeds the limit"),
    ({"max_attempts": 0}, "max_attempts must be"),
    ({"max_attempts": 1001}, "max_attempts must be"),
    ({"max_attempts": 2.0}, "max_attempts must be"),
    ({"run_at": "soon"}, "run_at must be"),
    ({"time_limit": 0}, "time_limit must be"),
    ({"time_limit": "1"}, "time_limit must be"),
])
def test_invalid_rows_say_why(fields, words):
    reason = invalid_row(row(**fields), LEVELS)
    assert reason is not None and words in reason
    assert "\n" not in reason


def test_a_queue_check_lists_the_levels():
    assert invalid_queue("echo", "urgent", LEVELS) == (
        "unknown priority level 'urgent' (levels: high,normal,low)")
    assert invalid_queue("echo", None, LEVELS) is None


def test_defaults_fill_only_what_sql_left_null():
    assert with_defaults(row(), "normal", 3)[3:7] == (
        "normal", "queued", 0, 3)
    kept = row(priority="low", max_attempts=7)
    assert with_defaults(kept, "normal", 3) is kept
