# -*- test-case-name: tests.unit.test_store_contract -*-
"""
The contract of a task store, as a test suite that any store plugs into:
the same tests run against :class:`~taskbroker.testing.MemoryStore`, the
SQLite store, and any store of your own.

Subclass :class:`StoreContract` (and :class:`QueueReadsContract` for a
store that one broker owns at a time and that provides
:class:`~taskbroker.interfaces.IQueueReads`) in a pytest module, and give
the class three fixtures::

    import pytest
    import pytest_twisted
    from taskbroker.testing.store_contract import StoreContract

    class TestMyStore(StoreContract):
        @pytest.fixture
        def new_store(self, tmp_path):
            # Makes an unopened store; each call on the same database.
            return lambda: MyStore(tmp_path / "db")

        @pytest_twisted.async_yield_fixture
        async def store(self, new_store):
            store = new_store()
            await store.open()
            yield store
            await store.close()

        @pytest.fixture
        def insert_sql(self, store):
            # Inserts a row as another program's plain SQL would, with the
            # other columns at their defaults, and returns its id; raises
            # the database's integrity error for a row it refuses: one
            # naming the index tasks_live_unique_key for a live task's
            # unique_key, one naming the column for a value out of range
            # (a store may take those, for the broker to fail).
            def insert(handler, payload, priority=None, **columns):
                ...
            return insert

The tests need pytest and pytest-twisted (``pip install
taskbroker[test]``); nothing else in ``taskbroker.testing`` does.
"""

import math

import pytest
import pytest_twisted
from zope.interface.verify import verifyObject

from taskbroker.errors import StoreError, WriteRefused
from taskbroker.interfaces import IQueueReads, ITaskStore
from taskbroker.schedules import unique_key
from taskbroker.store import NewTask, ScheduleRow, Submitted, TaskRow

__all__ = [
    "StoreContract",
    "QueueReadsContract",
    "HousekeepingContract",
    "new_task",
    "rows_of",
    "submit_one",
    "all_rows",
]


def new_task(
    handler="echo",
    payload='{"n": 1}',
    priority="normal",
    max_attempts=3,
    created_at=1000.25,
    **v2,
):
    return NewTask(
        handler=handler,
        payload=payload,
        priority=priority,
        max_attempts=max_attempts,
        created_at=created_at,
        **v2,
    )


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


