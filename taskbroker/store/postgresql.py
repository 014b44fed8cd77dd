# -*- test-case-name: tests.unit.test_store_postgresql -*-
"""
The PostgreSQL task store: one database shared by several brokers.

Each broker claims queued tasks only for its idle credits, with ``FOR
UPDATE SKIP LOCKED``, and holds a lease in ``taskbroker_brokers`` by the
database's clock; every dispatch, finish and requeue is a compare-and-set
on the task's state, token and owner, so nothing a broker that lost its
lease writes can land.  See :class:`PostgresClaims`.

The store's statements run on blocking psycopg connections, each in a
thread of its own (:class:`~taskbroker.store._sqlite_threads.ConnectionThread`),
as the SQLite store's do: writes on one, so they reach the database in
order and batch into group commits; reads (listings, counts) on a
second, so that a long one does not hold up commits; claims on a third,
so that a claim for a free slot does not wait for the commit of the
result that freed it; the lease on a fourth, so that a renewal never
waits behind a batch; and ``LISTEN`` on a fifth.  A thread of our own costs a hand-off of about 45 microseconds a
batch, a fraction of a round trip to the server, and keeps the
reactor-independent, tested machinery of the SQLite store; psycopg's
asyncio connection would tie the broker to the asyncio reactor.

A lost connection fails the writes of its batch (the broker pauses
dispatch and retries), and the next use connects again.
"""

import os
import socket
import threading

from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from taskbroker.errors import ConfigError, StoreError, one_line
from taskbroker.interfaces import IClaimSource, ITaskStore
from taskbroker.store import _postgresql_sql as sql
from taskbroker.store import _schema
from taskbroker.store._batches import BatchedStore
from taskbroker.store._sqlite_threads import ConnectionThread

__all__ = ["PostgresStore", "PostgresClaims", "describe_url"]

log = Logger()

#: Seconds a broker's lease lasts unless renewed; it renews it every
#: second.
DEFAULT_LEASE = 5.0
#: Seconds between renewals of the lease.
RENEW_INTERVAL = 1.0
#: Seconds before a failed release of claimed tasks is tried again.
RELEASE_RETRY = 1.0
#: libpq settings the store uses unless the URI gives its own: a
#: connection attempt gives up after 5 s, and a connection whose server
#: stopped answering (a host gone, a network cut without a reset) is found
#: dead within about 10 s, instead of holding a statement (and the thread
#: that waits for it) for as long as the kernel's TCP timeouts.
CONNECTION_DEFAULTS = {
    "connect_timeout": 5,
    "keepalives": 1,
    "keepalives_idle": 5,
    "keepalives_interval": 2,
    "keepalives_count": 3,
    "tcp_user_timeout": 10000,
}
#: Connections that commit batches of writes, each in a thread of its
#: own: while one waits for the server (its statements, the disk sync of
#: its commit), another commits the next batch.
WRITERS = 2
#: How many times a batch the server rolled back to break a deadlock
#: between two writers runs again.
DEADLOCK_RETRIES = 3
#: Seconds between attempts to listen again after the listening
#: connection failed, at most.
LISTEN_RETRY_MAX = 5.0


def _psycopg():
    try:
        import psycopg
    except ImportError:
        raise ConfigError(
            "--database: PostgreSQL needs psycopg 3: "
            "pip install 'taskbroker[postgresql]'"
        ) from None
    return psycopg


def check_url(url):
    """
    Check a PostgreSQL connection URI (libpq's syntax).

    :raises ConfigError: with a one-line reason.
    """
    psycopg = _psycopg()
    try:
        psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError as e:
        raise ConfigError(
            f"--database: invalid PostgreSQL URI: {one_line(e)}"
        ) from None


def describe_url(url):
    """
    The database a URI names, for logs: without its password.
    """
    try:
        params = _psycopg().conninfo.conninfo_to_dict(url)
    except Exception:
        return "postgresql://?"
    host = params.get("host") or "localhost"
    port = params.get("port")
    user = params.get("user")
    return (
        f"postgresql://{user + '@' if user else ''}{host}"
        f"{':' + str(port) if port else ''}/{params.get('dbname', '')}"
    )


