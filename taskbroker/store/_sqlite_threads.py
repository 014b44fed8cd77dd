# -*- test-case-name: tests.unit.test_store -*-
"""
The threads of the SQLite store: the one thread that owns the store's
connection (so statements reach the database in the order they were
issued and the reactor never blocks on disk), and the checkpointer, which
runs WAL checkpoints on a connection of its own, apart from commits.
"""

import queue
import sqlite3
import threading

from twisted.internet import defer, threads
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from taskbroker.errors import StoreLost, one_line
from taskbroker.store._sqlite_files import connect_existing

log = Logger()

#: Seconds between WAL checkpoints (see :class:`Checkpointer`).
CHECKPOINT_INTERVAL = 1.0

#: A WAL of this many frames (pages) or more after a checkpoint is
#: restarted (see :class:`Checkpointer`): 4,096 pages of 4 KiB, 16 MiB.
RESTART_FRAMES = 4096

#: Milliseconds a restarting checkpoint waits for the writer and for
#: readers; all writes wait for it meanwhile.
RESTART_WAIT_MS = 20


class ConnectionThread:
    """
    One thread that owns one ``sqlite3`` connection and runs functions on
    it, in the order they were handed over.

    What ``adbapi.ConnectionPool`` with one connection does, for the one
    pattern the store uses, at half the cost per call: a round trip to
    the thread and back took about 100 microseconds through the pool and
    its thread pool, and about 45 here (a queue, and ``callFromThread``).
    Every write of the broker pays it once per group commit.

    The caller may also run a function on the connection in its own
    thread, at once, while the thread has nothing to do (see
    :meth:`run_here`).

    :param connect: called in the thread to make the connection.
    :param switched: if given, called as ``switched(connection, here)``
        before a function runs where the one before did not: ``here`` is
        true in the caller's thread (:meth:`run_here`), false in the
        connection's own, so that each may have its own settings.
    """

    def __init__(self, reactor, connect, name, switched=None):
        self._reactor = reactor
        self._connect = connect
        self._switched = switched
        self._queue = queue.SimpleQueue()
        self._thread = threading.Thread(
            target=self._work, name=name, daemon=True
        )
        self._stopped = None
        self._connection = None
        self._interrupted = False
        # Functions handed to the thread whose results have not come back
        # yet; counted in the caller's thread.
        self._outstanding = 0
        self._here = False

    def start(self):
        """
        :returns: a ``Deferred`` firing with ``None`` once connected, or
            failing with the error of ``connect`` (the thread has ended
            then).
        """
        started = self.run(lambda connection: None)
        # Before the thread starts: it looks up self._stopped.callback in
        # its own thread (only the call goes through callFromThread), and
        # one whose connect fails fast would otherwise find None.
        self._stopped = defer.Deferred()
        try:
            self._thread.start()
        except BaseException:
            self._stopped = None  # never started: nothing to stop
            raise
        return started

    def run(self, function, *args):
        """
        :returns: a ``Deferred`` firing with ``function(connection,
            *args)``, called in the thread.
        """
        d = defer.Deferred()
        self._outstanding += 1
        d.addBoth(self._came_back)
        self._queue.put((function, args, d))
        return d

    def _came_back(self, result):
        self._outstanding -= 1
        return result

    def run_here(self, function, *args):
        """
        Call ``function(connection, *args)`` in the calling thread, now,
        if the connection's thread is idle: nothing handed to it is
        running or waiting.  Order is kept, as nothing issued earlier is
        left to run first.

        :returns: ``(True, result)``, or ``(False, None)`` when the thread
            is busy, stopping or not connected; ``function``'s exception
            propagates.
        """
        connection = self._connection
        if self._outstanding or connection is None or self._interrupted:
            return False, None
        if not self._here:
            self._switch(connection, True)
        return True, function(connection, *args)

    def _switch(self, connection, here):
        self._here = here
        if self._switched is not None:
            self._switched(connection, here)

    def stop(self):
        """
        Close the connection (in the thread, after what was handed over
        before) and end the thread.

        :returns: a ``Deferred`` firing with ``None`` when it has ended.
        """
        if self._stopped is None:
            return defer.succeed(None)
        self._outstanding += 1  # run_here may not use it any more
        self._queue.put(None)
        return self._stopped

    def interrupt(self):
        """
        Make the call running in the thread, and every later one, fail
        with ``sqlite3.OperationalError`` ("interrupted"); safe from any
        thread.  For a thread that is no longer needed, such as one that
        runs a long check.
        """
        self._interrupted = True
        connection = self._connection
        if connection is not None:
            connection.interrupt()

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
        self._connection = connection
        while True:
            item = self._queue.get()
            if item is None:
                break
            function, args, d = item
            try:
                if self._interrupted:
                    raise sqlite3.OperationalError("interrupted")
                if self._here:
                    self._switch(connection, False)
                result = function(connection, *args)
            except BaseException:
                call(d.errback, Failure())
            else:
                call(d.callback, result)
        self._connection = None
        try:
            connection.close()
        except BaseException:
            call(
                log.failure, "error closing the database connection", Failure()
            )
        call(self._stopped.callback, None)


