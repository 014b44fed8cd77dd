# -*- test-case-name: tests.unit.test_store -*-
"""
Task storage: the row types shared by every backend, and the choice of a
backend from a database URL.
"""

from dataclasses import dataclass
from typing import NamedTuple

from taskbroker.errors import ConfigError

STATES = ("queued", "running", "succeeded", "failed", "cancelled")
FINAL_STATES = frozenset(("succeeded", "failed", "cancelled"))
# The states in which a task holds its unique_key.
LIVE_STATES = frozenset(("queued", "running"))


@dataclass(frozen=True, slots=True)
class NewTask:
    """
    A task to insert.  ``payload`` is JSON text.

    ``run_at`` is a Unix time in seconds before which the task must not
    run (``None``: as soon as possible).  ``unique_key``, if not ``None``,
    is a key that at most one queued or running task may hold.
    ``request_id`` names the client request that submits the task, so that
    a request sent again is recognised.  ``time_limit`` is how many seconds
    an attempt may run (``None``: the handler's or the broker's default).
    ``worker``, if not ``None``, names the worker the task goes to at once:
    it is inserted ``running``, with its first dispatch (token 1, one
    attempt used, ``started_at`` its ``created_at``) in the same
    transaction, which spares a free worker a second commit.
    ``submitter`` is the CURVE public key (Z85 text) of the client that
    submits it, or ``None``.
    """

    handler: str
    payload: str
    priority: str
    max_attempts: int
    created_at: float
    run_at: float | None = None
    unique_key: str | None = None
    request_id: str | None = None
    time_limit: float | None = None
    worker: str | None = None
    submitter: str | None = None


def text_size(row):
    """
    The characters of a row's large columns (payload, result, error and
    traceback): what a listing of it costs, roughly, in bytes.
    """
    return sum(
        len(text)
        for text in (row.payload, row.result, row.error, row.traceback)
        if isinstance(text, (str, bytes))
    )


def up_to_size(rows, max_bytes):
    """
    ``rows`` (any iterable, read lazily) until their :func:`text_size`
    reaches ``max_bytes`` (all of them if it is ``None``), as a ``list``.
    """
    if max_bytes is None:
        return list(rows)
    taken, size = [], 0
    for row in rows:
        taken.append(row)
        size += text_size(row)
        if size >= max_bytes:
            break
    return taken


class TaskRow(NamedTuple):
    """
    One row of the ``tasks`` table.

    ``payload`` and ``result`` are JSON text (``result`` may be ``None``);
    times are Unix times in seconds or ``None``.  ``priority`` and
    ``max_attempts`` may be ``None`` only for rows that another program
    inserted with SQL and that the broker has not yet validated.

    ``attempts`` is the number of attempts used; ``token`` is the fencing
    token, one more at every dispatch (whether or not the dispatch used up
    an attempt), so a worker's report counts only if it names the current
    token.  ``error`` and ``traceback`` describe the latest failed attempt
    (a task waiting to be retried keeps them), or ``error`` says why the
    task was cancelled.  See :class:`NewTask` for ``run_at``,
    ``unique_key``, ``request_id``, ``time_limit`` and ``submitter``.
    ``progress`` (a fraction from 0 to 1), ``progress_message`` and
    ``progress_at`` (a Unix time) are the latest progress the running
    attempt's handler reported, or ``None``; each dispatch clears them.

    The fields added with schema version 2 and later come last and have
    defaults, so that rows built with the first thirteen fields keep
    working.  A named
    tuple rather than a frozen dataclass: the broker builds one per task
    it reads, and a tuple is several times cheaper to build; change one
    with ``row._replace(...)``.
    """

    id: int
    handler: str
    payload: str
    priority: str | None
    state: str
    attempts: int
    max_attempts: int | None
    worker: str | None
    created_at: float
    started_at: float | None
    finished_at: float | None
    result: str | None
    error: str | None
    run_at: float | None = None
    unique_key: str | None = None
    request_id: str | None = None
    token: int = 0
    time_limit: float | None = None
    traceback: str | None = None
    submitter: str | None = None
    progress: float | None = None
    progress_message: str | None = None
    progress_at: float | None = None


