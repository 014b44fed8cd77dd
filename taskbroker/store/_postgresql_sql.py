# -*- test-case-name: tests.unit.test_store_postgresql -*-
"""
The SQL of the PostgreSQL store: what runs in the store's threads, one
function per operation.  Each write receives a cursor inside the
transaction the store opened for its batch, and the id of the broker
that writes (``None`` for a store no broker claims through), which the
rows it takes or queues record as their ``owner``.
"""

import psycopg
from psycopg import errors as pg_errors

from taskbroker.errors import StoreError, WriteRefused, one_line
from taskbroker.store import Submitted, TaskRow, up_to_size
from taskbroker.store import _housekeeping_sql as housekeeping

# In TaskRow's field order, so that TaskRow(*row) builds one.
COLUMNS = (
    "id, handler, payload, priority, state, attempts, max_attempts, worker, "
    "created_at, started_at, finished_at, result, error, run_at, "
    "unique_key, request_id, token, time_limit, traceback, submitter, "
    "progress, progress_message, progress_at"
)
_T_COLUMNS = ", ".join("t." + name.strip() for name in COLUMNS.split(","))

# Errors that one operation's arguments can cause (a value a constraint
# refuses, text that is not JSON, a number out of range): they fail that
# operation alone.  Anything else (a lost connection, a full disk) fails
# the whole transaction.
_OPERATION_ERRORS = (
    pg_errors.IntegrityError,
    pg_errors.DataError,
    psycopg.ProgrammingError,
    TypeError,
    ValueError,
    OverflowError,
)


class _IsolateOperations(Exception):
    """
    An operation failed on its own arguments: roll back and run the batch
    again with a savepoint around each operation.
    """


def clean(text):
    """
    Text as PostgreSQL can store it: a ``text`` value cannot hold NUL,
    which a worker's error or traceback may (it is replaced by U+FFFD).
    """
    if text is not None and "\x00" in text:
        return text.replace("\x00", "\ufffd")
    return text


def run_batch(connection, operations, owner, channels):
    """
    Run a group of writes in one transaction.

    :param channels: ``(wake, done)``: the channels to notify the brokers
        on when the batch made tasks claimable, and with the ids of the
        tasks it ended; or ``None``.
    :returns: for each operation, ``(True, result)`` or ``(False,
        StoreError)`` when the operation's own arguments made it fail
        (:class:`~taskbroker.errors.WriteRefused` when a constraint refused
        what it would write).
    :raises: the database's error when the transaction as a whole failed;
        nothing was written then.
    """
    if len(operations) == 1 and operations[0][0] in SINGLE_STATEMENT:
        return _alone(connection, *operations[0], owner, channels)
    try:
        if psycopg.Pipeline.is_supported():
            return _pipelined(connection, operations, owner, channels)
        return _transaction(connection, operations, owner, channels, False)
    except _IsolateOperations:
        # Savepoints cost two statements per operation: only a batch in
        # which a caller passed bad arguments pays for them.
        return _transaction(connection, operations, owner, channels, True)


class Later:
    """
    What a write returns when its result can be read only once the
    server answered its statement: in a pipelined batch, after the whole
    batch was sent.
    """

    __slots__ = ("read",)

    def __init__(self, read):
        self.read = read


def _settled(outcome):
    return outcome.read() if isinstance(outcome, Later) else outcome


def _alone(connection, operation, args, owner, channels):
    """
    One statement commits on its own: no BEGIN and COMMIT (a dispatch or
    a finish, most often, between two results).
    """
    cursor = connection.cursor()
    try:
        outcome = _settled(operation(cursor, owner, *args))
    except _OPERATION_ERRORS as e:
        return [(False, _refusal(operation, e))]
    outcomes = [(True, outcome)]
    _announce_ended(connection, [(operation, args)], outcomes, channels)
    return outcomes


