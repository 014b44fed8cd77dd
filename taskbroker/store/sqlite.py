# -*- test-case-name: tests.unit.test_store -*-
"""
The SQLite task store: the broker's embedded, default database.

All SQLite work runs in one thread that owns the one connection, so
statements reach the database in the order they were issued and the reactor
thread never blocks on disk.  Writes are grouped: every write issued in a
reactor turn (and every write issued while a transaction is running) goes
into one transaction, so the broker pays for one commit per batch, not one
per task.
"""

import fcntl
import os
import queue
import sqlite3
import threading

from twisted.internet import defer, threads
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from taskbroker.errors import StoreError, StoreLocked, one_line
from taskbroker.interfaces import IQueueReads, ITaskStore
from taskbroker.store import (
    FINAL_STATES, Submitted, TaskRow, _schema, check_request_ids,
)
from taskbroker.store.claims import OwnerClaims

__all__ = ["SQLiteStore"]

log = Logger()

_SYNCHRONOUS = {"normal": "NORMAL", "full": "FULL"}

# In TaskRow's field order, so that TaskRow(*row) builds one.
_COLUMNS = (
    "id, handler, payload, priority, state, attempts, max_attempts, worker, "
    "created_at, started_at, finished_at, result, error, run_at, "
    "unique_key, request_id, token, time_limit, traceback"
)

# Errors that one operation's arguments can cause (a NULL in a NOT NULL
# column, a value sqlite3 cannot bind, a bug in the caller): they fail that
# operation alone.  Anything else (disk full, I/O error, a locked database)
# fails the whole transaction.
_OPERATION_ERRORS = (
    sqlite3.IntegrityError,
    sqlite3.InterfaceError,
    sqlite3.ProgrammingError,
    sqlite3.DataError,
    TypeError,
    ValueError,
    AttributeError,
    OverflowError,
)


class _ConnectionThread:
    """
    One thread that owns one ``sqlite3`` connection and runs functions on
    it, in the order they were handed over.

    What ``adbapi.ConnectionPool`` with one connection does, for the one
    pattern the store uses, at half the cost per call: a round trip to
    the thread and back took about 100 microseconds through the pool and
    its thread pool, and about 45 here (a queue, and ``callFromThread``).
    Every write of the broker pays it once per group commit.

    :param connect: called in the thread to make the connection.
    """

    def __init__(self, reactor, connect, name):
        self._reactor = reactor
        self._connect = connect
        self._queue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._work, name=name,
                                        daemon=True)
        self._stopped = None

    def start(self):
        """
        :returns: a ``Deferred`` firing with ``None`` once connected, or
            failing with the error of ``connect`` (the thread has ended
            then).
        """
        started = self.run(lambda connection: None)
        self._thread.start()
        # Only now: a thread that never started has nothing to stop.  It
        # reports through callFromThread, so not before this line.
        self._stopped = defer.Deferred()
        return started

    def run(self, function, *args):
        """
        :returns: a ``Deferred`` firing with ``function(connection,
            *args)``, called in the thread.
        """
        d = defer.Deferred()
        self._queue.put((function, args, d))
        return d

    def stop(self):
        """
        Close the connection (in the thread, after what was handed over
        before) and end the thread.

        :returns: a ``Deferred`` firing with ``None`` when it has ended.
        """
        if self._stopped is None:
            return defer.succeed(None)
        self._queue.put(None)
        return self._stopped

    def _work(self):
        call = self._reactor.callFromThread
        try:
            connection = self._connect()
        except BaseException:
            failure = Failure()
            _, _, d = self._queue.get()
            call(d.errback, failure)
            call(self._stopped.callback, None)
            return
        while True:
            item = self._queue.get()
            if item is None:
                break
            function, args, d = item
            try:
                result = function(connection, *args)
            except BaseException:
                call(d.errback, Failure())
            else:
                call(d.callback, result)
        try:
            connection.close()
        except BaseException:
            call(log.failure, "error closing the database connection",
                 Failure())
        call(self._stopped.callback, None)


class _IsolateOperations(Exception):
    """
    An operation failed on its own arguments: roll back and run the batch
    again with a savepoint around each operation.
    """


class _Event:
    """
    Something many callers can wait for; each gets its own ``Deferred``.
    """

    def __init__(self):
        self._waiters = []

    def wait(self):
        d = defer.Deferred()
        self._waiters.append(d)
        return d

    def fire(self):
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.callback(None)


