# -*- test-case-name: tests.unit.test_store -*-
"""
Tests for the task stores: one contract suite that runs against every
backend (:class:`MemoryStore`, :class:`SQLiteStore` on a real file), then
what only SQLite has (ownership lock, schema versions, group commit, SQL
inserts by other programs), the schema loader, and the test helpers.
"""

import math
import os
import signal
import sqlite3
import sys
import time
from contextlib import closing

import pytest
import pytest_twisted
from twisted.internet import defer, protocol
from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

import taskbroker
from taskbroker.errors import StoreError, StoreLocked
from taskbroker.interfaces import ITaskStore
from taskbroker.store import NewTask, Submitted, TaskRow, _schema
from taskbroker.store.sqlite import SQLiteStore
from taskbroker.testing import MemoryStore, result_of


@pytest.fixture
def reactor():
    # pytest-twisted installs and runs the reactor; tests that need it ask
    # for this fixture so that no library code reaches for the global one.
    from twisted.internet import reactor

    return reactor


@pytest.fixture
def db_path(tmp_path):
    return str(tmp_path / "tasks.db")


@pytest_twisted.async_yield_fixture(params=["memory", "sqlite"])
async def store(request, reactor, db_path):
    if request.param == "memory":
        store = MemoryStore()
    else:
        store = SQLiteStore(db_path, reactor)
    await store.open()
    try:
        yield store
    finally:
        await store.close()


def new_task(handler="echo", payload='{"n": 1}', priority="normal",
             max_attempts=3, created_at=1000.25, **v2):
    return NewTask(handler=handler, payload=payload, priority=priority,
                   max_attempts=max_attempts, created_at=created_at, **v2)


def insert_external(store, handler, payload, priority=None, **columns):
    """
    Insert a task the way another program would, with plain SQL.

    :param columns: more columns to set, such as ``run_at`` or
        ``unique_key``.
    :returns: the new task's id.
    :raises sqlite3.IntegrityError: when the database refuses the row.
    """
    if isinstance(store, MemoryStore):
        return store.insert_external(handler, payload, priority,
                                     **columns).id
    names = ["handler", "payload", "priority", *columns]
    with closing(sqlite3.connect(store.path)) as connection:
        with connection:
            cursor = connection.execute(
                f"INSERT INTO tasks ({', '.join(names)}) "
                f"VALUES ({', '.join('?' for _ in names)})",
                (handler, payload, priority, *columns.values()),
            )
        return cursor.lastrowid


def rows_of(submitted):
    """
    The rows of what ``submit`` returned, checking that it created each.
    """
    assert all(created is True for _, created in submitted)
    return [row for row, _ in submitted]


async def submit_one(store, **kwargs):
    (row,) = rows_of(await store.submit([new_task(**kwargs)]))
    return row


async def all_rows(store):
    return await store.list(None, None, 0, 1000)


# The contract, for every backend.


def test_provides_interface(store):
    assert verifyObject(ITaskStore, store)


@pytest_twisted.ensureDeferred
async def test_submit_returns_rows_with_increasing_ids(store):
    first = await store.submit([new_task(handler="a"), new_task(handler="b")])
    second = await store.submit([new_task(handler="c", priority="high",
                                          max_attempts=5, created_at=7.5)])
    assert all(isinstance(s, Submitted) for s in first + second)
    rows = rows_of(first + second)
    assert [row.handler for row in rows] == ["a", "b", "c"]
    ids = [row.id for row in rows]
    assert ids == sorted(ids) and len(set(ids)) == 3
    assert second == [(TaskRow(
        id=ids[2], handler="c", payload='{"n": 1}', priority="high",
        state="queued", attempts=0, max_attempts=5, worker=None,
        created_at=7.5, started_at=None, finished_at=None, result=None,
        error=None, run_at=None, unique_key=None, request_id=None, token=0,
        time_limit=None, traceback=None,
    ), True)]
    assert [await store.get(i) for i in ids] == rows


@pytest_twisted.ensureDeferred
async def test_submit_new_fields(store):
    (submitted,) = await store.submit([new_task(
        run_at=1500.5, unique_key="k", request_id="r", time_limit=30.0)])
    row, created = submitted
    assert created is True
    assert (row.run_at, row.unique_key, row.request_id, row.time_limit,
            row.token, row.traceback) == (1500.5, "k", "r", 30.0, 0, None)
    assert await store.get(row.id) == row
    # Rows read back carry them too; run_at does not hide a task from
    # Still listed as queued: the broker decides when to run it.
    assert await store.list("queued", None, 0, 10) == [row]
    assert await all_rows(store) == [row]


def test_row_types_keep_v1_constructions():
    task = NewTask("echo", "{}", "normal", 3, 1.0)
    assert (task.run_at, task.unique_key, task.request_id,
            task.time_limit) == (None, None, None, None)
    row = TaskRow(1, "echo", "{}", "normal", "queued", 0, 3, None, 1.0,
                  None, None, None, None)
    assert (row.run_at, row.unique_key, row.request_id, row.token,
            row.time_limit, row.traceback) == (None, None, None, 0, None,
                                               None)


@pytest_twisted.ensureDeferred
async def test_submit_nothing(store):
    assert await store.submit([]) == []
    assert await all_rows(store) == []


@pytest_twisted.ensureDeferred
async def test_submit_same_request_again(store):
    first = rows_of(await store.submit([
        new_task(handler="a", request_id="req-1"),
        new_task(handler="b", request_id="req-1"),
    ]))
    await store.dispatch(first[0].id, 1, "w1", 2000.0)
    # The client lost the reply and sends the request again: it gets the
    # same tasks, as they are now, and nothing is inserted.
    again = await store.submit([
        new_task(handler="a", request_id="req-1"),
        new_task(handler="b", request_id="req-1"),
    ])
    assert again == [(await store.get(first[0].id), False),
                     (first[1], False)]
    assert again[0].row.state == "running"
    # Whatever the second copy holds: the request is what counts.
    assert await store.submit([new_task(handler="zzz",
                                        request_id="req-1")]) == again
    assert len(await all_rows(store)) == 2
    # Another request makes new tasks.
    other = rows_of(await store.submit([
        new_task(handler="a", request_id="req-2")]))
    assert other[0].id > first[1].id
    assert other[0].request_id == "req-2"
    # So do tasks without a request_id, every time.
    rows_of(await store.submit([new_task(handler="a")]))
    rows_of(await store.submit([new_task(handler="a")]))
    assert len(await all_rows(store)) == 5


@pytest_twisted.ensureDeferred
async def test_submit_same_request_in_one_turn(store):
    # Not waiting in between: with SQLite both share one transaction.
    first = store.submit([new_task(request_id="req")])
    second = store.submit([new_task(request_id="req")])
    (row,) = rows_of(await first)
    assert await second == [(row, False)]
    assert await all_rows(store) == [row]


@pytest_twisted.ensureDeferred
async def test_submit_refuses_mixed_request_ids(store):
    for request_ids in (["a", "b"], ["a", None], [None, "a"]):
        with pytest.raises(ValueError, match="share one request_id"):
            await store.submit([new_task(request_id=r) for r in request_ids])
    assert await all_rows(store) == []