def _pipelined(connection, operations, owner, channels):
    """
    The batch's statements sent at once, BEGIN to COMMIT, in psycopg's
    pipeline mode: one round trip to the server instead of one per
    statement.  A write that must see an earlier one's result (a submit
    with a unique key) still waits for it.
    """
    pending = []
    try:
        with connection.pipeline():
            connection.execute("BEGIN")
            for operation, args in operations:
                pending.append(operation(connection.cursor(), owner, *args))
            _wake(connection.cursor(), operations, channels)
            connection.execute("COMMIT")
    except BaseException as e:
        # A failed pipeline leaves the session in its transaction.
        if (
            not connection.closed
            and connection.info.transaction_status != _IDLE
        ):
            connection.execute("ROLLBACK")
        if isinstance(e, (*_OPERATION_ERRORS, pg_errors.PipelineAborted)):
            # (Statements after a failed one are aborted: which operation
            # failed is found without the pipeline.)
            raise _IsolateOperations() from e
        raise
    outcomes = [
        _read_after_commit(operation, outcome)
        for (operation, _), outcome in zip(operations, pending)
    ]
    _announce_ended(connection, operations, outcomes, channels)
    return outcomes


def _read_after_commit(operation, outcome):
    """
    An operation's outcome, read once its batch committed: a failure to
    read it fails that operation alone (the others committed).
    """
    try:
        return (True, _settled(outcome))
    except psycopg.Error as e:
        error = StoreError(
            f"{operation.__name__} committed, but its "
            f"outcome could not be read: {one_line(e)}"
        )
        error.__cause__ = e
        return (False, error)


def _transaction(connection, operations, owner, channels, isolate):
    outcomes = []
    with connection.transaction():
        for operation, args in operations:
            cursor = connection.cursor()
            if not isolate:
                try:
                    outcomes.append(
                        (True, _settled(operation(cursor, owner, *args)))
                    )
                except _OPERATION_ERRORS as e:
                    raise _IsolateOperations() from e
                continue
            try:
                with connection.transaction():
                    outcomes.append(
                        (True, _settled(operation(cursor, owner, *args)))
                    )
            except _OPERATION_ERRORS as e:
                outcomes.append((False, _refusal(operation, e)))
        _wake(connection.cursor(), operations, channels)
    _announce_ended(connection, operations, outcomes, channels)
    return outcomes


def _wake(cursor, operations, channels):
    """
    Notify, at the batch's commit, the brokers that may claim tasks it
    made claimable.  Most batches notify nothing, and take no
    notification lock.
    """
    if channels is not None and any(
        operation in WAKING for operation, _ in operations
    ):
        cursor.execute("SELECT pg_notify(%s, '')", (channels[0],))


def _announce_ended(connection, operations, outcomes, channels):
    """
    After a batch committed, notify the brokers whose WAITs watch a task
    it ended: the finishes that found their task ``watched``, and the
    cancels that cancelled one (rare; a notification that no WAIT
    watches is ignored).  Read from the outcomes rather than the table,
    which costs no statement in the common case and no plan that could
    scan the finished tasks.  A WAIT whose notification was lost reads
    its task when its hold time is up.
    """
    if channels is None:
        return
    ended = {
        args[0]
        for (operation, args), (ok, outcome) in zip(operations, outcomes)
        if ok
        and (
            (isinstance(outcome, Finished) and outcome.watched)
            or (
                operation is cancel
                and outcome is not None
                and outcome.state == "cancelled"
            )
        )
    }
    if ended:
        try:
            connection.execute(
                "SELECT pg_notify(%s, %s)",
                (channels[1], _ids_payload(sorted(ended))),
            )
        except psycopg.Error:
            pass


_IDLE = psycopg.pq.TransactionStatus.IDLE


def _refusal(operation, e):
    """
    The error of an operation that failed on its own arguments.
    """
    refused = isinstance(e, (pg_errors.IntegrityError, pg_errors.DataError))
    error = (WriteRefused if refused else StoreError)(
        f"{operation.__name__.lstrip('_')} failed: {one_line(e)}"
    )
    error.__cause__ = e
    return error


#: The longest list of ids a notification carries; a longer one says
#: only that tasks ended (PostgreSQL's limit is 8000 bytes).
MAX_IDS_PAYLOAD = 7000


def _ids_payload(task_ids):
    payload = ",".join(map(str, task_ids))
    return payload if len(payload) <= MAX_IDS_PAYLOAD else ""


def parse_ids(payload):
    """
    The ids a notification of ended tasks names, or ``None`` for "some".
    """
    try:
        return [int(part) for part in payload.split(",")] if payload else None
    except ValueError:
        return None


def touch(cursor, owner):
    """
    A write that changes nothing, for a transaction that must write.
    """
    cursor.execute("UPDATE taskbroker_schema SET version = version")