#: Seconds between WAL checkpoints (see :class:`_Checkpointer`).
CHECKPOINT_INTERVAL = 1.0

#: Transactions queued to the database thread at once.  Two let the next
#: batch start as soon as one commits, without waiting for the reactor to
#: hear of it; the store's single thread still runs them in order.
PIPELINE_DEPTH = 2


@implementer(ITaskStore, IQueueReads)
class SQLiteStore:
    """
    An :class:`taskbroker.interfaces.ITaskStore` in a SQLite file.

    One broker owns the file at a time: :meth:`open` takes an exclusive
    ``flock`` on ``<path>.lock``, which the operating system releases when
    the owner exits, however it dies.  Other programs may still insert
    tasks with SQL (see ``schema/sqlite/v3.sql``); the database runs in WAL
    mode so that they and the broker's readers do not block each other.

    A read sees every write whose ``Deferred`` has fired; a write still
    waiting for its batch may or may not be visible to it.

    :param str path: the database file; created if missing, but its
        directory must exist.  A relative path is resolved when the store
        is opened.
    :param reactor: the reactor that hears from the store's thread and
        schedules group commits
        (:class:`twisted.internet.interfaces.IReactorCore` and
        :class:`~twisted.internet.interfaces.IReactorThreads`).
    :param str synchronous: SQLite's ``synchronous`` setting.
        ``"normal"`` (the default) syncs the disk at WAL checkpoints only:
        a crash of the process loses nothing, but a power cut may lose the
        last commits.  ``"full"`` syncs at every commit, which costs little
        here because commits are grouped.
    :param float busy_timeout: how long, in seconds, a statement waits for
        another program that holds the database's write lock before it
        fails.
    :ivar int transactions: how many write transactions (group commits)
        the store has started; for tests and metrics.
    """

    def __init__(self, path, reactor, synchronous="normal", busy_timeout=5.0):
        if synchronous not in _SYNCHRONOUS:
            raise ValueError(
                f"synchronous must be 'normal' or 'full', not {synchronous!r}"
            )
        self.path = path
        self.transactions = 0
        self._reactor = reactor
        self._synchronous = synchronous
        self._busy_timeout_ms = int(busy_timeout * 1000)
        # "new" -> "opening" -> "open" -> "closing" -> "closed"; a failed
        # open goes back to "closed", and a closed store may be opened again.
        self._state = "new"
        self._abspath = None
        self._lock_fd = None
        self._thread = None
        self._checkpointer = None
        self._journal_mode = None
        # Group commit: (operation, args, Deferred) waiting for a flush.
        self._pending = []
        self._flush_call = None
        # Transactions handed to the thread and not yet reported back.
        self._flushing = 0
        self._reads = 0
        self._idle = _Event()
        self._opened = _Event()
        self._closed = _Event()

    def __repr__(self):
        return f"<SQLiteStore {self.path!r} {self._state}>"

    # Opening and closing

    def claims(self, broker_id):
        """
        See :meth:`taskbroker.interfaces.ITaskStore.claims`: one broker
        owns this store at a time, so its claims are trivial.
        """
        return OwnerClaims(self)

    def open(self):
        """
        Take ownership of the database and create or upgrade its schema.

        :returns: a ``Deferred`` firing with ``None``, or failing with
            :class:`taskbroker.errors.StoreLocked` when another broker owns
            the database, or with :class:`taskbroker.errors.StoreError`
            (with a one-line message) when it cannot be used.
        """
        return defer.Deferred.fromCoroutine(self._open())

    async def _open(self):
        if self._state not in ("new", "closed"):
            raise StoreError(f"database {self.path} is already {self._state}")
        self._state = "opening"
        try:
            await self._open_unguarded()
        except BaseException:
            self._state = "closed"
            raise
        else:
            self._state = "open"
        finally:
            self._opened.fire()

    async def _open_unguarded(self):
        path = self._abspath = os.path.abspath(self.path)
        directory = os.path.dirname(path)
        if not os.path.isdir(directory):
            raise StoreError(
                f"cannot open database {path}: directory {directory} "
                "does not exist"
            )
        self._lock_fd = _lock(path)
        try:
            # One connection, one thread: writes reach SQLite in the order
            # they were issued, and never contend with each other.
            self._thread = _ConnectionThread(
                self._reactor, self._connect, "taskbroker-sqlite")
            await self._thread.start()
            old, new = await self._thread.run(_ensure_schema)
        except BaseException as e:
            await self._shut_down()
            # OSError: a schema file missing from a broken installation.
            if isinstance(e, (StoreError, sqlite3.Error, OSError)):
                raise StoreError(
                    f"cannot use database {path}: {one_line(e)}"
                ) from e
            raise
        if old is None:
            log.info("created database {path} at schema version {version}",
                     path=path, version=new)
        elif old != new:
            log.info("upgraded database {path} from schema version {old} "
                     "to {new}", path=path, old=old, new=new)
        if self._journal_mode != "wal":
            # WAL cannot be used on some file systems (network ones); the
            # store still works, but readers then block the broker's writes.
            log.warn("database {path} uses journal mode {journal_mode} "
                     "instead of WAL", path=path,
                     journal_mode=self._journal_mode)
        if self._journal_mode == "wal":
            self._checkpointer = _Checkpointer(
                path, self._reactor, self._busy_timeout_ms)
            self._checkpointer.start()
        log.info("opened database {path} (schema version {version}, "
                 "synchronous {synchronous})", path=path, version=new,
                 synchronous=self._synchronous)

    def checkpoint(self):
        """
        Copy the WAL's committed pages into the database file now (it is
        done every :data:`CHECKPOINT_INTERVAL` seconds anyway).

        :returns: a ``Deferred`` firing with SQLite's ``(busy, WAL frames,
            frames checkpointed)``, or ``None`` when not in WAL mode.
        """
        if self._checkpointer is None:
            return defer.succeed(None)
        return self._checkpointer.run()

    def _connect(self):
        """
        Open and set up the connection; runs in the store's thread.
        """
        connection = sqlite3.connect(
            self._abspath,
            check_same_thread=False,
            # Autocommit mode: we issue BEGIN and COMMIT ourselves, so that
            # a group of writes is one transaction and reads take no lock
            # beyond their own statement.
            isolation_level=None,
        )
        try:
            # First, so that switching to WAL waits for other programs.
            connection.execute(
                f"PRAGMA busy_timeout = {self._busy_timeout_ms:d}"
            )
            (mode,) = connection.execute("PRAGMA journal_mode = WAL").fetchone()
            # Checkpoints run on their own connection and thread (see
            # _Checkpointer), not inside whichever commit crosses the WAL's
            # size threshold.
            connection.execute("PRAGMA wal_autocheckpoint = 0")
            connection.execute(
                f"PRAGMA synchronous = {_SYNCHRONOUS[self._synchronous]}"
            )
        except BaseException:
            connection.close()
            raise
        self._journal_mode = str(mode).lower()
        return connection

    def close(self):
        """
        Wait for pending writes and reads, close the database and release
        ownership.  Writes and reads issued after this fail with
        :class:`taskbroker.errors.StoreError`.

        :returns: a ``Deferred`` firing with ``None``.  Safe to call twice,
            and before :meth:`open`.
        """
        return defer.Deferred.fromCoroutine(self._close())

    async def _close(self):
        if self._state == "opening":
            await self._opened.wait()
        if self._state == "closing":
            await self._closed.wait()
            return
        if self._state != "open":
            return
        self._state = "closing"
        if self._busy():
            await self._idle.wait()
        await self._shut_down()
        self._state = "closed"
        log.info("closed database {path}", path=self._abspath)
        self._closed.fire()

    async def _shut_down(self):
        """
        Close the connection, end its thread, and release the lock.  Never
        fails: this runs on the way out, where an error has nowhere to go.
        """
        if self._checkpointer is not None:
            checkpointer, self._checkpointer = self._checkpointer, None
            await checkpointer.stop()
        if self._thread is not None:
            # Closing the last connection checkpoints the WAL into the
            # database: disk work, done in the store's thread.
            thread, self._thread = self._thread, None
            await thread.stop()
        if self._lock_fd is not None:
            fd, self._lock_fd = self._lock_fd, None
            # Closing the only descriptor releases the flock.  The lock file
            # stays: deleting it would let a newcomer lock a fresh file while
            # the old owner still holds the deleted one.
            os.close(fd)

    # Group commit

    def _write(self, operation, *args):
        """
        Queue a write for the next group commit.

        :returns: a ``Deferred`` firing with the operation's result after
            the transaction that ran it committed.
        """
        if self._state != "open":
            return defer.fail(self._not_open())
        d = defer.Deferred()
        self._pending.append((operation, args, d))
        self._schedule_flush()
        return d

    def _schedule_flush(self):
        if (self._pending and self._flush_call is None
                and self._flushing < PIPELINE_DEPTH):
            # callLater(0) rather than flushing now: every write issued in
            # this reactor turn joins the same transaction.
            self._flush_call = self._reactor.callLater(0, self._flush)

    def _flush(self):
        self._flush_call = None
        batch, self._pending = self._pending, []
        self.transactions += 1
        operations = [(operation, args) for operation, args, _ in batch]
        d = self._thread.run(_run_batch, operations)
        self._flushing += 1
        d.addCallbacks(
            self._flushed,
            self._flush_failed,
            callbackArgs=(batch,),
            errbackArgs=(batch,),
        )

    def _flushed(self, outcomes, batch):
        self._flushing -= 1
        for (_, _, d), (ok, value) in zip(batch, outcomes):
            if ok:
                d.callback(value)
            else:
                d.errback(Failure(value))
        self._after_work()

    def _flush_failed(self, reason, batch):
        self._flushing -= 1
        error = reason.value
        log.error("write transaction of {count} operations on {path} "
                  "failed: {error}", count=len(batch), path=self._abspath,
                  error=one_line(error))
        for _, _, d in batch:
            wrapped = StoreError(
                f"database {self._abspath}: transaction failed: "
                f"{one_line(error)}"
            )
            wrapped.__cause__ = error
            d.errback(Failure(wrapped))
        self._after_work()

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

    def _read(self, query, *args):
        if self._state != "open":
            return defer.fail(self._not_open())
        self._reads += 1
        d = self._thread.run(query, *args)
        d.addErrback(self._read_failed)
        d.addBoth(self._read_done)
        return d

    def _read_failed(self, reason):
        if reason.check(StoreError):
            return reason
        error = StoreError(
            f"database {self._abspath}: read failed: {one_line(reason.value)}"
        )
        error.__cause__ = reason.value
        return Failure(error)

    def _read_done(self, result):
        self._reads -= 1
        self._after_work()
        return result

    def _not_open(self):
        return StoreError(f"database {self.path} is not open ({self._state})")

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
        return self._write(_submit, tasks)

    def dispatch(self, task_id, token, worker, started_at, priority=None,
                 max_attempts=None):
        """
        See :meth:`taskbroker.interfaces.ITaskStore.dispatch`.
        """
        return self._write(_dispatch, task_id, token, worker, started_at,
                           priority, max_attempts)

    def finish(self, task_id, token, state, result, error, traceback,
               finished_at):
        """
        See :meth:`taskbroker.interfaces.ITaskStore.finish`.

        :raises ValueError: (through the ``Deferred``) if ``state`` is not
            ``"succeeded"``, ``"failed"`` or ``"cancelled"``.
        """
        if state not in FINAL_STATES:
            return defer.fail(_bad_final_state(state))
        return self._write(_finish, task_id, token, state, result, error,
                           traceback, finished_at)

    def requeue(self, task_id, token, run_at=None, error=None, traceback=None,
                consumed=True):
        """
        See :meth:`taskbroker.interfaces.ITaskStore.requeue`.
        """
        return self._write(_requeue, task_id, token, run_at, error, traceback,
                           bool(consumed))

    def cancel(self, task_id, finished_at):
        """
        See :meth:`taskbroker.interfaces.ITaskStore.cancel`.
        """
        return self._write(_cancel, task_id, finished_at)

    def retry(self, task_id):
        """
        See :meth:`taskbroker.interfaces.ITaskStore.retry`.
        """
        return self._write(_retry, task_id)

    def reject(self, task_id, error, finished_at):
        """
        See :meth:`taskbroker.interfaces.ITaskStore.reject`.
        """
        return self._write(_reject, task_id, error, finished_at)

    def reject_group(self, handler, priority, error, finished_at):
        """
        See :meth:`taskbroker.interfaces.ITaskStore.reject_group`.
        """
        return self._write(_reject_group, handler, priority, error,
                           finished_at)

    def get(self, task_id):
        """
        See :meth:`taskbroker.interfaces.ITaskStore.get`.
        """
        return self._read(_get, task_id)

    def list(self, state, handler, after_id, limit):
        """
        See :meth:`taskbroker.interfaces.ITaskStore.list`.
        """
        return self._read(_list, state, handler, after_id, limit)

    def scan_queued(self, after_id, limit, known):
        """
        See :meth:`taskbroker.interfaces.ITaskStore.scan_queued`.
        """
        return self._read(_scan_queued, after_id, limit, frozenset(known))

    def queued_groups(self):
        """
        See :meth:`taskbroker.interfaces.ITaskStore.queued_groups`.
        """
        return self._read(_queued_groups)

    def queued_window(self, handler, priorities, after_id, limit, now):
        """
        See :meth:`taskbroker.interfaces.ITaskStore.queued_window`.
        """
        return self._read(_queued_window, handler, tuple(priorities),
                          after_id, limit, now)

    def delayed_window(self, after, limit):
        """
        See :meth:`taskbroker.interfaces.ITaskStore.delayed_window`.
        """
        return self._read(_delayed_window, tuple(after), limit)

    def running(self):
        """
        See :meth:`taskbroker.interfaces.ITaskStore.running`.
        """
        return self._read(_running)

    def counts(self, now):
        """
        See :meth:`taskbroker.interfaces.ITaskStore.counts`.
        """
        return self._read(_counts, now)