class StoreContract:
    """
    The tests every :class:`~taskbroker.interfaces.ITaskStore` passes.
    Fixtures a subclass provides: ``store`` (an open store, closed after
    the test), ``new_store`` (makes an unopened store on the same
    database) and ``insert_sql`` (inserts a row as another program's SQL
    would; returns its id).
    """

    def test_provides_interface(self, store):
        assert verifyObject(ITaskStore, store)

    @pytest_twisted.ensureDeferred
    async def test_submit_returns_rows_with_increasing_ids(self, store):
        first = await store.submit(
            [new_task(handler="a"), new_task(handler="b")]
        )
        second = await store.submit(
            [
                new_task(
                    handler="c",
                    priority="high",
                    max_attempts=5,
                    created_at=7.5,
                )
            ]
        )
        assert all(isinstance(s, Submitted) for s in first + second)
        rows = rows_of(first + second)
        assert [row.handler for row in rows] == ["a", "b", "c"]
        ids = [row.id for row in rows]
        assert ids == sorted(ids) and len(set(ids)) == 3
        assert second == [
            (
                TaskRow(
                    id=ids[2],
                    handler="c",
                    payload='{"n": 1}',
                    priority="high",
                    state="queued",
                    attempts=0,
                    max_attempts=5,
                    worker=None,
                    created_at=7.5,
                    started_at=None,
                    finished_at=None,
                    result=None,
                    error=None,
                    run_at=None,
                    unique_key=None,
                    request_id=None,
                    token=0,
                    time_limit=None,
                    traceback=None,
                ),
                True,
            )
        ]
        assert [await store.get(i) for i in ids] == rows

    @pytest_twisted.ensureDeferred
    async def test_submit_new_fields(self, store):
        (submitted,) = await store.submit(
            [
                new_task(
                    run_at=1500.5,
                    unique_key="k",
                    request_id="r",
                    time_limit=30.0,
                )
            ]
        )
        row, created = submitted
        assert created is True
        assert (
            row.run_at,
            row.unique_key,
            row.request_id,
            row.time_limit,
            row.token,
            row.traceback,
        ) == (1500.5, "k", "r", 30.0, 0, None)
        assert await store.get(row.id) == row
        # Rows read back carry them too; run_at does not hide a task from
        # Still listed as queued: the broker decides when to run it.
        assert await store.list("queued", None, 0, 10) == [row]
        assert await all_rows(store) == [row]

    @pytest_twisted.ensureDeferred
    async def test_submit_nothing(self, store):
        assert await store.submit([]) == []
        assert await all_rows(store) == []

    @pytest_twisted.ensureDeferred
    async def test_submit_same_request_again(self, store):
        first = rows_of(
            await store.submit(
                [
                    new_task(handler="a", request_id="req-1"),
                    new_task(handler="b", request_id="req-1"),
                ]
            )
        )
        await store.dispatch(first[0].id, 1, "w1", 2000.0)
        # The client lost the reply and sends the request again: it gets the
        # same tasks, as they are now, and nothing is inserted.
        again = await store.submit(
            [
                new_task(handler="a", request_id="req-1"),
                new_task(handler="b", request_id="req-1"),
            ]
        )
        assert again == [
            (await store.get(first[0].id), False),
            (first[1], False),
        ]
        assert again[0].row.state == "running"
        # Whatever the second copy holds: the request is what counts.
        assert (
            await store.submit([new_task(handler="zzz", request_id="req-1")])
            == again
        )
        assert len(await all_rows(store)) == 2
        # Another request makes new tasks.
        other = rows_of(
            await store.submit([new_task(handler="a", request_id="req-2")])
        )
        assert other[0].id > first[1].id
        assert other[0].request_id == "req-2"
        # So do tasks without a request_id, every time.
        rows_of(await store.submit([new_task(handler="a")]))
        rows_of(await store.submit([new_task(handler="a")]))
        assert len(await all_rows(store)) == 5

    @pytest_twisted.ensureDeferred
    async def test_submit_same_request_in_one_turn(self, store):
        # Not waiting in between: with SQLite both share one transaction.
        first = store.submit([new_task(request_id="req")])
        second = store.submit([new_task(request_id="req")])
        (row,) = rows_of(await first)
        assert await second == [(row, False)]
        assert await all_rows(store) == [row]

    @pytest_twisted.ensureDeferred
    async def test_submit_refuses_mixed_request_ids(self, store):
        for request_ids in (["a", "b"], ["a", None], [None, "a"]):
            with pytest.raises(ValueError, match="share one request_id"):
                await store.submit(
                    [new_task(request_id=r) for r in request_ids]
                )
        assert await all_rows(store) == []

    @pytest_twisted.ensureDeferred
    async def test_unique_key(self, store):
        first = await submit_one(store, handler="a", unique_key="k")
        # A second live task with the key is refused: the first is returned.
        assert await store.submit(
            [
                new_task(handler="b", unique_key="k"),
                new_task(handler="c", unique_key="other"),
            ]
        ) == [(first, False), ((await all_rows(store))[1], True)]
        assert [row.handler for row in await all_rows(store)] == ["a", "c"]
        # Running still holds the key.
        await store.dispatch(first.id, 1, "w1", 2000.0)
        running = await store.get(first.id)
        assert await store.submit([new_task(unique_key="k")]) == [
            (running, False)
        ]
        # Once the task has finished, the key is free again.
        await store.finish(first.id, 1, "succeeded", "1", None, None, 2001.0)
        second = await submit_one(store, handler="d", unique_key="k")
        assert second.id > first.id
        assert (second.unique_key, second.state) == ("k", "queued")

    @pytest_twisted.ensureDeferred
    async def test_unique_key_twice_in_one_submit(self, store):
        submitted = await store.submit(
            [
                new_task(handler="a", unique_key="k"),
                new_task(handler="b", unique_key="k"),
                new_task(handler="c"),
            ]
        )
        first = submitted[0].row
        assert [(s.row.id, s.created) for s in submitted] == [
            (first.id, True),
            (first.id, False),
            (submitted[2].row.id, True),
        ]
        assert len(await all_rows(store)) == 2

    @pytest_twisted.ensureDeferred
    async def test_unique_key_freed_by_cancel_and_failure(self, store):
        cancelled = await submit_one(store, unique_key="k")
        await store.cancel(cancelled.id, 3000.0)
        failed = await submit_one(store, unique_key="k")
        await store.dispatch(failed.id, 1, "w1", 3001.0)
        await store.finish(
            failed.id, 1, "failed", None, "boom", "Traceback", 3002.0
        )
        third = await submit_one(store, unique_key="k")
        assert len({cancelled.id, failed.id, third.id}) == 3

    @pytest_twisted.ensureDeferred
    async def test_request_id_checked_before_unique_key(self, store):
        (row,) = rows_of(
            await store.submit([new_task(unique_key="k", request_id="r")])
        )
        await store.cancel(row.id, 3000.0)
        # The request was seen: its (now cancelled) task comes back, even
        # though the key is free.
        assert await store.submit(
            [new_task(unique_key="k", request_id="r")]
        ) == [(await store.get(row.id), False)]

    @pytest_twisted.ensureDeferred
    async def test_external_insert_with_live_key_refused(
        self, store, insert_sql
    ):
        task = await submit_one(store, unique_key="k")
        # The database's own integrity error, naming the key's index.
        with pytest.raises(Exception, match="unique_key"):
            insert_sql("echo", "{}", unique_key="k")
        assert await all_rows(store) == [task]
        await store.cancel(task.id, 3000.0)
        task_id = insert_sql("echo", "{}", unique_key="k")
        assert (await store.get(task_id)).unique_key == "k"
        # And a task submitted with the key now finds the inserted one.
        assert await store.submit([new_task(unique_key="k")]) == [
            (await store.get(task_id), False)
        ]

    @pytest_twisted.ensureDeferred
    async def test_get_unknown(self, store):
        assert await store.get(12345) is None

    @pytest_twisted.ensureDeferred
    async def test_dispatch(self, store):
        task = await submit_one(store)
        assert await store.dispatch(task.id, 1, "w1", 2000.5) is True
        row = await store.get(task.id)
        assert (
            row.state,
            row.token,
            row.attempts,
            row.worker,
            row.started_at,
        ) == ("running", 1, 1, "w1", 2000.5)
        # Only a queued task can be dispatched.
        assert await store.dispatch(task.id, 2, "w2", 2001.0) is False
        assert await store.get(task.id) == row
        assert await store.dispatch(12345, 1, "w1", 2000.5) is False

    @pytest_twisted.ensureDeferred
    async def test_dispatch_needs_the_next_token(self, store):
        task = await submit_one(store)
        for token in (0, 2, 5, -1):
            assert await store.dispatch(task.id, token, "w1", 2000.0) is False
        assert await store.get(task.id) == task
        assert await store.dispatch(task.id, 1, "w1", 2000.0) is True

    @pytest_twisted.ensureDeferred
    async def test_dispatch_clears_finished_at(self, store):
        task = await submit_one(store)
        await store.dispatch(task.id, 1, "w1", 2000.0)
        await store.finish(task.id, 1, "failed", None, "boom", "tb", 2001.0)
        await store.retry(task.id)
        await store.dispatch(task.id, 2, "w2", 2002.0)
        row = await store.get(task.id)
        assert (
            row.state,
            row.token,
            row.attempts,
            row.worker,
            row.started_at,
            row.finished_at,
        ) == ("running", 2, 1, "w2", 2002.0, None)

    @pytest_twisted.ensureDeferred
    async def test_finish_succeeded(self, store):
        task = await submit_one(store)
        await store.dispatch(task.id, 1, "w1", 2000.0)
        assert (
            await store.finish(
                task.id, 1, "succeeded", '{"ok": true}', None, None, 2010.5
            )
            is True
        )
        row = await store.get(task.id)
        assert (
            row.state,
            row.result,
            row.error,
            row.traceback,
            row.finished_at,
        ) == ("succeeded", '{"ok": true}', None, None, 2010.5)
        # A duplicate result (a worker resending after a reconnect) changes
        # nothing.
        assert (
            await store.finish(
                task.id, 1, "failed", None, "late", None, 2011.0
            )
            is False
        )
        assert await store.get(task.id) == row

    @pytest_twisted.ensureDeferred
    async def test_finish_failed_and_cancelled(self, store):
        rows = rows_of(await store.submit([new_task(), new_task()]))
        for row in rows:
            await store.dispatch(row.id, 1, "w1", 2000.0)
        assert (
            await store.finish(
                rows[0].id,
                1,
                "failed",
                None,
                "boom",
                "Traceback (most recent call last): ...",
                2001.0,
            )
            is True
        )
        assert (
            await store.finish(
                rows[1].id, 1, "cancelled", None, "cancelled", None, 2002.0
            )
            is True
        )
        failed, cancelled = await all_rows(store)
        assert (
            failed.state,
            failed.error,
            failed.traceback,
            failed.result,
            failed.finished_at,
        ) == (
            "failed",
            "boom",
            "Traceback (most recent call last): ...",
            None,
            2001.0,
        )
        assert (cancelled.state, cancelled.error, cancelled.finished_at) == (
            "cancelled",
            "cancelled",
            2002.0,
        )

    @pytest_twisted.ensureDeferred
    async def test_finish_needs_the_current_token(self, store):
        task = await submit_one(store)
        await store.dispatch(task.id, 1, "w1", 2000.0)
        assert await store.requeue(task.id, 1) is True
        await store.dispatch(task.id, 2, "w2", 2005.0)
        # The first dispatch's worker reports late.
        assert (
            await store.finish(
                task.id, 1, "succeeded", "1", None, None, 2006.0
            )
            is False
        )
        assert (
            await store.finish(
                task.id, 3, "succeeded", "1", None, None, 2006.0
            )
            is False
        )
        assert (await store.get(task.id)).state == "running"
        assert (
            await store.finish(
                task.id, 2, "failed", None, "boom", None, 2007.0
            )
            is True
        )
        row = await store.get(task.id)
        assert (
            row.state,
            row.token,
            row.attempts,
            row.worker,
            row.error,
            row.result,
        ) == ("failed", 2, 2, "w2", "boom", None)

    @pytest_twisted.ensureDeferred
    async def test_finish_needs_running_task(self, store):
        task = await submit_one(store)
        assert (
            await store.finish(task.id, 0, "succeeded", "1", None, None, 1.0)
            is False
        )
        assert (
            await store.finish(12345, 1, "succeeded", "1", None, None, 1.0)
            is False
        )
        assert (await store.get(task.id)).state == "queued"

    @pytest_twisted.ensureDeferred
    async def test_finish_refuses_other_states(self, store):
        task = await submit_one(store)
        await store.dispatch(task.id, 1, "w1", 2000.0)
        for state in ("queued", "running", "bogus", None):
            with pytest.raises(ValueError):
                await store.finish(task.id, 1, state, None, None, None, 1.0)
        assert (await store.get(task.id)).state == "running"

    @pytest_twisted.ensureDeferred
    async def test_requeue(self, store):
        task = await submit_one(store)
        assert await store.requeue(task.id, 0) is False  # queued, not running
        await store.dispatch(task.id, 1, "w1", 2000.0)
        assert await store.requeue(task.id, 2) is False  # not its token
        assert await store.requeue(task.id, 1) is True
        row = await store.get(task.id)
        # The worker and start time still describe the last attempt, which
        # counted.
        assert (
            row.state,
            row.token,
            row.attempts,
            row.worker,
            row.started_at,
            row.run_at,
            row.error,
            row.traceback,
        ) == ("queued", 1, 1, "w1", 2000.0, None, None, None)
        assert await store.requeue(task.id, 1) is False
        assert await store.requeue(12345, 1) is False

    @pytest_twisted.ensureDeferred
    async def test_requeue_for_a_later_retry(self, store):
        task = await submit_one(store)
        await store.dispatch(task.id, 1, "w1", 2000.0)
        assert (
            await store.requeue(
                task.id,
                1,
                run_at=2060.0,
                error="boom",
                traceback="Traceback ...",
            )
            is True
        )
        row = await store.get(task.id)
        # The failed attempt's error stays visible while the task waits.
        assert (
            row.state,
            row.run_at,
            row.error,
            row.traceback,
            row.attempts,
            row.token,
            row.worker,
        ) == ("queued", 2060.0, "boom", "Traceback ...", 1, 1, "w1")
        assert await store.list("queued", None, 0, 10) == [row]
        # The next attempt's outcome replaces them.
        await store.dispatch(task.id, 2, "w2", 2060.5)
        await store.requeue(task.id, 2, run_at=2200.0, error="again")
        row = await store.get(task.id)
        assert (
            row.run_at,
            row.error,
            row.traceback,
            row.attempts,
            row.token,
        ) == (2200.0, "again", None, 2, 2)

    @pytest_twisted.ensureDeferred
    async def test_requeue_not_consumed(self, store):
        task = await submit_one(store)
        await store.dispatch(task.id, 1, "w1", 2000.0)
        await store.requeue(task.id, 1, error="boom")
        await store.dispatch(task.id, 2, "w2", 2001.0)
        # The worker was shut down gracefully: the attempt is given back, but
        # the token never goes back.
        assert await store.requeue(task.id, 2, consumed=False) is True
        row = await store.get(task.id)
        assert (row.state, row.attempts, row.token, row.worker) == (
            "queued",
            1,
            2,
            "w2",
        )
        assert await store.dispatch(task.id, 2, "w3", 2002.0) is False
        assert await store.dispatch(task.id, 3, "w3", 2002.0) is True
        row = await store.get(task.id)
        assert (row.attempts, row.token) == (2, 3)

    @pytest_twisted.ensureDeferred
    async def test_cancel(self, store):
        queued = await submit_one(store)
        running = await submit_one(store)
        finished = await submit_one(store)
        await store.dispatch(running.id, 1, "w1", 2000.0)
        await store.dispatch(finished.id, 1, "w1", 2000.0)
        await store.finish(
            finished.id, 1, "succeeded", "1", None, None, 2001.0
        )

        row = await store.cancel(queued.id, 3000.5)
        assert (row.id, row.state, row.error, row.finished_at) == (
            queued.id,
            "cancelled",
            "cancelled",
            3000.5,
        )
        assert await store.get(queued.id) == row
        # Cancelling again reports the row as it is and changes nothing.
        assert await store.cancel(queued.id, 3001.0) == row

        row = await store.cancel(running.id, 3000.5)
        assert (
            row.id,
            row.state,
            row.error,
            row.finished_at,
            row.token,
            row.worker,
        ) == (running.id, "cancelled", "cancelled", 3000.5, 1, "w1")
        assert await store.get(running.id) == row
        # The worker's late report changes nothing.
        assert (
            await store.finish(
                running.id, 1, "succeeded", "1", None, None, 3002.0
            )
            is False
        )
        assert await store.requeue(running.id, 1) is False
        assert await store.get(running.id) == row

        # A finished task is not cancelled; the row says so.
        row = await store.get(finished.id)
        assert await store.cancel(finished.id, 3000.5) == row
        assert row.state == "succeeded"
        assert await store.cancel(12345, 3000.5) is None

    @pytest_twisted.ensureDeferred
    async def test_cancel_keeps_the_last_traceback(self, store):
        task = await submit_one(store)
        await store.dispatch(task.id, 1, "w1", 2000.0)
        await store.requeue(
            task.id, 1, run_at=2060.0, error="boom", traceback="Traceback ..."
        )
        row = await store.cancel(task.id, 2010.0)
        assert (row.state, row.error, row.traceback, row.run_at) == (
            "cancelled",
            "cancelled",
            "Traceback ...",
            2060.0,
        )

    @pytest_twisted.ensureDeferred
    async def test_retry_failed_task(self, store):
        task = await submit_one(store, run_at=1500.0)
        await store.dispatch(task.id, 1, "w1", 2000.0)
        await store.requeue(task.id, 1, run_at=2060.0, error="boom")
        await store.dispatch(task.id, 2, "w1", 2060.0)
        await store.finish(
            task.id, 2, "failed", None, "boom", "Traceback ...", 2061.0
        )

        row = await store.retry(task.id)
        assert (
            row.state,
            row.attempts,
            row.token,
            row.run_at,
            row.finished_at,
            row.result,
            row.error,
            row.traceback,
        ) == ("queued", 0, 2, None, None, None, None, None)
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
    async def test_retry_cancelled_task(self, store):
        task = await submit_one(store)
        await store.cancel(task.id, 3000.0)
        row = await store.retry(task.id)
        assert (row.state, row.error, row.finished_at) == (
            "queued",
            None,
            None,
        )

    @pytest_twisted.ensureDeferred
    async def test_retry_needs_failed_or_cancelled(self, store):
        task = await submit_one(store)
        await store.dispatch(task.id, 1, "w1", 2000.0)
        await store.finish(task.id, 1, "succeeded", "42", None, None, 2001.0)
        row = await store.get(task.id)
        assert await store.retry(task.id) == row
        assert await store.get(task.id) == row
        assert await store.retry(12345) is None

    @pytest_twisted.ensureDeferred
    async def test_retry_refused_while_the_key_is_taken(self, store):
        old = await submit_one(store, unique_key="k")
        await store.cancel(old.id, 3000.0)
        new = await submit_one(store, unique_key="k")
        cancelled = await store.get(old.id)
        assert await store.retry(old.id) == cancelled
        await store.cancel(new.id, 3001.0)
        assert (await store.retry(old.id)).state == "queued"
        assert (await store.retry(new.id)).state == "cancelled"

    @pytest_twisted.ensureDeferred
    async def test_dispatch_fills_only_nulls(self, store, insert_sql):
        task_id = insert_sql("echo", "{}", None)
        row = await store.get(task_id)
        assert (row.priority, row.max_attempts) == (None, None)
        assert await store.dispatch(task_id, 1, "w", 1.0, "normal", 3) is True
        row = await store.get(task_id)
        assert (row.priority, row.max_attempts) == ("normal", 3)

        given = await submit_one(store, priority="low", max_attempts=1)
        await store.dispatch(given.id, 1, "w", 1.0, "normal", 3)
        row = await store.get(given.id)
        assert (row.priority, row.max_attempts, row.state) == (
            "low",
            1,
            "running",
        )

    @pytest_twisted.ensureDeferred
    async def test_reject_group(self, store, insert_sql):
        odd = [insert_sql("echo", "{}", "urgent") for _ in range(3)]
        kept = insert_sql("echo", "{}", None)
        other = insert_sql("other", "{}", "urgent")
        running = await submit_one(store, priority="urgent")
        await store.dispatch(running.id, 1, "w1", 2000.0)
        assert (
            await store.reject_group("echo", "urgent", "no such level", 4000.0)
            == 3
        )
        for task_id in odd:
            row = await store.get(task_id)
            assert (row.state, row.error, row.finished_at) == (
                "failed",
                "no such level",
                4000.0,
            )
        for task_id in (kept, other, running.id):
            assert (await store.get(task_id)).state in ("queued", "running")
        assert await store.reject_group("echo", None, "gone", 4001.0) == 1
        assert (await store.get(kept)).state == "failed"

    @pytest_twisted.ensureDeferred
    async def test_reject(self, store, insert_sql):
        task_id = insert_sql("no-such-handler", "{}")
        assert await store.reject(task_id, "unknown handler", 4000.0) is None
        row = await store.get(task_id)
        assert (row.state, row.error, row.finished_at) == (
            "failed",
            "unknown handler",
            4000.0,
        )

        running = await submit_one(store)
        await store.dispatch(running.id, 1, "w1", 2000.0)
        await store.reject(running.id, "nope", 4000.0)
        assert (await store.get(running.id)).state == "running"

    @pytest_twisted.ensureDeferred
    async def test_external_insert_gets_defaults(self, store, insert_sql):
        task_id = insert_sql("echo", '{"a":1}')
        row = await store.get(task_id)
        assert (
            row.handler,
            row.payload,
            row.priority,
            row.state,
            row.attempts,
            row.max_attempts,
            row.worker,
            row.started_at,
            row.finished_at,
            row.result,
            row.error,
            row.run_at,
            row.unique_key,
            row.request_id,
            row.token,
            row.time_limit,
            row.traceback,
        ) == (
            "echo",
            '{"a":1}',
            None,
            "queued",
            0,
            None,
            None,
            None,
            None,
            None,
            None,
            None,
            None,
            None,
            0,
            None,
            None,
        )
        assert isinstance(row.created_at, float)
        assert await store.list("queued", None, 0, 10) == [row]

    @pytest_twisted.ensureDeferred
    async def test_external_insert_delayed_and_unique(self, store, insert_sql):
        task_id = insert_sql(
            "echo", "{}", run_at=5000.0, unique_key="nightly", time_limit=60.0
        )
        row = await store.get(task_id)
        assert (row.run_at, row.unique_key, row.time_limit, row.token) == (
            5000.0,
            "nightly",
            60.0,
            0,
        )
        assert await store.list("queued", None, 0, 10) == [row]

    @pytest_twisted.ensureDeferred
    async def test_list_filters_and_pages(self, store):
        rows = []
        for handler in ("a", "b", "a", "b", "a"):
            rows.extend(
                rows_of(await store.submit([new_task(handler=handler)]))
            )
        ids = [row.id for row in rows]
        await store.dispatch(ids[0], 1, "w", 1.0)
        await store.dispatch(ids[1], 1, "w", 1.0)

        async def listed(state=None, handler=None, after_id=0, limit=100):
            return [
                row.id
                for row in await store.list(state, handler, after_id, limit)
            ]

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
    async def test_list_newest_first_by_priority_between_ids(self, store):
        rows = []
        for priority in ("high", "low", "high", "high", "low"):
            rows.extend(
                rows_of(await store.submit([new_task(priority=priority)]))
            )
        ids = [row.id for row in rows]

        async def listed(after_id=0, limit=100, **kwargs):
            return [
                row.id
                for row in await store.list(
                    None, None, after_id, limit, **kwargs
                )
            ]

        assert await listed(newest_first=True) == ids[::-1]
        assert await listed(newest_first=True, limit=2) == [ids[4], ids[3]]
        # Paging back: the next page is before the last id of this one.
        assert await listed(newest_first=True, limit=2, before_id=ids[3]) == [
            ids[2],
            ids[1],
        ]
        assert await listed(priority="high") == [ids[0], ids[2], ids[3]]
        assert await listed(
            priority="high", newest_first=True, before_id=ids[3]
        ) == [ids[2], ids[0]]
        assert await listed(after_id=ids[0], before_id=ids[3]) == ids[1:3]
        assert await listed(priority="urgent") == []

    @pytest_twisted.ensureDeferred
    async def test_the_submitter_is_kept_and_filters_a_list(self, store):
        alice, bob = "a" * 40, "b" * 40
        mine = rows_of(
            await store.submit(
                [new_task(submitter=alice), new_task(submitter=alice)]
            )
        )
        (theirs,) = rows_of(await store.submit([new_task(submitter=bob)]))
        (nobody,) = rows_of(await store.submit([new_task()]))
        assert [row.submitter for row in mine] == [alice, alice]
        assert (theirs.submitter, nobody.submitter) == (bob, None)
        for row in mine + [theirs, nobody]:
            assert await store.get(row.id) == row
        # Kept through a dispatch, as every column the broker does not
        # write.
        assert await store.dispatch(mine[0].id, 1, "w", 1.0)
        assert (await store.get(mine[0].id)).submitter == alice

        async def listed(submitter, after_id=0, state=None):
            return [
                row.id
                for row in await store.list(
                    state, None, after_id, 100, submitter=submitter
                )
            ]

        assert await listed(alice) == [row.id for row in mine]
        assert await listed(alice, after_id=mine[0].id) == [mine[1].id]
        assert await listed(alice, state="queued") == [mine[1].id]
        assert await listed(bob) == [theirs.id]
        assert await listed("c" * 40) == []
        assert len(await listed(None)) == 4

    @pytest_twisted.ensureDeferred
    async def test_progress_is_kept_for_the_current_dispatch_only(self, store):
        (row,) = rows_of(await store.submit([new_task()]))
        # Not running: nothing to report on.
        assert await store.progress(row.id, 0, 0.5, "x", 5.0) is False
        assert await store.dispatch(row.id, 1, "w", 1.0)
        assert await store.progress(row.id, 1, 0.25, "a quarter", 5.0)
        assert await store.progress(row.id, 1, 0.5, None, 6.5)
        got = await store.get(row.id)
        assert (got.progress, got.progress_message, got.progress_at) == (
            0.5,
            None,
            6.5,
        )
        # A report of an earlier dispatch changes nothing.
        assert await store.progress(row.id, 0, 0.9, "old", 7.0) is False
        assert await store.requeue(row.id, 1) is True
        assert await store.progress(row.id, 1, 0.9, "old", 7.0) is False
        # Kept while the task waits to run again; cleared at its dispatch.
        assert (await store.get(row.id)).progress == 0.5
        assert await store.dispatch(row.id, 2, "w", 8.0)
        got = await store.get(row.id)
        assert (got.progress, got.progress_message, got.progress_at) == (
            None,
            None,
            None,
        )
        assert await store.progress(row.id, 2, 1, "done", 9.0)
        assert await store.finish(
            row.id, 2, "succeeded", "1", None, None, 10.0
        )
        assert await store.progress(row.id, 2, 0.1, "late", 11.0) is False
        assert (await store.get(row.id)).progress_message == "done"

    @pytest_twisted.ensureDeferred
    async def test_list_stops_at_a_size(self, store):
        rows = rows_of(
            await store.submit(
                [new_task(payload='"' + "x" * 998 + '"') for _ in range(5)]
            )
        )
        ids = [row.id for row in rows]

        async def listed(max_bytes):
            return [
                row.id
                for row in await store.list(None, None, 0, 100, max_bytes)
            ]

        # The row that reaches the size is the last one read.
        assert await listed(2000) == ids[:2]
        assert await listed(2001) == ids[:3]
        assert await listed(1) == ids[:1]
        assert await listed(None) == ids

    @pytest_twisted.ensureDeferred
    async def test_counts(self, store, insert_sql):
        assert await store.counts(100.0) == {}
        rows = rows_of(
            await store.submit(
                [
                    new_task(priority="high"),
                    new_task(priority="high"),
                    new_task(priority="low"),
                    new_task(priority="low", run_at=150.0),
                    new_task(priority="low", run_at=50.0),
                ]
            )
        )
        insert_sql("other", "{}")
        await store.dispatch(rows[0].id, 1, "w", 1.0)
        assert await store.counts(100.0) == {
            ("running", "high", "echo", False): 1,
            ("queued", "high", "echo", False): 1,
            ("queued", "low", "echo", False): 2,
            ("queued", "low", "echo", True): 1,
            ("queued", None, "other", False): 1,
        }

    @pytest_twisted.ensureDeferred
    async def test_writes_in_one_turn_apply_in_order(self, store):
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
    async def test_bad_write_fails_alone(self, store):
        bad = store.submit([new_task(handler=None)])
        good = store.submit([new_task(handler="fine")])
        # Refused for its own values: not the database's trouble.
        with pytest.raises(WriteRefused):
            await bad
        (row,) = rows_of(await good)
        assert [r.handler for r in await all_rows(store)] == ["fine"]
        assert await store.get(row.id) == row

    @pytest_twisted.ensureDeferred
    async def test_bad_submit_inserts_nothing(self, store):
        # The first task is fine, the second is not: the call is all or
        # nothing, and its request can be sent again.
        bad = store.submit(
            [
                new_task(handler="fine", request_id="r"),
                new_task(handler=None, request_id="r"),
            ]
        )
        with pytest.raises(StoreError):
            await bad
        assert await all_rows(store) == []
        (row,) = rows_of(await store.submit([new_task(request_id="r")]))
        assert await all_rows(store) == [row]

    @pytest_twisted.ensureDeferred
    async def test_close_then_reopen(self, store):
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
    async def test_open_twice_fails(self, store):
        with pytest.raises(StoreError):
            await store.open()
        assert await store.get(1) is None  # still usable

    @pytest_twisted.ensureDeferred
    async def test_close_before_open(self, new_store):
        store = new_store()
        await store.close()
        with pytest.raises(StoreError):
            await store.dispatch(1, 1, "w", 1.0)


