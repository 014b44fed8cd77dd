# -*- test-case-name: tests.unit.test_store -*-
"""
A task store in memory, for tests: the same contract as the SQLite store,
with every ``Deferred`` already fired, so that tests of code that uses a
store can run without a reactor or a disk.

Public through :mod:`taskbroker.testing`.
"""

import sqlite3

from twisted.internet import defer
from twisted.internet.task import Clock
from zope.interface import implementer

from taskbroker.errors import StoreError, WriteRefused
from taskbroker.interfaces import IQueueReads, ITaskStore
from taskbroker.store import (
    FINAL_STATES,
    LIVE_STATES,
    Submitted,
    TaskRow,
    check_request_ids,
    up_to_size,
)
from taskbroker.store.claims import OwnerClaims

__all__ = ["MemoryStore"]


@implementer(ITaskStore, IQueueReads)
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

    #: Writes in memory do not fail; see
    #: :attr:`taskbroker.interfaces.ITaskStore.write_error`.
    write_error = None

    def __init__(self, clock=None):
        self._clock = Clock() if clock is None else clock
        # Insertion order is id order, because ids only grow.
        self._rows = {}
        self._last_id = 0
        self._open = False
        # The database's indexes: unique_key -> id of the live (queued or
        # running) task that holds it, and request_id -> ids, in order.
        self._live_keys = {}
        self._by_request = {}
        # The schedules table, by name, and the settings of a database
        # created at the newest schema version.
        self._schedules = {}
        self._settings = {"default_keep_finished": "7d"}

    def __repr__(self):
        state = "open" if self._open else "closed"
        return f"<MemoryStore {len(self._rows)} tasks {state}>"

    def insert_external(
        self,
        handler,
        payload="null",
        priority=None,
        max_attempts=None,
        run_at=None,
        unique_key=None,
        time_limit=None,
        submitter=None,
    ):
        """
        Add a row the way another program's ``INSERT INTO tasks (handler,
        payload, priority) VALUES (...)`` would: every other column takes
        its SQL default.  Works whether or not the store is open.

        :param str handler: the handler name.
        :param str payload: JSON text (or anything, to test validation).
        :param priority: a priority name, or ``None`` for the default.
        :param max_attempts: an ``int``, or ``None`` for the default.
        :param run_at: a Unix time, or ``None``.
        :param unique_key: a ``str``, or ``None``.
        :param time_limit: seconds, or ``None``.
        :param submitter: a client's public key (Z85 text), or ``None``.
        :returns: the new :class:`taskbroker.store.TaskRow`.
        :raises sqlite3.IntegrityError: as SQLite would, if a queued or
            running task already holds ``unique_key``; nothing is inserted
            then.
        """
        return self._insert(
            handler,
            payload,
            priority,
            max_attempts,
            self._clock.seconds(),
            run_at=run_at,
            unique_key=unique_key,
            time_limit=time_limit,
            submitter=submitter,
        )

    def _insert(
        self,
        handler,
        payload,
        priority,
        max_attempts,
        created_at,
        run_at=None,
        unique_key=None,
        request_id=None,
        time_limit=None,
        worker=None,
        submitter=None,
    ):
        dispatched = worker is not None
        row = TaskRow(
            id=self._last_id + 1,
            handler=handler,
            payload=payload,
            priority=priority,
            state="running" if dispatched else "queued",
            attempts=int(dispatched),
            max_attempts=max_attempts,
            worker=worker,
            created_at=created_at,
            started_at=created_at if dispatched else None,
            finished_at=None,
            result=None,
            error=None,
            run_at=run_at,
            unique_key=unique_key,
            request_id=request_id,
            token=int(dispatched),
            time_limit=time_limit,
            traceback=None,
            submitter=submitter,
        )
        self._index(None, row)
        self._last_id = row.id
        self._rows[row.id] = row
        if request_id is not None:
            self._by_request.setdefault(request_id, []).append(row.id)
        return row

    def _update(self, row, **changes):
        new = row._replace(**changes)
        self._index(row, new)
        self._rows[row.id] = new
        return new

    def _index(self, old, new):
        """
        Keep the unique index of live keys as SQLite's
        ``tasks_live_unique_key`` would, refusing a change that breaks it.
        """
        key = new.unique_key if new.state in LIVE_STATES else None
        if key is not None and self._live_keys.get(key, new.id) != new.id:
            raise sqlite3.IntegrityError(
                "UNIQUE constraint failed: tasks.unique_key"
            )
        if (
            old is not None
            and old.unique_key is not None
            and old.state in LIVE_STATES
        ):
            del self._live_keys[old.unique_key]
        if key is not None:
            self._live_keys[key] = new.id

    def _live_with_key(self, unique_key):
        task_id = self._live_keys.get(unique_key)
        return None if task_id is None else self._rows[task_id]

    def _check_open(self):
        if not self._open:
            raise StoreError("memory store is not open")

    def claims(self, broker_id):
        """
        See :meth:`taskbroker.interfaces.ITaskStore.claims`: one broker
        owns this store at a time, so its claims are trivial.
        """
        return OwnerClaims(self)

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

    def when_lost(self):
        """
        See :meth:`taskbroker.interfaces.ITaskStore.when_lost`: memory is
        never lost, so this never fires.
        """
        return defer.Deferred()

    def check(self):
        """
        See :meth:`taskbroker.interfaces.ITaskStore.check`: nothing to
        check.
        """
        return self._run(self._check_open)

    def submit(self, tasks):
        """
        See :meth:`taskbroker.interfaces.ITaskStore.submit`.
        """
        if not self._open:
            return defer.fail(StoreError("memory store is not open"))
        tasks = list(tasks)
        try:
            request_id = check_request_ids(tasks)
        except Exception as e:
            return defer.fail(e)
        for task in tasks:
            # The SQLite store refuses NULLs here through NOT NULL columns.
            if task.handler is None or task.payload is None:
                return defer.fail(
                    WriteRefused(
                        "submit failed: handler and payload must not be None"
                    )
                )
        if request_id in self._by_request:
            return defer.succeed(
                [
                    Submitted(self._rows[task_id], False)
                    for task_id in self._by_request[request_id]
                ]
            )
        submitted = []
        for task in tasks:
            live = (
                None
                if task.unique_key is None
                else self._live_with_key(task.unique_key)
            )
            if live is not None:
                submitted.append(Submitted(live, False))
                continue
            row = self._insert(
                task.handler,
                task.payload,
                task.priority,
                task.max_attempts,
                task.created_at,
                run_at=task.run_at,
                unique_key=task.unique_key,
                request_id=task.request_id,
                time_limit=task.time_limit,
                worker=task.worker,
                submitter=task.submitter,
            )
            submitted.append(Submitted(row, True))
        return defer.succeed(submitted)

    @staticmethod
    def _run(function, *args):
        # Turns the synchronous methods below into the Deferred contract.
        try:
            return defer.succeed(function(*args))
        except sqlite3.IntegrityError as e:
            # What the SQLite store makes of a constraint that refused a
            # write.
            return defer.fail(
                WriteRefused(f"{function.__name__.lstrip('_')} failed: {e}")
            )
        except Exception as e:
            return defer.fail(e)

    def dispatch(
        self,
        task_id,
        token,
        worker,
        started_at,
        priority=None,
        max_attempts=None,
    ):
        """
        See :meth:`taskbroker.interfaces.ITaskStore.dispatch`.
        """
        return self._run(
            self._dispatch,
            task_id,
            token,
            worker,
            started_at,
            priority,
            max_attempts,
        )

    def _dispatch(
        self, task_id, token, worker, started_at, priority, max_attempts
    ):
        self._check_open()
        row = self._rows.get(task_id)
        if row is None or row.state != "queued" or row.token + 1 != token:
            return False
        self._update(
            row,
            state="running",
            token=token,
            attempts=row.attempts + 1,
            worker=worker,
            started_at=started_at,
            finished_at=None,
            progress=None,
            progress_message=None,
            progress_at=None,
            priority=row.priority if row.priority is not None else priority,
            max_attempts=(
                row.max_attempts
                if row.max_attempts is not None
                else max_attempts
            ),
        )
        return True

    def progress(self, task_id, token, fraction, message, at):
        """
        See :meth:`taskbroker.interfaces.ITaskStore.progress`.
        """
        return self._run(self._progress, task_id, token, fraction, message, at)

    def _progress(self, task_id, token, fraction, message, at):
        self._check_open()
        row = self._rows.get(task_id)
        if row is None or row.state != "running" or row.token != token:
            return False
        self._update(
            row, progress=fraction, progress_message=message, progress_at=at
        )
        return True

    def finish(
        self, task_id, token, state, result, error, traceback, finished_at
    ):
        """
        See :meth:`taskbroker.interfaces.ITaskStore.finish`.

        :raises ValueError: (through the ``Deferred``) if ``state`` is not
            ``"succeeded"``, ``"failed"`` or ``"cancelled"``.
        """
        return self._run(
            self._finish,
            task_id,
            token,
            state,
            result,
            error,
            traceback,
            finished_at,
        )

    def _finish(
        self, task_id, token, state, result, error, traceback, finished_at
    ):
        if state not in FINAL_STATES:
            raise ValueError(
                "a finished task's state must be 'succeeded', 'failed' or "
                f"'cancelled', not {state!r}"
            )
        self._check_open()
        row = self._running_with(task_id, token)
        if row is None:
            return False
        self._update(
            row,
            state=state,
            result=result,
            error=error,
            traceback=traceback,
            finished_at=finished_at,
        )
        return True

    def requeue(
        self,
        task_id,
        token,
        run_at=None,
        error=None,
        traceback=None,
        consumed=True,
    ):
        """
        See :meth:`taskbroker.interfaces.ITaskStore.requeue`.
        """
        return self._run(
            self._requeue, task_id, token, run_at, error, traceback, consumed
        )

    def _requeue(self, task_id, token, run_at, error, traceback, consumed):
        self._check_open()
        row = self._running_with(task_id, token)
        if row is None:
            return False
        attempts = row.attempts if consumed else max(row.attempts - 1, 0)
        self._update(
            row,
            state="queued",
            run_at=run_at,
            error=error,
            traceback=traceback,
            attempts=attempts,
        )
        return True

    def _running_with(self, task_id, token):
        """
        :returns: the task's row if it is running with that token, else
            ``None``.
        """
        row = self._rows.get(task_id)
        if row is None or row.state != "running" or row.token != token:
            return None
        return row

    def cancel(self, task_id, finished_at):
        """
        See :meth:`taskbroker.interfaces.ITaskStore.cancel`.
        """
        return self._run(self._cancel, task_id, finished_at)

    def _cancel(self, task_id, finished_at):
        self._check_open()
        row = self._rows.get(task_id)
        if row is not None and row.state in LIVE_STATES:
            row = self._update(
                row,
                state="cancelled",
                error="cancelled",
                finished_at=finished_at,
            )
        return row

    def retry(self, task_id):
        """
        See :meth:`taskbroker.interfaces.ITaskStore.retry`.
        """
        return self._run(self._retry, task_id)

    def _retry(self, task_id):
        self._check_open()
        row = self._rows.get(task_id)
        if (
            row is not None
            and row.state in ("failed", "cancelled")
            and (
                row.unique_key is None
                or self._live_with_key(row.unique_key) is None
            )
        ):
            row = self._update(
                row,
                state="queued",
                attempts=0,
                run_at=None,
                finished_at=None,
                result=None,
                error=None,
                traceback=None,
            )
        return row

    def reject(self, task_id, error, finished_at):
        """
        See :meth:`taskbroker.interfaces.ITaskStore.reject`.
        """
        return self._run(self._reject, task_id, error, finished_at)

    def _reject(self, task_id, error, finished_at):
        self._check_open()
        row = self._rows.get(task_id)
        if row is not None and row.state == "queued":
            self._update(
                row, state="failed", error=error, finished_at=finished_at
            )

    def reject_group(self, handler, priority, error, finished_at):
        """
        See :meth:`taskbroker.interfaces.ITaskStore.reject_group`.
        """

        def reject():
            rows = [
                row
                for row in self._select("queued", handler, 0, None)
                if row.priority == priority
            ]
            for row in rows:
                self._reject(row.id, error, finished_at)
            return len(rows)

        return self._run(reject)

    def get(self, task_id):
        """
        See :meth:`taskbroker.interfaces.ITaskStore.get`.
        """
        return self._run(self._get, task_id)

    def _get(self, task_id):
        self._check_open()
        return self._rows.get(task_id)

    def list(
        self,
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
        """
        See :meth:`taskbroker.interfaces.ITaskStore.list`.
        """

        def listed():
            rows = [
                row
                for row in self._select(
                    state, handler, after_id, None, submitter
                )
                if (priority is None or row.priority == priority)
                and (before_id is None or row.id < before_id)
            ]
            if newest_first:
                rows.reverse()
            return up_to_size(rows[:limit], max_bytes)

        return self._run(listed)

    def scan_queued(self, after_id, limit, known):
        """
        See :meth:`taskbroker.interfaces.IQueueReads.scan_queued`.
        """

        def scan():
            rows = self._select("queued", None, after_id, limit)
            return (
                [row for row in rows if row.id not in known],
                rows[-1].id if rows else after_id,
            )

        return self._run(scan)

    def queued_groups(self):
        """
        See :meth:`taskbroker.interfaces.IQueueReads.queued_groups`.
        """

        def groups():
            queued = self._select("queued", None, 0, None)
            pairs = {(row.handler, row.priority) for row in queued}
            # SQLite's order: NULL first, then numbers, text, blobs.
            return (
                sorted(pairs, key=lambda pair: (pair[0], _order(pair[1]))),
                queued[-1].id if queued else 0,
            )

        return self._run(groups)

    def queued_window(self, handler, priorities, after_id, limit, now):
        """
        See :meth:`taskbroker.interfaces.IQueueReads.queued_window`.
        """

        def window():
            rows = [
                row
                for row in self._select("queued", handler, after_id, None)
                if row.priority in priorities
                and (
                    row.run_at is None
                    or not isinstance(row.run_at, (int, float))
                    or row.run_at <= now
                )
            ]
            return rows[:limit]

        return self._run(window)

    def delayed_window(self, after, limit):
        """
        See :meth:`taskbroker.interfaces.IQueueReads.delayed_window`.
        """

        def window():
            rows = sorted(
                (
                    row
                    for row in self._select("queued", None, 0, None)
                    if isinstance(row.run_at, (int, float))
                    and (row.run_at, row.id) > tuple(after)
                ),
                key=lambda row: (row.run_at, row.id),
            )
            return rows[:limit]

        return self._run(window)

    def running(self):
        """
        See :meth:`taskbroker.interfaces.IQueueReads.running`.
        """
        return self._run(self._select, "running", None, 0, None)

    def _select(self, state, handler, after_id, limit, submitter=None):
        self._check_open()
        rows = []
        for row in self._rows.values():
            if limit is not None and len(rows) >= limit:
                break
            if (
                row.id > after_id
                and (state is None or row.state == state)
                and (handler is None or row.handler == handler)
                and (submitter is None or row.submitter == submitter)
            ):
                rows.append(row)
        return rows

    def counts(self, now):
        """
        See :meth:`taskbroker.interfaces.ITaskStore.counts`.
        """
        return self._run(self._counts, now)

    def _counts(self, now):
        self._check_open()
        counts = {}
        for row in self._rows.values():
            delayed = (
                row.state == "queued"
                and row.run_at is not None
                and row.run_at > now
            )
            key = (row.state, row.priority, row.handler, delayed)
            counts[key] = counts.get(key, 0) + 1
        return counts

    # Schedules, retention and settings

    def add_schedule(self, row, replace=False):
        """
        See :meth:`taskbroker.interfaces.ITaskStore.add_schedule`.
        """

        def add():
            if (row.every is None) == (row.cron is None):
                # The schedules table's CHECK constraint "timing".
                raise sqlite3.IntegrityError("CHECK constraint failed: timing")
            if row.name in self._schedules and not replace:
                return False
            self._schedules[row.name] = row
            return True

        return self._run_open(add)

    def schedules(self, names=None):
        """
        See :meth:`taskbroker.interfaces.ITaskStore.schedules`.
        """
        return self._run_open(
            lambda: [
                self._schedules[name]
                for name in sorted(self._schedules)
                if names is None or name in names
            ]
        )

    def remove_schedule(self, name):
        """
        See :meth:`taskbroker.interfaces.ITaskStore.remove_schedule`.
        """
        return self._run_open(
            lambda: self._schedules.pop(name, None) is not None
        )

    def pause_schedule(self, name, paused, next_tick):
        """
        See :meth:`taskbroker.interfaces.ITaskStore.pause_schedule`.
        """

        def pause():
            row = self._schedules.get(name)
            if row is None or row.paused == paused:
                return row
            changes = {"paused": paused}
            if not paused:
                changes["next_tick"] = next_tick
            row = self._schedules[name] = row._replace(**changes)
            return row

        return self._run_open(pause)

    def due_schedules(self, now, limit):
        """
        See :meth:`taskbroker.interfaces.ITaskStore.due_schedules`.
        """
        return self._run_open(
            lambda: sorted(
                (
                    row
                    for row in self._schedules.values()
                    if not row.paused and row.next_tick <= now
                ),
                key=lambda row: row.next_tick,
            )[:limit]
        )

    def fire_schedule(self, name, tick, next_tick, task, skip_if_running):
        """
        See :meth:`taskbroker.interfaces.ITaskStore.fire_schedule`.
        """

        def fire():
            row = self._schedules.get(name)
            if row is None or row.paused or row.next_tick != tick:
                return ("gone", None)
            row = self._schedules[name] = row._replace(
                next_tick=next_tick, last_tick=tick
            )
            previous = self._rows.get(row.last_task_id)
            if (
                skip_if_running
                and previous is not None
                and previous.state in LIVE_STATES
            ):
                return ("skipped", None)
            live = self._live_with_key(task.unique_key)
            if live is not None:
                created = live
            else:
                created = self._insert(
                    task.handler,
                    task.payload,
                    task.priority,
                    task.max_attempts,
                    task.created_at,
                    unique_key=task.unique_key,
                    time_limit=task.time_limit,
                    submitter=task.submitter,
                )
            self._schedules[name] = row._replace(last_task_id=created.id)
            return ("existing" if live is not None else "enqueued", created)

        return self._run_open(fire)

    def purge(
        self,
        finished_before,
        states=FINAL_STATES,
        handler=None,
        submitter=None,
        limit=500,
    ):
        """
        See :meth:`taskbroker.interfaces.ITaskStore.purge`.
        """

        def purge():
            chosen = sorted(
                (
                    row
                    for row in self._rows.values()
                    if row.state in FINAL_STATES
                    and row.state in states
                    and row.finished_at is not None
                    and row.finished_at < finished_before
                    and (handler is None or row.handler == handler)
                    and (submitter is None or row.submitter == submitter)
                ),
                key=lambda row: row.finished_at,
            )[:limit]
            for row in chosen:
                del self._rows[row.id]
            return [(row.priority, row.handler, row.state) for row in chosen]

        return self._run_open(purge)

    def count(self, state, handler=None, submitter=None):
        """
        See :meth:`taskbroker.interfaces.ITaskStore.count`.
        """
        return self._run_open(
            lambda: sum(
                1
                for row in self._rows.values()
                if row.state == state
                and (handler is None or row.handler == handler)
                and (submitter is None or row.submitter == submitter)
            )
        )

    def setting(self, name):
        """
        See :meth:`taskbroker.interfaces.ITaskStore.setting`.
        """
        return self._run_open(lambda: self._settings.get(name))

    def _run_open(self, function):
        # Checked open inside _run, as the other methods are.
        def checked():
            self._check_open()
            return function()

        checked.__name__ = function.__name__
        return self._run(checked)


def _order(value):
    if value is None:
        return (0,)
    if isinstance(value, (int, float)):
        return (1, value)
    if isinstance(value, str):
        return (2, value)
    return (3, value)
