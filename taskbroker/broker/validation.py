# -*- test-case-name: tests.unit.test_validation -*-
"""
Whether a task as stored can run: the checks the broker applies to rows it
did not write itself (SQL inserts, retried rows).

Pure functions of a row and the broker's priority levels, so that every
path that reads a row (a poll, a window load, a retry) applies the same
rules, and tests need neither store nor reactor.
"""

from taskbroker.protocol import codec

#: The latest time a row may name (the end of year 9999, UTC), so that
#: every time can be shown as a date and a task cannot wait for ever.
MAX_TIME = 253402300799.0


def invalid_queue(handler, priority, levels):
    """
    Why tasks with this handler and priority, as stored, cannot run.

    :param levels: the broker's level names, a ``tuple`` (or any
        container) of ``str``.
    :returns: a one-line reason, or ``None`` if they can run.
    """
    if not isinstance(handler, str) or not (
        0 < len(handler) <= codec.MAX_NAME and handler.isprintable()
    ):
        return (
            f"invalid handler name (1 to {codec.MAX_NAME} printable "
            "characters)"
        )
    if priority is not None and (
        not isinstance(priority, str) or priority not in levels
    ):
        return (
            f"unknown priority level {priority!r} (levels: "
            + ",".join(levels)
            + ")"
        )
    return None


def invalid_row(row, levels):
    """
    Why a row another program inserted (or changed) cannot run: the limits
    are the codec's, which every worker applies to the TASK made of the
    row, so that a task the broker dispatches is one every worker can read.

    A queued row must leave room for its next dispatch (one more token,
    one more attempt); a running row holds its current ones, which may be
    the highest a message carries.

    :param row: a :class:`taskbroker.store.TaskRow`, queued or running.
    :param levels: as for :func:`invalid_queue`.
    :returns: a one-line reason naming the column, or ``None`` if it can
        run.
    """
    reason = invalid_queue(row.handler, row.priority, levels)
    if reason is not None:
        return reason
    room = 0 if row.state == "running" else 1
    for column, value, low, high in (
        ("id", row.id, 1, codec.MAX_EXACT - 1),
        ("token", row.token, 0, codec.MAX_EXACT - room),
        ("attempts", row.attempts, 0, codec.MAX_ATTEMPT - room),
    ):
        if type(value) is not int or not low <= value <= high:
            return f"{column} must be a whole number from {low} to {high}"
    for column, value in (
        ("created_at", row.created_at),
        ("run_at", row.run_at),
    ):
        if (value is not None or column == "created_at") and not _time(value):
            return (
                f"{column} must be a Unix time in seconds from 0 to "
                f"{MAX_TIME:.0f}"
            )
    try:
        codec.check_text(row.payload, "payload")
    except ValueError as e:
        return str(e)
    for column in ("max_attempts", "time_limit"):
        value = getattr(row, column)
        if value is not None:
            try:
                _TASK[column][0](value)
            except ValueError as e:
                return f"{column} {e}"
    return None


_TASK = codec.BROKER_TO_WORKER_COMMANDS[b"TASK"]


def _time(value):
    return (
        not isinstance(value, bool)
        and isinstance(value, (int, float))
        and 0 <= value <= MAX_TIME
    )


def with_defaults(row, default_priority, default_max_attempts):
    """
    The row with the broker's defaults for the ``priority`` and
    ``max_attempts`` that SQL left NULL (the dispatch writes them).
    """
    if row.priority is None or row.max_attempts is None:
        row = row._replace(
            priority=row.priority or default_priority,
            max_attempts=row.max_attempts or default_max_attempts,
        )
    return row