class _Link:
    """
    A psycopg connection that connects again when it was lost: what the
    store's connection threads hand to the functions they run.
    """

    def __init__(self, url, application_name, setup=()):
        self._url = url
        self._application_name = application_name
        self._setup = setup
        self._connection = None
        #: The server process of the current connection.
        self.pid = None

    @property
    def connected(self):
        return self._connection is not None

    @property
    def broken(self):
        connection = self._connection
        return connection is not None and connection.broken

    def get(self):
        connection = self._connection
        if (
            connection is not None
            and not connection.broken
            and not connection.closed
        ):
            return connection
        self.close()
        psycopg = _psycopg()
        from psycopg.types.string import TextLoader

        given = psycopg.conninfo.conninfo_to_dict(self._url)
        options = {
            name: value
            for name, value in CONNECTION_DEFAULTS.items()
            if name not in given
        }
        connection = psycopg.connect(
            self._url,
            autocommit=True,
            application_name=self._application_name,
            **options,
        )
        # Payloads are json: read them as the text that was written, not
        # decoded, as the store's interface wants.
        connection.adapters.register_loader("json", TextLoader)
        for statement in self._setup:
            connection.execute(statement)
        self._connection = connection
        self.pid = connection.info.backend_pid
        return connection

    def close(self):
        connection, self._connection = self._connection, None
        if connection is not None:
            try:
                connection.close()
            except Exception:
                pass


def _on(function):
    """
    ``function(connection, ...)`` as a connection thread calls it: with
    the link's current connection.  A connection found dead when used (the
    server restarted, or the network dropped it while idle) is replaced
    and the call tried once more: a statement that failed that way never
    ran.
    """

    def call(link, *args):
        reused = link.connected
        try:
            return function(link.get(), *args)
        except _psycopg().OperationalError:
            if not (reused and link.broken):
                raise
            link.close()
            return function(link.get(), *args)

    call.__name__ = function.__name__
    return call


