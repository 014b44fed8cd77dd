# -*- test-case-name: tests.unit.test_store -*-
"""
The SQL of the SQLite store: what runs in the store's thread, one function
per operation.  Each receives the sqlite3 connection (or a cursor in a
transaction), in autocommit mode: the store manages the transactions.
"""

import sqlite3

from taskbroker.errors import StoreError, WriteRefused, one_line
from taskbroker.store import Submitted, TaskRow, _schema, up_to_size
from taskbroker.store import _housekeeping_sql as housekeeping

# In TaskRow's field order, so that TaskRow(*row) builds one.
_COLUMNS = (
    "id, handler, payload, priority, state, attempts, max_attempts, worker, "
    "created_at, started_at, finished_at, result, error, run_at, "
    "unique_key, request_id, token, time_limit, traceback, submitter, "
    "progress, progress_message, progress_at"
)

# Errors that one operation's arguments can cause (a value a constraint
# refuses, one sqlite3 cannot bind, a bug in the caller): they fail that
# operation alone.  Anything else (disk full, I/O error, a locked database)
# fails the whole transaction.
_OPERATION_ERRORS = (
    sqlite3.IntegrityError,
    sqlite3.InterfaceError,
    sqlite3.ProgrammingError,
    sqlite3.DataError,
    TypeError,
    ValueError,
    AttributeError,
    OverflowError,
)


class _IsolateOperations(Exception):
    """
    An operation failed on its own arguments: roll back and run the batch
    again with a savepoint around each operation.
    """


def ensure_schema(connection):
    try:
        connection.execute("SELECT json_valid('null')")
    except sqlite3.OperationalError:
        # Checked here, where it can be said plainly: without them every
        # INSERT would fail with "no such function" (schema 4's CHECKs).
        raise StoreError(
            f"SQLite {sqlite3.sqlite_version} has no JSON functions, which "
            "the tasks table's constraints use; use a build that has them "
            "(built in since SQLite 3.38)"
        ) from None
    return _schema.ensure_schema(connection, "sqlite")


def run_batch(connection, operations):
    """
    Run a group of writes in one transaction.

    :returns: for each operation, ``(True, result)`` or ``(False,
        StoreError)`` when the operation's own arguments made it fail
        (:class:`~taskbroker.errors.WriteRefused` when a constraint
        refused what it would write).
    :raises: the database's error when the transaction as a whole failed;
        nothing was written then.
    """
    cursor = connection.cursor()
    try:
        return transaction(cursor, operations, isolate=False)
    except _IsolateOperations:
        # Savepoints cost two statements per operation, so the first try
        # goes without; a batch gets here only when a caller passed bad
        # arguments, and the other callers' writes must not fail with it.
        return transaction(cursor, operations, isolate=True)


def touch(cursor):
    """
    A write that changes nothing, for a transaction that must write: SQLite
    writes the row again even though its value stays the same.
    """
    cursor.execute("UPDATE taskbroker_schema SET version = version")


def quick_check(connection, limit):
    """
    Run ``PRAGMA quick_check``.

    :returns: the problems found, one line each (at most ``limit``
        reports, some of several lines); none when the database is sound.
    """
    rows = connection.execute(f"PRAGMA quick_check({limit:d})").fetchall()
    lines = [line for (text,) in rows for line in str(text).splitlines()]
    if lines == ["ok"]:
        return []
    return [line for line in lines if not line.startswith("*** in database")]


def transaction(cursor, operations, isolate):
    outcomes = []
    cursor.execute("BEGIN IMMEDIATE")
    try:
        for operation, args in operations:
            if not isolate:
                try:
                    outcomes.append((True, operation(cursor, *args)))
                except _OPERATION_ERRORS as e:
                    raise _IsolateOperations() from e
                continue
            cursor.execute("SAVEPOINT operation")
            try:
                outcomes.append((True, operation(cursor, *args)))
            except _OPERATION_ERRORS as e:
                cursor.execute("ROLLBACK TO operation")
                refused = isinstance(e, sqlite3.IntegrityError)
                error = (WriteRefused if refused else StoreError)(
                    f"{operation.__name__.lstrip('_')} failed: {one_line(e)}"
                )
                error.__cause__ = e
                outcomes.append((False, error))
            cursor.execute("RELEASE operation")
        cursor.execute("COMMIT")
    except BaseException:
        _schema.rollback(cursor)
        raise
    return outcomes


