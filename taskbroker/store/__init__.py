# -*- test-case-name: tests.unit.test_store -*-
"""
Task storage: the row types shared by every backend, and the choice of a
backend from a database URL.
"""

from dataclasses import dataclass
from typing import Optional

from taskbroker.errors import ConfigError

STATES = ("queued", "running", "succeeded", "failed", "cancelled")
FINAL_STATES = frozenset(("succeeded", "failed", "cancelled"))


@dataclass(frozen=True, slots=True)
class NewTask:
    """
    A task to insert.  ``payload`` is JSON text.
    """

    handler: str
    payload: str
    priority: str
    max_attempts: int
    created_at: float


@dataclass(frozen=True, slots=True)
class TaskRow:
    """
    One row of the ``tasks`` table.

    ``payload`` and ``result`` are JSON text (``result`` may be ``None``);
    times are Unix times in seconds or ``None``.  ``priority`` and
    ``max_attempts`` may be ``None`` only for rows that another program
    inserted with SQL and that the broker has not yet validated.
    """

    id: int
    handler: str
    payload: str
    priority: Optional[str]
    state: str
    attempts: int
    max_attempts: Optional[int]
    worker: Optional[str]
    created_at: float
    started_at: Optional[float]
    finished_at: Optional[float]
    result: Optional[str]
    error: Optional[str]


def parse_database_url(url):
    """
    Check a database URL and say which backend it names.

    :param url: ``sqlite:///relative.db``, ``sqlite:////absolute.db``.
    :returns: ``("sqlite", path)``.
    :raises ConfigError: for anything else, with a one-line reason.
    """
    if url.startswith("sqlite:///"):
        path = url[len("sqlite:///"):]
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
        raise ConfigError(
            "--database: PostgreSQL is not supported yet; use sqlite:///FILE"
        )
    raise ConfigError(
        f"--database: unsupported URL {url!r} "
        "(expected sqlite:///relative.db or sqlite:////abs/path.db)"
    )


def store_from_url(url, reactor, synchronous="normal"):
    """
    Make the store a database URL names.

    :param reactor: the reactor the store's connection pool runs with.
    :param synchronous: SQLite's ``synchronous`` pragma: ``"normal"`` or
        ``"full"``.
    :returns: an unopened :class:`taskbroker.interfaces.ITaskStore`.
    :raises ConfigError: when the URL is invalid or not supported.
    """
    kind, path = parse_database_url(url)
    from taskbroker.store.sqlite import SQLiteStore

    return SQLiteStore(path, reactor, synchronous=synchronous)
