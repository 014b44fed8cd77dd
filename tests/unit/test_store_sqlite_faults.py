# -*- test-case-name: tests.unit.test_store_sqlite_faults -*-
"""
The SQLite store against faults of its files: a database that is missing
where its lock file says one was, a database removed or replaced while
open, a damaged one, and writes that fail for a while.  Real files in
``tmp_path``; the non-root cases (files this process may not write) are
in ``tests/integration/test_database_faults.py``, since tests run as root.
"""

import os
import sqlite3
from contextlib import closing, contextmanager

import pytest
import pytest_twisted
from twisted.internet import defer
from twisted.logger import globalLogPublisher

from taskbroker.errors import StoreError, StoreLost
from taskbroker.store import _batches as batches_module
from taskbroker.store._sqlite_threads import ConnectionThread
from taskbroker.store.sqlite import SQLiteStore
from taskbroker.testing.store_contract import new_task, rows_of
from tests.damage import damage_index_pages

#: How long a test waits for something the store does by itself.
WAIT = 10.0


@pytest.fixture
def reactor():
    from twisted.internet import reactor

    return reactor


@pytest.fixture
def db_path(tmp_path):
    return str(tmp_path / "tasks.db")


@pytest_twisted.async_yield_fixture
async def store(reactor, db_path):
    store = SQLiteStore(db_path, reactor)
    await store.open()
    try:
        yield store
    finally:
        await store.close()


@contextmanager
def first_logged(log_format):
    """
    :returns: a ``Deferred`` that fires with the first event logged, while
        in the context, with this format.
    """
    d = defer.Deferred()

    def observe(event):
        if event.get("log_format") == log_format and not d.called:
            d.callback(event)

    globalLogPublisher.addObserver(observe)
    try:
        yield d
    finally:
        globalLogPublisher.removeObserver(observe)


def remove(path, *suffixes):
    for suffix in suffixes:
        if os.path.exists(path + suffix):
            os.unlink(path + suffix)


# A database missing where its lock file is


@pytest_twisted.ensureDeferred
async def test_a_lost_database_is_not_replaced_by_an_empty_one(
    reactor, db_path
):
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
        "with an empty one"
    )
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
    reactor, db_path
):
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
        f"cannot use database {db_path}: database is locked"
    )


# Files removed or replaced under an open store


