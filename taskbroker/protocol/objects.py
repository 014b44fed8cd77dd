# -*- test-case-name: tests.unit.test_codec -*-
"""
The task object: how a task is shown to clients (protocol, CLI ``--json``,
Python API).

Readers must ignore keys they do not know, so that later versions can add
some.
"""

from datetime import datetime, timezone

from taskbroker.protocol.codec import loads

TASK_KEYS = (
    "id", "handler", "payload", "priority", "state", "attempts",
    "max_attempts", "worker", "created_at", "started_at", "finished_at",
    "result", "error", "traceback", "run_at", "unique_key", "time_limit",
)


def iso_time(unix_time):
    """
    ISO 8601 UTC with microseconds and an explicit ``+00:00``, or ``None``.
    """
    if unix_time is None:
        return None
    return datetime.fromtimestamp(unix_time, timezone.utc).isoformat(
        timespec="microseconds")


def _json_value(text):
    if text is None:
        return None
    try:
        # The codec's strict loads: json.loads would accept NaN, which the
        # reply could then not encode.
        return loads(text)
    except ValueError:
        # Only a row inserted by SQL with invalid JSON gets here (it was
        # failed for it); show the text rather than hide it.
        return text


def task_object(row):
    """
    :param row: a :class:`taskbroker.store.TaskRow`.
    :returns: a ``dict`` of JSON values with the keys :data:`TASK_KEYS`.
    """
    return {
        "id": row.id,
        "handler": row.handler,
        "payload": _json_value(row.payload),
        "priority": row.priority,
        "state": row.state,
        "attempts": row.attempts,
        "max_attempts": row.max_attempts,
        "worker": row.worker,
        "created_at": iso_time(row.created_at),
        "started_at": iso_time(row.started_at),
        "finished_at": iso_time(row.finished_at),
        "result": _json_value(row.result),
        "error": row.error,
        "traceback": row.traceback,
        "run_at": iso_time(row.run_at),
        "unique_key": row.unique_key,
        "time_limit": row.time_limit,
    }
