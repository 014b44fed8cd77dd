# -*- test-case-name: tests.unit.test_store -*-
"""
The SQLite task store: the broker's embedded, default database.

One connection, owned by one thread, so that statements reach the
database in the order they were issued; while that thread is idle, a small
group of writes (or a read of one task) runs in the reactor's thread
instead, where it costs less than the hand-off and never waits for a disk
sync or a lock (see :meth:`SQLiteStore._commit_here`).  Writes are grouped:
every write issued in a reactor turn (and every write issued while a
transaction is running) goes into one transaction, so the broker pays for
one commit per batch, not one per task.
"""

import os
import sqlite3

from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from taskbroker.errors import StoreError, StoreLost, one_line
from taskbroker.interfaces import IQueueReads, ITaskStore
from taskbroker.store import _sqlite_files as files
from taskbroker.store import _sqlite_sql as sql
from taskbroker.store._batches import BatchedStore
from taskbroker.store._sqlite_threads import (
    Checkpointer,
    ConnectionThread,
    Event,
)
from taskbroker.store.claims import OwnerClaims

__all__ = ["SQLiteStore"]

log = Logger()

_SYNCHRONOUS = {"normal": "NORMAL", "full": "FULL"}

#: The writes that may commit in the reactor's thread (see
#: :meth:`SQLiteStore._commit_here`): each touches a row or two through
#: its primary key, or inserts the tasks it is given.
_SMALL_WRITES = frozenset(
    (
        sql.touch,
        sql.submit,
        sql.dispatch,
        sql.progress,
        sql.finish,
        sql.requeue,
        sql.cancel,
        sql.retry,
        sql.reject,
    )
)

#: The most rows (a submitted task, or another small write) a transaction
#: committed in the reactor's thread may write: at about 25 microseconds
#: each, a few hundred microseconds at most.
INLINE_ROWS = 16

#: Bytes to which the WAL file is cut back when SQLite writes it from its
#: start again.
WAL_SIZE_LIMIT = 64 * 1024 * 1024

#: SQLite's result code for "database is locked", without its extension.
_SQLITE_BUSY = 5

#: How many of ``PRAGMA quick_check``'s reports the store asks for, and
#: how many lines of them a damaged database's error shows.
CHECK_REPORTS = 10
CHECK_SHOWN = 3


def _text(data):
    # Text that is not UTF-8 (another program's INSERT) would make the
    # whole query fail to read, and with it every other row; replaced, it
    # is one bad row that fails alone.
    return data.decode("utf-8", "replace")


