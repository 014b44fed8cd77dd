# -*- test-case-name: tests.unit.test_shared_claims -*-
"""
One in-memory database shared by several brokers, the way a PostgreSQL
database is (:mod:`taskbroker.store.postgresql`): each broker claims only
for its idle credits, holds its claims under a lease it renews, and takes
over the claims of a broker that stopped renewing.  For tests
(``taskbroker.testing``): the broker's unit tests run several brokers on
it with a ``Clock``, with no server.

The clock is the database's: every lease is judged on it, as PostgreSQL's
``now()`` would judge them, whatever each broker's own clock says.
"""

import math

from twisted.internet import defer
from twisted.python.failure import Failure
from zope.interface import implementer

from taskbroker.interfaces import IClaimSource
from taskbroker.store.memory import MemoryStore

#: Seconds a broker's claims last unless renewed.
DEFAULT_LEASE = 10.0


class SharedMemoryDatabase:
    """
    The shared database: one :class:`SharedMemoryStore` and the claims and
    leases of every broker on it.

    :param clock: the database's ``IReactorTime``, which times leases and
        delivers wake-ups (``callLater(0, ...)``, as a notification
        arrives after the transaction that sent it).
    :param lease: seconds a broker's claims last unless renewed.
    """

    def __init__(self, clock, lease=DEFAULT_LEASE):
        self.clock = clock
        self.lease = lease
        self.store = SharedMemoryStore(self, clock)
        # task id -> the broker id that claims it
        self.claimed = {}
        # broker id -> when its lease ends
        self.leases = {}
        # broker id -> its on_change, and its on_finished
        self._listeners = {}
        self._finished_listeners = {}

    def insert_external(self, *args, **kwargs):
        """
        An ``INSERT`` by another program (see
        :meth:`taskbroker.store.memory.MemoryStore.insert_external`), with
        the wake-up a trigger would send.
        """
        row = self.store.insert_external(*args, **kwargs)
        self.signal()
        return row

    def signal(self):
        """
        Wake every broker: tasks may have become claimable.
        """
        for on_change in list(self._listeners.values()):
            self.clock.callLater(0, on_change)

    def ended(self, task_ids):
        """
        Tell every broker that tasks ended, as a notification sent with the
        commit would.
        """
        for on_finished in list(self._finished_listeners.values()):
            self.clock.callLater(0, on_finished, list(task_ids))

    def live(self, broker_id):
        return self.leases.get(broker_id, -math.inf) >= self.clock.seconds()


class SharedMemoryStore(MemoryStore):
    """
    A :class:`~taskbroker.store.memory.MemoryStore` whose writes that make
    tasks claimable wake the brokers, as a trigger sending ``NOTIFY``
    would, and whose claims are those of :class:`SharedClaims`.
    """

    def __init__(self, database, clock):
        MemoryStore.__init__(self, clock)
        self._database = database

    def claims(self, broker_id):
        return SharedClaims(self._database, broker_id)

    def _signalled(self, d):
        return d.addCallback(_passing(self._database.signal))

    def submit(self, tasks):
        return self._signalled(MemoryStore.submit(self, tasks))

    def requeue(self, *args, **kwargs):
        return self._signalled(MemoryStore.requeue(self, *args, **kwargs))

    def retry(self, task_id):
        return self._signalled(MemoryStore.retry(self, task_id))

    # A task that ends is nobody's claim any more, as an owner column
    # cleared by the same UPDATE would say.

    def _unclaim(self, task_id, ended=True):
        if ended:
            self._database.claimed.pop(task_id, None)
            self._database.ended([task_id])

    def finish(self, task_id, *args):
        def ended(changed):
            self._unclaim(task_id, changed)
            return changed

        return MemoryStore.finish(self, task_id, *args).addCallback(ended)

    def cancel(self, task_id, finished_at):
        def ended(row):
            self._unclaim(
                task_id, row is not None and row.state == "cancelled"
            )
            return row

        return MemoryStore.cancel(self, task_id, finished_at).addCallback(
            ended
        )

    def reject(self, task_id, error, finished_at):
        return MemoryStore.reject(
            self, task_id, error, finished_at
        ).addCallback(_passing(lambda: self._unclaim(task_id)))