@pytest_twisted.ensureDeferred
async def test_unique_key(store):
    first = await submit_one(store, handler="a", unique_key="k")
    # A second live task with the key is refused: the first is returned.
    assert await store.submit([
        new_task(handler="b", unique_key="k"),
        new_task(handler="c", unique_key="other"),
    ]) == [(first, False), ((await all_rows(store))[1], True)]
    assert [row.handler for row in await all_rows(store)] == ["a", "c"]
    # Running still holds the key.
    await store.dispatch(first.id, 1, "w1", 2000.0)
    running = await store.get(first.id)
    assert await store.submit([new_task(unique_key="k")]) == [
        (running, False)]
    # Once the task has finished, the key is free again.
    await store.finish(first.id, 1, "succeeded", "1", None, None, 2001.0)
    second = await submit_one(store, handler="d", unique_key="k")
    assert second.id > first.id
    assert (second.unique_key, second.state) == ("k", "queued")


@pytest_twisted.ensureDeferred
async def test_unique_key_twice_in_one_submit(store):
    submitted = await store.submit([
        new_task(handler="a", unique_key="k"),
        new_task(handler="b", unique_key="k"),
        new_task(handler="c"),
    ])
    first = submitted[0].row
    assert [(s.row.id, s.created) for s in submitted] == [
        (first.id, True), (first.id, False), (submitted[2].row.id, True)]
    assert len(await all_rows(store)) == 2


@pytest_twisted.ensureDeferred
async def test_unique_key_freed_by_cancel_and_failure(store):
    cancelled = await submit_one(store, unique_key="k")
    await store.cancel(cancelled.id, 3000.0)
    failed = await submit_one(store, unique_key="k")
    await store.dispatch(failed.id, 1, "w1", 3001.0)
    await store.finish(failed.id, 1, "failed", None, "boom", "Traceback",
                       3002.0)
    third = await submit_one(store, unique_key="k")
    assert len({cancelled.id, failed.id, third.id}) == 3


@pytest_twisted.ensureDeferred
async def test_request_id_checked_before_unique_key(store):
    (row,) = rows_of(await store.submit([
        new_task(unique_key="k", request_id="r")]))
    await store.cancel(row.id, 3000.0)
    # The request was seen: its (now cancelled) task comes back, even
    # though the key is free.
    assert await store.submit([new_task(unique_key="k", request_id="r")]) \
        == [(await store.get(row.id), False)]


@pytest_twisted.ensureDeferred
async def test_external_insert_with_live_key_refused(store):
    task = await submit_one(store, unique_key="k")
    with pytest.raises(sqlite3.IntegrityError, match="unique_key"):
        insert_external(store, "echo", "{}", unique_key="k")
    assert await all_rows(store) == [task]
    await store.cancel(task.id, 3000.0)
    task_id = insert_external(store, "echo", "{}", unique_key="k")
    assert (await store.get(task_id)).unique_key == "k"
    # And a task submitted with the key now finds the inserted one.
    assert await store.submit([new_task(unique_key="k")]) == [
        (await store.get(task_id), False)]


@pytest_twisted.ensureDeferred
async def test_get_unknown(store):
    assert await store.get(12345) is None


@pytest_twisted.ensureDeferred
async def test_dispatch(store):
    task = await submit_one(store)
    assert await store.dispatch(task.id, 1, "w1", 2000.5) is True
    row = await store.get(task.id)
    assert (row.state, row.token, row.attempts, row.worker,
            row.started_at) == ("running", 1, 1, "w1", 2000.5)
    # Only a queued task can be dispatched.
    assert await store.dispatch(task.id, 2, "w2", 2001.0) is False
    assert await store.get(task.id) == row
    assert await store.dispatch(12345, 1, "w1", 2000.5) is False


@pytest_twisted.ensureDeferred
async def test_dispatch_needs_the_next_token(store):
    task = await submit_one(store)
    for token in (0, 2, 5, -1):
        assert await store.dispatch(task.id, token, "w1", 2000.0) is False
    assert await store.get(task.id) == task
    assert await store.dispatch(task.id, 1, "w1", 2000.0) is True


@pytest_twisted.ensureDeferred
async def test_dispatch_clears_finished_at(store):
    task = await submit_one(store)
    await store.dispatch(task.id, 1, "w1", 2000.0)
    await store.finish(task.id, 1, "failed", None, "boom", "tb", 2001.0)
    await store.retry(task.id)
    await store.dispatch(task.id, 2, "w2", 2002.0)
    row = await store.get(task.id)
    assert (row.state, row.token, row.attempts, row.worker, row.started_at,
            row.finished_at) == ("running", 2, 1, "w2", 2002.0, None)


@pytest_twisted.ensureDeferred
async def test_finish_succeeded(store):
    task = await submit_one(store)
    await store.dispatch(task.id, 1, "w1", 2000.0)
    assert await store.finish(task.id, 1, "succeeded", '{"ok": true}', None,
                              None, 2010.5) is True
    row = await store.get(task.id)
    assert (row.state, row.result, row.error, row.traceback,
            row.finished_at) == (
        "succeeded", '{"ok": true}', None, None, 2010.5)
    # A duplicate result (a worker resending after a reconnect) changes
    # nothing.
    assert await store.finish(task.id, 1, "failed", None, "late", None,
                              2011.0) is False
    assert await store.get(task.id) == row


@pytest_twisted.ensureDeferred
async def test_finish_failed_and_cancelled(store):
    rows = rows_of(await store.submit([new_task(), new_task()]))
    for row in rows:
        await store.dispatch(row.id, 1, "w1", 2000.0)
    assert await store.finish(rows[0].id, 1, "failed", None, "boom",
                              "Traceback (most recent call last): ...",
                              2001.0) is True
    assert await store.finish(rows[1].id, 1, "cancelled", None,
                              "cancelled", None, 2002.0) is True
    failed, cancelled = await all_rows(store)
    assert (failed.state, failed.error, failed.traceback, failed.result,
            failed.finished_at) == (
        "failed", "boom", "Traceback (most recent call last): ...", None,
        2001.0)
    assert (cancelled.state, cancelled.error, cancelled.finished_at) == (
        "cancelled", "cancelled", 2002.0)


@pytest_twisted.ensureDeferred
async def test_finish_needs_the_current_token(store):
    task = await submit_one(store)
    await store.dispatch(task.id, 1, "w1", 2000.0)
    assert await store.requeue(task.id, 1) is True
    await store.dispatch(task.id, 2, "w2", 2005.0)
    # The first dispatch's worker reports late.
    assert await store.finish(task.id, 1, "succeeded", "1", None, None,
                              2006.0) is False
    assert await store.finish(task.id, 3, "succeeded", "1", None, None,
                              2006.0) is False
    assert (await store.get(task.id)).state == "running"
    assert await store.finish(task.id, 2, "failed", None, "boom", None,
                              2007.0) is True
    row = await store.get(task.id)
    assert (row.state, row.token, row.attempts, row.worker, row.error,
            row.result) == ("failed", 2, 2, "w2", "boom", None)


@pytest_twisted.ensureDeferred
async def test_finish_needs_running_task(store):
    task = await submit_one(store)
    assert await store.finish(task.id, 0, "succeeded", "1", None, None,
                              1.0) is False
    assert await store.finish(12345, 1, "succeeded", "1", None, None,
                              1.0) is False
    assert (await store.get(task.id)).state == "queued"


@pytest_twisted.ensureDeferred
async def test_finish_refuses_other_states(store):
    task = await submit_one(store)
    await store.dispatch(task.id, 1, "w1", 2000.0)
    for state in ("queued", "running", "bogus", None):
        with pytest.raises(ValueError):
            await store.finish(task.id, 1, state, None, None, None, 1.0)
    assert (await store.get(task.id)).state == "running"


