# -*- test-case-name: tests.unit.test_validation -*-
"""
Whether a task as stored can run: the checks the broker applies to rows it
did not write itself (SQL inserts, retried rows).

Pure functions of a row and the broker's priority levels, so that every
path that reads a row (a poll, a window load, a retry) applies the same
rules, and tests need neither store nor reactor.
"""

from taskbroker.protocol import codec

#: Ids, tokens and counts stay below 2**53, so that a JSON reader in any
#: language reads them exactly (and a token can always be incremented).
MAX_EXACT = 2**53 - 1


def invalid_queue(handler, priority, levels):
    """
    Why tasks with this handler and priority, as stored, cannot run.

    :param levels: the broker's level names, a ``tuple`` (or any
        container) of ``str``.
    :returns: a one-line reason, or ``None`` if they can run.
    """
    if not isinstance(handler, str) or not (
            0 < len(handler) <= codec.MAX_NAME and handler.isprintable()):
        return (f"invalid handler name (1 to {codec.MAX_NAME} printable "
                "characters)")
    if priority is not None and (
            not isinstance(priority, str) or priority not in levels):
        return (f"unknown priority level {priority!r} (levels: "
                + ",".join(levels) + ")")
    return None


def invalid_row(row, levels):
    """
    Why a row another program inserted cannot run.

    :param row: a :class:`taskbroker.store.TaskRow`.
    :param levels: as for :func:`invalid_queue`.
    :returns: a one-line reason, or ``None`` if it can run.
    """
    reason = invalid_queue(row.handler, row.priority, levels)
    if reason is not None:
        return reason
    for column, value, low in (("id", row.id, 1), ("token", row.token, 0),
                               ("attempts", row.attempts, 0)):
        if type(value) is not int or not low <= value < MAX_EXACT:
            return (f"{column} must be a whole number from {low} to "
                    f"{MAX_EXACT - 1}")
    if isinstance(row.created_at, bool) or not isinstance(
            row.created_at, (int, float)):
        return "created_at must be a Unix time in seconds"
    if not isinstance(row.payload, str):
        return "payload is not JSON text"
    if len(row.payload.encode("utf-8")) > codec.MAX_PAYLOAD_SIZE:
        return (f"payload exceeds the limit of "
                f"{codec.MAX_PAYLOAD_SIZE} bytes")
    try:
        codec.loads(row.payload)
    except ValueError:
        return "payload is not valid JSON"
    if row.max_attempts is not None and not (
            type(row.max_attempts) is int and 1 <= row.max_attempts <= 1000):
        return "max_attempts must be a whole number from 1 to 1000"
    if row.run_at is not None and not isinstance(row.run_at, (int, float)):
        return "run_at must be a Unix time in seconds"
    if row.time_limit is not None and not (
            isinstance(row.time_limit, (int, float)) and row.time_limit > 0):
        return "time_limit must be a positive number of seconds"
    return None


def with_defaults(row, default_priority, default_max_attempts):
    """
    The row with the broker's defaults for the ``priority`` and
    ``max_attempts`` that SQL left NULL (the dispatch writes them).
    """
    if row.priority is None or row.max_attempts is None:
        row = row._replace(
            priority=row.priority or default_priority,
            max_attempts=row.max_attempts or default_max_attempts)
    return row