@implementer(ITaskStore)
class PostgresStore(BatchedStore):
    """
    An :class:`taskbroker.interfaces.ITaskStore` in a PostgreSQL
    database, which several brokers may share.

    :param str url: a libpq connection URI (``postgresql://`` or
        ``postgres://``); a password is best left to ``~/.pgpass`` or
        ``PGPASSWORD``.
    :param reactor: the reactor that hears from the store's threads.
    :param levels: the priority levels, most urgent first: recorded in an
        empty database, and compared with those recorded, which must be
        the same.
    :param default_priority: the level a NULL priority runs at.
    :param float lease: seconds a broker's claims last unless renewed.
    """

    _sql = sql
    # Each writer commits one batch at a time: what comes meanwhile joins
    # the next batch, or goes to another writer.
    _pipeline_depth = 1

    def __init__(
        self,
        url,
        reactor,
        levels=("high", "normal", "low"),
        default_priority="normal",
        lease=DEFAULT_LEASE,
    ):
        self.url = url
        self.levels = tuple(levels)
        self.default_priority = default_priority
        self.lease = lease
        self._label = describe_url(url)
        self._init_batches()
        self._reactor = reactor
        # The broker that claims through this store: the owner of the
        # rows it inserts or takes.
        self._owner = None
        self.channel = None
        self.done_channel = None
        self.schema = None
        # The running tasks this store's broker dispatched or adopted, so
        # that a broker whose lease lapsed learns which it lost.
        self.running_ids = set()
        # The server process of each writer thread's connection.
        self.writer_pids = {}
        self._writer_threads = []

    def __repr__(self):
        return f"<PostgresStore {self._label} {self._state}>"

    def claims(self, broker_id):
        """
        See :meth:`taskbroker.interfaces.ITaskStore.claims`.
        """
        self._owner = broker_id
        return PostgresClaims(self, broker_id)

    def _link(self, role, setup=()):
        return _Link(self.url, f"taskbroker {role} {os.getpid()}", setup)

    def _connection_thread(self, role, setup=()):
        return ConnectionThread(
            self._reactor,
            lambda: self._link(role, setup),
            f"taskbroker-pg-{role}",
        )

    # Opening and closing

    def open(self):
        """
        Connect, create or upgrade the schema, and check (or record) the
        priority levels.

        :returns: a ``Deferred`` firing with ``None``, or failing with
            :class:`taskbroker.errors.StoreError` (a one-line message).
        """
        return defer.Deferred.fromCoroutine(self._open())

    async def _open_unguarded(self):
        psycopg = _psycopg()
        self._writer_threads = [
            self._connection_thread("writer") for _ in range(WRITERS)
        ]
        self._thread = self._writer_threads[0]
        self._counter = self._connection_thread("reader")
        try:
            for writer in self._writer_threads:
                await writer.start()
            await self._counter.start()
            old, new = await self._thread.run(self._prepare)
        except BaseException as e:
            await self._shut_down()
            if isinstance(e, (StoreError, psycopg.Error, OSError)):
                raise StoreError(
                    f"cannot use database {self._label}: {one_line(e)}"
                ) from e
            raise
        if old is None:
            log.info(
                "created the taskbroker tables in {database} (schema "
                "{schema}) at version {version}",
                database=self._label,
                schema=self.schema,
                version=new,
            )
        elif old != new:
            log.info(
                "upgraded database {database} from schema version "
                "{old} to {new}",
                database=self._label,
                old=old,
                new=new,
            )
        log.info(
            "opened database {database} (schema {schema}, version {version})",
            database=self._label,
            schema=self.schema,
            version=new,
        )

    def _prepare(self, link):
        connection = link.get()
        versions = _schema.ensure_schema(connection, "postgresql")
        self.schema = connection.execute("SELECT current_schema()").fetchone()[
            0
        ]
        # Named after the schema, so that deployments in several schemas
        # of one database do not wake each other.
        self.channel = ("taskbroker_" + self.schema)[:63]
        self.done_channel = ("taskbroker_done_" + self.schema)[:63]
        _record_levels(connection, self.levels, self.default_priority)
        return versions

    def close(self):
        """
        Wait for pending writes and reads, and close the connections.

        :returns: a ``Deferred`` firing with ``None``.  Safe to call twice,
            and before :meth:`open`.
        """
        return defer.Deferred.fromCoroutine(self._close())

    async def _shut_down(self):
        threads, self._writer_threads = self._writer_threads, []
        self._thread = None
        if self._counter is not None:
            threads.append(self._counter)
            self._counter = None
        for thread in threads:
            await thread.stop()

    def _writers(self):
        return self._writer_threads

    # Losing the database: a server may be down for a while, which is
    # passing trouble; nothing here makes the store unusable for good.

    def when_lost(self):
        """
        See :meth:`taskbroker.interfaces.ITaskStore.when_lost`: never
        fires; a server that is away is passing trouble.
        """
        return defer.Deferred()

    def _lose(self, error):
        pass

    def check(self):
        """
        See :meth:`taskbroker.interfaces.ITaskStore.check`: PostgreSQL
        checks its own pages (enable data checksums with ``initdb -k``).
        """
        return defer.succeed(None)

    # Group commit (taskbroker.store._batches)

    def _commit(self, link, operations):
        channels = (self.channel, self.done_channel)
        for attempt in range(DEADLOCK_RETRIES + 1):
            connection = link.get()
            # (Read by the listener, to tell this store's notifications.)
            self.writer_pids[threading.get_ident()] = link.pid
            try:
                return sql.run_batch(
                    connection, operations, self._owner, channels
                )
            except sql.pg_errors.DeadlockDetected:
                # Two writers' batches waited for each other's rows (a
                # cancel racing a result, say): the server rolled this
                # one back whole, so it runs again as it was.
                if attempt == DEADLOCK_RETRIES:
                    raise

    def _read(self, query, *args, thread=None):
        return BatchedStore._read(
            self, _on(query), *args, thread=thread or self._counter
        )

    def cannot_write(self, reason):
        """
        An errback for the lease's statements: a broker that cannot renew
        cannot write either, even with no write to try; say so (its
        workers move to another broker after a while) until a probe's
        write commits.
        """
        if self.write_error is None and self._state == "open":
            self.write_error = one_line(reason.value)
            self._start_probing()
        return reason

    # What the claims run

    def _run(self, thread, function, *args):
        return BatchedStore._read(self, _on(function), *args, thread=thread)

    # The writes that start or end this broker's attempts

    def _tracking(self, d, task_id, running):
        def changed(ok):
            if ok:
                (
                    self.running_ids.add
                    if running
                    else self.running_ids.discard
                )(task_id)
            return bool(ok)

        return d.addCallback(changed)

    def submit(self, tasks):
        def inserted(submitted):
            self.running_ids.update(
                row.id
                for row, created in submitted
                if created and row.state == "running"
            )
            return submitted

        return BatchedStore.submit(self, tasks).addCallback(inserted)

    def dispatch(self, task_id, *args, **kwargs):
        return self._tracking(
            BatchedStore.dispatch(self, task_id, *args, **kwargs),
            task_id,
            True,
        )

    def finish(self, task_id, *args):
        return self._tracking(
            BatchedStore.finish(self, task_id, *args), task_id, False
        )

    def requeue(self, task_id, *args, **kwargs):
        return self._tracking(
            BatchedStore.requeue(self, task_id, *args, **kwargs),
            task_id,
            False,
        )

    def release(self, task_ids):
        """
        Give back queued tasks this store's broker claimed and will not
        dispatch (with the group commit, which wakes the other brokers).
        """
        return self._write(sql.release, list(task_ids))