@pytest_twisted.ensureDeferred
async def test_requeue(store):
    task = await submit_one(store)
    assert await store.requeue(task.id, 0) is False  # queued, not running
    await store.dispatch(task.id, 1, "w1", 2000.0)
    assert await store.requeue(task.id, 2) is False  # not its token
    assert await store.requeue(task.id, 1) is True
    row = await store.get(task.id)
    # The worker and start time still describe the last attempt, which
    # counted.
    assert (row.state, row.token, row.attempts, row.worker, row.started_at,
            row.run_at, row.error, row.traceback) == (
        "queued", 1, 1, "w1", 2000.0, None, None, None)
    assert await store.requeue(task.id, 1) is False
    assert await store.requeue(12345, 1) is False


@pytest_twisted.ensureDeferred
async def test_requeue_for_a_later_retry(store):
    task = await submit_one(store)
    await store.dispatch(task.id, 1, "w1", 2000.0)
    assert await store.requeue(task.id, 1, run_at=2060.0, error="boom",
                               traceback="Traceback ...") is True
    row = await store.get(task.id)
    # The failed attempt's error stays visible while the task waits.
    assert (row.state, row.run_at, row.error, row.traceback, row.attempts,
            row.token, row.worker) == (
        "queued", 2060.0, "boom", "Traceback ...", 1, 1, "w1")
    assert await store.list("queued", None, 0, 10) == [row]
    # The next attempt's outcome replaces them.
    await store.dispatch(task.id, 2, "w2", 2060.5)
    await store.requeue(task.id, 2, run_at=2200.0, error="again")
    row = await store.get(task.id)
    assert (row.run_at, row.error, row.traceback, row.attempts,
            row.token) == (2200.0, "again", None, 2, 2)


@pytest_twisted.ensureDeferred
async def test_requeue_not_consumed(store):
    task = await submit_one(store)
    await store.dispatch(task.id, 1, "w1", 2000.0)
    await store.requeue(task.id, 1, error="boom")
    await store.dispatch(task.id, 2, "w2", 2001.0)
    # The worker was shut down gracefully: the attempt is given back, but
    # the token never goes back.
    assert await store.requeue(task.id, 2, consumed=False) is True
    row = await store.get(task.id)
    assert (row.state, row.attempts, row.token, row.worker) == (
        "queued", 1, 2, "w2")
    assert await store.dispatch(task.id, 2, "w3", 2002.0) is False
    assert await store.dispatch(task.id, 3, "w3", 2002.0) is True
    row = await store.get(task.id)
    assert (row.attempts, row.token) == (2, 3)


@pytest_twisted.ensureDeferred
async def test_cancel(store):
    queued = await submit_one(store)
    running = await submit_one(store)
    finished = await submit_one(store)
    await store.dispatch(running.id, 1, "w1", 2000.0)
    await store.dispatch(finished.id, 1, "w1", 2000.0)
    await store.finish(finished.id, 1, "succeeded", "1", None, None, 2001.0)

    row = await store.cancel(queued.id, 3000.5)
    assert (row.id, row.state, row.error, row.finished_at) == (
        queued.id, "cancelled", "cancelled", 3000.5)
    assert await store.get(queued.id) == row
    # Cancelling again reports the row as it is and changes nothing.
    assert await store.cancel(queued.id, 3001.0) == row

    row = await store.cancel(running.id, 3000.5)
    assert (row.id, row.state, row.error, row.finished_at, row.token,
            row.worker) == (
        running.id, "cancelled", "cancelled", 3000.5, 1, "w1")
    assert await store.get(running.id) == row
    # The worker's late report changes nothing.
    assert await store.finish(running.id, 1, "succeeded", "1", None, None,
                              3002.0) is False
    assert await store.requeue(running.id, 1) is False
    assert await store.get(running.id) == row

    # A finished task is not cancelled; the row says so.
    row = await store.get(finished.id)
    assert await store.cancel(finished.id, 3000.5) == row
    assert row.state == "succeeded"
    assert await store.cancel(12345, 3000.5) is None


@pytest_twisted.ensureDeferred
async def test_cancel_keeps_the_last_traceback(store):
    task = await submit_one(store)
    await store.dispatch(task.id, 1, "w1", 2000.0)
    await store.requeue(task.id, 1, run_at=2060.0, error="boom",
                        traceback="Traceback ...")
    row = await store.cancel(task.id, 2010.0)
    assert (row.state, row.error, row.traceback, row.run_at) == (
        "cancelled", "cancelled", "Traceback ...", 2060.0)


@pytest_twisted.ensureDeferred
async def test_retry_failed_task(store):
    task = await submit_one(store, run_at=1500.0)
    await store.dispatch(task.id, 1, "w1", 2000.0)
    await store.requeue(task.id, 1, run_at=2060.0, error="boom")
    await store.dispatch(task.id, 2, "w1", 2060.0)
    await store.finish(task.id, 2, "failed", None, "boom", "Traceback ...",
                       2061.0)

    row = await store.retry(task.id)
    assert (row.state, row.attempts, row.token, row.run_at, row.finished_at,
            row.result, row.error, row.traceback) == (
        "queued", 0, 2, None, None, None, None, None)
    assert await store.get(task.id) == row
    assert await store.list("queued", None, 0, 10) == [row]
    # Retrying a queued task changes nothing.
    assert await store.retry(task.id) == row
    assert await store.dispatch(task.id, 3, "w2", 3000.0) is True
    row = await store.get(task.id)
    assert (row.state, row.attempts, row.token) == ("running", 1, 3)
    # Nor does retrying a running one.
    assert await store.retry(task.id) == row


@pytest_twisted.ensureDeferred
async def test_retry_cancelled_task(store):
    task = await submit_one(store)
    await store.cancel(task.id, 3000.0)
    row = await store.retry(task.id)
    assert (row.state, row.error, row.finished_at) == ("queued", None, None)


@pytest_twisted.ensureDeferred
async def test_retry_needs_failed_or_cancelled(store):
    task = await submit_one(store)
    await store.dispatch(task.id, 1, "w1", 2000.0)
    await store.finish(task.id, 1, "succeeded", "42", None, None, 2001.0)
    row = await store.get(task.id)
    assert await store.retry(task.id) == row
    assert await store.get(task.id) == row
    assert await store.retry(12345) is None


@pytest_twisted.ensureDeferred
async def test_retry_refused_while_the_key_is_taken(store):
    old = await submit_one(store, unique_key="k")
    await store.cancel(old.id, 3000.0)
    new = await submit_one(store, unique_key="k")
    cancelled = await store.get(old.id)
    assert await store.retry(old.id) == cancelled
    await store.cancel(new.id, 3001.0)
    assert (await store.retry(old.id)).state == "queued"
    assert (await store.retry(new.id)).state == "cancelled"


@pytest_twisted.ensureDeferred
async def test_dispatch_fills_only_nulls(store):
    task_id = insert_external(store, "echo", "{}", None)
    row = await store.get(task_id)
    assert (row.priority, row.max_attempts) == (None, None)
    assert await store.dispatch(task_id, 1, "w", 1.0, "normal", 3) is True
    row = await store.get(task_id)
    assert (row.priority, row.max_attempts) == ("normal", 3)

    given = await submit_one(store, priority="low", max_attempts=1)
    await store.dispatch(given.id, 1, "w", 1.0, "normal", 3)
    row = await store.get(given.id)
    assert (row.priority, row.max_attempts, row.state) == ("low", 1, "running")