def _passing(call):
    def after(result):
        call()
        return result

    return after


@implementer(IClaimSource)
class SharedClaims:
    """
    The claims of one broker on a :class:`SharedMemoryDatabase`.
    """

    shared = True

    def __init__(self, database, broker_id):
        self._db = database
        self._id = broker_id
        self.lease = database.lease
        self._on_change = None
        # The live tasks this broker claimed, to tell which it lost.
        self._claimed = set()

    def __repr__(self):
        return f"<SharedClaims of {self._id!r}>"

    def _mine(self):
        return [
            task_id
            for task_id, owner in self._db.claimed.items()
            if owner == self._id
        ]

    def _claim(self, task_id):
        self._db.claimed[task_id] = self._id
        self._claimed.add(task_id)

    def start(self, now, on_change, on_finished=None):
        db = self._db
        db.leases[self._id] = db.clock.seconds() + db.lease
        self._on_change = db._listeners[self._id] = on_change
        if on_finished is not None:
            db._finished_listeners[self._id] = on_finished
        # A new broker answers for no running task: those of a broker that
        # went away are taken back once its lease lapses (reclaim).
        return defer.succeed([])

    def stop(self):
        db = self._db
        db._listeners.pop(self._id, None)
        db._finished_listeners.pop(self._id, None)
        # Queued claims go back at once; running ones stay until the
        # lease lapses, for the workers to finish and another broker to
        # take over.
        self.release(
            [
                task_id
                for task_id in self._mine()
                if db.store._rows[task_id].state == "queued"
            ]
        )
        return defer.succeed(None)

    def queues(self):
        return defer.succeed(
            sorted(
                {
                    (row.handler, row.priority)
                    for row in self._db.store._rows.values()
                    if row.state == "queued"
                },
                key=repr,
            )
        )

    def claim_queue(self, handler, priorities, after_id, limit, now):
        raise NotImplementedError("a shared store claims for credits")

    def poll(self, limit):
        raise NotImplementedError("a shared store claims for credits")

    def polled(self, cursor):
        raise NotImplementedError("a shared store claims for credits")

    def claim_for(self, levels, handlers, limit, now):
        return defer.succeed(self._claim_due(levels, handlers, limit, now))

    def _claim_due(self, levels, handlers, limit, now):
        db = self._db
        rank = {}
        for i, level in enumerate(levels):
            rank.setdefault(level, i)
        handlers = set(handlers)
        candidates = []
        for row in db.store._rows.values():
            if (
                row.state != "queued"
                or row.handler not in handlers
                or row.priority not in rank
            ):
                continue
            if row.run_at is not None and not (
                isinstance(row.run_at, (int, float)) and row.run_at <= now
            ):
                continue
            owner = db.claimed.get(row.id)
            if owner is not None and db.live(owner):
                continue
            candidates.append((rank[row.priority], row.id, row))
        candidates.sort(key=lambda c: c[:2])
        taken = [row for _, _, row in candidates[:limit]]
        for row in taken:
            self._claim(row.id)
        return taken

    def dispatch_for(
        self, levels, handlers, workers, now, priority, max_attempts
    ):
        store = self._db.store
        rows = self._claim_due(levels, handlers, len(workers), now)
        dispatched = [None] * len(workers)
        for i, (row, worker) in enumerate(zip(rows, workers)):
            outcome = []
            store.dispatch(
                row.id, row.token + 1, worker, now, priority, max_attempts
            ).addBoth(outcome.append)
            if isinstance(outcome[0], Failure):
                # One statement in a real store: all or nothing.
                for done in rows[:i]:
                    store._rows[done.id] = done
                self.release([row.id for row in rows])
                return defer.fail(outcome[0])
            if outcome[0]:
                dispatched[i] = store._rows[row.id]
        return defer.succeed(dispatched)

    def upcoming(self, after, limit):
        return self._db.store.delayed_window(after, limit)

    def inserted(self, task_ids):
        # What the broker dispatched as it inserted it is its claim; the
        # rest waits unclaimed.  (A real shared store records the owner in
        # the inserting transaction; here nothing runs in between.)
        rows = self._db.store._rows
        for task_id in task_ids:
            if rows[task_id].state == "running":
                self._claim(task_id)

    def release(self, task_ids):
        db = self._db
        freed = False
        for task_id in task_ids:
            self._claimed.discard(task_id)
            if db.claimed.get(task_id) == self._id:
                del db.claimed[task_id]
                freed = True
        if freed:
            db.signal()

    def renew(self, now):
        db = self._db
        lapsed = not db.live(self._id)
        db.leases[self._id] = db.clock.seconds() + db.lease
        if not lapsed:
            return defer.succeed(None)
        # Another broker may have taken this one for gone (and stopped
        # waking it): come back, let go of the queued claims (the broker
        # drops what it holds), and say which running tasks were taken.
        if self._on_change is not None:
            db._listeners[self._id] = self._on_change
        rows = db.store._rows
        lost = set()
        for task_id in list(self._claimed):
            state = rows[task_id].state
            if db.claimed.get(task_id) != self._id:
                self._claimed.discard(task_id)
                if state in ("queued", "running"):
                    lost.add(task_id)
            elif state == "queued":
                self.release((task_id,))
        return defer.succeed(lost)

    @defer.inlineCallbacks
    def reclaim(self, now, grace):
        db = self._db
        lapsed = [b for b in db.leases if b != self._id and not db.live(b)]
        freed = 0
        for broker_id in lapsed:
            past_grace = db.leases[broker_id] + grace < db.clock.seconds()
            if past_grace:
                del db.leases[broker_id]
            db._listeners.pop(broker_id, None)
            for task_id, owner in list(db.claimed.items()):
                if owner != broker_id:
                    continue
                row = db.store._rows[task_id]
                if row.state == "running" and not past_grace:
                    continue  # its worker may bring it here (adopt)
                del db.claimed[task_id]
                if row.state == "running":
                    # A compare-and-set: the next dispatch gives it a new
                    # token, so a late result from the old worker is
                    # refused.
                    yield MemoryStore.requeue(
                        db.store, task_id, row.token, consumed=False
                    )
                freed += row.state in ("queued", "running")
        if freed:
            db.signal()
        return freed

    def adopt(self, task_id, token):
        db = self._db
        row = db.store._rows.get(task_id)
        if row is None or row.state != "running" or row.token != token:
            return defer.succeed(("stale", None))
        owner = db.claimed.get(task_id)
        if owner is not None and owner != self._id and db.live(owner):
            return defer.succeed(("held", None))
        self._claim(task_id)
        return defer.succeed(("adopted", row))

    def watch(self, task_id):
        # Every end is told to every broker here.
        return defer.succeed(None)

    def holding(self):
        rows = self._db.store._rows
        return defer.succeed(
            {
                task_id: rows[task_id].state
                for task_id in self._mine()
                if rows[task_id].state in ("queued", "running")
            }
        )

    @defer.inlineCallbacks
    def let_go(self, task_ids):
        db = self._db
        count = 0
        for task_id in task_ids:
            if db.claimed.get(task_id) != self._id:
                continue
            row = db.store._rows[task_id]
            self._claimed.discard(task_id)
            del db.claimed[task_id]
            if row.state == "running":
                yield MemoryStore.requeue(
                    db.store, task_id, row.token, consumed=False
                )
            count += row.state in ("queued", "running")
        if count:
            db.signal()
        return count