def submit(cursor, tasks):
    request_id = tasks[0].request_id
    if request_id is not None:
        # Uses the partial index tasks_by_request_id: "request_id = ?"
        # implies its "request_id IS NOT NULL".
        rows = cursor.execute(
            f"SELECT {_COLUMNS} FROM tasks WHERE request_id = ? ORDER BY id",
            (request_id,),
        ).fetchall()
        if rows:
            return [Submitted(TaskRow(*row), False) for row in rows]
    submitted = []
    for task in tasks:
        if task.unique_key is not None:
            live = live_with_key(cursor, task.unique_key)
            if live is not None:
                submitted.append(Submitted(live, False))
                continue
        dispatched = task.worker is not None
        started_at = task.created_at if dispatched else None
        cursor.execute(
            "INSERT INTO tasks "
            "(handler, payload, priority, max_attempts, created_at, run_at, "
            "unique_key, request_id, time_limit, state, attempts, token, "
            "worker, started_at, submitter) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                task.handler,
                task.payload,
                task.priority,
                task.max_attempts,
                task.created_at,
                task.run_at,
                task.unique_key,
                task.request_id,
                task.time_limit,
                "running" if dispatched else "queued",
                int(dispatched),
                int(dispatched),
                task.worker,
                started_at,
                task.submitter,
            ),
        )
        submitted.append(
            Submitted(
                TaskRow(
                    id=cursor.lastrowid,
                    handler=task.handler,
                    payload=task.payload,
                    priority=task.priority,
                    state="running" if dispatched else "queued",
                    attempts=int(dispatched),
                    max_attempts=task.max_attempts,
                    worker=task.worker,
                    created_at=task.created_at,
                    started_at=started_at,
                    finished_at=None,
                    result=None,
                    error=None,
                    run_at=task.run_at,
                    unique_key=task.unique_key,
                    request_id=task.request_id,
                    token=int(dispatched),
                    time_limit=task.time_limit,
                    traceback=None,
                    submitter=task.submitter,
                ),
                True,
            )
        )
    return submitted


def live_with_key(cursor, unique_key):
    # The state condition is written exactly as in the partial index
    # tasks_live_unique_key, so that SQLite can use it.
    row = cursor.execute(
        f"SELECT {_COLUMNS} FROM tasks WHERE unique_key = ? "
        "AND state IN ('queued', 'running')",
        (unique_key,),
    ).fetchone()
    return None if row is None else TaskRow(*row)


def dispatch(
    cursor, task_id, token, worker, started_at, priority, max_attempts
):
    cursor.execute(
        "UPDATE tasks SET state = 'running', token = ?, "
        "attempts = attempts + 1, worker = ?, started_at = ?, "
        "finished_at = NULL, progress = NULL, progress_message = NULL, "
        "progress_at = NULL, priority = COALESCE(priority, ?), "
        "max_attempts = COALESCE(max_attempts, ?) "
        "WHERE id = ? AND state = 'queued' AND token = ? - 1",
        (token, worker, started_at, priority, max_attempts, task_id, token),
    )
    return cursor.rowcount == 1


def progress(cursor, task_id, token, fraction, message, at):
    cursor.execute(
        "UPDATE tasks SET progress = ?, progress_message = ?, "
        "progress_at = ? WHERE id = ? AND token = ? AND state = 'running'",
        (fraction, message, at, task_id, token),
    )
    return cursor.rowcount == 1


def finish(
    cursor, task_id, token, state, result, error, traceback, finished_at
):
    cursor.execute(
        "UPDATE tasks SET state = ?, result = ?, error = ?, traceback = ?, "
        "finished_at = ? WHERE id = ? AND token = ? AND state = 'running'",
        (state, result, error, traceback, finished_at, task_id, token),
    )
    return cursor.rowcount == 1


def requeue(cursor, task_id, token, run_at, error, traceback, consumed):
    # MAX: a running task has used at least one attempt, unless another
    # program set its columns by hand; attempts must not go negative then.
    cursor.execute(
        "UPDATE tasks SET state = 'queued', run_at = ?, error = ?, "
        "traceback = ?, "
        "attempts = CASE WHEN ? THEN attempts ELSE MAX(attempts - 1, 0) END "
        "WHERE id = ? AND token = ? AND state = 'running'",
        (run_at, error, traceback, consumed, task_id, token),
    )
    return cursor.rowcount == 1