class Event:
    """
    Something many callers can wait for; each gets its own ``Deferred``.
    """

    def __init__(self):
        self._waiters = []

    def wait(self):
        d = defer.Deferred()
        self._waiters.append(d)
        return d

    def fire(self, value=None):
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.callback(value)


class Checkpointer:
    """
    Runs SQLite's WAL checkpoints on a connection and thread of their own.

    Left to SQLite, a checkpoint runs inside the commit that finds the WAL
    past its threshold: a few milliseconds every hundred tasks or so, on
    the one thread every write waits for, which is what the broker's p99
    latencies were made of.  A ``PASSIVE`` checkpoint here copies what it
    can without blocking the writer.

    But SQLite writes the WAL from its start again only when a checkpoint
    has copied every frame before the next write begins, which a passive
    one never does while writes keep coming: under steady load the WAL
    grew by about 15 KiB a task, without end.  So when a passive
    checkpoint leaves :data:`RESTART_FRAMES` frames or more, a
    ``RESTART`` one follows: it holds writes back while it copies what
    the passive one left (a few milliseconds), and waits at most
    :data:`RESTART_WAIT_MS` for readers of old frames, failing otherwise
    (it tries again a second later).  The store's commits in the reactor's
    thread do not wait for it; they go to the store's thread meanwhile.

    Before each checkpoint it also runs ``watch``, which raises
    :class:`taskbroker.errors.StoreLost` when the database's files were
    removed or replaced, so that an idle broker notices within a tick too;
    it then calls ``on_lost`` with that error.
    """

    def __init__(self, path, reactor, busy_timeout_ms, watch, on_lost):
        self._path = path
        self._reactor = reactor
        self._busy_timeout_ms = busy_timeout_ms
        self._watch = watch
        self._on_lost = on_lost
        self._threads = ThreadPool(
            minthreads=1, maxthreads=1, name="taskbroker-checkpoint"
        )
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
            self.run().addErrback(self._failed)

    def _failed(self, reason):
        if reason.check(StoreLost):
            self._on_lost(reason.value)
        else:
            log.error(
                "WAL checkpoint of {path} failed: {error}",
                path=self._path,
                error=one_line(reason.value),
            )

    def run(self):
        """
        :returns: a ``Deferred`` firing with ``(busy, log, checkpointed)``.
        """
        d = threads.deferToThreadPool(
            self._reactor, self._threads, self._checkpoint
        )
        self._running = d

        def done(result):
            if self._running is d:
                self._running = None
            return result

        return d.addBoth(done)

    def _checkpoint(self):
        # First: a connection to a removed file would fail less clearly.
        self._watch()
        if self._connection is None:
            self._connection = connect_existing(
                self._path, isolation_level=None, check_same_thread=False
            )
            self._connection.execute(
                f"PRAGMA busy_timeout = {self._busy_timeout_ms:d}"
            )
        connection = self._connection
        result = tuple(
            connection.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        )
        if result[1] < RESTART_FRAMES:
            return result
        connection.execute(f"PRAGMA busy_timeout = {RESTART_WAIT_MS:d}")
        try:
            return tuple(
                connection.execute("PRAGMA wal_checkpoint(RESTART)").fetchone()
            )
        finally:
            connection.execute(
                f"PRAGMA busy_timeout = {self._busy_timeout_ms:d}"
            )

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
                self._reactor, self._threads, self._close_connection
            )
        except Exception:
            log.failure("error closing the checkpoint connection")
        # Idle now, so joining its thread is quick.
        self._threads.stop()
