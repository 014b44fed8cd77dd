# -*- test-case-name: tests.unit.test_store -*-
"""
A task store in memory, for tests: the same contract as the SQLite store,
with every ``Deferred`` already fired, so that tests of code that uses a
store can run without a reactor or a disk.

Public through :mod:`taskbroker.testing`.
"""

import dataclasses

from twisted.internet import defer
from twisted.internet.task import Clock
from zope.interface import implementer

from taskbroker.errors import StoreError
from taskbroker.interfaces import ITaskStore
from taskbroker.store import TaskRow

__all__ = ["MemoryStore"]


@implementer(ITaskStore)
class MemoryStore:
    """
    An :class:`taskbroker.interfaces.ITaskStore` that keeps its rows in a
    ``dict``.  Each method returns an already-fired ``Deferred``; use
    :func:`taskbroker.testing.result_of` to read it.

    Like the SQLite store, it refuses writes and reads unless it is open,
    and it may be opened again after :meth:`close`, with its rows intact,
    as a stand-in for a broker restart.

    :param clock: what :meth:`insert_external` reads the time from, as the
        database's default for ``created_at`` would; an
        :class:`twisted.internet.interfaces.IReactorTime`.  Defaults to a
        new :class:`twisted.internet.task.Clock` (time ``0.0``).  The store
        methods themselves read no clock.
    """

    def __init__(self, clock=None):
        self._clock = Clock() if clock is None else clock
        # Insertion order is id order, because ids only grow.
        self._rows = {}
        self._last_id = 0
        self._open = False

    def __repr__(self):
        state = "open" if self._open else "closed"
        return f"<MemoryStore {len(self._rows)} tasks {state}>"

    def insert_external(self, handler, payload="null", priority=None,
                        max_attempts=None):
        """
        Add a row the way another program's ``INSERT INTO tasks (handler,
        payload, priority) VALUES (...)`` would: every other column takes
        its SQL default.  Works whether or not the store is open.

        :param str handler: the handler name.
        :param str payload: JSON text (or anything, to test validation).
        :param priority: a priority name, or ``None`` for the default.
        :param max_attempts: an ``int``, or ``None`` for the default.
        :returns: the new :class:`taskbroker.store.TaskRow`.
        """
        return self._insert(
            handler, payload, priority, max_attempts, self._clock.seconds()
        )

    def _insert(self, handler, payload, priority, max_attempts, created_at):
        self._last_id += 1
        row = TaskRow(
            id=self._last_id,
            handler=handler,
            payload=payload,
            priority=priority,
            state="queued",
            attempts=0,
            max_attempts=max_attempts,
            worker=None,
            created_at=created_at,
            started_at=None,
            finished_at=None,
            result=None,
            error=None,
        )
        self._rows[row.id] = row
        return row

    def _update(self, row, **changes):
        row = self._rows[row.id] = dataclasses.replace(row, **changes)
        return row

    def _check_open(self):
        if not self._open:
            raise StoreError("memory store is not open")

    def open(self):
        """
        See :meth:`taskbroker.interfaces.ITaskStore.open`.
        """
        if self._open:
            return defer.fail(StoreError("memory store is already open"))
        self._open = True
        return defer.succeed(None)

    def close(self):
        """
        See :meth:`taskbroker.interfaces.ITaskStore.close`.
        """
        self._open = False
        return defer.succeed(None)

    def submit(self, tasks):
        """
        See :meth:`taskbroker.interfaces.ITaskStore.submit`.
        """
        if not self._open:
            return defer.fail(StoreError("memory store is not open"))
        tasks = list(tasks)
        for task in tasks:
            # The SQLite store refuses NULLs here through NOT NULL columns.
            if task.handler is None or task.payload is None:
                return defer.fail(StoreError(
                    "submit failed: handler and payload must not be None"
                ))
        return defer.succeed([
            self._insert(task.handler, task.payload, task.priority,
                         task.max_attempts, task.created_at)
            for task in tasks
        ])

    @staticmethod
    def _run(function, *args):
        # Turns the synchronous methods below into the Deferred contract.
        try:
            return defer.succeed(function(*args))
        except Exception as e:
            return defer.fail(e)

    def dispatch(self, task_id, attempt, worker, started_at):
        """
        See :meth:`taskbroker.interfaces.ITaskStore.dispatch`.
        """
        return self._run(self._dispatch, task_id, attempt, worker, started_at)

    def _dispatch(self, task_id, attempt, worker, started_at):
        self._check_open()
        row = self._rows.get(task_id)
        if row is None or row.state != "queued":
            return False
        self._update(row, state="running", attempts=attempt, worker=worker,
                     started_at=started_at)
        return True

    def finish(self, task_id, attempt, state, result, error, finished_at):
        """
        See :meth:`taskbroker.interfaces.ITaskStore.finish`.

        :raises ValueError: (through the ``Deferred``) if ``state`` is not
            ``"succeeded"`` or ``"failed"``.
        """
        return self._run(self._finish, task_id, attempt, state, result,
                         error, finished_at)

    def _finish(self, task_id, attempt, state, result, error, finished_at):
        if state not in ("succeeded", "failed"):
            raise ValueError(
                "a finished task's state must be 'succeeded' or 'failed', "
                f"not {state!r}"
            )
        self._check_open()
        row = self._rows.get(task_id)
        if row is None or row.state != "running" or row.attempts != attempt:
            return False
        self._update(row, state=state, result=result, error=error,
                     finished_at=finished_at)
        return True

    def requeue(self, task_id, attempt):
        """
        See :meth:`taskbroker.interfaces.ITaskStore.requeue`.
        """
        return self._run(self._requeue, task_id, attempt)

    def _requeue(self, task_id, attempt):
        self._check_open()
        row = self._rows.get(task_id)
        if row is None or row.state != "running" or row.attempts != attempt:
            return False
        self._update(row, state="queued")
        return True

    def cancel(self, task_id, finished_at):
        """
        See :meth:`taskbroker.interfaces.ITaskStore.cancel`.
        """
        return self._run(self._cancel, task_id, finished_at)

    def _cancel(self, task_id, finished_at):
        self._check_open()
        row = self._rows.get(task_id)
        if row is not None and row.state == "queued":
            row = self._update(row, state="cancelled", error="cancelled",
                               finished_at=finished_at)
        return row

    def fix(self, task_id, priority, max_attempts):
        """
        See :meth:`taskbroker.interfaces.ITaskStore.fix`.
        """
        return self._run(self._fix, task_id, priority, max_attempts)

    def _fix(self, task_id, priority, max_attempts):
        self._check_open()
        row = self._rows.get(task_id)
        if row is not None:
            self._update(
                row,
                priority=row.priority if row.priority is not None else priority,
                max_attempts=(row.max_attempts if row.max_attempts is not None
                              else max_attempts),
            )

    def reject(self, task_id, error, finished_at):
        """
        See :meth:`taskbroker.interfaces.ITaskStore.reject`.
        """
        return self._run(self._reject, task_id, error, finished_at)

    def _reject(self, task_id, error, finished_at):
        self._check_open()
        row = self._rows.get(task_id)
        if row is not None and row.state == "queued":
            self._update(row, state="failed", error=error,
                         finished_at=finished_at)

    def get(self, task_id):
        """
        See :meth:`taskbroker.interfaces.ITaskStore.get`.
        """
        return self._run(self._get, task_id)

    def _get(self, task_id):
        self._check_open()
        return self._rows.get(task_id)

    def list(self, state, handler, after_id, limit):
        """
        See :meth:`taskbroker.interfaces.ITaskStore.list`.
        """
        return self._run(self._select, state, handler, after_id, limit)

    def queued(self, after_id, limit):
        """
        See :meth:`taskbroker.interfaces.ITaskStore.queued`.
        """
        return self._run(self._select, "queued", None, after_id, limit)

    def running(self):
        """
        See :meth:`taskbroker.interfaces.ITaskStore.running`.
        """
        return self._run(self._select, "running", None, 0, None)

    def _select(self, state, handler, after_id, limit):
        self._check_open()
        rows = []
        for row in self._rows.values():
            if limit is not None and len(rows) >= limit:
                break
            if (row.id > after_id
                    and (state is None or row.state == state)
                    and (handler is None or row.handler == handler)):
                rows.append(row)
        return rows

    def counts(self):
        """
        See :meth:`taskbroker.interfaces.ITaskStore.counts`.
        """
        return self._run(self._counts)

    def _counts(self):
        self._check_open()
        counts = {}
        for row in self._rows.values():
            key = (row.state, row.priority)
            counts[key] = counts.get(key, 0) + 1
        return counts