def submit(cursor, owner, tasks):
    connection = cursor.connection
    request_id = tasks[0].request_id
    if request_id is not None:
        # Two brokers given the same request (a client that failed over)
        # take turns here, so the second finds the tasks of the first.
        cursor.execute(
            "SELECT pg_advisory_xact_lock(%s, hashtext(%s))",
            (_REQUEST_LOCK, request_id),
        )
    if any(task.unique_key is not None for task in tasks):
        earlier = _requested(cursor, request_id)
        if earlier:
            return earlier
        return [
            _insert_keyed(cursor, owner, task)
            if task.unique_key
            else _insert_one(cursor, owner, task)
            for task in tasks
        ]
    # One statement for the whole request, read once the batch is sent
    # (in a pipelined batch, with no round trip of its own).  Unless the
    # request was carried out before: then it inserts nothing.
    inserting = connection.cursor()
    inserting.execute(
        _INSERT_MANY.format(rows=", ".join([_VALUES] * len(tasks)))
        + ("" if request_id is None else _UNLESS_REQUESTED)
        + _RETURNING,
        [value for task in tasks for value in _values(task, owner)]
        + ([] if request_id is None else [request_id]),
    )

    def read():
        # Ids are drawn in the order of the VALUES rows.
        rows = sorted(inserting.fetchall())
        if not rows:
            # The request came before: its tasks are read after this
            # batch committed (a round trip that only a resent request
            # costs).
            return _requested(connection.cursor(), request_id)
        return [Submitted(TaskRow(*row), True) for row in rows]

    return Later(read)


def _requested(cursor, request_id):
    """
    The tasks a request created when it came before, as ``submit``
    returns them (``[]`` for a new request).
    """
    if request_id is None:
        return []
    rows = cursor.execute(
        f"SELECT {COLUMNS} FROM tasks WHERE request_id = %s ORDER BY id",
        (request_id,),
    ).fetchall()
    return [Submitted(TaskRow(*row), False) for row in rows]


def _values(task, owner):
    dispatched = task.worker is not None
    return (
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
        task.created_at if dispatched else None,
        # Claimed only when dispatched at once; else any broker's idle
        # credit may take it.
        owner if dispatched else None,
        task.submitter,
    )


def _insert_one(cursor, owner, task):
    row = cursor.execute(_INSERT, _values(task, owner)).fetchone()
    return Submitted(TaskRow(*row), True)


def _insert_keyed(cursor, owner, task):
    # Another broker may insert the same key meanwhile: the conflict waits
    # for it to commit, then its task is the one.
    row = cursor.execute(
        _INSERT.replace(" RETURNING", _ON_KEY_CONFLICT + " RETURNING"),
        _values(task, owner),
    ).fetchone()
    if row is None:
        live = live_with_key(cursor, task.unique_key)
        if live is not None:
            return Submitted(live, False)
        row = cursor.execute(_INSERT, _values(task, owner)).fetchone()
    return Submitted(TaskRow(*row), True)


# The first key of the advisory locks on request ids (the second is the
# id's hash): a constant of our own, so that other programs' locks on the
# same database do not collide with them.
_REQUEST_LOCK = 0x7462  # "tb"

# In the order of _values().
_INSERT_COLUMNS = (
    "handler, payload, priority, max_attempts, created_at, run_at, "
    "unique_key, request_id, time_limit, state, attempts, token, worker, "
    "started_at, owner, submitter"
)
_RETURNING = f" RETURNING {COLUMNS}"
_INSERT = (
    f"INSERT INTO tasks ({_INSERT_COLUMNS}) VALUES "
    f"({', '.join(['%s'] * 16)}){_RETURNING}"
)
# The same with many rows, from a SELECT so that a WHERE can stop it; the
# casts give the VALUES the columns' types.
_INSERT_MANY = (
    f"INSERT INTO tasks ({_INSERT_COLUMNS}) SELECT * FROM (VALUES {{rows}}) "
    f"AS v({_INSERT_COLUMNS})"
)
_VALUES = (
    "(%s::text, %s::json, %s::text, %s::integer, %s::double precision, "
    "%s::double precision, %s::text, %s::text, %s::double precision, "
    "%s::text, %s::integer, %s::bigint, %s::text, %s::double precision, "
    "%s::text, %s::text)"
)
_UNLESS_REQUESTED = (
    " WHERE NOT EXISTS (SELECT 1 FROM tasks WHERE request_id = %s)"
)
_ON_KEY_CONFLICT = (
    " ON CONFLICT (unique_key) WHERE unique_key IS NOT NULL "
    "AND state IN ('queued', 'running') DO NOTHING"
)