@pytest_twisted.ensureDeferred
async def test_reject_group(store):
    odd = [insert_external(store, "echo", "{}", "urgent") for _ in range(3)]
    kept = insert_external(store, "echo", "{}", None)
    other = insert_external(store, "other", "{}", "urgent")
    running = await submit_one(store, priority="urgent")
    await store.dispatch(running.id, 1, "w1", 2000.0)
    assert await store.reject_group("echo", "urgent", "no such level",
                                    4000.0) == 3
    for task_id in odd:
        row = await store.get(task_id)
        assert (row.state, row.error, row.finished_at) == (
            "failed", "no such level", 4000.0)
    for task_id in (kept, other, running.id):
        assert (await store.get(task_id)).state in ("queued", "running")
    assert await store.reject_group("echo", None, "gone", 4001.0) == 1
    assert (await store.get(kept)).state == "failed"


@pytest_twisted.ensureDeferred
async def test_queued_groups(store):
    assert await store.queued_groups() == ([], 0)
    insert_external(store, "b", "{}", "high")
    insert_external(store, "a", "{}", "low")
    insert_external(store, "b", "{}", None)
    insert_external(store, "a", "{}", "high")
    last = insert_external(store, "b", "{}", "high")
    finished = await submit_one(store, handler="c")
    await store.cancel(finished.id, 1.0)
    assert await store.queued_groups() == (
        [("a", "high"), ("a", "low"), ("b", None), ("b", "high")], last)


@pytest_twisted.ensureDeferred
async def test_queued_window(store):
    ids = []
    for priority in ("normal", None, "high", "normal", None, "normal"):
        ids.append(insert_external(store, "echo", "{}", priority))
    other = insert_external(store, "other", "{}", "normal")
    later = insert_external(store, "echo", "{}", "normal", run_at=50.0)
    due = insert_external(store, "echo", "{}", "normal", run_at=10.0)
    await store.dispatch(ids[3], 1, "w", 1.0)

    async def window(priorities, after_id=0, limit=100, now=20.0):
        return [row.id for row in await store.queued_window(
            "echo", priorities, after_id, limit, now)]

    # Oldest first, NULL matching None, running and undue tasks left out.
    assert await window(("normal", None)) == [
        ids[0], ids[1], ids[4], ids[5], due]
    assert await window(("normal",)) == [ids[0], ids[5], due]
    assert await window(("normal", None), limit=2) == ids[:2]
    assert await window(("normal", None), after_id=ids[1], limit=2) == [
        ids[4], ids[5]]
    assert await window(("normal",), now=60.0) == [ids[0], ids[5], later, due]
    assert await window(("high",)) == [ids[2]]
    assert other not in await window(("normal",))
    # A run_at that is no time is read at once, for the broker to reject.
    text = insert_external(store, "echo", "{}", "high", run_at="tomorrow")
    assert await window(("high",)) == [ids[2], text]


@pytest_twisted.ensureDeferred
async def test_delayed_window(store):
    at = {}
    for run_at in (30.0, 10.0, 20.0, 10.0):
        at.setdefault(run_at, []).append(
            insert_external(store, "echo", "{}", run_at=run_at))
    insert_external(store, "echo", "{}")

    async def window(after, limit=100):
        return [(row.run_at, row.id) for row in
                await store.delayed_window(after, limit)]

    ten = [(10.0, i) for i in at[10.0]]
    everything = ten + [(20.0, at[20.0][0]), (30.0, at[30.0][0])]
    assert await window((-math.inf, 0)) == everything
    assert await window((0.0, 0), limit=1) == ten[:1]
    # The pair after which to go on: ties on run_at are split by id.
    assert await window(ten[0], limit=1) == ten[1:]
    assert await window((20.0, math.inf)) == everything[-1:]
    assert await window((math.inf, math.inf)) == []


@pytest_twisted.ensureDeferred
async def test_reject(store):
    task_id = insert_external(store, "no-such-handler", "{}")
    assert await store.reject(task_id, "unknown handler", 4000.0) is None
    row = await store.get(task_id)
    assert (row.state, row.error, row.finished_at) == (
        "failed", "unknown handler", 4000.0)

    running = await submit_one(store)
    await store.dispatch(running.id, 1, "w1", 2000.0)
    await store.reject(running.id, "nope", 4000.0)
    assert (await store.get(running.id)).state == "running"


@pytest_twisted.ensureDeferred
async def test_external_insert_gets_defaults(store):
    task_id = insert_external(store, "echo", '{"a":1}')
    row = await store.get(task_id)
    assert (row.handler, row.payload, row.priority, row.state, row.attempts,
            row.max_attempts, row.worker, row.started_at, row.finished_at,
            row.result, row.error, row.run_at, row.unique_key,
            row.request_id, row.token, row.time_limit, row.traceback) == (
        "echo", '{"a":1}', None, "queued", 0, None, None, None, None, None,
        None, None, None, None, 0, None, None)
    assert isinstance(row.created_at, float)
    assert await store.list("queued", None, 0, 10) == [row]


@pytest_twisted.ensureDeferred
async def test_external_insert_delayed_and_unique(store):
    task_id = insert_external(store, "echo", "{}", run_at=5000.0,
                              unique_key="nightly", time_limit=60.0)
    row = await store.get(task_id)
    assert (row.run_at, row.unique_key, row.time_limit, row.token) == (
        5000.0, "nightly", 60.0, 0)
    assert await store.list("queued", None, 0, 10) == [row]


@pytest_twisted.ensureDeferred
async def test_list_filters_and_pages(store):
    rows = []
    for handler in ("a", "b", "a", "b", "a"):
        rows.extend(rows_of(await store.submit([new_task(handler=handler)])))
    ids = [row.id for row in rows]
    await store.dispatch(ids[0], 1, "w", 1.0)
    await store.dispatch(ids[1], 1, "w", 1.0)

    async def listed(state=None, handler=None, after_id=0, limit=100):
        return [row.id for row in
                await store.list(state, handler, after_id, limit)]

    assert await listed() == ids
    assert await listed(handler="a") == [ids[0], ids[2], ids[4]]
    assert await listed(state="running") == [ids[0], ids[1]]
    assert await listed(state="queued", handler="b") == [ids[3]]
    assert await listed(state="failed") == []
    assert await listed(handler="zzz") == []
    # Paging: after_id is the last id of the previous page.
    assert await listed(limit=2) == ids[:2]
    assert await listed(after_id=ids[1], limit=2) == ids[2:4]
    assert await listed(after_id=ids[3], limit=2) == ids[4:]
    assert await listed(after_id=ids[4], limit=2) == []
    assert await listed(handler="a", after_id=ids[0], limit=1) == [ids[2]]
    assert await listed(limit=0) == []


@pytest_twisted.ensureDeferred
async def test_scan_queued_leaves_out_known_tasks(store):
    ids = [row.id for row in rows_of(
        await store.submit([new_task() for _ in range(6)]))]
    await store.dispatch(ids[5], 1, "w", 1.0)
    rows, last = await store.scan_queued(0, 100, frozenset(ids[:3]))
    assert [row.id for row in rows] == ids[3:5]
    assert last == ids[4]
    rows, last = await store.scan_queued(0, 2, frozenset(ids[:2]))
    assert (rows, last) == ([], ids[1])
    rows, last = await store.scan_queued(ids[4], 100, frozenset())
    assert (rows, last) == ([], ids[4])