@implementer(ITaskStore, IQueueReads)
class SQLiteStore(BatchedStore):
    """
    An :class:`taskbroker.interfaces.ITaskStore` in a SQLite file.

    One broker owns the file at a time: :meth:`open` takes an exclusive
    ``flock`` on ``<path>.lock``, which the operating system releases when
    the owner exits, however it dies.  Other programs may still insert
    tasks with SQL (see ``schema/sqlite/v4.sql``); the database runs in WAL
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
    :param bool create_database: create a missing database even where its
        lock file exists (see :meth:`open`).
    :ivar int transactions: how many write transactions (group commits)
        the store has started; for tests and metrics.
    :ivar write_error: see
        :attr:`taskbroker.interfaces.ITaskStore.write_error`.
    """

    def __init__(
        self,
        path,
        reactor,
        synchronous="normal",
        busy_timeout=5.0,
        create_database=False,
    ):
        if synchronous not in _SYNCHRONOUS:
            raise ValueError(
                f"synchronous must be 'normal' or 'full', not {synchronous!r}"
            )
        self.path = path
        self._init_batches()
        self._reactor = reactor
        self._create_database = create_database
        self._synchronous = synchronous
        self._busy_timeout_ms = int(busy_timeout * 1000)
        self._abspath = None
        self._creating = False
        self._lock_fd = None
        self._watch = None
        self._checkpointer = None
        self._checker = None
        self._journal_mode = None
        # The StoreLost that ended this store's use is self._lost.
        self._lost_event = Event()

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

        A database that is missing is created, unless its lock file exists
        (a database was there, and was probably deleted or moved) and the
        store was not made with ``create_database``.  A database that this
        process cannot write is refused, and so is one where an empty
        write transaction fails.

        :returns: a ``Deferred`` firing with ``None``, or failing with
            :class:`taskbroker.errors.StoreLocked` when another broker owns
            the database, or with :class:`taskbroker.errors.StoreError`
            (with a one-line message) when it cannot be used.
        """
        return defer.Deferred.fromCoroutine(self._open())

    async def _open_unguarded(self):
        path = self._abspath = os.path.abspath(self.path)
        directory = os.path.dirname(path)
        if not os.path.isdir(directory):
            raise StoreError(
                f"cannot open database {path}: directory {directory} "
                "does not exist"
            )
        # Before the lock, whose file this looks for.
        self._creating = files.check_may_create(path, self._create_database)
        files.check_writable(path)
        self._lock_fd = files.lock(path)
        try:
            # One connection, one thread: writes reach SQLite in the order
            # they were issued, and never contend with each other.
            self._thread = ConnectionThread(
                self._reactor,
                self._connect,
                "taskbroker-sqlite",
                switched=self._set_busy_timeout,
            )
            await self._thread.start()
            old, new = await self._thread.run(self._prepare)
        except BaseException as e:
            await self._shut_down()
            # OSError: a schema file missing from a broken installation.
            if isinstance(e, (StoreError, sqlite3.Error, OSError)):
                raise StoreError(
                    f"cannot use database {path}: {one_line(e)}"
                ) from e
            raise
        if old is None:
            log.info(
                "created database {path} at schema version {version}",
                path=path,
                version=new,
            )
        elif old != new:
            log.info(
                "upgraded database {path} from schema version {old} to {new}",
                path=path,
                old=old,
                new=new,
            )
        await self._start_helpers(path)
        log.info(
            "opened database {path} (schema version {version}, "
            "synchronous {synchronous})",
            path=path,
            version=new,
            synchronous=self._synchronous,
        )

    def _prepare(self, connection):
        """
        Bring the schema up to date, make sure a write commits, and note
        which file was opened; runs in the store's thread.
        """
        versions = sql.ensure_schema(connection)
        try:
            sql.run_batch(connection, [(sql.touch, ())])
        except sqlite3.Error as e:
            raise StoreError(f"an empty write failed: {one_line(e)}") from e
        self._watch = files.FileWatch(self._abspath, self._lock_fd)
        return versions

    async def _start_helpers(self, path):
        """
        Start the checkpointer and the counts' connection, in WAL mode.
        """
        if self._journal_mode != "wal":
            # WAL cannot be used on some file systems (network ones); the
            # store still works, but readers then block the broker's writes.
            log.warn(
                "database {path} uses journal mode {journal_mode} "
                "instead of WAL",
                path=path,
                journal_mode=self._journal_mode,
            )
            return
        self._checkpointer = Checkpointer(
            path,
            self._reactor,
            self._busy_timeout_ms,
            self._watch.check_all,
            self._lose,
        )
        self._checkpointer.start()
        # Counting a large table takes long: on a connection of its own,
        # WAL lets it read while the store's thread commits.
        self._counter = ConnectionThread(
            self._reactor, self._connect_reader, "taskbroker-sqlite-count"
        )
        try:
            await self._counter.start()
        except BaseException:
            await self._shut_down()
            raise

    def checkpoint(self):
        """
        Copy the WAL's committed pages into the database file now (it is
        done every :data:`~taskbroker.store._sqlite_threads.CHECKPOINT_INTERVAL` seconds anyway).

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
        connect = sqlite3.connect if self._creating else files.connect_existing
        connection = connect(
            self._abspath,
            check_same_thread=False,
            # Autocommit mode: we issue BEGIN and COMMIT ourselves, so that
            # a group of writes is one transaction and reads take no lock
            # beyond their own statement.
            isolation_level=None,
        )
        connection.text_factory = _text
        try:
            # First, so that switching to WAL waits for other programs.
            connection.execute(
                f"PRAGMA busy_timeout = {self._busy_timeout_ms:d}"
            )
            (mode,) = connection.execute(
                "PRAGMA journal_mode = WAL"
            ).fetchone()
            # Checkpoints run on their own connection and thread (see
            # Checkpointer), not inside whichever commit crosses the WAL's
            # size threshold.
            connection.execute("PRAGMA wal_autocheckpoint = 0")
            # Restarted (see Checkpointer), the WAL is cut back to this.
            connection.execute(
                f"PRAGMA journal_size_limit = {WAL_SIZE_LIMIT:d}"
            )
            connection.execute(
                f"PRAGMA synchronous = {_SYNCHRONOUS[self._synchronous]}"
            )
        except BaseException:
            connection.close()
            raise
        self._journal_mode = str(mode).lower()
        return connection

    def _set_busy_timeout(self, connection, here):
        """
        In the reactor's thread, a statement never waits for another
        program's write lock: the transaction fails at once, and the store
        runs it again in its own thread, which waits (see
        :meth:`_commit_here`).
        """
        timeout = 0 if here else self._busy_timeout_ms
        connection.execute(f"PRAGMA busy_timeout = {timeout:d}")

    def _connect_reader(self):
        """
        Open a read-only connection, for the counts and the integrity
        check; runs in its thread.
        """
        connection = files.connect_existing(
            self._abspath, check_same_thread=False, isolation_level=None
        )
        connection.text_factory = _text
        connection.execute(f"PRAGMA busy_timeout = {self._busy_timeout_ms:d}")
        connection.execute("PRAGMA query_only = 1")
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

    async def _shut_down(self):
        """
        Close the connections, end their threads, and release the lock.
        Never fails: this runs on the way out, where an error has nowhere
        to go.
        """
        for name in ("_checker", "_counter"):
            thread = getattr(self, name)
            if thread is not None:
                setattr(self, name, None)
                await thread.stop()
        if self._checkpointer is not None:
            checkpointer, self._checkpointer = self._checkpointer, None
            await checkpointer.stop()
        if self._thread is not None:
            # Closing the last connection checkpoints the WAL into the
            # database: disk work, done in the store's thread.  After a
            # loss too: SQLite then deletes the -wal file, which must not
            # be applied to whatever database is now at the path.
            thread, self._thread = self._thread, None
            await thread.stop()
        if self._lock_fd is not None:
            fd, self._lock_fd = self._lock_fd, None
            # Closing the only descriptor releases the flock.  The lock file
            # stays: deleting it would let a newcomer lock a fresh file while
            # the old owner still holds the deleted one.
            os.close(fd)
            if self._lost is not None:
                files.leave_lock(self._abspath)

    # Losing the database

    def when_lost(self):
        """
        See :meth:`taskbroker.interfaces.ITaskStore.when_lost`.
        """
        if self._lost is not None:
            return defer.succeed(str(self._lost))
        return self._lost_event.wait()

    def _lose(self, error):
        """
        Stop using the database for good: refuse every write from now on
        and tell those waiting on :meth:`when_lost`.

        :param StoreLost error: why.
        """
        if self._lost is not None:
            return
        self._lost = error
        self.write_error = one_line(error)
        self._stop_probing()
        self._lost_event.fire(str(error))

    # Checking

    def check(self):
        """
        See :meth:`taskbroker.interfaces.ITaskStore.check`.  It runs
        ``PRAGMA quick_check`` on a connection and thread of its own, so
        that the store's work goes on meanwhile; closing the store stops
        it.  A damaged database is lost (see :meth:`when_lost`).
        """
        if self._state != "open":
            return defer.fail(self._not_open())
        return defer.Deferred.fromCoroutine(self._check())

    async def _check(self):
        path = self._abspath
        checker = self._checker = ConnectionThread(
            self._reactor, self._connect_reader, "taskbroker-sqlite-check"
        )
        started = self._reactor.seconds()
        log.info("checking database {path} (PRAGMA quick_check)", path=path)
        try:
            await checker.start()
            problems = await checker.run(sql.quick_check, CHECK_REPORTS)
        except sqlite3.DatabaseError as e:
            if not _is_damage(e):
                raise StoreError(
                    f"could not check database {path}: {one_line(e)}"
                ) from e
            problems = [one_line(e)]
        finally:
            if self._checker is checker:
                self._checker = None
                await checker.stop()
        if problems:
            error = _damaged(path, problems)
            self._lose(error)
            raise error
        log.info(
            "database {path} passed its integrity check in {seconds:.2f} s",
            path=path,
            seconds=self._reactor.seconds() - started,
        )

    # Group commit (taskbroker.store._batches)

    @property
    def _label(self):
        return self._abspath or self.path

    _sql = sql

    def _interrupt(self):
        if self._checker is not None:
            # An integrity check may take minutes: stop it, not wait for it.
            self._checker.interrupt()

    def _commit(self, connection, operations):
        """
        Run a group of writes, then make sure that they went into the file
        at the store's path, before anyone hears that they were made; runs
        in the store's thread.

        :raises StoreLost: if the database or its lock file was removed or
            replaced.
        """
        outcomes = sql.run_batch(connection, operations)
        self._watch.check()
        return outcomes

    def _commit_here(self, operations):
        """
        Commit a small group of writes in the reactor's thread when the
        store's thread is idle.

        In WAL mode with ``synchronous = normal`` a commit appends to the
        WAL without syncing the disk: about 100 microseconds for a
        result and the dispatch it frees, against a round trip through the
        store's thread that wakes two threads and makes them take turns
        for the GIL.  Large groups, other writes, ``synchronous = full``
        (a sync at each commit) and rollback journals (which sync too) go
        to the store's thread, and so does a group that finds another
        program holding the write lock, so that the reactor never waits
        for it.
        """
        if self._synchronous != "normal" or self._journal_mode != "wal":
            return False, None
        rows = 0
        for operation, args in operations:
            if operation not in _SMALL_WRITES:
                return False, None
            rows += len(args[0]) if operation is sql.submit else 1
            if rows > INLINE_ROWS:
                return False, None
        return self._run_here(self._commit, operations)

    def _read_here(self, query, args):
        """
        Read one task by its id in the reactor's thread when the store's
        thread is idle: a lookup by primary key, a few microseconds where
        the round trip costs tens.  A WAIT for a task that has just ended
        reads it so.
        """
        if query is not sql.get or self._journal_mode != "wal":
            return False, None
        return self._run_here(query, *args)

    def _run_here(self, function, *args):
        """
        ``function(connection, *args)`` in the reactor's thread if the
        store's thread is idle: ``(True, result)``, or ``(False, None)``
        to run it in the store's thread instead, also when another
        program holds the write lock (a transaction is then rolled back
        whole, so it may run again).
        """
        try:
            return self._thread.run_here(function, *args)
        except sqlite3.OperationalError as e:
            if _is_busy(e):
                return False, None
            raise

    # IQueueReads

    def scan_queued(self, after_id, limit, known):
        """
        See :meth:`taskbroker.interfaces.IQueueReads.scan_queued`.
        """
        return self._read(sql.scan_queued, after_id, limit, frozenset(known))

    def queued_groups(self):
        """
        See :meth:`taskbroker.interfaces.IQueueReads.queued_groups`.
        """
        return self._read(sql.queued_groups)

    def queued_window(self, handler, priorities, after_id, limit, now):
        """
        See :meth:`taskbroker.interfaces.IQueueReads.queued_window`.
        """
        return self._read(
            sql.queued_window, handler, tuple(priorities), after_id, limit, now
        )

    def delayed_window(self, after, limit):
        """
        See :meth:`taskbroker.interfaces.IQueueReads.delayed_window`.
        """
        return self._read(sql.delayed_window, tuple(after), limit)

    def running(self):
        """
        See :meth:`taskbroker.interfaces.IQueueReads.running`.
        """
        return self._read(sql.running)


def _is_busy(error):
    return getattr(error, "sqlite_errorcode", 0) & 0xFF == _SQLITE_BUSY


def _is_damage(error):
    # SQLITE_CORRUPT and SQLITE_NOTADB, with their extended codes.
    return getattr(error, "sqlite_errorcode", 0) & 0xFF in (11, 26)


def _damaged(path, problems):
    shown = "; ".join(problems[:CHECK_SHOWN])
    return StoreLost(
        f"database {path} is damaged: PRAGMA quick_check found: {shown}"
        + (" (and more)" if len(problems) > CHECK_SHOWN else "")
        + "; see 'Database faults' in the docs to recover it"
    )