@pytest.mark.parametrize(
    "removed, what",
    [
        (("", "-wal", "-shm"), "database {path} was removed"),
        (("", "-wal", "-shm", ".lock"), "database {path} was removed"),
        ((".lock",), "lock file {path}.lock was removed"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_writes_after_a_removal_are_not_acknowledged(
    reactor, db_path, removed, what
):
    store = SQLiteStore(db_path, reactor)
    await store.open()
    lost = store.when_lost()
    (kept,) = rows_of(await store.submit([new_task()]))
    remove(db_path, *removed)
    # One group commit: every write in it fails, none is acknowledged.
    writes = [store.submit([new_task()]), store.dispatch(kept.id, 1, "w", 1.0)]
    outcomes = await defer.DeferredList(writes, consumeErrors=True)
    message = what.format(path=db_path) + " while the broker was using it"
    for ok, failure in outcomes:
        assert not ok and failure.check(StoreLost)
        assert str(failure.value) == message
    assert await lost == message
    assert store.write_error == message
    # From now on, writes fail at once.
    with pytest.raises(StoreLost):
        await store.submit([new_task()])
    await store.close()
    # The lock file is back, so that a restart does not create an empty
    # database in place of the lost one.
    assert os.path.exists(db_path + ".lock")
    assert os.path.exists(db_path) == ("" not in removed)


@pytest_twisted.ensureDeferred
async def test_a_replaced_database_is_lost(store, db_path, tmp_path):
    other = str(tmp_path / "other.db")
    with closing(sqlite3.connect(other)) as connection:
        connection.execute("CREATE TABLE x (a)")
    before = os.stat(db_path)
    os.replace(other, db_path)
    after = os.stat(db_path)
    with pytest.raises(StoreLost) as caught:
        await store.submit([new_task()])
    assert str(caught.value) == (
        f"database {db_path} was replaced while the broker was using it "
        f"(device {before.st_dev} inode {before.st_ino}, now device "
        f"{after.st_dev} inode {after.st_ino})"
    )


@pytest.mark.parametrize(
    "removed, what",
    [
        (("", "-wal", "-shm"), "database {path}"),
        (("-wal",), "file {path}-wal"),
        (("-shm",), "file {path}-shm"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_an_idle_store_notices_a_removal_by_itself(
    store, db_path, reactor, removed, what
):
    remove(db_path, *removed)
    # No write: the checkpointer looks every second, at the -wal and -shm
    # files too.
    message = await store.when_lost().addTimeout(WAIT, reactor)
    assert message == (
        what.format(path=db_path)
        + " was removed while the broker was using it"
    )
    # Its connections never create a new file in place of the old one.
    assert os.path.exists(db_path) == ("" not in removed)


def test_the_watch_costs_one_stat_per_file(tmp_path, monkeypatch):
    from taskbroker.store._sqlite_files import FileWatch, lock

    path = str(tmp_path / "tasks.db")
    with closing(sqlite3.connect(path)):
        pass
    fd = lock(path)
    try:
        watch = FileWatch(path, fd)
        looked_at = []
        real_stat = os.stat
        monkeypatch.setattr(
            os, "stat", lambda name: looked_at.append(name) or real_stat(name)
        )
        watch.check()
        assert looked_at == [path, path + ".lock"]
    finally:
        os.close(fd)


# Damage


async def fill(store, tasks=2000):
    for start in range(0, tasks, 500):
        await store.submit(
            [
                new_task(payload=f'"{i:0>200}"')
                for i in range(start, start + 500)
            ]
        )


@pytest_twisted.ensureDeferred
async def test_check_passes_a_sound_database(store):
    await fill(store, 500)
    await store.check()
    assert store.write_error is None
    await store.submit([new_task()])


@pytest_twisted.ensureDeferred
async def test_check_finds_damage_in_the_middle_of_the_file(reactor, db_path):
    store = SQLiteStore(db_path, reactor)
    await store.open()
    await fill(store)
    await store.close()
    pages = damage_index_pages(db_path)
    await store.open()  # opening reads too little to notice
    try:
        lost = store.when_lost()
        with pytest.raises(StoreLost) as caught:
            await store.check()
        message = str(caught.value)
        assert message.startswith(
            f"database {db_path} is damaged: PRAGMA quick_check found: Page "
        )
        assert message.endswith(
            "; see 'Database faults' in the docs to recover it"
        )
        assert any(f"Page {page}:" in message for page in pages)
        assert "\n" not in message
        assert await lost == message
        with pytest.raises(StoreLost):
            await store.submit([new_task()])
    finally:
        await store.close()


@pytest_twisted.ensureDeferred
async def test_a_check_that_cannot_run_is_a_store_error(store):
    await store.close()
    with pytest.raises(StoreError):
        await store.check()


@pytest_twisted.ensureDeferred
async def test_interrupt_stops_a_long_statement_and_every_later_one(reactor):
    running = defer.Deferred()

    def connect():
        connection = sqlite3.connect(":memory:", check_same_thread=False)
        # Called by the statement itself, so it runs when this is heard.
        connection.create_function(
            "running",
            0,
            lambda: reactor.callFromThread(running.callback, None) or 1,
        )
        return connection

    thread = ConnectionThread(reactor, connect, "test-interrupt")
    await thread.start()
    endless = thread.run(
        lambda connection: connection.execute(
            "WITH RECURSIVE n(i) AS (SELECT running() UNION ALL "
            "SELECT i + 1 FROM n) SELECT count(*) FROM n"
        ).fetchone()
    )
    later = thread.run(lambda connection: 1)
    await running.addTimeout(WAIT, reactor)
    thread.interrupt()
    with pytest.raises(sqlite3.OperationalError, match="interrupted"):
        await endless.addTimeout(WAIT, reactor)
    with pytest.raises(sqlite3.OperationalError, match="interrupted"):
        await later
    await thread.stop()


# Writes that fail for a while


@pytest_twisted.ensureDeferred
async def test_write_error_lasts_until_a_write_commits_again(
    reactor, db_path, monkeypatch
):
    monkeypatch.setattr(batches_module, "WRITE_PROBE_INTERVAL", 0.05)
    store = SQLiteStore(db_path, reactor, busy_timeout=0.05)
    await store.open()
    try:
        assert store.write_error is None
        with closing(sqlite3.connect(db_path, isolation_level=None)) as other:
            # Another program holds the write lock longer than the store
            # waits for it.
            other.execute("BEGIN IMMEDIATE")
            with pytest.raises(StoreError):
                await store.submit([new_task()])
            assert store.write_error == (
                f"database {db_path}: transaction failed: database is locked"
            )
            # Nothing else writes: the store's own empty writes find out.
            with first_logged("writes to database {path} work again") as again:
                other.execute("ROLLBACK")
                await again.addTimeout(WAIT, reactor)
        assert store.write_error is None
    finally:
        await store.close()