class _Checkpointer:
    """
    Runs SQLite's WAL checkpoints on a connection and thread of their own.

    Left to SQLite, a checkpoint runs inside the commit that finds the WAL
    past its threshold: a few milliseconds every hundred tasks or so, on
    the one thread every write waits for, which is what the broker's p99
    latencies were made of.  A ``PASSIVE`` checkpoint here copies what it
    can without blocking the writer.
    """

    def __init__(self, path, reactor, busy_timeout_ms):
        self._path = path
        self._reactor = reactor
        self._busy_timeout_ms = busy_timeout_ms
        self._threads = ThreadPool(minthreads=1, maxthreads=1,
                                   name="taskbroker-checkpoint")
        self._connection = None
        self._loop = None
        self._running = None

    def start(self):
        self._threads.start()
        self._loop = LoopingCall(self._tick)
        self._loop.clock = self._reactor
        self._loop.start(CHECKPOINT_INTERVAL, now=False)

    def _tick(self):
        if self._running is None:
            self.run().addErrback(
                lambda reason: log.error(
                    "WAL checkpoint of {path} failed: {error}",
                    path=self._path, error=one_line(reason.value)))

    def run(self):
        """
        :returns: a ``Deferred`` firing with ``(busy, log, checkpointed)``.
        """
        d = threads.deferToThreadPool(
            self._reactor, self._threads, self._checkpoint)
        self._running = d

        def done(result):
            if self._running is d:
                self._running = None
            return result

        return d.addBoth(done)

    def _checkpoint(self):
        if self._connection is None:
            self._connection = sqlite3.connect(
                self._path, isolation_level=None, check_same_thread=False)
            self._connection.execute(
                f"PRAGMA busy_timeout = {self._busy_timeout_ms:d}")
        return tuple(self._connection.execute(
            "PRAGMA wal_checkpoint(PASSIVE)").fetchone())

    def _close_connection(self):
        if self._connection is not None:
            connection, self._connection = self._connection, None
            connection.close()

    async def stop(self):
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        if self._running is not None:
            try:
                await self._running
            except Exception:
                pass
        try:
            await threads.deferToThreadPool(
                self._reactor, self._threads, self._close_connection)
        except Exception:
            log.failure("error closing the checkpoint connection")
        # Idle now, so joining its thread is quick.
        self._threads.stop()