def cancel(cursor, task_id, finished_at):
    cursor.execute(
        "UPDATE tasks SET state = 'cancelled', error = 'cancelled', "
        "finished_at = ? WHERE id = ? AND state IN ('queued', 'running')",
        (finished_at, task_id),
    )
    return get_with(cursor, task_id)


def retry(cursor, task_id):
    # NOT EXISTS: queueing the task while another live task holds its key
    # would break the unique index; the row then stays as it is.
    cursor.execute(
        "UPDATE tasks SET state = 'queued', attempts = 0, run_at = NULL, "
        "finished_at = NULL, result = NULL, error = NULL, traceback = NULL "
        "WHERE id = ? AND state IN ('failed', 'cancelled') "
        "AND NOT EXISTS (SELECT 1 FROM tasks AS live "
        "WHERE live.unique_key = tasks.unique_key "
        "AND live.state IN ('queued', 'running'))",
        (task_id,),
    )
    return get_with(cursor, task_id)


def reject(cursor, task_id, error, finished_at):
    cursor.execute(
        "UPDATE tasks SET state = 'failed', error = ?, finished_at = ? "
        "WHERE id = ? AND state = 'queued'",
        (error, finished_at, task_id),
    )


def reject_group(cursor, handler, priority, error, finished_at):
    cursor.execute(
        "UPDATE tasks SET state = 'failed', error = ?, finished_at = ? "
        "WHERE state = 'queued' AND handler = ? AND priority IS ?",
        (error, finished_at, handler, priority),
    )
    return cursor.rowcount


def get_with(cursor, task_id):
    row = cursor.execute(
        f"SELECT {_COLUMNS} FROM tasks WHERE id = ?", (task_id,)
    ).fetchone()
    return None if row is None else TaskRow(*row)


def get(connection, task_id):
    return get_with(connection.cursor(), task_id)


def list_tasks(
    connection,
    state,
    handler,
    after_id,
    limit,
    max_bytes=None,
    submitter=None,
    priority=None,
    before_id=None,
    newest_first=False,
):
    where = ["id > ?"]
    params = [after_id]
    for column, value in (
        ("id <", before_id),
        ("submitter =", submitter),
        ("state =", state),
        ("handler =", handler),
        ("priority =", priority),
    ):
        if value is not None:
            where.append(f"{column} ?")
            params.append(value)
    params.append(limit)
    cursor = connection.cursor()
    cursor.execute(
        f"SELECT {_COLUMNS} FROM tasks WHERE {' AND '.join(where)} "
        f"ORDER BY id {'DESC' if newest_first else ''} LIMIT ?",
        params,
    )
    return up_to_size(map(TaskRow._make, cursor), max_bytes)


def scan_queued(connection, after_id, limit, known):
    cursor = connection.cursor()
    ids = [
        row[0]
        for row in cursor.execute(
            "SELECT id FROM tasks WHERE state = 'queued' AND id > ? "
            "ORDER BY id LIMIT ?",
            (after_id, limit),
        )
    ]
    wanted = [i for i in ids if i not in known]
    rows = []
    # Bounded IN lists: SQLite caps the number of parameters.
    for start in range(0, len(wanted), 500):
        chunk = wanted[start : start + 500]
        rows.extend(
            TaskRow(*row)
            for row in cursor.execute(
                f"SELECT {_COLUMNS} FROM tasks WHERE id IN "
                f"({','.join('?' * len(chunk))}) AND state = 'queued' ORDER BY id",
                chunk,
            )
        )
    return rows, (ids[-1] if ids else after_id)