def live_with_key(cursor, unique_key):
    row = cursor.execute(
        f"SELECT {COLUMNS} FROM tasks WHERE unique_key = %s "
        "AND state IN ('queued', 'running')",
        (unique_key,),
    ).fetchone()
    return None if row is None else TaskRow(*row)


def dispatch(
    cursor, owner, task_id, token, worker, started_at, priority, max_attempts
):
    cursor.execute(
        "UPDATE tasks SET state = 'running', token = %s, "
        "attempts = attempts + 1, worker = %s, started_at = %s, "
        "finished_at = NULL, progress = NULL, progress_message = NULL, "
        "progress_at = NULL, priority = COALESCE(priority, %s), "
        "max_attempts = COALESCE(max_attempts, %s) "
        "WHERE id = %s AND state = 'queued' AND token = %s - 1 "
        "AND owner IS NOT DISTINCT FROM %s",
        (
            token,
            clean(worker),
            started_at,
            priority,
            max_attempts,
            task_id,
            token,
            owner,
        ),
    )
    return Later(lambda: cursor.rowcount == 1)


def dispatch_for(
    cursor, owner, ranks, handlers, workers, now, priority, max_attempts
):
    """
    Claim up to ``len(workers)`` due tasks as :func:`claim` does and
    dispatch them in the same statement, the n-th claimed to
    ``workers[n]``: one durable commit before their TASKs instead of a
    claim and then a dispatch.  A NULL priority or max_attempts becomes
    ``priority`` or ``max_attempts``, as :func:`dispatch` does.

    :returns: a ``list`` as long as ``workers``: the dispatched
        :class:`TaskRow` for each worker, or ``None`` where no task was
        left for it.
    """
    # One worker, the usual case, takes a statement with its LIMITs
    # written out (see _DISPATCH_ONE).
    limits = [] if len(workers) == 1 else [len(workers)] * 2
    cursor.execute(
        _DISPATCH_FOR if limits else _DISPATCH_ONE,
        (
            ranks,
            handlers,
            now,
            *limits,
            [clean(name) for name in workers],
            owner,
            now,
            priority,
            max_attempts,
        ),
    )

    def read():
        dispatched = [None] * len(workers)
        for n, *row in cursor.fetchall():
            dispatched[n - 1] = TaskRow(*row)
        return dispatched

    return Later(read)


# The levels are read in order, as in _CLAIM, and a claim takes at most
# {limit} tasks; row_number() numbers the claimed rows for the workers
# (which worker of a class gets which task does not matter: they all can
# run each of them).
_DISPATCH = (
    "WITH c AS (SELECT t.id, row_number() OVER () AS n "
    "FROM unnest(%s::integer[]) AS r(rank) "
    "CROSS JOIN LATERAL (SELECT id FROM tasks WHERE state = 'queued' "
    "AND owner IS NULL AND rank = r.rank AND handler = ANY(%s) "
    "AND (run_at IS NULL OR run_at <= %s) "
    "ORDER BY ready_seq LIMIT {limit} FOR UPDATE SKIP LOCKED) AS t "
    "LIMIT {limit}), "
    "w AS (SELECT name, n FROM unnest(%s::text[]) WITH ORDINALITY "
    "AS w(name, n)) "
    "UPDATE tasks AS t SET owner = %s, state = 'running', "
    "token = t.token + 1, attempts = t.attempts + 1, worker = w.name, "
    "started_at = %s, finished_at = NULL, progress = NULL, "
    "progress_message = NULL, progress_at = NULL, "
    "priority = COALESCE(t.priority, %s), "
    "max_attempts = COALESCE(t.max_attempts, %s) "
    "FROM c JOIN w USING (n) WHERE t.id = c.id "
    f"RETURNING c.n, {_T_COLUMNS}"
)
_DISPATCH_FOR = _DISPATCH.format(limit="%s")
# For one worker (a freed slot asking for its next task).  Its plan does
# not depend on the values, so once psycopg prepares it (at its fifth
# use) the server keeps one generic plan; with the LIMITs as parameters,
# it planned every run anew (a quarter of its time on a busy queue).
_DISPATCH_ONE = _DISPATCH.format(limit="1")