def _bad_final_state(state):
    return ValueError(
        "a finished task's state must be 'succeeded', 'failed' or "
        f"'cancelled', not {state!r}"
    )


def _lock(path):
    """
    Take the ownership lock of the database at ``path``.

    :returns: the lock file's descriptor; closing it releases the lock.
    :raises StoreLocked: if another process (or another store in this one)
        holds it.
    """
    lock_path = path + ".lock"
    try:
        # os.open makes the descriptor close-on-exec, so processes the
        # broker spawns cannot keep the lock alive after the broker dies.
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise StoreError(
            f"cannot open lock file {lock_path}: {e.strerror}"
        ) from e
    try:
        # flock, not fcntl locks: an flock belongs to this open file, so a
        # second store in the same process is refused too, and closing any
        # other descriptor of the file does not drop it.
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            owner = os.read(fd, 64).decode("ascii", "replace").strip()
        finally:
            os.close(fd)
        # The owner writes its pid just after locking; it may not be there yet.
        if not owner.isdigit():
            owner = "unknown"
        raise StoreLocked(
            f"database {path} is in use by another broker (pid {owner})"
        ) from None
    except OSError as e:
        os.close(fd)
        raise StoreError(f"cannot lock {lock_path}: {e.strerror}") from e
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode("ascii"))
    except OSError:
        # The pid is only shown in the other broker's error message.
        log.failure("could not write the pid into {lock_path}",
                    lock_path=lock_path)
    return fd


