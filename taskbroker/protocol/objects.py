# -*- test-case-name: tests.unit.test_codec -*-
"""
The task object: how a task is shown to clients (protocol, CLI ``--json``,
Python API).

Readers must ignore keys they do not know, so that later versions can add
some.
"""

import math
from datetime import UTC, datetime

from taskbroker.protocol.codec import loads

TASK_KEYS = (
    "id",
    "handler",
    "payload",
    "priority",
    "state",
    "attempts",
    "max_attempts",
    "worker",
    "created_at",
    "started_at",
    "finished_at",
    "result",
    "error",
    "traceback",
    "run_at",
    "unique_key",
    "time_limit",
    "submitter",
    "progress",
)


def iso_time(unix_time):
    """
    ISO 8601 UTC with microseconds and an explicit ``+00:00``, or ``None``;
    a value that is not a time (another program stored it) is shown as
    text.
    """
    if unix_time is None:
        return None
    try:
        return datetime.fromtimestamp(unix_time, UTC).isoformat(
            timespec="microseconds"
        )
    except (TypeError, ValueError, OverflowError, OSError):
        return str(_shown(unix_time))


def _shown(value):
    """
    A column's value as JSON can carry it: a row another program wrote may
    hold anything SQLite stores, and one bad row must not break a reply.
    """
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _json_value(text):
    if not isinstance(text, str):
        return _shown(text)
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
        "id": _shown(row.id),
        "handler": _shown(row.handler),
        "payload": _json_value(row.payload),
        "priority": _shown(row.priority),
        "state": _shown(row.state),
        "attempts": _shown(row.attempts),
        "max_attempts": _shown(row.max_attempts),
        "worker": _shown(row.worker),
        "created_at": iso_time(row.created_at),
        "started_at": iso_time(row.started_at),
        "finished_at": iso_time(row.finished_at),
        "result": _json_value(row.result),
        "error": _shown(row.error),
        "traceback": _shown(row.traceback),
        "run_at": iso_time(row.run_at),
        "unique_key": _shown(row.unique_key),
        "time_limit": _shown(row.time_limit),
        "submitter": _shown(row.submitter),
        "progress": _progress(row),
    }


def _progress(row):
    """
    The latest progress its handler reported, as ``{"fraction",
    "message", "at"}``, or ``None``.
    """
    if row.progress is None:
        return None
    return {
        "fraction": _shown(row.progress),
        "message": _shown(row.progress_message),
        "at": iso_time(row.progress_at),
    }


SCHEDULE_KEYS = (
    "name",
    "handler",
    "payload",
    "priority",
    "max_attempts",
    "time_limit",
    "every",
    "cron",
    "timezone",
    "skip_if_running",
    "paused",
    "next_tick",
    "last_tick",
    "last_task_id",
    "created_at",
    "submitter",
)


def schedule_object(row):
    """
    :param row: a :class:`taskbroker.store.ScheduleRow`.
    :returns: a ``dict`` of JSON values with the keys
        :data:`SCHEDULE_KEYS`; times in the ISO form of task objects.
    """
    return {
        "name": _shown(row.name),
        "handler": _shown(row.handler),
        "payload": _json_value(row.payload),
        "priority": _shown(row.priority),
        "max_attempts": _shown(row.max_attempts),
        "time_limit": _shown(row.time_limit),
        "every": _shown(row.every),
        "cron": _shown(row.cron),
        "timezone": _shown(row.timezone),
        "skip_if_running": bool(row.skip_if_running),
        "paused": bool(row.paused),
        "next_tick": iso_time(row.next_tick),
        "last_tick": iso_time(row.last_tick),
        "last_task_id": _shown(row.last_task_id),
        "created_at": iso_time(row.created_at),
        "submitter": _shown(row.submitter),
    }