def progress(cursor, owner, task_id, token, fraction, message, at):
    cursor.execute(
        "UPDATE tasks SET progress = %s, progress_message = %s, "
        "progress_at = %s WHERE id = %s AND token = %s AND state = 'running' "
        "AND owner IS NOT DISTINCT FROM %s",
        (fraction, clean(message), at, task_id, token, owner),
    )
    return Later(lambda: cursor.rowcount == 1)


def finish(
    cursor, owner, task_id, token, state, result, error, traceback, finished_at
):
    cursor.execute(
        "UPDATE tasks SET state = %s, result = %s, error = %s, "
        "traceback = %s, finished_at = %s "
        "WHERE id = %s AND token = %s AND state = 'running' "
        "AND owner IS NOT DISTINCT FROM %s RETURNING watched",
        (
            state,
            clean(result),
            clean(error),
            clean(traceback),
            finished_at,
            task_id,
            token,
            owner,
        ),
    )

    def read():
        row = cursor.fetchone()
        return False if row is None else Finished(row[0])

    return Later(read)


class Finished:
    """
    What :func:`finish` returns when it changed the row (the store turns
    it into ``True``): whether a WAIT on another broker watches the task.
    """

    __slots__ = ("watched",)

    def __init__(self, watched):
        self.watched = watched

    def __bool__(self):
        return True


def requeue(cursor, owner, task_id, token, run_at, error, traceback, consumed):
    # The task stays this broker's claim: it holds it again at once, and
    # gives it back if no worker of its own takes it.
    cursor.execute(
        "UPDATE tasks SET state = 'queued', run_at = %s, error = %s, "
        "traceback = %s, attempts = CASE WHEN %s THEN attempts "
        "ELSE GREATEST(attempts - 1, 0) END "
        "WHERE id = %s AND token = %s AND state = 'running' "
        "AND owner IS NOT DISTINCT FROM %s",
        (
            run_at,
            clean(error),
            clean(traceback),
            consumed,
            task_id,
            token,
            owner,
        ),
    )
    return Later(lambda: cursor.rowcount == 1)


def cancel(cursor, owner, task_id, finished_at):
    cursor.execute(
        "UPDATE tasks SET state = 'cancelled', error = 'cancelled', "
        "finished_at = %s WHERE id = %s AND state IN ('queued', 'running')",
        (finished_at, task_id),
    )
    return get_with(cursor, task_id)


def retry(cursor, owner, task_id):
    cursor.execute(
        "UPDATE tasks SET state = 'queued', attempts = 0, run_at = NULL, "
        "finished_at = NULL, result = NULL, error = NULL, traceback = NULL, "
        "owner = %s "
        "WHERE id = %s AND state IN ('failed', 'cancelled') "
        "AND NOT EXISTS (SELECT 1 FROM tasks AS live "
        "WHERE live.unique_key = tasks.unique_key "
        "AND live.state IN ('queued', 'running'))",
        (owner, task_id),
    )
    return get_with(cursor, task_id)


def reject(cursor, owner, task_id, error, finished_at):
    cursor.execute(
        "UPDATE tasks SET state = 'failed', error = %s, finished_at = %s "
        "WHERE id = %s AND state = 'queued'",
        (clean(error), finished_at, task_id),
    )


def reject_group(cursor, owner, handler, priority, error, finished_at):
    cursor.execute(
        "UPDATE tasks SET state = 'failed', error = %s, finished_at = %s "
        "WHERE state = 'queued' AND handler = %s "
        "AND priority IS NOT DISTINCT FROM %s",
        (clean(error), finished_at, handler, priority),
    )
    return Later(lambda: cursor.rowcount)


def release(cursor, owner, task_ids):
    cursor.execute(
        "UPDATE tasks SET owner = NULL "
        "WHERE id = ANY(%s) AND state = 'queued' AND owner = %s",
        (list(task_ids), owner),
    )
    return Later(lambda: cursor.rowcount)


def watch(cursor, owner, task_id):
    cursor.execute(
        "UPDATE tasks SET watched = true WHERE id = %s "
        "AND state IN ('queued', 'running') AND NOT watched",
        (task_id,),
    )