# What runs in the store's thread.  Each receives the sqlite3 connection, in
# autocommit mode: we manage the transactions ourselves.


def _ensure_schema(connection):
    return _schema.ensure_schema(connection, "sqlite")


def _run_batch(connection, operations):
    """
    Run a group of writes in one transaction.

    :returns: for each operation, ``(True, result)`` or ``(False,
        StoreError)`` when the operation's own arguments made it fail.
    :raises: the database's error when the transaction as a whole failed;
        nothing was written then.
    """
    cursor = connection.cursor()
    try:
        return _transaction(cursor, operations, isolate=False)
    except _IsolateOperations:
        # Savepoints cost two statements per operation, so the first try
        # goes without; a batch gets here only when a caller passed bad
        # arguments, and the other callers' writes must not fail with it.
        return _transaction(cursor, operations, isolate=True)


def _transaction(cursor, operations, isolate):
    outcomes = []
    cursor.execute("BEGIN IMMEDIATE")
    try:
        for operation, args in operations:
            if not isolate:
                try:
                    outcomes.append((True, operation(cursor, *args)))
                except _OPERATION_ERRORS as e:
                    raise _IsolateOperations() from e
                continue
            cursor.execute("SAVEPOINT operation")
            try:
                outcomes.append((True, operation(cursor, *args)))
            except _OPERATION_ERRORS as e:
                cursor.execute("ROLLBACK TO operation")
                error = StoreError(
                    f"{operation.__name__.lstrip('_')} failed: {one_line(e)}"
                )
                error.__cause__ = e
                outcomes.append((False, error))
            cursor.execute("RELEASE operation")
        cursor.execute("COMMIT")
    except BaseException:
        _schema.rollback(cursor)
        raise
    return outcomes