@pytest_twisted.ensureDeferred
async def test_queued_and_running(store):
    rows = rows_of(await store.submit([new_task() for _ in range(5)]))
    ids = [row.id for row in rows]
    await store.dispatch(ids[1], 1, "w", 1.0)
    await store.dispatch(ids[3], 1, "w", 1.0)
    await store.cancel(ids[4], 2.0)

    queued = await store.list("queued", None, 0, 100)
    assert [row.id for row in queued] == [ids[0], ids[2]]
    assert queued[0] == await store.get(ids[0])
    assert [row.id for row in await store.list("queued", None, ids[0], 100)] == [ids[2]]
    assert [row.id for row in await store.list("queued", None, 0, 1)] == [ids[0]]
    running = await store.running()
    assert [row.id for row in running] == [ids[1], ids[3]]
    assert [row.token for row in running] == [1, 1]


@pytest_twisted.ensureDeferred
async def test_counts(store):
    assert await store.counts(100.0) == {}
    rows = rows_of(await store.submit([
        new_task(priority="high"), new_task(priority="high"),
        new_task(priority="low"), new_task(priority="low", run_at=150.0),
        new_task(priority="low", run_at=50.0),
    ]))
    insert_external(store, "other", "{}")
    await store.dispatch(rows[0].id, 1, "w", 1.0)
    assert await store.counts(100.0) == {
        ("running", "high", "echo", False): 1,
        ("queued", "high", "echo", False): 1,
        ("queued", "low", "echo", False): 2,
        ("queued", "low", "echo", True): 1,
        ("queued", None, "other", False): 1,
    }


@pytest_twisted.ensureDeferred
async def test_writes_in_one_turn_apply_in_order(store):
    task = await submit_one(store)
    # Not waiting in between: with SQLite these share one transaction, and
    # must still apply in the order they were issued.
    dispatched = store.dispatch(task.id, 1, "w1", 1.0)
    finished = store.finish(task.id, 1, "failed", None, "boom", None, 2.0)
    requeued = store.requeue(task.id, 1)
    retried = store.retry(task.id)
    dispatched_again = store.dispatch(task.id, 2, "w2", 3.0)
    assert await dispatched is True
    assert await finished is True
    assert await requeued is False
    assert (await retried).state == "queued"
    assert await dispatched_again is True
    row = await store.get(task.id)
    assert (row.state, row.token, row.attempts) == ("running", 2, 1)


@pytest_twisted.ensureDeferred
async def test_bad_write_fails_alone(store):
    bad = store.submit([new_task(handler=None)])
    good = store.submit([new_task(handler="fine")])
    with pytest.raises(StoreError):
        await bad
    (row,) = rows_of(await good)
    assert [r.handler for r in await all_rows(store)] == ["fine"]
    assert await store.get(row.id) == row


@pytest_twisted.ensureDeferred
async def test_bad_submit_inserts_nothing(store):
    # The first task is fine, the second is not: the call is all or
    # nothing, and its request can be sent again.
    bad = store.submit([new_task(handler="fine", request_id="r"),
                        new_task(handler=None, request_id="r")])
    with pytest.raises(StoreError):
        await bad
    assert await all_rows(store) == []
    (row,) = rows_of(await store.submit([new_task(request_id="r")]))
    assert await all_rows(store) == [row]


@pytest_twisted.ensureDeferred
async def test_close_then_reopen(store):
    task = await submit_one(store)
    await store.close()
    await store.close()  # safe twice
    with pytest.raises(StoreError):
        await store.submit([new_task()])
    with pytest.raises(StoreError):
        await store.get(task.id)
    with pytest.raises(StoreError):
        await store.retry(task.id)
    await store.open()
    assert await store.get(task.id) == task


@pytest_twisted.ensureDeferred
async def test_open_twice_fails(store):
    with pytest.raises(StoreError):
        await store.open()
    assert await store.get(1) is None  # still usable


@pytest_twisted.ensureDeferred
async def test_close_before_open(reactor, db_path):
    for store in (MemoryStore(), SQLiteStore(db_path, reactor)):
        await store.close()
        with pytest.raises(StoreError):
            await store.dispatch(1, 1, "w", 1.0)
    assert not os.path.exists(db_path)


# SQLite only.


@pytest_twisted.async_yield_fixture
async def sqlite_store(reactor, db_path):
    store = SQLiteStore(db_path, reactor)
    await store.open()
    try:
        yield store
    finally:
        await store.close()


def query(path, sql, *params):
    with closing(sqlite3.connect(path)) as connection:
        return connection.execute(sql, params).fetchall()


def execute(path, sql, *params):
    with closing(sqlite3.connect(path)) as connection:
        with connection:
            connection.execute(sql, params)


@pytest_twisted.ensureDeferred
async def test_sql_insert_by_another_program(sqlite_store, db_path):
    before = time.time()
    with closing(sqlite3.connect(db_path)) as connection:
        for _ in range(3):
            with connection:
                connection.execute(
                    "INSERT INTO tasks (handler, payload, priority) "
                    """VALUES ('echo', '{"a":1}', NULL)"""
                )
    after = time.time()
    rows = await sqlite_store.list("queued", None, 0, 10)
    assert [(row.handler, row.payload, row.priority, row.state,
             row.attempts) for row in rows] == [
        ("echo", '{"a":1}', None, "queued", 0)] * 3
    for row in rows:
        assert before - 0.01 <= row.created_at <= after + 0.01
    # Milliseconds, not whole seconds: with three rows, all landing on a
    # whole second has a chance of one in a billion.
    assert any(row.created_at != int(row.created_at) for row in rows)


@pytest_twisted.ensureDeferred
async def test_sql_insert_delayed_and_unique(sqlite_store, db_path):
    # The example of schema/sqlite/v3.sql.
    insert = (
        "INSERT INTO tasks (handler, payload, priority, run_at, unique_key) "
        "VALUES ('report', '{}', NULL, "
        "(julianday('now') - 2440587.5) * 86400.0 + 3600, 'daily-report')"
    )
    before = time.time()
    execute(db_path, insert)
    (row,) = await sqlite_store.list("queued", None, 0, 10)
    assert (row.handler, row.unique_key, row.token) == (
        "report", "daily-report", 0)
    assert before + 3600 - 0.01 <= row.run_at <= time.time() + 3600 + 0.01
    # An integer run_at is stored as a number of the column's type.
    execute(db_path, "INSERT INTO tasks (handler, run_at) VALUES ('a', 7)")
    assert query(db_path, "SELECT typeof(run_at) FROM tasks "
                 "WHERE handler = 'a'") == [("real",)]

    # A second live task with the key: the other program's INSERT fails.
    with pytest.raises(sqlite3.IntegrityError,
                       match="UNIQUE constraint failed: tasks.unique_key"):
        execute(db_path, insert)
    # INSERT OR IGNORE skips it quietly.
    with closing(sqlite3.connect(db_path)) as connection:
        with connection:
            cursor = connection.execute(
                insert.replace("INSERT", "INSERT OR IGNORE", 1))
        assert cursor.rowcount == 0
    assert len(await sqlite_store.list(None, None, 0, 10)) == 2

    # Once the task has ended, the key can be used again.
    assert await sqlite_store.dispatch(row.id, 1, "w1", 1.0) is True
    assert await sqlite_store.finish(row.id, 1, "succeeded", "1", None, None,
                                     2.0) is True
    execute(db_path, insert)
    assert [r.unique_key for r in await sqlite_store.list("queued", None, 0, 10)] == [
        None, "daily-report"]