def _record_levels(connection, levels, default):
    """
    Record the levels in an empty database, or check that they are those
    recorded.  Recording them (again, after an operator emptied
    ``taskbroker_levels`` to change them) ranks the queued tasks anew.
    """
    with connection.transaction():
        connection.execute(
            "SELECT pg_advisory_xact_lock(hashtext('taskbroker schema ' "
            "|| current_schema()))"
        )
        rows = connection.execute(
            "SELECT name, is_default FROM taskbroker_levels ORDER BY rank"
        ).fetchall()
        if rows:
            names = tuple(name for name, _ in rows)
            recorded = next(
                (name for name, is_default in rows if is_default), None
            )
            if names != levels or recorded != default:
                raise StoreError(
                    "the database's priority levels are "
                    f"{','.join(names)} (default {recorded}), this broker's "
                    f"are {','.join(levels)} (default {default}): start "
                    "every broker with the same --priorities and "
                    "--default-priority (to change them, see 'Changing "
                    "priority levels' in the docs)"
                )
            return
        for rank, name in enumerate(levels):
            connection.execute(
                "INSERT INTO taskbroker_levels (rank, name, is_default) "
                "VALUES (%s, %s, %s)",
                (rank, name, name == default),
            )
        connection.execute(
            "UPDATE tasks AS t SET rank = l.rank FROM taskbroker_levels AS l "
            "WHERE t.state = 'queued' AND l.name = COALESCE(t.priority, %s)",
            (default,),
        )
        connection.execute(
            "UPDATE tasks SET rank = NULL WHERE state = 'queued' "
            "AND COALESCE(priority, %s) <> ALL(%s)",
            (default, list(levels)),
        )