def _submit(cursor, tasks):
    request_id = tasks[0].request_id
    if request_id is not None:
        # Uses the partial index tasks_by_request_id: "request_id = ?"
        # implies its "request_id IS NOT NULL".
        rows = cursor.execute(
            f"SELECT {_COLUMNS} FROM tasks WHERE request_id = ? ORDER BY id",
            (request_id,),
        ).fetchall()
        if rows:
            return [Submitted(TaskRow(*row), False) for row in rows]
    submitted = []
    for task in tasks:
        if task.unique_key is not None:
            live = _live_with_key(cursor, task.unique_key)
            if live is not None:
                submitted.append(Submitted(live, False))
                continue
        dispatched = task.worker is not None
        started_at = task.created_at if dispatched else None
        cursor.execute(
            "INSERT INTO tasks "
            "(handler, payload, priority, max_attempts, created_at, run_at, "
            "unique_key, request_id, time_limit, state, attempts, token, "
            "worker, started_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (task.handler, task.payload, task.priority, task.max_attempts,
             task.created_at, task.run_at, task.unique_key, task.request_id,
             task.time_limit, "running" if dispatched else "queued",
             int(dispatched), int(dispatched), task.worker, started_at),
        )
        submitted.append(Submitted(TaskRow(
            id=cursor.lastrowid,
            handler=task.handler,
            payload=task.payload,
            priority=task.priority,
            state="running" if dispatched else "queued",
            attempts=int(dispatched),
            max_attempts=task.max_attempts,
            worker=task.worker,
            created_at=task.created_at,
            started_at=started_at,
            finished_at=None,
            result=None,
            error=None,
            run_at=task.run_at,
            unique_key=task.unique_key,
            request_id=task.request_id,
            token=int(dispatched),
            time_limit=task.time_limit,
            traceback=None,
        ), True))
    return submitted


