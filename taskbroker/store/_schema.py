# -*- test-case-name: tests.unit.test_store -*-
"""
Versioned database schemas, shipped as package data, and the code that
creates a new database or upgrades an old one to the newest version.

For each dialect, ``taskbroker/store/schema/<dialect>/`` holds:

- ``v<N>.sql``: the whole schema at version ``N``, used to create a new
  database in one step;
- ``upgrade-to-v<N>.sql``: the statements that take a database from version
  ``N - 1`` to ``N``.

The newest version is the highest ``N`` with a ``v<N>.sql`` file.  The
database records its version in the one row of ``taskbroker_schema``.
Creation and upgrades each run in a single transaction, so a crash leaves
the database at the old version or the new one, never in between.

The functions here block: call them in a database thread.
"""

import re
import sqlite3
from dataclasses import dataclass
from importlib.resources import files

from taskbroker.errors import StoreError

__all__ = [
    "ensure_schema",
    "latest_version",
    "read_script",
    "rollback",
    "schema_directory",
    "split_sqlite",
]

_SCHEMA_FILE = re.compile(r"\Av([0-9]+)\.sql\Z")


def split_sqlite(script):
    """
    Split a SQLite script into statements.

    ``sqlite3.executescript`` would do this for us, but it commits any open
    transaction first and then runs in autocommit mode, which would make
    creating the schema non-atomic.  ``sqlite3.complete_statement`` knows
    SQLite's quoting, comments and ``CREATE TRIGGER ... END`` blocks, so
    splitting with it is exact.

    :param str script: the text of a ``.sql`` file.
    :returns: a ``list`` of statements (``str``), in order.
    :raises StoreError: if the script ends with an incomplete statement.
    """
    statements = []
    pending = ""
    for line in script.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            statements.append(pending.strip())
            pending = ""
    leftover = "".join(
        line
        for line in pending.splitlines()
        if line.strip() and not line.strip().startswith("--")
    )
    if leftover:
        raise StoreError(
            f"schema script ends with an incomplete statement: {leftover!r}"
        )
    return statements


@dataclass(frozen=True)
class _Dialect:
    """
    What differs between databases, for the schema code.
    """

    # Starts a write transaction that holds the write lock from the start,
    # so that checking the version and acting on it cannot race.
    begin: str
    # One parameter: a table name.  Returns a row if the table exists.
    has_table: str
    split: object
    # The placeholder of a parameter.
    param: str = "?"
    # Run first in the transaction, so that one process at a time checks
    # and upgrades a database that several share; or None.
    lock: str | None = None


_DIALECTS = {
    "sqlite": _Dialect(
        begin="BEGIN IMMEDIATE",
        has_table="SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?",
        split=split_sqlite,
    ),
    # PostgreSQL runs a script of several statements in one call (its
    # simple query protocol), so the files need no splitting.  Several
    # brokers may start at once on one database: an advisory lock named
    # after the schema makes them take turns.
    "postgresql": _Dialect(
        begin="BEGIN",
        has_table="SELECT 1 FROM pg_tables "
        "WHERE schemaname = current_schema() AND tablename = %s",
        split=lambda script: [script],
        param="%s",
        lock="SELECT pg_advisory_xact_lock(hashtext('taskbroker schema ' "
        "|| current_schema()))",
    ),
}


def schema_directory(dialect):
    """
    :param str dialect: the database dialect, such as ``"sqlite"``.
    :returns: the package's folder of schema files for that dialect, as an
        :class:`importlib.resources.abc.Traversable`.
    """
    return files("taskbroker.store") / "schema" / dialect


def read_script(directory, name):
    """
    Read one schema file.

    :param directory: a folder of schema files, such as
        :func:`schema_directory` returns (any
        :class:`importlib.resources.abc.Traversable`, or a
        :class:`pathlib.Path`).
    :param str name: the file name, such as ``"v1.sql"``.
    :returns: the file's text (``str``).
    """
    return (directory / name).read_text(encoding="utf-8")


