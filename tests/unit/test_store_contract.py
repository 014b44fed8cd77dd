# -*- test-case-name: tests.unit.test_store_contract -*-
"""
The store contract (taskbroker.testing.store_contract) run against every
store: the in-memory one, the SQLite store on a real file, and the shared
in-memory database the multi-broker tests use.
"""

import sqlite3
from contextlib import closing

import pytest
import pytest_twisted
from twisted.internet.task import Clock

from taskbroker.store import NewTask, TaskRow
from taskbroker.store.postgresql import PostgresStore
from taskbroker.store.sqlite import SQLiteStore
from taskbroker.testing import MemoryStore, SharedMemoryDatabase
from taskbroker.testing.store_contract import (
    HousekeepingContract,
    QueueReadsContract,
    StoreContract,
)
from tests.postgres import connect


@pytest.fixture
def reactor():
    from twisted.internet import reactor

    return reactor


class _OpenStore:
    @pytest_twisted.async_yield_fixture
    async def store(self, new_store):
        store = new_store()
        await store.open()
        try:
            yield store
        finally:
            await store.close()


class TestMemoryStore(
    _OpenStore, StoreContract, QueueReadsContract, HousekeepingContract
):
    @pytest.fixture
    def new_store(self):
        return MemoryStore

    @pytest.fixture
    def insert_sql(self, store):
        def insert(handler, payload, priority=None, **columns):
            return store.insert_external(
                handler, payload, priority, **columns
            ).id

        return insert


class TestSharedMemoryStore(TestMemoryStore):
    @pytest.fixture
    def new_store(self):
        return lambda: SharedMemoryDatabase(Clock()).store


class TestSQLiteStore(
    _OpenStore, StoreContract, QueueReadsContract, HousekeepingContract
):
    @pytest.fixture
    def new_store(self, reactor, tmp_path):
        path = str(tmp_path / "tasks.db")
        return lambda: SQLiteStore(path, reactor)

    @pytest.fixture
    def insert_sql(self, store):
        def insert(handler, payload, priority=None, **columns):
            names = ["handler", "payload", "priority", *columns]
            with closing(sqlite3.connect(store.path)) as connection:
                with connection:
                    cursor = connection.execute(
                        f"INSERT INTO tasks ({', '.join(names)}) "
                        f"VALUES ({', '.join('?' for _ in names)})",
                        (handler, payload, priority, *columns.values()),
                    )
                return cursor.lastrowid

        return insert


class TestPostgresStore(_OpenStore, StoreContract, HousekeepingContract):
    @pytest.fixture
    def new_store(self, reactor, postgres_url):
        return lambda: PostgresStore(postgres_url, reactor)

    @pytest.fixture
    def insert_sql(self, store):
        def insert(handler, payload, priority=None, **columns):
            names = ["handler", "payload", "priority", *columns]
            with connect(store.url) as connection:
                return connection.execute(
                    f"INSERT INTO tasks ({', '.join(names)}) "
                    f"VALUES ({', '.join('%s' for _ in names)}) RETURNING id",
                    (handler, payload, priority, *columns.values()),
                ).fetchone()[0]

        return insert


def test_row_types_keep_v1_constructions():
    task = NewTask("echo", "{}", "normal", 3, 1.0)
    assert (
        task.run_at,
        task.unique_key,
        task.request_id,
        task.time_limit,
    ) == (None, None, None, None)
    row = TaskRow(
        1,
        "echo",
        "{}",
        "normal",
        "queued",
        0,
        3,
        None,
        1.0,
        None,
        None,
        None,
        None,
    )
    assert (
        row.run_at,
        row.unique_key,
        row.request_id,
        row.token,
        row.time_limit,
        row.traceback,
    ) == (None, None, None, 0, None, None)
