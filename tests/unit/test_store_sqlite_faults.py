# -*- test-case-name: tests.unit.test_store_sqlite_faults -*-
"""
The SQLite store against faults of its files: a database that is missing
where its lock file says one was, and one that cannot be written.  Real
files in ``tmp_path``; the non-root cases (files this process may not
write) are in ``tests/integration/test_database_faults.py``, since tests
run as root.
"""

import os
import sqlite3
from contextlib import closing

import pytest
import pytest_twisted

from taskbroker.errors import StoreError
from taskbroker.store.sqlite import SQLiteStore

@pytest.fixture
def reactor():
    from twisted.internet import reactor

    return reactor


@pytest.fixture
def db_path(tmp_path):
    return str(tmp_path / "tasks.db")


def remove(path, *suffixes):
    for suffix in suffixes:
        if os.path.exists(path + suffix):
            os.unlink(path + suffix)


# A database missing where its lock file is


@pytest_twisted.ensureDeferred
async def test_a_lost_database_is_not_replaced_by_an_empty_one(
        reactor, db_path):
    first = SQLiteStore(db_path, reactor)
    await first.open()
    await first.close()
    remove(db_path, "", "-wal", "-shm")
    with pytest.raises(StoreError) as caught:
        await SQLiteStore(db_path, reactor).open()
    assert str(caught.value) == (
        f"database {db_path} does not exist, but its lock file "
        f"{db_path}.lock does: the database was probably deleted or moved; "
        "put it back, or start the broker with --create-database to begin "
        "with an empty one")
    assert not os.path.exists(db_path)
    # When told to, it creates one.
    again = SQLiteStore(db_path, reactor, create_database=True)
    await again.open()
    try:
        assert await again.list(None, None, 0, 10) == []
    finally:
        await again.close()


@pytest_twisted.ensureDeferred
async def test_a_new_folder_gets_a_new_database(reactor, db_path):
    store = SQLiteStore(db_path, reactor)
    await store.open()
    await store.close()
    assert os.path.exists(db_path) and os.path.exists(db_path + ".lock")


@pytest_twisted.ensureDeferred
async def test_a_database_that_cannot_be_written_is_refused_at_open(
        reactor, db_path):
    first = SQLiteStore(db_path, reactor)
    await first.open()
    await first.close()
    with closing(sqlite3.connect(db_path, isolation_level=None)) as other:
        # Another program holds the write lock longer than the store
        # waits for it.
        other.execute("BEGIN IMMEDIATE")
        with pytest.raises(StoreError) as caught:
            await SQLiteStore(db_path, reactor, busy_timeout=0.05).open()
        other.execute("ROLLBACK")
    assert str(caught.value) == (
        f"cannot use database {db_path}: database is locked")