@pytest_twisted.ensureDeferred
async def test_second_store_is_locked_out(sqlite_store, reactor, db_path):
    other = SQLiteStore(db_path, reactor)
    with pytest.raises(StoreLocked) as caught:
        await other.open()
    message = str(caught.value)
    assert message == (f"database {os.path.abspath(db_path)} is in use by "
                       f"another broker (pid {os.getpid()})")
    await other.close()
    await sqlite_store.close()
    await other.open()
    await other.close()


class _LineReader(protocol.ProcessProtocol):
    """
    Fires ``line`` with the child's first line of output and ``ended`` when
    it exits.
    """

    def __init__(self):
        self.line = defer.Deferred()
        self.ended = defer.Deferred()
        self._out = b""
        self._err = b""

    def outReceived(self, data):
        self._out += data
        if b"\n" in self._out and self.line is not None:
            d, self.line = self.line, None
            d.callback(self._out.split(b"\n", 1)[0].decode())

    def errReceived(self, data):
        self._err += data

    def processEnded(self, reason):
        if self.line is not None:
            d, self.line = self.line, None
            d.errback(AssertionError(
                "the child exited before its first line: "
                + self._err.decode(errors="replace")))
        # The reason itself, not the Failure, which would fail the Deferred.
        self.ended.callback(reason.value)


_HOLD_LOCK = """
import sys
from twisted.internet import defer, task
from taskbroker.store.sqlite import SQLiteStore

async def main(reactor):
    await SQLiteStore(sys.argv[1], reactor).open()
    print("opened", flush=True)
    await defer.Deferred()  # until killed

task.react(lambda reactor: defer.ensureDeferred(main(reactor)))
"""


@pytest_twisted.ensureDeferred
async def test_lock_released_when_owner_is_killed(reactor, db_path):
    reader = _LineReader()
    root = os.path.dirname(os.path.dirname(taskbroker.__file__))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [root, env.get("PYTHONPATH")]))
    child = reactor.spawnProcess(
        reader, sys.executable, [sys.executable, "-c", _HOLD_LOCK, db_path],
        env=env)
    try:
        line = reader.line
        line.addTimeout(30, reactor)
        assert await line == "opened"
        store = SQLiteStore(db_path, reactor)
        with pytest.raises(StoreLocked, match=f"pid {child.pid}"):
            await store.open()
        # SIGKILL: no cleanup code runs in the child; only the kernel can
        # release the lock.
        os.kill(child.pid, signal.SIGKILL)
        assert (await reader.ended).signal == signal.SIGKILL
        await store.open()
        assert await store.list("queued", None, 0, 10) == []
        await store.close()
    finally:
        if child.pid is not None:
            child.signalProcess("KILL")
            await reader.ended


@pytest_twisted.ensureDeferred
async def test_schema_version_recorded(sqlite_store, db_path):
    assert query(db_path, "SELECT version FROM taskbroker_schema") == [(3,)]
    indexes = {name for (name,) in query(
        db_path, "SELECT name FROM sqlite_master WHERE type = 'index' "
        "AND tbl_name = 'tasks' AND sql IS NOT NULL")}
    assert indexes == {"tasks_queued_by_group", "tasks_queued_by_run_at",
                       "tasks_by_state_id",
                       "tasks_by_handler_id", "tasks_live_unique_key",
                       "tasks_by_request_id"}
    assert query(db_path, "PRAGMA journal_mode") == [("wal",)]


@pytest.mark.parametrize("where", [
    "state = 'queued' AND id > ?",
    "id > ? AND state = ?",
    "id > ? AND handler = ?",
    "request_id = ?",
])
@pytest_twisted.ensureDeferred
async def test_reads_use_an_index(sqlite_store, db_path, where):
    params = (0, "x")[:where.count("?")]
    plan = " ".join(detail for *_, detail in query(
        db_path, f"EXPLAIN QUERY PLAN SELECT * FROM tasks WHERE {where} "
        "ORDER BY id LIMIT 10", *params))
    # An index range, already in id order: no full scan and no sort, however
    # many finished tasks the table holds.
    assert "SEARCH tasks USING" in plan and "INDEX" in plan
    assert "TEMP B-TREE" not in plan


@pytest.mark.parametrize("where, index", [
    # What submit looks for: a request sent again, a live task with a key
    # (the state condition as the partial index has it).
    ("request_id = ? ORDER BY id", "tasks_by_request_id"),
    ("unique_key = ? AND state IN ('queued', 'running')",
     "tasks_live_unique_key"),
])
@pytest_twisted.ensureDeferred
async def test_submit_lookups_use_their_index(sqlite_store, db_path, where,
                                              index):
    plan = " ".join(detail for *_, detail in query(
        db_path, f"EXPLAIN QUERY PLAN SELECT * FROM tasks WHERE {where}",
        "x"))
    assert f"SEARCH tasks USING INDEX {index} " in plan
    assert "TEMP B-TREE" not in plan


@pytest_twisted.ensureDeferred
async def test_newer_schema_refused(reactor, db_path):
    store = SQLiteStore(db_path, reactor)
    await store.open()
    await store.close()
    execute(db_path, "UPDATE taskbroker_schema SET version = 99")
    with pytest.raises(StoreError) as caught:
        await store.open()
    assert "database schema version 99 is newer than this taskbroker " \
        "supports (3)" in str(caught.value)
    assert not isinstance(caught.value, StoreLocked)
    # The failed open let go of the lock and the pool.
    execute(db_path, "UPDATE taskbroker_schema SET version = 3")
    await store.open()
    await store.close()


def create_old_database(path, version):
    """
    Create a database as the taskbroker of that schema version did, with
    ``v<version>.sql``.
    """
    script = _schema.read_script(_schema.schema_directory("sqlite"),
                                 f"v{version}.sql")
    with closing(sqlite3.connect(path)) as connection:
        connection.executescript(script)
        connection.execute(
            "INSERT INTO taskbroker_schema VALUES (?)", (version,))
        connection.commit()


def create_v1_database(path):
    create_old_database(path, 1)


def describe_schema(path):
    """
    What makes two databases' schemas the same: the columns of each table
    (name, type, NOT NULL, default, primary key) and each index (unique,
    partial, columns, and its definition give or take white space).
    """
    with closing(sqlite3.connect(path)) as connection:
        tables = {}
        for (table,) in connection.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' "
                "AND name NOT LIKE 'sqlite_%' ORDER BY name"):
            tables[table] = connection.execute(
                f"PRAGMA table_xinfo({table})").fetchall()
        indexes = {}
        for name, sql in connection.execute(
                "SELECT name, sql FROM sqlite_master WHERE type = 'index' "
                "ORDER BY name"):
            indexes[name] = (
                connection.execute(
                    f"PRAGMA index_xinfo({name})").fetchall(),
                None if sql is None else " ".join(sql.split()),
            )
    return tables, indexes