@implementer(IClaimSource)
class PostgresClaims:
    """
    The claims of one broker on a :class:`PostgresStore`: taken for idle
    credits, held under a lease in ``taskbroker_brokers``, and given to
    the other brokers when the lease lapses.
    """

    shared = True

    def __init__(self, store, broker_id):
        self._store = store
        self._id = broker_id
        self.lease = store.lease
        self.renew_interval = RENEW_INTERVAL
        self._on_change = None
        self._leaser = None
        self._claimer = None
        self._listener = None
        # Claimed tasks to give back in the next statement.
        self._to_release = set()
        self._release_call = None

    def __repr__(self):
        return f"<PostgresClaims of {self._id!r}>"

    def start(self, now, on_change, on_finished=None):
        return defer.Deferred.fromCoroutine(
            self._start(on_change, on_finished)
        )

    async def _start(self, on_change, on_finished):
        store = self._store
        self._on_change = on_change
        self._leaser = store._connection_thread("lease")
        await self._leaser.start()
        # Claims on a connection of their own: a claim for a credit does
        # not wait behind the commit of the result that freed it.
        self._claimer = store._connection_thread("claims", (sql.LAZY_COMMIT,))
        await self._claimer.start()
        await store._run(
            self._leaser,
            sql.register,
            self._id,
            socket.gethostname(),
            os.getpid(),
            self.lease,
        )
        self._listener = _Listener(
            store, store._reactor, on_change, on_finished
        )
        # Listening before the broker claims: a task inserted after this
        # wakes it.  (If the server refuses, the poll covers until the
        # listener is back.)
        await self._listener.start()
        # A new broker answers for no running task: those of a broker
        # that went away come back when its lease lapses (reclaim), or
        # with their workers (adopt).
        return []

    def stop(self):
        return defer.Deferred.fromCoroutine(self._stop())

    async def _stop(self):
        if self._release_call is not None and self._release_call.active():
            self._release_call.cancel()
        self._release_call = None
        if self._listener is not None:
            listener, self._listener = self._listener, None
            await listener.stop()
        if self._claimer is not None:
            claimer, self._claimer = self._claimer, None
            await claimer.stop()
        if self._leaser is not None:
            leaser, self._leaser = self._leaser, None
            try:
                await leaser.run(_on(sql.unregister), self._id)
            except Exception as e:
                log.warn(
                    "could not give back this broker's claims: {error}",
                    error=one_line(e),
                )
            await leaser.stop()

    def queues(self):
        store = self._store
        return store._run(store._counter, sql.queued_groups)

    def claim_queue(self, handler, priorities, after_id, limit, now):
        raise NotImplementedError("a shared store claims for credits")

    def poll(self, limit):
        raise NotImplementedError("a shared store claims for credits")

    def polled(self, cursor):
        raise NotImplementedError("a shared store claims for credits")

    def claim_for(self, levels, handlers, limit, now):
        store = self._store
        ranks = sorted(
            {
                store.levels.index(level)
                for level in levels
                if level in store.levels
            }
        )
        if not ranks or not handlers or limit <= 0:
            return defer.succeed([])
        return store._run(
            self._claimer,
            sql.claim,
            self._id,
            ranks,
            sorted(handlers),
            limit,
            now,
        )

    def dispatch_for(
        self, levels, handlers, workers, now, priority, max_attempts
    ):
        store = self._store
        ranks = sorted(
            {
                store.levels.index(level)
                for level in levels
                if level in store.levels
            }
        )
        if not ranks or not handlers or not workers:
            return defer.succeed([None] * len(workers))

        def dispatched(rows):
            store.running_ids.update(row.id for row in rows if row is not None)
            return rows

        # With the group commit: a result and the dispatch its freed slot
        # asked for share one transaction.
        return store._write(
            sql.dispatch_for,
            ranks,
            sorted(handlers),
            list(workers),
            now,
            priority,
            max_attempts,
        ).addCallback(dispatched)

    def upcoming(self, after, limit):
        store = self._store
        return store._run(
            store._counter, sql.delayed_window, tuple(after), limit
        )

    def inserted(self, task_ids):
        pass  # inserted with this broker as their owner

    def release(self, task_ids):
        """
        Give tasks back, in one statement per reactor turn; if that fails,
        again a second later, until it is done (the tasks are claimed by
        this broker, and nobody else's to run, until then).
        """
        self._to_release.update(task_ids)
        if self._to_release and self._release_call is None:
            self._release_call = self._store._reactor.callLater(
                0, self._release
            )

    def _release(self):
        self._release_call = None
        task_ids, self._to_release = self._to_release, set()

        def failed(reason):
            if not reason.check(StoreError):
                return reason
            self._to_release.update(task_ids)
            if self._release_call is None and self._leaser is not None:
                self._release_call = self._store._reactor.callLater(
                    RELEASE_RETRY, self._release
                )

        def released(_):
            # The brokers' notification of it is this broker's own, which
            # it ignores: wake it here.
            if self._on_change is not None:
                self._on_change()

        self._store.release(sorted(task_ids)).addCallbacks(
            released, failed
        ).addErrback(lambda f: log.failure("giving back claimed tasks", f))

    def renew(self, now):
        store = self._store

        def renewed(lost):
            if lost:
                store.running_ids.difference_update(lost)
            return lost

        return store._run(
            self._leaser,
            sql.renew,
            self._id,
            socket.gethostname(),
            os.getpid(),
            self.lease,
            set(store.running_ids),
        ).addCallbacks(renewed, store.cannot_write)

    def reclaim(self, now, grace):
        store = self._store
        return store._run(
            self._leaser, sql.reap, self._id, grace, store.channel
        )

    def adopt(self, task_id, token):
        store = self._store

        def adopted(outcome):
            if outcome[0] == "adopted":
                store.running_ids.add(task_id)
            return outcome

        return store._run(
            store._thread, sql.adopt, self._id, task_id, token
        ).addCallback(adopted)

    def watch(self, task_id):
        return self._store._write(sql.watch, task_id)

    def holding(self):
        store = self._store
        return store._run(self._leaser, sql.holding, self._id)

    def let_go(self, task_ids):
        store = self._store
        store.running_ids.difference_update(task_ids)
        return store._run(
            self._leaser, sql.let_go, self._id, sorted(task_ids), store.channel
        )