class ScheduleRow(NamedTuple):
    """
    One row of the ``schedules`` table: a periodic task.

    Exactly one of ``every`` (seconds between ticks) and ``cron`` (an
    expression run in the wall time of ``timezone``) is set.  ``payload``
    is JSON text; ``priority``, ``max_attempts`` and ``time_limit`` may be
    ``None`` for the broker's defaults.  ``next_tick`` is the Unix time of
    the tick to enqueue next; ``last_tick`` and ``last_task_id`` say what
    the last tick handled did (``last_task_id`` stays as it was when that
    tick was skipped).  ``submitter`` is the CURVE public key of the
    client that added it, or ``None``.
    """

    name: str
    handler: str
    payload: str
    priority: str | None
    max_attempts: int | None
    time_limit: float | None
    every: float | None
    cron: str | None
    timezone: str
    skip_if_running: bool
    paused: bool
    next_tick: float
    last_tick: float | None
    last_task_id: int | None
    created_at: float
    submitter: str | None


class Submitted(NamedTuple):
    """
    What :meth:`taskbroker.interfaces.ITaskStore.submit` returns for each
    task: its ``row``, and whether this call ``created`` it (``False`` when
    the row is a task that already existed: one from an earlier submit with
    the same ``request_id``, or the live task that holds the
    ``unique_key``).  A tuple, so ``row, created = submitted`` works.
    """

    row: TaskRow
    created: bool


def check_request_ids(tasks):
    """
    Check that the tasks of one submit share one ``request_id``, as
    :meth:`taskbroker.interfaces.ITaskStore.submit` requires.

    :param tasks: a ``list`` of :class:`NewTask`.
    :returns: that ``request_id`` (``None`` if there are no tasks, or none
        has one).
    :raises ValueError: if they do not share one.
    """
    request_ids = {task.request_id for task in tasks}
    if len(request_ids) > 1:
        raise ValueError(
            "the tasks of one submit must share one request_id, not "
            f"{sorted(request_ids, key=repr)!r}"
        )
    return request_ids.pop() if request_ids else None


def parse_database_url(url):
    """
    Check a database URL and say which backend it names.

    :param url: ``sqlite:///relative.db``, ``sqlite:////absolute.db``, or
        a libpq connection URI (``postgresql://...`` or ``postgres://...``).
    :returns: ``("sqlite", path)`` or ``("postgresql", url)``.
    :raises ConfigError: for anything else, with a one-line reason.
    """
    if url.startswith("sqlite:///"):
        path = url[len("sqlite:///") :]
        if not path:
            raise ConfigError(
                "--database: sqlite URL names no file "
                "(use sqlite:///relative.db or sqlite:////abs/path.db)"
            )
        if path == ":memory:":
            raise ConfigError(
                "--database: an in-memory SQLite database would lose every "
                "task at exit; name a file"
            )
        return ("sqlite", path)
    if url.startswith(("postgresql://", "postgres://")):
        from taskbroker.store.postgresql import check_url

        check_url(url)
        return ("postgresql", url)
    shown = url if "@" not in url else url.split("://")[0] + "://..."
    raise ConfigError(
        f"--database: unsupported URL {shown!r} (expected "
        "sqlite:///relative.db, sqlite:////abs/path.db or postgresql://...)"
    )


def describe_database(url):
    """
    A database URL as logs and status pages show it: a PostgreSQL URI
    without its password.
    """
    if url.startswith(("postgresql://", "postgres://")):
        from taskbroker.store.postgresql import describe_url

        return describe_url(url)
    return url


def store_from_url(
    url,
    reactor,
    synchronous="normal",
    create_database=False,
    levels=("high", "normal", "low"),
    default_priority="normal",
    lease=5.0,
):
    """
    Make the store a database URL names.

    :param reactor: the reactor the store's database thread reports to.
    :param synchronous: SQLite's ``synchronous`` pragma: ``"normal"`` or
        ``"full"``.
    :param create_database: create a missing database even where its lock
        file shows that one was there (see
        :meth:`taskbroker.store.sqlite.SQLiteStore.open`).
    :param levels: the priority levels, which a PostgreSQL database
        records (see :class:`taskbroker.store.postgresql.PostgresStore`).
    :param default_priority: the level of a task that names none.
    :param lease: seconds a broker's claims on a shared database last
        unless renewed.
    :returns: an unopened :class:`taskbroker.interfaces.ITaskStore`.
    :raises ConfigError: when the URL is invalid or not supported.
    """
    kind, path = parse_database_url(url)
    if kind == "postgresql":
        from taskbroker.store.postgresql import PostgresStore

        return PostgresStore(
            url,
            reactor,
            levels=levels,
            default_priority=default_priority,
            lease=lease,
        )
    from taskbroker.store.sqlite import SQLiteStore

    return SQLiteStore(
        path, reactor, synchronous=synchronous, create_database=create_database
    )