def schedule_row(
    name="nightly", every=60.0, cron=None, next_tick=1060.0, **changes
):
    row = ScheduleRow(
        name=name,
        handler="echo",
        payload='{"n": 1}',
        priority=None,
        max_attempts=None,
        time_limit=None,
        every=every,
        cron=cron,
        timezone="UTC",
        skip_if_running=False,
        paused=False,
        next_tick=next_tick,
        last_tick=None,
        last_task_id=None,
        created_at=1000.0,
        submitter=None,
    )
    return row._replace(**changes)


def schedule_task(name, tick):
    return new_task(unique_key=unique_key(name, tick), created_at=tick)


class HousekeepingContract:
    """
    Schedules, retention and settings: the tests every
    :class:`~taskbroker.interfaces.ITaskStore` passes (with the fixtures
    of :class:`StoreContract`).
    """

    @pytest_twisted.ensureDeferred
    async def test_add_list_remove_schedules(self, store):
        assert await store.schedules() == []
        assert await store.add_schedule(schedule_row("b")) is True
        assert (
            await store.add_schedule(
                schedule_row(
                    "a",
                    every=None,
                    cron="0 3 * * *",
                    timezone="Europe/Paris",
                    skip_if_running=True,
                    priority="high",
                    max_attempts=2,
                    time_limit=30.0,
                    submitter="key",
                )
            )
            is True
        )
        a, b = await store.schedules()
        assert a == schedule_row(
            "a",
            every=None,
            cron="0 3 * * *",
            timezone="Europe/Paris",
            skip_if_running=True,
            priority="high",
            max_attempts=2,
            time_limit=30.0,
            submitter="key",
        )
        assert b == schedule_row("b")
        assert await store.schedules(["b", "c"]) == [b]
        # A name is taken until the schedule is removed or replaced.
        changed = schedule_row("b", every=5.0)
        assert await store.add_schedule(changed) is False
        assert await store.schedules(["b"]) == [b]
        assert await store.add_schedule(changed, replace=True) is True
        assert await store.schedules(["b"]) == [changed]
        assert await store.remove_schedule("b") is True
        assert await store.remove_schedule("b") is False
        assert [row.name for row in await store.schedules()] == ["a"]

    @pytest_twisted.ensureDeferred
    async def test_a_schedule_has_every_or_cron(self, store):
        with pytest.raises(WriteRefused):
            await store.add_schedule(schedule_row(every=None))
        with pytest.raises(WriteRefused):
            await store.add_schedule(schedule_row(cron="* * * * *"))
        assert await store.schedules() == []

    @pytest_twisted.ensureDeferred
    async def test_pause_and_resume(self, store):
        await store.add_schedule(schedule_row(next_tick=1060.0))
        paused = await store.pause_schedule("nightly", True, 5000.0)
        assert (paused.paused, paused.next_tick) == (True, 1060.0)
        assert await store.due_schedules(2000.0, 10) == []
        # Pausing again changes nothing; resuming sets the next tick.
        assert await store.pause_schedule("nightly", True, 7000.0) == paused
        resumed = await store.pause_schedule("nightly", False, 2060.0)
        assert (resumed.paused, resumed.next_tick) == (False, 2060.0)
        assert await store.pause_schedule("nightly", False, 9.0) == resumed
        assert await store.pause_schedule("other", True, 1.0) is None

    @pytest_twisted.ensureDeferred
    async def test_due_schedules_earliest_first(self, store):
        for name, tick in (("c", 1300.0), ("a", 1200.0), ("b", 1100.0)):
            await store.add_schedule(schedule_row(name, next_tick=tick))
        assert [row.name for row in await store.due_schedules(1250.0, 10)] == [
            "b",
            "a",
        ]
        assert [row.name for row in await store.due_schedules(1300.0, 1)] == [
            "b"
        ]

    @pytest_twisted.ensureDeferred
    async def test_each_tick_is_fired_once(self, store):
        await store.add_schedule(schedule_row(next_tick=1060.0))
        task = schedule_task("nightly", 1060.0)
        state, row = await store.fire_schedule(
            "nightly", 1060.0, 1120.0, task, False
        )
        assert state == "enqueued"
        assert (row.handler, row.payload, row.state, row.unique_key) == (
            "echo",
            '{"n": 1}',
            "queued",
            "schedule:nightly:1970-01-01T00:17:40.000000+00:00",
        )
        assert await store.get(row.id) == row
        # The compare-and-set: the tick is no longer the schedule's.
        assert await store.fire_schedule(
            "nightly", 1060.0, 1120.0, task, False
        ) == ("gone", None)
        (schedule,) = await store.schedules()
        assert (
            schedule.next_tick,
            schedule.last_tick,
            schedule.last_task_id,
        ) == (1120.0, 1060.0, row.id)
        assert len(await all_rows(store)) == 1
        # Nor does a paused or removed schedule fire.
        await store.pause_schedule("nightly", True, 0.0)
        assert await store.fire_schedule(
            "nightly", 1120.0, 1180.0, schedule_task("nightly", 1120.0), False
        ) == ("gone", None)
        assert await store.fire_schedule(
            "other", 1120.0, 1180.0, schedule_task("other", 1120.0), False
        ) == ("gone", None)

    @pytest_twisted.ensureDeferred
    async def test_skip_if_running(self, store):
        await store.add_schedule(schedule_row(skip_if_running=True))
        _, first = await store.fire_schedule(
            "nightly", 1060.0, 1120.0, schedule_task("nightly", 1060.0), True
        )
        # Its first task still queued: the next tick enqueues nothing, but
        # passes.
        assert await store.fire_schedule(
            "nightly", 1120.0, 1180.0, schedule_task("nightly", 1120.0), True
        ) == ("skipped", None)
        (schedule,) = await store.schedules()
        assert (schedule.next_tick, schedule.last_task_id) == (
            1180.0,
            first.id,
        )
        await store.cancel(first.id, 1150.0)
        state, second = await store.fire_schedule(
            "nightly", 1180.0, 1240.0, schedule_task("nightly", 1180.0), True
        )
        assert state == "enqueued" and second.id != first.id

    @pytest_twisted.ensureDeferred
    async def test_purge_deletes_old_finished_tasks_oldest_first(self, store):
        rows = rows_of(
            await store.submit(
                [new_task(handler=handler) for handler in "abcab"]
            )
        )
        ended = [
            (rows[0], 1500.0),
            (rows[1], 1100.0),
            (rows[2], 1200.0),
            (rows[3], 2500.0),
        ]
        for row, at in ended:
            await store.cancel(row.id, at)
        # rows[4] stays queued.
        assert await store.purge(2000.0, limit=1) == [
            ("normal", "b", "cancelled")
        ]
        assert await store.purge(2000.0, handler="a") == [
            ("normal", "a", "cancelled")
        ]
        assert await store.purge(2000.0, states=("failed",)) == []
        assert await store.purge(2000.0, states=("cancelled", "failed")) == [
            ("normal", "c", "cancelled")
        ]
        assert await store.purge(2000.0) == []
        assert [row.id for row in await all_rows(store)] == [
            rows[3].id,
            rows[4].id,
        ]

    @pytest_twisted.ensureDeferred
    async def test_purge_of_a_clients_tasks(self, store):
        mine, theirs = rows_of(
            await store.submit(
                [new_task(submitter="m" * 40), new_task(submitter="t" * 40)]
            )
        )
        for row in (mine, theirs):
            await store.cancel(row.id, 1100.0)
        assert await store.purge(2000.0, submitter="m" * 40) == [
            ("normal", "echo", "cancelled")
        ]
        assert [row.id for row in await all_rows(store)] == [theirs.id]

    @pytest_twisted.ensureDeferred
    async def test_count(self, store):
        rows = rows_of(
            await store.submit(
                [
                    new_task(handler="a", submitter="m" * 40),
                    new_task(handler="a"),
                    new_task(handler="b"),
                ]
            )
        )
        await store.cancel(rows[2].id, 1100.0)
        assert await store.count("queued") == 2
        assert await store.count("queued", handler="a") == 2
        assert await store.count("queued", submitter="m" * 40) == 1
        assert await store.count("cancelled", handler="a") == 0
        assert await store.count("cancelled") == 1

    @pytest_twisted.ensureDeferred
    async def test_a_new_database_keeps_finished_tasks_a_week(self, store):
        assert await store.setting("default_keep_finished") == "7d"
        assert await store.setting("nothing") is None


