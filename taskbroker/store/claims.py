# -*- test-case-name: tests.unit.test_claims -*-
"""
The claim source of a database that one broker owns at a time (SQLite, and
the in-memory store): every queued task is this broker's to claim, so
claiming is reading, and the broker claims ahead, a window of each queue.

New tasks inserted by other programs are found by polling above an id
watermark.  That works because a single owner's ids commit in order (one
writer); a store shared by several brokers needs another way (claims
under leases, wake-ups), which is why the watermark lives here and not in
the broker.
"""

from twisted.internet import defer
from zope.interface import implementer

from taskbroker.interfaces import IClaimSource


@implementer(IClaimSource)
class OwnerClaims:
    """
    Claims for the one broker that owns the store.

    :param store: an open store that provides
        :class:`taskbroker.interfaces.IQueueReads`.
    """

    shared = False
    lease = None

    def __init__(self, store):
        self._store = store
        # Every queued task up to the watermark belongs to a queue the
        # broker knows of; a poll reads above it.
        self._watermark = 0
        # Tasks above the watermark that the broker inserted itself.
        self._inserted = set()

    def start(self, now, on_change, on_finished=None):
        return self._store.running()

    def stop(self):
        return defer.succeed(None)

    @defer.inlineCallbacks
    def queues(self):
        pairs, last_id = yield self._store.queued_groups()
        self._watermark = max(self._watermark, last_id)
        return pairs

    def claim_queue(self, handler, priorities, after_id, limit, now):
        return self._store.queued_window(
            handler, priorities, after_id, limit, now
        )

    def claim_for(self, levels, handlers, limit, now):
        raise NotImplementedError("a single owner claims by queue")

    def dispatch_for(
        self, levels, handlers, workers, now, priority, max_attempts
    ):
        raise NotImplementedError("a single owner claims by queue")

    def upcoming(self, after, limit):
        return self._store.delayed_window(after, limit)

    @defer.inlineCallbacks
    def poll(self, limit):
        rows, last_id = yield self._store.scan_queued(
            self._watermark, limit, frozenset(self._inserted)
        )
        rows = [row for row in rows if row.id not in self._inserted]
        return rows, (last_id if last_id != self._watermark else None)

    def polled(self, cursor):
        self._watermark = max(self._watermark, cursor)
        self._inserted = {i for i in self._inserted if i > self._watermark}

    def inserted(self, task_ids):
        self._inserted.update(i for i in task_ids if i > self._watermark)

    def release(self, task_ids):
        pass  # nobody else claims: a later window load reads them again

    def renew(self, now):
        return defer.succeed(None)

    def reclaim(self, now, grace):
        return defer.succeed(0)

    def adopt(self, task_id, token):
        return defer.succeed(("stale", None))

    def watch(self, task_id):
        return defer.succeed(None)

    def holding(self):
        return defer.succeed({})

    def let_go(self, task_ids):
        return defer.succeed(0)
