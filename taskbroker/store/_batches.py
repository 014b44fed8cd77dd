# -*- test-case-name: tests.unit.test_store_contract -*-
"""
Group commit, shared by the stores that keep a database connection in a
thread of their own (SQLite, PostgreSQL): every write issued in a reactor
turn (and every write issued while a transaction is running) goes into
one transaction, so the broker pays for one commit per batch, not one per
task; a failed transaction fails its writes, and the store then tries an
empty write now and then until one commits.
"""

from types import ModuleType

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from taskbroker.errors import StoreError, StoreLost, one_line
from taskbroker.store import FINAL_STATES, check_request_ids
from taskbroker.store._sqlite_threads import Event

log = Logger()

#: After a write transaction failed, seconds until the store tries an
#: empty one, so that it finds out by itself when writes work again (see
#: :attr:`taskbroker.interfaces.ITaskStore.write_error`).
WRITE_PROBE_INTERVAL = 5.0

#: Transactions queued to the database thread at once.  Two let the next
#: batch start as soon as one commits, without waiting for the reactor to
#: hear of it; the store's single thread still runs them in order.
PIPELINE_DEPTH = 2


class BatchedStore:
    """
    The writes and reads of :class:`taskbroker.interfaces.ITaskStore` on
    a connection thread.  A subclass sets ``_sql`` (the module of its
    statements: ``touch``, ``submit``, ``dispatch``, ..., ``get``,
    ``list_tasks`` and ``counts``), ``_label`` (the database, as messages
    name it), ``_commit``, and ``_open_unguarded`` and ``_shut_down``,
    which start and stop ``_thread`` and ``_counter`` (its
    :class:`~taskbroker.store._sqlite_threads.ConnectionThread` objects for
    writes and for counts); it calls :meth:`_init_batches` in its
    ``__init__``, and its ``open`` and ``close`` return ``_open()`` and
    ``_close()`` as ``Deferred`` objects.
    """

    # The module of the backend's SQL (a subclass sets it).
    _sql: ModuleType | None = None
    _pipeline_depth = PIPELINE_DEPTH

    def _init_batches(self):
        # "new" -> "opening" -> "open" -> "closing" -> "closed"; a failed
        # open goes back to "closed", and a closed store may be opened again.
        self._state = "new"
        self._thread = None
        self._counter = None
        self._idle = Event()
        self._opened = Event()
        self._closed = Event()
        self.transactions = 0
        self.write_error = None
        self._lost = None
        self._probe_call = None
        # Group commit: (operation, args, Deferred) waiting for a flush.
        self._pending = []
        self._flush_call = None
        # Transactions handed to the threads and not yet reported back,
        # in all and by writer thread.
        self._flushing = 0
        self._in_flight = {}
        self._reads = 0

    # Opening and closing: the subclass's _open_unguarded connects (and
    # _shut_down undoes it, and never fails); _interrupt stops what need
    # not be waited for.

    async def _open(self):
        if self._state not in ("new", "closed"):
            raise StoreError(
                f"database {self._label} is already {self._state}"
            )
        self._state = "opening"
        self._lost = None
        try:
            await self._open_unguarded()
        except BaseException:
            self._state = "closed"
            raise
        else:
            self._state = "open"
        finally:
            self._opened.fire()

    async def _close(self):
        if self._state == "opening":
            await self._opened.wait()
        if self._state == "closing":
            await self._closed.wait()
            return
        if self._state != "open":
            return
        self._state = "closing"
        self._stop_probing()
        self._interrupt()
        if self._busy():
            await self._idle.wait()
        await self._shut_down()
        self._state = "closed"
        log.info("closed database {path}", path=self._label)
        self._closed.fire()

    def _interrupt(self):
        pass

    def _commit(self, connection, operations):
        """
        Run a group of writes in one transaction; runs in the store's
        thread.

        :returns: for each operation, ``(True, result)`` or ``(False,
            error)``.
        """
        raise NotImplementedError()

    def _commit_here(self, operations):
        """
        Commit a group of writes in the reactor's thread, now, where that
        is cheaper than a round trip to the store's thread and short
        enough not to hold up the reactor.

        :returns: ``(True, outcomes)`` as :meth:`_commit`'s, or ``(False,
            None)`` to commit in the store's thread instead (always, here).
        """
        return False, None

    def _read_here(self, query, args):
        """
        Run a read in the reactor's thread, now, where it is one row by
        its key (see :meth:`_commit_here`).

        :returns: ``(True, result)``, or ``(False, None)`` to read in the
            store's thread instead (always, here).
        """
        return False, None

    def _lose(self, error):
        raise NotImplementedError()

    # Group commit

    def _write(self, operation, *args):
        """
        Queue a write for the next group commit.

        :returns: a ``Deferred`` firing with the operation's result after
            the transaction that ran it committed.
        """
        if self._state != "open":
            return defer.fail(self._not_open())
        if self._lost is not None:
            return defer.fail(self._lost)
        d = defer.Deferred()
        self._pending.append((operation, args, d))
        self._schedule_flush()
        return d

    def _schedule_flush(self):
        if (
            self._pending
            and self._flush_call is None
            and self._free_writer() is not None
        ):
            # callLater(0) rather than flushing now: every write issued in
            # this reactor turn joins the same transaction.
            self._flush_call = self._reactor.callLater(0, self._flush)

    def _flush(self):
        self._flush_call = None
        batch, self._pending = self._pending, []
        if self._lost is not None:
            for _, _, d in batch:
                d.errback(Failure(self._lost))
            self._after_work()
            return
        self.transactions += 1
        operations = [(operation, args) for operation, args, _ in batch]
        self._flushing += 1
        try:
            done_here, outcomes = self._commit_here(operations)
        except BaseException:
            self._flush_failed(Failure(), batch)
            return
        if done_here:
            self._flushed(outcomes, batch)
            return
        writer = self._free_writer()
        d = writer.run(self._commit, operations)
        self._in_flight[writer] = self._in_flight.get(writer, 0) + 1

        def done(result):
            self._in_flight[writer] -= 1
            return result

        d.addBoth(done)
        d.addCallbacks(
            self._flushed,
            self._flush_failed,
            callbackArgs=(batch,),
            errbackArgs=(batch,),
        )

    def _writers(self):
        """
        The connection threads that commit batches: ``_thread`` alone,
        unless a subclass has several.
        """
        return (self._thread,)

    def _free_writer(self):
        """
        The writer with the fewest transactions under way, if it can take
        one more (``_pipeline_depth`` each), else ``None``.
        """
        writer = min(
            self._writers(), key=lambda writer: self._in_flight.get(writer, 0)
        )
        if self._in_flight.get(writer, 0) < self._pipeline_depth:
            return writer
        return None

    def _flushed(self, outcomes, batch):
        self._flushing -= 1
        if self.write_error is not None:
            self.write_error = None
            self._stop_probing()
            log.info("writes to database {path} work again", path=self._label)
        for (_, _, d), (ok, value) in zip(batch, outcomes):
            if ok:
                d.callback(value)
            else:
                d.errback(Failure(value))
        self._after_work()

    def _flush_failed(self, reason, batch):
        self._flushing -= 1
        error = reason.value
        if not isinstance(error, StoreLost):
            log.error(
                "write transaction of {count} operations on {path} "
                "failed: {error}",
                count=len(batch),
                path=self._label,
                error=one_line(error),
            )
            wrapped = StoreError(
                f"database {self._label}: transaction failed: "
                f"{one_line(error)}"
            )
            wrapped.__cause__ = error
            self.write_error = one_line(wrapped)
            self._start_probing()
            error = wrapped
        for _, _, d in batch:
            d.errback(Failure(error))
        if isinstance(error, StoreLost):
            self._lose(error)
        self._after_work()

    def _start_probing(self):
        """
        Try an empty write transaction in a while, and again after each
        that fails, until one commits: without it, a broker with nothing
        to write would report a passing trouble for ever.
        """
        if self._probe_call is None and self._state == "open":
            self._probe_call = self._reactor.callLater(
                WRITE_PROBE_INTERVAL, self._probe
            )

    def _probe(self):
        self._probe_call = None
        # Its failure is recorded, and the next probe scheduled, by
        # _flush_failed.
        self._write(self._sql.touch).addErrback(lambda _: None)

    def _stop_probing(self):
        if self._probe_call is not None:
            call, self._probe_call = self._probe_call, None
            call.cancel()

    def _busy(self):
        return bool(
            self._pending
            or self._flush_call is not None
            or self._flushing
            or self._reads
        )

    def _after_work(self):
        self._schedule_flush()
        if not self._busy():
            self._idle.fire()

    # Reads

    def _read(self, query, *args, thread=None):
        if self._state != "open":
            return defer.fail(self._not_open())
        self._reads += 1
        d = None
        if thread is None:
            try:
                done_here, result = self._read_here(query, args)
            except Exception:
                d = defer.fail()
            else:
                if done_here:
                    d = defer.succeed(result)
        if d is None:
            d = (thread or self._thread).run(query, *args)
        d.addErrback(self._read_failed)
        d.addBoth(self._read_done)
        return d

    def _read_failed(self, reason):
        if reason.check(StoreError):
            return reason
        error = StoreError(
            f"database {self._label}: read failed: {one_line(reason.value)}"
        )
        error.__cause__ = reason.value
        return Failure(error)

    def _read_done(self, result):
        self._reads -= 1
        self._after_work()
        return result

    def _not_open(self):
        return StoreError(
            f"database {self._label} is not open ({self._state})"
        )

    # ITaskStore

    def submit(self, tasks):
        """
        See :meth:`taskbroker.interfaces.ITaskStore.submit`.
        """
        tasks = list(tasks)
        try:
            check_request_ids(tasks)
        except Exception as e:
            return defer.fail(e)
        if not tasks and self._state == "open":
            return defer.succeed([])
        return self._write(self._sql.submit, tasks)

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
        return self._write(
            self._sql.dispatch,
            task_id,
            token,
            worker,
            started_at,
            priority,
            max_attempts,
        )

    def progress(self, task_id, token, fraction, message, at):
        """
        See :meth:`taskbroker.interfaces.ITaskStore.progress`.
        """
        return self._write(
            self._sql.progress, task_id, token, fraction, message, at
        )

    def finish(
        self, task_id, token, state, result, error, traceback, finished_at
    ):
        """
        See :meth:`taskbroker.interfaces.ITaskStore.finish`.

        :raises ValueError: (through the ``Deferred``) if ``state`` is not
            ``"succeeded"``, ``"failed"`` or ``"cancelled"``.
        """
        if state not in FINAL_STATES:
            return defer.fail(_bad_final_state(state))
        return self._write(
            self._sql.finish,
            task_id,
            token,
            state,
            result,
            error,
            traceback,
            finished_at,
        )

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
        return self._write(
            self._sql.requeue,
            task_id,
            token,
            run_at,
            error,
            traceback,
            bool(consumed),
        )

    def cancel(self, task_id, finished_at):
        """
        See :meth:`taskbroker.interfaces.ITaskStore.cancel`.
        """
        return self._write(self._sql.cancel, task_id, finished_at)

    def retry(self, task_id):
        """
        See :meth:`taskbroker.interfaces.ITaskStore.retry`.
        """
        return self._write(self._sql.retry, task_id)

    def reject(self, task_id, error, finished_at):
        """
        See :meth:`taskbroker.interfaces.ITaskStore.reject`.
        """
        return self._write(self._sql.reject, task_id, error, finished_at)

    def reject_group(self, handler, priority, error, finished_at):
        """
        See :meth:`taskbroker.interfaces.ITaskStore.reject_group`.
        """
        return self._write(
            self._sql.reject_group, handler, priority, error, finished_at
        )

    def get(self, task_id):
        """
        See :meth:`taskbroker.interfaces.ITaskStore.get`.
        """
        return self._read(self._sql.get, task_id)

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
        return self._read(
            self._sql.list_tasks,
            state,
            handler,
            after_id,
            limit,
            max_bytes,
            submitter,
            priority,
            before_id,
            newest_first,
        )

    def counts(self, now):
        """
        See :meth:`taskbroker.interfaces.ITaskStore.counts`.  It reads on
        a connection of its own, so a large table's count does not hold up
        the broker's commits.
        """
        return self._read(self._sql.counts, now, thread=self._counter)

    # Schedules, retention and settings

    def add_schedule(self, row, replace=False):
        """
        See :meth:`taskbroker.interfaces.ITaskStore.add_schedule`.
        """
        return self._write(self._sql.add_schedule, row, replace)

    def schedules(self, names=None):
        """
        See :meth:`taskbroker.interfaces.ITaskStore.schedules`.
        """
        return self._read(
            self._sql.schedules, None if names is None else list(names)
        )

    def remove_schedule(self, name):
        """
        See :meth:`taskbroker.interfaces.ITaskStore.remove_schedule`.
        """
        return self._write(self._sql.remove_schedule, name)

    def pause_schedule(self, name, paused, next_tick):
        """
        See :meth:`taskbroker.interfaces.ITaskStore.pause_schedule`.
        """
        return self._write(self._sql.pause_schedule, name, paused, next_tick)

    def due_schedules(self, now, limit):
        """
        See :meth:`taskbroker.interfaces.ITaskStore.due_schedules`.
        """
        return self._read(self._sql.due_schedules, now, limit)

    def fire_schedule(self, name, tick, next_tick, task, skip_if_running):
        """
        See :meth:`taskbroker.interfaces.ITaskStore.fire_schedule`.
        """
        return self._write(
            self._sql.fire_schedule,
            name,
            tick,
            next_tick,
            task,
            skip_if_running,
        )

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
        return self._write(
            self._sql.purge,
            finished_before,
            tuple(states),
            handler,
            submitter,
            limit,
        )

    def count(self, state, handler=None, submitter=None):
        """
        See :meth:`taskbroker.interfaces.ITaskStore.count`.
        """
        return self._read(
            self._sql.count, state, handler, submitter, thread=self._counter
        )

    def setting(self, name):
        """
        See :meth:`taskbroker.interfaces.ITaskStore.setting`.
        """
        return self._read(self._sql.setting, name)


def _bad_final_state(state):
    return ValueError(
        "a finished task's state must be 'succeeded', 'failed' or "
        f"'cancelled', not {state!r}"
    )