class QueueReadsContract:
    """
    The tests of :class:`~taskbroker.interfaces.IQueueReads`, for a store
    that one broker owns at a time.  Same fixtures as
    :class:`StoreContract`.
    """

    def test_provides_queue_reads(self, store):
        assert verifyObject(IQueueReads, store)

    @pytest_twisted.ensureDeferred
    async def test_queued_groups(self, store, insert_sql):
        assert await store.queued_groups() == ([], 0)
        insert_sql("b", "{}", "high")
        insert_sql("a", "{}", "low")
        insert_sql("b", "{}", None)
        insert_sql("a", "{}", "high")
        last = insert_sql("b", "{}", "high")
        finished = await submit_one(store, handler="c")
        await store.cancel(finished.id, 1.0)
        assert await store.queued_groups() == (
            [("a", "high"), ("a", "low"), ("b", None), ("b", "high")],
            last,
        )

    @pytest_twisted.ensureDeferred
    async def test_queued_window(self, store, insert_sql):
        ids = []
        for priority in ("normal", None, "high", "normal", None, "normal"):
            ids.append(insert_sql("echo", "{}", priority))
        other = insert_sql("other", "{}", "normal")
        later = insert_sql("echo", "{}", "normal", run_at=50.0)
        due = insert_sql("echo", "{}", "normal", run_at=10.0)
        await store.dispatch(ids[3], 1, "w", 1.0)

        async def window(priorities, after_id=0, limit=100, now=20.0):
            return [
                row.id
                for row in await store.queued_window(
                    "echo", priorities, after_id, limit, now
                )
            ]

        # Oldest first, NULL matching None, running and undue tasks left out.
        assert await window(("normal", None)) == [
            ids[0],
            ids[1],
            ids[4],
            ids[5],
            due,
        ]
        assert await window(("normal",)) == [ids[0], ids[5], due]
        assert await window(("normal", None), limit=2) == ids[:2]
        assert await window(("normal", None), after_id=ids[1], limit=2) == [
            ids[4],
            ids[5],
        ]
        assert await window(("normal",), now=60.0) == [
            ids[0],
            ids[5],
            later,
            due,
        ]
        assert await window(("high",)) == [ids[2]]
        assert other not in await window(("normal",))
        # A run_at that is no time is read at once, for the broker to reject
        # (if the store takes it: SQLite refuses it since schema 4).
        try:
            text = insert_sql("echo", "{}", "high", run_at="tomorrow")
        except Exception as refused:
            assert "run_at" in str(refused)
            return
        assert await window(("high",)) == [ids[2], text]

    @pytest_twisted.ensureDeferred
    async def test_delayed_window(self, store, insert_sql):
        at = {}
        for run_at in (30.0, 10.0, 20.0, 10.0):
            at.setdefault(run_at, []).append(
                insert_sql("echo", "{}", run_at=run_at)
            )
        insert_sql("echo", "{}")

        async def window(after, limit=100):
            return [
                (row.run_at, row.id)
                for row in await store.delayed_window(after, limit)
            ]

        ten = [(10.0, i) for i in at[10.0]]
        everything = ten + [(20.0, at[20.0][0]), (30.0, at[30.0][0])]
        assert await window((-math.inf, 0)) == everything
        assert await window((0.0, 0), limit=1) == ten[:1]
        # The pair after which to go on: ties on run_at are split by id.
        assert await window(ten[0], limit=1) == ten[1:]
        assert await window((20.0, math.inf)) == everything[-1:]
        assert await window((math.inf, math.inf)) == []

    @pytest_twisted.ensureDeferred
    async def test_scan_queued_leaves_out_known_tasks(self, store):
        ids = [
            row.id
            for row in rows_of(
                await store.submit([new_task() for _ in range(6)])
            )
        ]
        await store.dispatch(ids[5], 1, "w", 1.0)
        rows, last = await store.scan_queued(0, 100, frozenset(ids[:3]))
        assert [row.id for row in rows] == ids[3:5]
        assert last == ids[4]
        rows, last = await store.scan_queued(0, 2, frozenset(ids[:2]))
        assert (rows, last) == ([], ids[1])
        rows, last = await store.scan_queued(ids[4], 100, frozenset())
        assert (rows, last) == ([], ids[4])

    @pytest_twisted.ensureDeferred
    async def test_queued_and_running(self, store):
        rows = rows_of(await store.submit([new_task() for _ in range(5)]))
        ids = [row.id for row in rows]
        await store.dispatch(ids[1], 1, "w", 1.0)
        await store.dispatch(ids[3], 1, "w", 1.0)
        await store.cancel(ids[4], 2.0)

        queued = await store.list("queued", None, 0, 100)
        assert [row.id for row in queued] == [ids[0], ids[2]]
        assert queued[0] == await store.get(ids[0])
        assert [
            row.id for row in await store.list("queued", None, ids[0], 100)
        ] == [ids[2]]
        assert [row.id for row in await store.list("queued", None, 0, 1)] == [
            ids[0]
        ]
        running = await store.running()
        assert [row.id for row in running] == [ids[1], ids[3]]
        assert [row.token for row in running] == [1, 1]