def queued_groups(connection):
    # A loose index scan of tasks_queued_by_group: one seek per distinct
    # (handler, priority), where GROUP BY would read every queued row.
    # NULL sorts first and compares with nothing, so it is stepped over on
    # its own.  INDEXED BY: without statistics SQLite would rather read
    # tasks_by_state_id and sort.
    cursor = connection.cursor()
    # First: a row inserted during the scan has a higher id, and the
    # poller, which looks above this one, finds it.
    last_id = cursor.execute(
        "SELECT MAX(id) FROM tasks WHERE state = 'queued'"
    ).fetchone()[0]
    select = (
        "SELECT handler, priority FROM tasks "
        "INDEXED BY tasks_queued_by_group WHERE state = 'queued' "
    )
    pairs = []
    row = cursor.execute(
        select + "ORDER BY handler, priority LIMIT 1"
    ).fetchone()
    while row is not None:
        pairs.append(row)
        handler, priority = row
        if priority is None:
            row = cursor.execute(
                select + "AND handler = ? AND priority IS NOT NULL "
                "ORDER BY priority LIMIT 1",
                (handler,),
            ).fetchone()
        else:
            row = cursor.execute(
                select + "AND handler = ? AND priority > ? "
                "ORDER BY priority LIMIT 1",
                (handler, priority),
            ).fetchone()
        if row is None:
            row = cursor.execute(
                select + "AND handler > ? ORDER BY handler, priority LIMIT 1",
                (handler,),
            ).fetchone()
    return pairs, last_id or 0


def queued_window(connection, handler, priorities, after_id, limit, now):
    # One ordered range of tasks_queued_by_group per priority, merged:
    # "priority IN (...)" or "OR priority IS NULL" would make SQLite sort
    # the whole queue to honour ORDER BY.
    cursor = connection.cursor()
    rows = []
    for priority in priorities:
        rows.extend(
            cursor.execute(
                f"SELECT {_COLUMNS} FROM tasks INDEXED BY tasks_queued_by_group "
                "WHERE state = 'queued' AND handler = ? AND priority IS ? "
                "AND id > ? "
                # A run_at that is no number is read too, for the broker to
                # reject: it would never come due.
                "AND (run_at IS NULL OR run_at <= ? "
                "OR typeof(run_at) NOT IN ('integer', 'real')) "
                "ORDER BY id LIMIT ?",
                (handler, priority, after_id, now, limit),
            )
        )
    if len(priorities) > 1:
        rows.sort()
    return [TaskRow(*row) for row in rows[:limit]]


def delayed_window(connection, after, limit):
    rows = connection.cursor().execute(
        f"SELECT {_COLUMNS} FROM tasks INDEXED BY tasks_queued_by_run_at "
        "WHERE state = 'queued' AND run_at IS NOT NULL "
        # A run_at that is not a number (text sorts after every number)
        # is no time: the poller rejects such rows, and they must not
        # become the cursor.
        "AND typeof(run_at) IN ('integer', 'real') "
        "AND (run_at, id) > (?, ?) ORDER BY run_at, id LIMIT ?",
        (*after, limit),
    )
    return [TaskRow(*row) for row in rows]


def running(connection):
    rows = connection.cursor().execute(
        f"SELECT {_COLUMNS} FROM tasks WHERE state = 'running' ORDER BY id"
    )
    return [TaskRow(*row) for row in rows]


def counts(connection, now):
    rows = connection.cursor().execute(
        "SELECT state, priority, handler, "
        "state = 'queued' AND run_at IS NOT NULL AND run_at > ?, COUNT(*) "
        "FROM tasks GROUP BY 1, 2, 3, 4",
        (now,),
    )
    return {
        (state, priority, handler, bool(delayed)): count
        for state, priority, handler, delayed, count in rows
    }


# Schedules, retention and settings (taskbroker.store._housekeeping_sql).


def add_schedule(cursor, row, replace):
    return housekeeping.add_schedule(cursor, "?", row, replace)


def schedules(connection, names=None):
    return housekeeping.schedules(connection, "?", names)


def remove_schedule(cursor, name):
    return housekeeping.remove_schedule(cursor, "?", name)


def pause_schedule(cursor, name, paused, next_tick):
    return housekeeping.pause_schedule(cursor, "?", name, paused, next_tick)


def due_schedules(connection, now, limit):
    return housekeeping.due_schedules(connection, "?", now, limit)


def _insert(cursor, task):
    return submit(cursor, [task])[0]


def fire_schedule(cursor, name, tick, next_tick, task, skip_if_running):
    return housekeeping.fire_schedule(
        cursor, "?", _insert, name, tick, next_tick, task, skip_if_running
    )


def purge(cursor, finished_before, states, handler, submitter, limit):
    return housekeeping.purge(
        cursor, "?", finished_before, states, handler, submitter, limit
    )


def count(connection, state, handler, submitter):
    return housekeeping.count(connection, "?", state, handler, submitter)


def setting(connection, name):
    return housekeeping.setting(connection, "?", name)