def latest_version(directory):
    """
    :param directory: a folder of schema files, as for :func:`read_script`.
    :returns: the highest ``N`` of its ``v<N>.sql`` files (``int``).
    :raises StoreError: if it has none.
    """
    versions = [
        int(match.group(1))
        for match in (
            _SCHEMA_FILE.match(entry.name) for entry in directory.iterdir()
        )
        if match
    ]
    if not versions:
        raise StoreError(f"no schema files in {directory}")
    return max(versions)


def _run_script(cursor, dialect, directory, name):
    for statement in _DIALECTS[dialect].split(read_script(directory, name)):
        cursor.execute(statement)


def _current_version(cursor, dialect):
    """
    :returns: the database's schema version, or ``None`` for a database
        that taskbroker has not initialised.
    """
    has_table = _DIALECTS[dialect].has_table
    if cursor.execute(has_table, ("taskbroker_schema",)).fetchone() is None:
        if cursor.execute(has_table, ("tasks",)).fetchone() is not None:
            # Creating our tables next to someone else's "tasks" would go
            # wrong in confusing ways later; refuse now, clearly.
            raise StoreError(
                "the database has a tasks table but no taskbroker_schema "
                "table; it was not created by taskbroker"
            )
        return None
    rows = cursor.execute("SELECT version FROM taskbroker_schema").fetchall()
    if len(rows) != 1:
        raise StoreError(
            f"the taskbroker_schema table holds {len(rows)} rows instead of 1"
        )
    return rows[0][0]


def ensure_schema(connection, dialect, directory=None):
    """
    Bring a database to the newest schema version, in one transaction.

    :param connection: a DB-API connection in autocommit mode (for
        ``sqlite3``, ``isolation_level=None``; for psycopg,
        ``autocommit=True``), so that this function can run its own
        ``BEGIN`` and ``COMMIT``.
    :param str dialect: the database dialect, such as ``"sqlite"``.
    :param directory: the folder of schema files, as for
        :func:`read_script`; by default, the one this package ships for
        ``dialect``.
    :returns: ``(old, new)``: the version found (``None`` for a new
        database) and the version the database is now at.
    :raises StoreError: if the database's version is newer than this
        package knows, or it is not a taskbroker database.  Any other error
        of the database module propagates; the transaction is rolled back.
    """
    if directory is None:
        directory = schema_directory(dialect)
    latest = latest_version(directory)
    cursor = connection.cursor()
    spec = _DIALECTS[dialect]
    cursor.execute(spec.begin)
    try:
        if spec.lock is not None:
            cursor.execute(spec.lock)
        old = _current_version(cursor, dialect)
        if old is None:
            _run_script(cursor, dialect, directory, f"v{latest}.sql")
            cursor.execute(
                "INSERT INTO taskbroker_schema (version) VALUES "
                f"({spec.param})",
                (latest,),
            )
        elif old > latest:
            raise StoreError(
                f"database schema version {old} is newer than this "
                f"taskbroker supports ({latest})"
            )
        else:
            for version in range(old + 1, latest + 1):
                _run_script(
                    cursor, dialect, directory, f"upgrade-to-v{version}.sql"
                )
            if old != latest:
                cursor.execute(
                    f"UPDATE taskbroker_schema SET version = {spec.param}",
                    (latest,),
                )
        cursor.execute("COMMIT")
    except BaseException:
        rollback(cursor)
        raise
    return (old, latest)


def rollback(cursor):
    """
    Roll back the cursor's connection's open transaction, if any, without
    raising: the caller is already handling the error that got it here.

    :param cursor: a DB-API cursor.
    """
    # Some errors (a full disk, for one) make SQLite roll back on its own;
    # a second ROLLBACK would then raise and hide the first error.
    if getattr(cursor.connection, "in_transaction", True):
        try:
            cursor.execute("ROLLBACK")
        except Exception:
            pass