class _Listener:
    """
    ``LISTEN`` on a connection of its own, in a thread of its own: each
    notification that tasks may be claimable (inserted, given back or
    taken back) calls ``on_change`` in the reactor, several arriving
    together making one call; each that tasks ended calls ``on_finished``
    with their ids.  If the connection fails, it listens again after a
    pause, and then calls both once, for what it may have missed.
    """

    def __init__(self, store, reactor, on_change, on_finished=None):
        self._store = store
        self._reactor = reactor
        self._on_change = on_change
        self._on_finished = on_finished
        self._stopping = threading.Event()
        self._thread = threading.Thread(
            target=self._work, name="taskbroker-pg-listen", daemon=True
        )
        self._connection = None
        self._pending = False
        self._done = defer.Deferred()
        self._listening = defer.Deferred()

    def start(self):
        """
        :returns: a ``Deferred`` that fires once listening, or once the
            first attempt failed.
        """
        self._thread.start()
        return self._listening

    def stop(self):
        self._stopping.set()
        return self._done

    def _wake(self):
        self._pending = False
        self._on_change()

    def _listened(self):
        if not self._listening.called:
            self._listening.callback(None)

    def _finished(self, payload):
        if self._on_finished is not None:
            self._on_finished(sql.parse_ids(payload))

    def _notify(self):
        # In the reactor: one on_change for a burst of notifications.
        if not self._pending:
            self._pending = True
            self._reactor.callLater(0, self._wake)

    def _work(self):
        from psycopg import sql as pgsql

        call = self._reactor.callFromThread
        wait = 0.1
        missed = False
        store = self._store
        while not self._stopping.is_set():
            link = store._link("listen")
            try:
                connection = link.get()
                for channel in (store.channel, store.done_channel):
                    connection.execute(
                        pgsql.SQL("LISTEN {}").format(
                            pgsql.Identifier(channel)
                        )
                    )
                if missed:
                    call(log.info, "listening for new tasks again")
                    call(self._notify)
                    call(self._finished, "")
                call(self._listened)
                missed = False
                wait = 0.1
                while not self._stopping.is_set():
                    for notification in connection.notifies(timeout=0.5):
                        if notification.pid in store.writer_pids.values():
                            # This broker's own writes: it knows what they
                            # made claimable, and what they ended.
                            continue
                        if notification.channel == store.done_channel:
                            call(self._finished, notification.payload)
                        else:
                            call(self._notify)
            except Exception as e:
                call(self._listened)
                if not missed and not self._stopping.is_set():
                    call(
                        log.warn,
                        "lost the connection that listens for "
                        "new tasks ({error}); the poll finds them until "
                        "it is back",
                        error=one_line(e),
                    )
                missed = True
                self._stopping.wait(wait)
                wait = min(wait * 2, LISTEN_RETRY_MAX)
            finally:
                link.close()
        call(self._done.callback, None)
