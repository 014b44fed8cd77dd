# -*- test-case-name: tests.unit.test_store_contract -*-
"""
The SQL of schedules, retention and the database's settings, the same on
SQLite and PostgreSQL but for the placeholder: each function takes a
cursor in the store's transaction and ``p``, the dialect's placeholder
(``"?"`` or ``"%s"``).  The dialect modules wrap them as operations.
"""

from taskbroker.store import FINAL_STATES, LIVE_STATES, ScheduleRow

SCHEDULE_COLUMNS = ", ".join(ScheduleRow._fields)


def schedule_row(values):
    row = ScheduleRow._make(values)
    # SQLite keeps the flags as 0 and 1.
    return row._replace(
        skip_if_running=bool(row.skip_if_running), paused=bool(row.paused)
    )


def add_schedule(cursor, p, row, replace):
    """
    :returns: ``True`` if added, ``False`` if a schedule of that name
        exists and ``replace`` is false (nothing is written then).
    """
    exists = cursor.execute(
        f"SELECT 1 FROM schedules WHERE name = {p}", (row.name,)
    ).fetchone()
    if exists is not None:
        if not replace:
            return False
        cursor.execute(f"DELETE FROM schedules WHERE name = {p}", (row.name,))
    cursor.execute(
        f"INSERT INTO schedules ({SCHEDULE_COLUMNS}) VALUES "
        f"({', '.join([p] * len(ScheduleRow._fields))})",
        tuple(row),
    )
    return True


def schedules(cursor, p, names=None):
    if names is None:
        rows = cursor.execute(
            f"SELECT {SCHEDULE_COLUMNS} FROM schedules ORDER BY name"
        )
    else:
        rows = cursor.execute(
            f"SELECT {SCHEDULE_COLUMNS} FROM schedules WHERE name IN "
            f"({', '.join([p] * len(names))}) ORDER BY name",
            tuple(names),
        )
    return [schedule_row(row) for row in rows.fetchall()]


def remove_schedule(cursor, p, name):
    # RETURNING rather than rowcount: in a pipelined batch, the count is
    # known only once the batch is sent.
    return (
        cursor.execute(
            f"DELETE FROM schedules WHERE name = {p} RETURNING name", (name,)
        ).fetchone()
        is not None
    )


def pause_schedule(cursor, p, name, paused, next_tick):
    """
    Pause or resume a schedule; a schedule resumed comes due next at
    ``next_tick`` (the ticks it missed while paused are not enqueued).

    :returns: its :class:`ScheduleRow`, or ``None`` if there is none.
    """
    if paused:
        cursor.execute(
            f"UPDATE schedules SET paused = {p} WHERE name = {p}", (True, name)
        )
    else:
        cursor.execute(
            f"UPDATE schedules SET paused = {p}, next_tick = {p} "
            f"WHERE name = {p} AND paused = {p}",
            (False, next_tick, name, True),
        )
    found = schedules(cursor, p, [name])
    return found[0] if found else None


def due_schedules(cursor, p, now, limit):
    return [
        schedule_row(row)
        for row in cursor.execute(
            f"SELECT {SCHEDULE_COLUMNS} FROM schedules "
            f"WHERE paused = {p} AND next_tick <= {p} "
            f"ORDER BY next_tick LIMIT {p}",
            (False, now, limit),
        ).fetchall()
    ]


def fire_schedule(
    cursor, p, insert, name, tick, next_tick, task, skip_if_running
):
    """
    Move a schedule on from ``tick`` to ``next_tick`` and enqueue ``task``
    for it, if the schedule still waits for that tick (no other broker
    handled it, nobody paused or changed it).

    :param insert: ``insert(cursor, task)``: the dialect's insert of one
        :class:`~taskbroker.store.NewTask`, returning a
        :class:`~taskbroker.store.Submitted`.
    :returns: ``("enqueued", row)``, ``("existing", row)`` (a live task
        holds the tick's unique key), ``("skipped", None)`` (the previous
        task still runs) or ``("gone", None)`` (the tick was not this
        broker's to handle).
    """
    moved = cursor.execute(
        f"UPDATE schedules SET next_tick = {p}, last_tick = {p} "
        f"WHERE name = {p} AND next_tick = {p} AND paused = {p} "
        "RETURNING name",
        (next_tick, tick, name, tick, False),
    ).fetchone()
    if moved is None:
        return ("gone", None)
    if skip_if_running:
        previous = cursor.execute(
            "SELECT t.state FROM schedules s JOIN tasks t "
            f"ON t.id = s.last_task_id WHERE s.name = {p}",
            (name,),
        ).fetchone()
        if previous is not None and previous[0] in LIVE_STATES:
            return ("skipped", None)
    row, created = insert(cursor, task)
    cursor.execute(
        f"UPDATE schedules SET last_task_id = {p} WHERE name = {p}",
        (row.id, name),
    )
    return ("enqueued" if created else "existing", row)


def purge(
    cursor,
    p,
    finished_before,
    states,
    handler,
    submitter,
    limit,
    skip_locked="",
):
    """
    Delete at most ``limit`` tasks in ``states`` (final states only) that
    finished before ``finished_before``, oldest first.

    :param skip_locked: ``" FOR UPDATE SKIP LOCKED"`` on PostgreSQL, so
        that brokers purging at once take different rows.
    :returns: what it deleted, as ``(priority, handler, state)`` tuples.
    """
    # Written out, so that the database sees that the partial index
    # tasks_finished_by_time covers the query.
    where = [
        "state IN ('succeeded', 'failed', 'cancelled')",
        f"finished_at < {p}",
    ]
    params = [finished_before]
    states = sorted(set(states) & FINAL_STATES)
    if len(states) < len(FINAL_STATES):
        where.append(f"state IN ({', '.join([p] * len(states))})")
        params.extend(states)
    for column, value in (("handler", handler), ("submitter", submitter)):
        if value is not None:
            where.append(f"{column} = {p}")
            params.append(value)
    cursor.execute(
        "DELETE FROM tasks WHERE id IN (SELECT id FROM tasks WHERE "
        f"{' AND '.join(where)} ORDER BY finished_at LIMIT {p}"
        f"{skip_locked}) RETURNING priority, handler, state",
        (*params, limit),
    )
    return cursor.fetchall()


def count(cursor, p, state, handler, submitter):
    where, params = [f"state = {p}"], [state]
    for column, value in (("handler", handler), ("submitter", submitter)):
        if value is not None:
            where.append(f"{column} = {p}")
            params.append(value)
    return cursor.execute(
        f"SELECT count(*) FROM tasks WHERE {' AND '.join(where)}", params
    ).fetchone()[0]


def setting(cursor, p, name):
    row = cursor.execute(
        f"SELECT value FROM taskbroker_settings WHERE name = {p}", (name,)
    ).fetchone()
    return None if row is None else row[0]