@pytest_twisted.ensureDeferred
async def test_upgrade_from_v1(reactor, db_path):
    create_v1_database(db_path)
    # What a version 1 database holds: a row inserted by another program,
    # one a version 1 broker dispatched twice (its attempt number was the
    # fencing token then), and one that failed.
    execute(db_path, "INSERT INTO tasks (handler, payload, priority) "
            """VALUES ('echo', '{"a":1}', NULL)""")
    execute(db_path, "INSERT INTO tasks (handler, priority, state, "
            "attempts, max_attempts, worker, started_at) "
            "VALUES ('echo', 'high', 'running', 2, 3, 'w1', 5.0)")
    execute(db_path, "INSERT INTO tasks (handler, state, attempts, error, "
            "finished_at) VALUES ('echo', 'failed', 1, 'boom', 6.0)")
    before = query(db_path, "SELECT * FROM tasks ORDER BY id")

    store = SQLiteStore(db_path, reactor)
    await store.open()
    try:
        assert query(db_path, "SELECT version FROM taskbroker_schema") == [
            (3,)]
        # The old columns are untouched, the new ones come after them.
        assert [row[:13] for row in query(
            db_path, "SELECT * FROM tasks ORDER BY id")] == before
        external, running, failed = await store.list(None, None, 0, 10)
        assert (external.handler, external.payload, external.state,
                external.attempts) == ("echo", '{"a":1}', "queued", 0)
        for row in (external, running, failed):
            assert (row.run_at, row.unique_key, row.request_id,
                    row.time_limit, row.traceback) == (
                None, None, None, None, None)
        # The tokens go on from the attempt numbers.
        assert [row.token for row in (external, running, failed)] == [
            0, 2, 1]
        assert (running.state, running.attempts, running.worker) == (
            "running", 2, "w1")
        assert failed.error == "boom"

        # The broker restarts with it: the running task gets its attempt
        # back, and its next dispatch gets a token never used before.
        assert await store.requeue(running.id, 2, consumed=False) is True
        assert await store.dispatch(running.id, 3, "w2", 7.0) is True
        row = await store.get(running.id)
        assert (row.attempts, row.token) == (2, 3)
        assert (await store.retry(failed.id)).state == "queued"
        (row, created), = await store.submit([new_task(unique_key="k")])
        assert created and await store.submit(
            [new_task(unique_key="k")]) == [(row, False)]
    finally:
        await store.close()
    # A second open finds it current.
    await store.open()
    await store.close()


@pytest.mark.parametrize("version", [1, 2])
@pytest_twisted.ensureDeferred
async def test_upgraded_schema_is_the_new_schema(reactor, tmp_path, version):
    upgraded = str(tmp_path / "upgraded.db")
    fresh = str(tmp_path / "fresh.db")
    create_old_database(upgraded, version)
    for path in (upgraded, fresh):
        store = SQLiteStore(path, reactor)
        await store.open()
        await store.close()
    tables, indexes = describe_schema(upgraded)
    assert (tables, indexes) == describe_schema(fresh)
    assert "tasks_queued_by_group" in indexes
    assert [column[1] for column in tables["tasks"]][-6:] == [
        "run_at", "unique_key", "request_id", "token", "time_limit",
        "traceback"]
    # The partial unique index, with its condition.
    assert indexes["tasks_live_unique_key"][1].endswith(
        "WHERE unique_key IS NOT NULL AND state IN ('queued', 'running')")


@pytest_twisted.ensureDeferred
async def test_failed_upgrade_from_v1_changes_nothing(reactor, db_path):
    create_v1_database(db_path)
    execute(db_path, "INSERT INTO tasks (handler) VALUES ('echo')")
    # Something in the way of the upgrade's last statement.
    execute(db_path, "CREATE TABLE tasks_by_request_id (x)")
    v1 = describe_schema(db_path)
    store = SQLiteStore(db_path, reactor)
    with pytest.raises(StoreError, match="tasks_by_request_id"):
        await store.open()
    assert describe_schema(db_path) == v1
    assert query(db_path, "SELECT version FROM taskbroker_schema") == [(1,)]
    assert query(db_path, "SELECT id, handler FROM tasks") == [(1, "echo")]
    # It let go of the database: once the obstacle is gone, it upgrades.
    execute(db_path, "DROP TABLE tasks_by_request_id")
    await store.open()
    try:
        assert (await store.get(1)).token == 0
    finally:
        await store.close()


@pytest_twisted.ensureDeferred
async def test_not_a_database(reactor, db_path):
    with open(db_path, "wb") as f:
        f.write(b"this is not a database\n" * 200)
    store = SQLiteStore(db_path, reactor)
    with pytest.raises(StoreError) as caught:
        await store.open()
    message = str(caught.value)
    assert os.path.abspath(db_path) in message
    assert "not a database" in message
    assert "\n" not in message
    with pytest.raises(StoreError):
        await store.get(1)


@pytest_twisted.ensureDeferred
async def test_someone_elses_tasks_table(reactor, db_path):
    execute(db_path, "CREATE TABLE tasks (x)")
    with pytest.raises(StoreError, match="not created by taskbroker"):
        await SQLiteStore(db_path, reactor).open()


@pytest_twisted.ensureDeferred
async def test_missing_directory(reactor, tmp_path):
    path = str(tmp_path / "missing" / "tasks.db")
    with pytest.raises(StoreError) as caught:
        await SQLiteStore(path, reactor).open()
    assert str(tmp_path / "missing") in str(caught.value)
    assert not os.path.exists(tmp_path / "missing")


def test_bad_synchronous(reactor, db_path):
    with pytest.raises(ValueError):
        SQLiteStore(db_path, reactor, synchronous="off")


@pytest_twisted.ensureDeferred
async def test_checkpoints_run_apart_from_commits(sqlite_store, db_path):
    # SQLite's own checkpoints (inside commits) are off; the store's
    # checkpointer copies the WAL into the database on its own connection.
    autocheckpoint = await sqlite_store._thread.run(
        lambda c: c.execute("PRAGMA wal_autocheckpoint").fetchone()[0])
    assert autocheckpoint == 0
    await sqlite_store.submit([new_task() for _ in range(200)])
    busy, frames, copied = await sqlite_store.checkpoint()
    assert busy == 0 and frames > 0 and copied == frames
    # Another connection sees the rows in the database file itself.
    assert query(db_path, "SELECT count(*) FROM tasks") == [(200,)]


@pytest_twisted.ensureDeferred
async def test_group_commit(sqlite_store):
    before = sqlite_store.transactions
    submitted = [sqlite_store.submit([new_task(payload=str(i))])
                 for i in range(100)]
    results = await defer.gatherResults(submitted)
    assert sqlite_store.transactions - before <= 2
    ids = [rows[0].row.id for rows in results]
    assert ids == sorted(set(ids))
    listed = await sqlite_store.list(None, None, 0, 1000)
    assert [(row.id, row.payload) for row in listed] == [
        (rows[0].row.id, str(i)) for i, rows in enumerate(results)]


@pytest_twisted.ensureDeferred
async def test_writes_during_a_flush_go_in_the_next(sqlite_store, reactor):
    before = sqlite_store.transactions
    first = sqlite_store.submit([new_task(payload="first")])
    later = []
    # Runs just after the first flush was handed to the pool thread, in the
    # same timer pass, so that flush cannot have finished yet.
    reactor.callLater(0, lambda: later.extend(
        sqlite_store.submit([new_task(payload=str(i))]) for i in range(10)))
    await first
    await defer.gatherResults(later)
    assert len(later) == 10
    assert sqlite_store.transactions - before == 2
    assert len(await sqlite_store.list(None, None, 0, 100)) == 11


@pytest_twisted.ensureDeferred
async def test_failed_transaction_fails_every_write(reactor, db_path):
    store = SQLiteStore(db_path, reactor, busy_timeout=0.05)
    await store.open()
    try:
        (task,) = rows_of(await store.submit([new_task()]))
        with closing(sqlite3.connect(db_path, isolation_level=None)) as other:
            # Another program holds the write lock longer than the store
            # waits for it.
            other.execute("BEGIN IMMEDIATE")
            writes = [store.submit([new_task()]),
                      store.dispatch(task.id, 1, "w", 1.0),
                      store.cancel(task.id, 2.0),
                      store.retry(task.id)]
            outcomes = await defer.DeferredList(writes, consumeErrors=True)
            other.execute("ROLLBACK")
        for ok, failure in outcomes:
            assert not ok
            assert failure.check(StoreError)
            assert "locked" in str(failure.value)
        assert await store.get(task.id) == task
        assert await store.dispatch(task.id, 1, "w", 1.0) is True
        assert len(await store.list(None, None, 0, 10)) == 1
    finally:
        await store.close()