def _live_with_key(cursor, unique_key):
    # The state condition is written exactly as in the partial index
    # tasks_live_unique_key, so that SQLite can use it.
    row = cursor.execute(
        f"SELECT {_COLUMNS} FROM tasks WHERE unique_key = ? "
        "AND state IN ('queued', 'running')",
        (unique_key,),
    ).fetchone()
    return None if row is None else TaskRow(*row)


def _dispatch(cursor, task_id, token, worker, started_at, priority,
              max_attempts):
    cursor.execute(
        "UPDATE tasks SET state = 'running', token = ?, "
        "attempts = attempts + 1, worker = ?, started_at = ?, "
        "finished_at = NULL, priority = COALESCE(priority, ?), "
        "max_attempts = COALESCE(max_attempts, ?) "
        "WHERE id = ? AND state = 'queued' AND token = ? - 1",
        (token, worker, started_at, priority, max_attempts, task_id, token),
    )
    return cursor.rowcount == 1


def _finish(cursor, task_id, token, state, result, error, traceback,
            finished_at):
    cursor.execute(
        "UPDATE tasks SET state = ?, result = ?, error = ?, traceback = ?, "
        "finished_at = ? WHERE id = ? AND token = ? AND state = 'running'",
        (state, result, error, traceback, finished_at, task_id, token),
    )
    return cursor.rowcount == 1


def _requeue(cursor, task_id, token, run_at, error, traceback, consumed):
    # MAX: a running task has used at least one attempt, unless another
    # program set its columns by hand; attempts must not go negative then.
    cursor.execute(
        "UPDATE tasks SET state = 'queued', run_at = ?, error = ?, "
        "traceback = ?, "
        "attempts = CASE WHEN ? THEN attempts ELSE MAX(attempts - 1, 0) END "
        "WHERE id = ? AND token = ? AND state = 'running'",
        (run_at, error, traceback, consumed, task_id, token),
    )
    return cursor.rowcount == 1


def _cancel(cursor, task_id, finished_at):
    cursor.execute(
        "UPDATE tasks SET state = 'cancelled', error = 'cancelled', "
        "finished_at = ? WHERE id = ? AND state IN ('queued', 'running')",
        (finished_at, task_id),
    )
    return _get_with(cursor, task_id)


def _retry(cursor, task_id):
    # NOT EXISTS: queueing the task while another live task holds its key
    # would break the unique index; the row then stays as it is.
    cursor.execute(
        "UPDATE tasks SET state = 'queued', attempts = 0, run_at = NULL, "
        "finished_at = NULL, result = NULL, error = NULL, traceback = NULL "
        "WHERE id = ? AND state IN ('failed', 'cancelled') "
        "AND NOT EXISTS (SELECT 1 FROM tasks AS live "
        "WHERE live.unique_key = tasks.unique_key "
        "AND live.state IN ('queued', 'running'))",
        (task_id,),
    )
    return _get_with(cursor, task_id)


def _reject(cursor, task_id, error, finished_at):
    cursor.execute(
        "UPDATE tasks SET state = 'failed', error = ?, finished_at = ? "
        "WHERE id = ? AND state = 'queued'",
        (error, finished_at, task_id),
    )


def _reject_group(cursor, handler, priority, error, finished_at):
    cursor.execute(
        "UPDATE tasks SET state = 'failed', error = ?, finished_at = ? "
        "WHERE state = 'queued' AND handler = ? AND priority IS ?",
        (error, finished_at, handler, priority),
    )
    return cursor.rowcount


def _get_with(cursor, task_id):
    row = cursor.execute(
        f"SELECT {_COLUMNS} FROM tasks WHERE id = ?", (task_id,)
    ).fetchone()
    return None if row is None else TaskRow(*row)


def _get(connection, task_id):
    return _get_with(connection.cursor(), task_id)


def _list(connection, state, handler, after_id, limit):
    where = ["id > ?"]
    params = [after_id]
    if state is not None:
        where.append("state = ?")
        params.append(state)
    if handler is not None:
        where.append("handler = ?")
        params.append(handler)
    params.append(limit)
    rows = connection.cursor().execute(
        f"SELECT {_COLUMNS} FROM tasks WHERE {' AND '.join(where)} "
        "ORDER BY id LIMIT ?",
        params,
    )
    return [TaskRow(*row) for row in rows]