def get_with(cursor, task_id):
    row = cursor.execute(
        f"SELECT {COLUMNS} FROM tasks WHERE id = %s", (task_id,)
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
    where = ["id > %s"]
    params = [after_id]
    for column, value in (
        ("id <", before_id),
        ("submitter =", submitter),
        ("state =", state),
        ("handler =", handler),
        ("priority =", priority),
    ):
        if value is not None:
            where.append(f"{column} %s")
            params.append(value)
    params.append(limit)
    cursor = connection.cursor()
    cursor.execute(
        f"SELECT {COLUMNS} FROM tasks WHERE {' AND '.join(where)} "
        f"ORDER BY id {'DESC' if newest_first else ''} LIMIT %s",
        params,
    )
    return up_to_size(map(TaskRow._make, cursor), max_bytes)


def counts(connection, now):
    cursor = connection.cursor()
    cursor.execute(
        "SELECT state, priority, handler, "
        "state = 'queued' AND run_at IS NOT NULL AND run_at > %s, count(*) "
        "FROM tasks GROUP BY 1, 2, 3, 4",
        (now,),
    )
    return {
        (state, priority, handler, bool(delayed)): count
        for state, priority, handler, delayed, count in cursor
    }


def running(connection):
    cursor = connection.cursor()
    cursor.execute(
        f"SELECT {COLUMNS} FROM tasks WHERE state = 'running' ORDER BY id"
    )
    return [TaskRow(*row) for row in cursor]


def queued_groups(connection):
    """
    The distinct ``(handler, priority)`` of queued tasks, one index seek
    each (a loose scan of ``tasks_queued_by_group``), however deep the
    queues.
    """
    cursor = connection.cursor()
    cursor.execute(
        "WITH RECURSIVE g AS ("
        " (SELECT handler, priority FROM tasks WHERE state = 'queued'"
        "  ORDER BY handler, priority LIMIT 1)"
        " UNION ALL"
        " SELECT n.handler, n.priority FROM g CROSS JOIN LATERAL"
        " (SELECT handler, priority FROM tasks"
        "  WHERE state = 'queued' AND (handler, priority) > (g.handler,"
        "  g.priority) ORDER BY handler, priority LIMIT 1) AS n"
        ") SELECT handler, priority FROM g"
    )
    pairs = cursor.fetchall()
    # A row comparison with a NULL is NULL where the handler does not
    # decide it: the handlers with NULL priorities are found apart.
    cursor.execute(
        "WITH RECURSIVE g AS ("
        " (SELECT handler FROM tasks WHERE state = 'queued'"
        "  AND priority IS NULL ORDER BY handler LIMIT 1)"
        " UNION ALL"
        " SELECT n.handler FROM g CROSS JOIN LATERAL"
        " (SELECT handler FROM tasks WHERE state = 'queued'"
        "  AND priority IS NULL AND handler > g.handler"
        "  ORDER BY handler LIMIT 1) AS n"
        ") SELECT handler FROM g"
    )
    pairs.extend((handler, None) for (handler,) in cursor)
    # (The first scan may find a NULL priority too, where the handler
    # alone decides the comparison.)
    return list(dict.fromkeys(pairs))


def delayed_window(connection, after, limit):
    cursor = connection.cursor()
    cursor.execute(
        f"SELECT {COLUMNS} FROM tasks "
        "WHERE state = 'queued' AND run_at IS NOT NULL "
        "AND (run_at, id) > (%s, %s) ORDER BY run_at, id LIMIT %s",
        (*after, limit),
    )
    return [TaskRow(*row) for row in cursor]


def claim(connection, owner, ranks, handlers, limit, now):
    """
    Claim up to ``limit`` due tasks: the most urgent level first, the
    longest queued first within a level; rows other brokers are claiming
    at this moment are skipped, not waited for.

    One statement, and so one round trip: the levels are read one after
    the other (a lateral join over ``ranks``, in order, which stops once
    ``limit`` rows came), each in ``tasks_claimable``'s order; with
    ``rank = ANY(...)`` instead, the planner sorts every queued row.  The
    CTE matters too: with the SELECT in the UPDATE's WHERE, the planner
    may run it more than once and update more rows than the LIMIT.

    The connection commits without waiting for the disk (see
    :data:`LAZY_COMMIT`).
    """
    cursor = connection.execute(
        _CLAIM, (ranks, handlers, now, limit, limit, owner)
    )
    return [TaskRow(*row[2:]) for row in sorted(cursor.fetchall())]


_CLAIM = (
    "WITH c AS (SELECT t.id FROM unnest(%s::integer[]) AS r(rank) "
    "CROSS JOIN LATERAL (SELECT id FROM tasks WHERE state = 'queued' "
    "AND owner IS NULL AND rank = r.rank AND handler = ANY(%s) "
    "AND (run_at IS NULL OR run_at <= %s) "
    "ORDER BY ready_seq LIMIT %s FOR UPDATE SKIP LOCKED) AS t LIMIT %s) "
    "UPDATE tasks AS t SET owner = %s FROM c WHERE t.id = c.id "
    f"RETURNING t.rank, t.ready_seq, {_T_COLUMNS}"
)

#: What the claims' connection runs first.  A claim commits without
#: waiting for its WAL to reach the disk: nothing outside the database
#: acts on one before a later write of the same broker (the dispatch)
#: commits with a full sync, which makes every earlier commit durable too;
#: if the server crashes before that, the claim is lost with nothing done
#: on it.  It saves a disk sync per task; the dispatch and the finish keep
#: theirs.
LAZY_COMMIT = "SET synchronous_commit = off"


def register(connection, owner, host, pid, lease):
    with connection.transaction():
        _register(connection, owner, host, pid, lease)


def _register(connection, owner, host, pid, lease):
    connection.execute(
        "INSERT INTO taskbroker_brokers (id, host, pid, lease_expires) "
        "VALUES (%s, %s, %s, now() + make_interval(secs => %s)) "
        "ON CONFLICT (id) DO UPDATE SET "
        "lease_expires = EXCLUDED.lease_expires",
        (owner, host, pid, lease),
    )


def unregister(connection, owner):
    """
    A broker that stops: its queued claims go back at once; its running
    tasks stay its own until its lease lapses, for its workers to finish
    them or take them to another broker.
    """
    with connection.transaction():
        connection.execute(
            "UPDATE tasks SET owner = NULL "
            "WHERE owner = %s AND state = 'queued'",
            (owner,),
        )
        connection.execute(
            "UPDATE taskbroker_brokers SET lease_expires = now() "
            "WHERE id = %s",
            (owner,),
        )


def renew(connection, owner, host, pid, lease, held):
    """
    Extend the broker's lease.

    :param held: the ids of the running tasks the broker holds.
    :returns: ``None`` if the lease held; else the ids of the tasks in
        ``held`` that are no longer the broker's (the broker is registered
        again, and its queued claims are given back).
    """
    with connection.transaction():
        # FOR UPDATE: a reaper taking this broker's tasks locks its row
        # first, so this waits until it is done and then sees all it took.
        row = connection.execute(
            "SELECT lease_expires > now() FROM taskbroker_brokers "
            "WHERE id = %s FOR UPDATE",
            (owner,),
        ).fetchone()
        if row is None:
            _register(connection, owner, host, pid, lease)
        else:
            connection.execute(
                "UPDATE taskbroker_brokers "
                "SET lease_expires = now() + make_interval(secs => %s) "
                "WHERE id = %s",
                (lease, owner),
            )
            if row[0]:
                return None
        lost = connection.execute(
            "SELECT id FROM tasks WHERE id = ANY(%s) "
            "AND (state <> 'running' OR owner IS DISTINCT FROM %s)",
            (sorted(held), owner),
        ).fetchall()
        connection.execute(
            "UPDATE tasks SET owner = NULL "
            "WHERE owner = %s AND state = 'queued'",
            (owner,),
        )
    return {task_id for (task_id,) in lost}


def reap(connection, owner, grace, notify):
    """
    Take back the tasks of brokers whose lease lapsed: their queued claims
    at once; their running tasks once the lease has been over for
    ``grace`` seconds (their workers had that long to bring them to
    another broker), queued again with a new token and the attempt given
    back.  Any number of brokers may run this at once: each lapsed
    broker's row is locked by one of them, and skipped by the others.

    :returns: the number of tasks freed.
    """
    with connection.transaction():
        lapsed = connection.execute(
            "SELECT id, lease_expires < now() - make_interval(secs => %s) "
            "FROM taskbroker_brokers WHERE lease_expires < now() AND id <> %s "
            "FOR UPDATE SKIP LOCKED",
            (grace, owner),
        ).fetchall()
        freed = 0
        for broker_id, past_grace in lapsed:
            freed += connection.execute(
                "UPDATE tasks SET owner = NULL "
                "WHERE owner = %s AND state = 'queued'",
                (broker_id,),
            ).rowcount
            if not past_grace:
                continue
            freed += connection.execute(
                "UPDATE tasks SET state = 'queued', owner = NULL, "
                "token = token + 1, attempts = GREATEST(attempts - 1, 0), "
                "error = 'its broker went away' "
                "WHERE owner = %s AND state = 'running'",
                (broker_id,),
            ).rowcount
            connection.execute(
                "DELETE FROM taskbroker_brokers WHERE id = %s", (broker_id,)
            )
        if freed and notify is not None:
            connection.execute("SELECT pg_notify(%s, '')", (notify,))
    return freed


def adopt(connection, owner, task_id, token):
    """
    Take over a running attempt that a worker brought from another broker:
    only from a broker whose lease lapsed (or from this one).

    :returns: ``("adopted", row)``; ``("held", None)`` while the broker
        that dispatched it holds its lease; ``("stale", None)`` if the
        attempt is not current.
    """
    with connection.transaction():
        row = connection.execute(
            f"SELECT {COLUMNS}, owner, EXISTS (SELECT 1 FROM "
            "taskbroker_brokers AS b WHERE b.id = t.owner "
            "AND b.lease_expires > now()) FROM tasks AS t "
            "WHERE id = %s AND token = %s AND state = 'running' FOR UPDATE",
            (task_id, token),
        ).fetchone()
        if row is None:
            return ("stale", None)
        *columns, holder, live = row
        if live and holder != owner:
            return ("held", None)
        connection.execute(
            "UPDATE tasks SET owner = %s WHERE id = %s", (owner, task_id)
        )
    return ("adopted", TaskRow(*columns))


def holding(connection, owner):
    """
    The tasks the database says this broker holds: ``{id: state}``.
    """
    return dict(
        connection.execute(
            "SELECT id, state FROM tasks WHERE owner = %s "
            "AND state IN ('queued', 'running')",
            (owner,),
        ).fetchall()
    )


def let_go(connection, owner, task_ids, notify):
    """
    Give up tasks this broker holds in the database but not in memory (a
    commit whose answer was lost with the connection): queued ones are
    freed, running ones queued again with a new token and the attempt
    given back.

    :returns: the number of tasks let go.
    """
    with connection.transaction():
        count = connection.execute(
            "UPDATE tasks SET owner = NULL "
            "WHERE id = ANY(%s) AND owner = %s AND state = 'queued'",
            ([*task_ids], owner),
        ).rowcount
        count += connection.execute(
            "UPDATE tasks SET state = 'queued', owner = NULL, "
            "token = token + 1, attempts = GREATEST(attempts - 1, 0) "
            "WHERE id = ANY(%s) AND owner = %s AND state = 'running'",
            ([*task_ids], owner),
        ).rowcount
        if count and notify is not None:
            connection.execute("SELECT pg_notify(%s, '')", (notify,))
    return count


# Schedules, retention and settings (taskbroker.store._housekeeping_sql).


def add_schedule(cursor, owner, row, replace):
    return housekeeping.add_schedule(cursor, "%s", row, replace)


def schedules(connection, names=None):
    return housekeeping.schedules(connection, "%s", names)


def remove_schedule(cursor, owner, name):
    return housekeeping.remove_schedule(cursor, "%s", name)


def pause_schedule(cursor, owner, name, paused, next_tick):
    return housekeeping.pause_schedule(cursor, "%s", name, paused, next_tick)


def due_schedules(connection, now, limit):
    return housekeeping.due_schedules(connection, "%s", now, limit)


def fire_schedule(cursor, owner, name, tick, next_tick, task, skip_if_running):
    # (A task with a unique key is inserted at once, not Later.)
    def insert(cursor, task):
        return submit(cursor, owner, [task])[0]

    return housekeeping.fire_schedule(
        cursor, "%s", insert, name, tick, next_tick, task, skip_if_running
    )


def purge(cursor, owner, finished_before, states, handler, submitter, limit):
    return housekeeping.purge(
        cursor,
        "%s",
        finished_before,
        states,
        handler,
        submitter,
        limit,
        skip_locked=" FOR UPDATE SKIP LOCKED",
    )


def count(connection, state, handler, submitter):
    return housekeeping.count(connection, "%s", state, handler, submitter)


def setting(connection, name):
    return housekeeping.setting(connection, "%s", name)


# The writes after which other brokers may find tasks to claim; and
# those of one statement, which commit alone without a transaction block.
WAKING = frozenset((requeue, retry, release, fire_schedule))
SINGLE_STATEMENT = frozenset((dispatch, finish, watch, dispatch_for))