@pytest_twisted.ensureDeferred
async def test_close_waits_for_pending_writes(reactor, db_path):
    store = SQLiteStore(db_path, reactor)
    await store.open()
    submitted = store.submit([new_task(handler="late")])
    closed = store.close()
    also_closed = store.close()
    (row,) = rows_of(await submitted)
    await closed
    await also_closed
    assert query(db_path, "SELECT id, handler FROM tasks") == [
        (row.id, "late")]
    # Closing the last connection checkpointed the WAL into the file.
    assert not os.path.exists(db_path + "-wal")


@pytest_twisted.ensureDeferred
async def test_data_survives_reopen(reactor, db_path):
    store = SQLiteStore(db_path, reactor)
    await store.open()
    rows = rows_of(await store.submit([
        new_task(handler="a", request_id="r"),
        new_task(handler="b", run_at=9.5, unique_key="k", request_id="r",
                 time_limit=2.5),
    ]))
    await store.dispatch(rows[0].id, 1, "w1", 5.0)
    await store.close()

    again = SQLiteStore(db_path, reactor)
    await again.open()
    try:
        assert [row.id for row in await again.running()] == [rows[0].id]
        assert await again.get(rows[1].id) == rows[1]
        (third,) = rows_of(await again.submit([new_task(handler="c")]))
        assert third.id > rows[1].id
        assert await again.submit([new_task(request_id="r")]) == [
            (await again.get(rows[0].id), False), (rows[1], False)]
    finally:
        await again.close()


@pytest_twisted.ensureDeferred
async def test_synchronous_full(reactor, db_path):
    store = SQLiteStore(db_path, reactor, synchronous="full")
    await store.open()
    try:
        (row,) = rows_of(await store.submit([new_task()]))
        assert await store.dispatch(row.id, 1, "w", 1.0) is True
        assert await store.finish(row.id, 1, "succeeded", "1", None, None,
                                  2.0)
    finally:
        await store.close()


# The schema loader.


def test_split_sqlite():
    script = """
    -- a comment; with a semicolon
    CREATE TABLE t (x TEXT DEFAULT ';');
    CREATE TRIGGER t_ins AFTER INSERT ON t BEGIN
        UPDATE t SET x = 'a;b';
    END;
    -- trailing comment
    """
    statements = _schema.split_sqlite(script)
    assert len(statements) == 2
    assert statements[0].endswith("DEFAULT ';');")
    assert statements[1].startswith("CREATE TRIGGER")
    with pytest.raises(StoreError, match="incomplete"):
        _schema.split_sqlite("CREATE TABLE t (x);\nCREATE TABLE u (y")


def test_packaged_schema_is_latest():
    directory = _schema.schema_directory("sqlite")
    assert _schema.latest_version(directory) == 3
    for name in ("v1.sql", "v2.sql", "v3.sql"):
        assert "CREATE TABLE tasks" in _schema.read_script(directory, name)
    assert "ALTER TABLE tasks" in _schema.read_script(
        directory, "upgrade-to-v2.sql")
    assert "CREATE INDEX tasks_queued_by_group" in _schema.read_script(
        directory, "upgrade-to-v3.sql")


@pytest.fixture
def schemas(tmp_path):
    """
    A folder of schema files at version 3, with upgrades.
    """
    directory = tmp_path / "schemas"
    directory.mkdir()
    files = {
        "v1.sql": "CREATE TABLE taskbroker_schema (version INTEGER);\n"
                  "CREATE TABLE a (x);",
        "v3.sql": "CREATE TABLE taskbroker_schema (version INTEGER);\n"
                  "CREATE TABLE a (x, y);\nCREATE TABLE b (z);",
        "upgrade-to-v2.sql": "ALTER TABLE a ADD COLUMN y;",
        "upgrade-to-v3.sql": "CREATE TABLE b (z);",
        "README": "not a schema",
    }
    for name, text in files.items():
        (directory / name).write_text(text)
    return directory


def _connect(path):
    return closing(sqlite3.connect(path, isolation_level=None))


def test_schema_created_at_latest(schemas, tmp_path):
    with _connect(tmp_path / "new.db") as connection:
        assert _schema.ensure_schema(connection, "sqlite", schemas) == (None, 3)
        assert connection.execute(
            "SELECT version FROM taskbroker_schema").fetchall() == [(3,)]
        # A second start finds it current.
        assert _schema.ensure_schema(connection, "sqlite", schemas) == (3, 3)


def test_schema_upgraded_step_by_step(schemas, tmp_path):
    with _connect(tmp_path / "old.db") as connection:
        connection.executescript(
            "CREATE TABLE taskbroker_schema (version INTEGER);"
            "INSERT INTO taskbroker_schema VALUES (1);"
            "CREATE TABLE a (x);")
        assert _schema.ensure_schema(connection, "sqlite", schemas) == (1, 3)
        connection.execute("INSERT INTO a (x, y) VALUES (1, 2)")
        connection.execute("INSERT INTO b (z) VALUES (3)")
        assert connection.execute(
            "SELECT version FROM taskbroker_schema").fetchall() == [(3,)]


def test_failed_upgrade_changes_nothing(schemas, tmp_path):
    (schemas / "upgrade-to-v3.sql").write_text(
        "CREATE TABLE b (z);\nTHIS IS NOT SQL;")
    with _connect(tmp_path / "old.db") as connection:
        connection.executescript(
            "CREATE TABLE taskbroker_schema (version INTEGER);"
            "INSERT INTO taskbroker_schema VALUES (1);"
            "CREATE TABLE a (x);")
        with pytest.raises(sqlite3.OperationalError):
            _schema.ensure_schema(connection, "sqlite", schemas)
        assert not connection.in_transaction
        assert connection.execute(
            "SELECT version FROM taskbroker_schema").fetchall() == [(1,)]
        columns = [row[1] for row in connection.execute("PRAGMA table_info(a)")]
        assert columns == ["x"]
        assert connection.execute(
            "SELECT name FROM sqlite_master WHERE name = 'b'").fetchall() == []


def test_failed_creation_leaves_empty_database(schemas, tmp_path):
    (schemas / "v3.sql").write_text("CREATE TABLE a (x);\nNOT SQL;")
    with _connect(tmp_path / "new.db") as connection:
        with pytest.raises(sqlite3.OperationalError):
            _schema.ensure_schema(connection, "sqlite", schemas)
        assert connection.execute(
            "SELECT name FROM sqlite_master").fetchall() == []


# The test helpers.


def test_memory_store_external_insert_reads_clock():
    clock = Clock()
    clock.advance(123.5)
    store = MemoryStore(clock)
    row = store.insert_external("echo", '{"a":1}')
    assert (row.created_at, row.priority, row.max_attempts) == (
        123.5, None, None)
    result_of(store.open())
    assert result_of(store.list("queued", None, 0, 10)) == [row]


def test_result_of():
    assert result_of(defer.succeed(5)) == 5
    with pytest.raises(KeyError):
        result_of(defer.fail(KeyError("x")))
    with pytest.raises(AssertionError):
        result_of(defer.Deferred())