def _scan_queued(connection, after_id, limit, known):
    cursor = connection.cursor()
    ids = [row[0] for row in cursor.execute(
        "SELECT id FROM tasks WHERE state = 'queued' AND id > ? "
        "ORDER BY id LIMIT ?", (after_id, limit))]
    wanted = [i for i in ids if i not in known]
    rows = []
    # Bounded IN lists: SQLite caps the number of parameters.
    for start in range(0, len(wanted), 500):
        chunk = wanted[start:start + 500]
        rows.extend(TaskRow(*row) for row in cursor.execute(
            f"SELECT {_COLUMNS} FROM tasks WHERE id IN "
            f"({','.join('?' * len(chunk))}) AND state = 'queued' ORDER BY id",
            chunk))
    return rows, (ids[-1] if ids else after_id)


def _queued_groups(connection):
    # A loose index scan of tasks_queued_by_group: one seek per distinct
    # (handler, priority), where GROUP BY would read every queued row.
    # NULL sorts first and compares with nothing, so it is stepped over on
    # its own.  INDEXED BY: without statistics SQLite would rather read
    # tasks_by_state_id and sort.
    cursor = connection.cursor()
    # First: a row inserted during the scan has a higher id, and the
    # poller, which looks above this one, finds it.
    last_id = cursor.execute(
        "SELECT MAX(id) FROM tasks WHERE state = 'queued'").fetchone()[0]
    select = ("SELECT handler, priority FROM tasks "
              "INDEXED BY tasks_queued_by_group WHERE state = 'queued' ")
    pairs = []
    row = cursor.execute(
        select + "ORDER BY handler, priority LIMIT 1").fetchone()
    while row is not None:
        pairs.append(row)
        handler, priority = row
        if priority is None:
            row = cursor.execute(
                select + "AND handler = ? AND priority IS NOT NULL "
                "ORDER BY priority LIMIT 1", (handler,)).fetchone()
        else:
            row = cursor.execute(
                select + "AND handler = ? AND priority > ? "
                "ORDER BY priority LIMIT 1", (handler, priority)).fetchone()
        if row is None:
            row = cursor.execute(
                select + "AND handler > ? ORDER BY handler, priority LIMIT 1",
                (handler,)).fetchone()
    return pairs, last_id or 0


def _queued_window(connection, handler, priorities, after_id, limit, now):
    # One ordered range of tasks_queued_by_group per priority, merged:
    # "priority IN (...)" or "OR priority IS NULL" would make SQLite sort
    # the whole queue to honour ORDER BY.
    cursor = connection.cursor()
    rows = []
    for priority in priorities:
        rows.extend(cursor.execute(
            f"SELECT {_COLUMNS} FROM tasks INDEXED BY tasks_queued_by_group "
            "WHERE state = 'queued' AND handler = ? AND priority IS ? "
            "AND id > ? "
            # A run_at that is no number is read too, for the broker to
            # reject: it would never come due.
            "AND (run_at IS NULL OR run_at <= ? "
            "OR typeof(run_at) NOT IN ('integer', 'real')) "
            "ORDER BY id LIMIT ?",
            (handler, priority, after_id, now, limit)))
    if len(priorities) > 1:
        rows.sort()
    return [TaskRow(*row) for row in rows[:limit]]


def _delayed_window(connection, after, limit):
    rows = connection.cursor().execute(
        f"SELECT {_COLUMNS} FROM tasks INDEXED BY tasks_queued_by_run_at "
        "WHERE state = 'queued' AND run_at IS NOT NULL "
        # A run_at that is not a number (text sorts after every number)
        # is no time: the poller rejects such rows, and they must not
        # become the cursor.
        "AND typeof(run_at) IN ('integer', 'real') "
        "AND (run_at, id) > (?, ?) ORDER BY run_at, id LIMIT ?",
        (*after, limit))
    return [TaskRow(*row) for row in rows]


def _running(connection):
    rows = connection.cursor().execute(
        f"SELECT {_COLUMNS} FROM tasks WHERE state = 'running' ORDER BY id"
    )
    return [TaskRow(*row) for row in rows]


def _counts(connection, now):
    rows = connection.cursor().execute(
        "SELECT state, priority, handler, "
        "state = 'queued' AND run_at IS NOT NULL AND run_at > ?, COUNT(*) "
        "FROM tasks GROUP BY 1, 2, 3, 4", (now,)
    )
    return {(state, priority, handler, bool(delayed)): count
            for state, priority, handler, delayed, count in rows}
