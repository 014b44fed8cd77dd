# -*- test-case-name: tests.unit.test_broker_bulk -*-
"""
Work on many tasks at once: retention (finished tasks deleted when they
are older than ``--keep-finished``), and the PURGE, CANCEL_MANY and
RETRY_MANY requests.

Each goes in small batches, one transaction each, the next started only
when the last committed: dispatch goes on between them, and no lock is
held for long.  A request does a bounded amount of work and says where
to go on (``next`` or ``more``), so that no answer takes long whatever
the number of tasks; the clients ask again until done.  Under CURVE with
client checks, a client key acts on its own tasks only.
"""

from twisted.internet import defer, task
from twisted.logger import Logger

from taskbroker.broker.requests import Refused
from taskbroker.schedules import format_duration, parse_duration
from taskbroker.store import FINAL_STATES

#: Tasks one purge transaction deletes, and the pause between two: at
#: most 1,000 tasks a second per broker (86 million a day), which keeps
#: up with any steady flow a broker carries, while dispatch goes on
#: between.  A backlog (a first --keep-finished on a long history) is
#: worked off at that pace.
PURGE_BATCH = 100
PURGE_PAUSE = 0.1
#: Transactions one PURGE request runs, at most.
PURGE_BATCHES_PER_REQUEST = 20
#: Seconds between two rounds of retention: a round with nothing to
#: delete is one indexed look, and frequent rounds keep each one short.
RETENTION_INTERVAL = 10.0
#: Tasks one CANCEL_MANY or RETRY_MANY request acts on, at most, and the
#: page in which it reads them.
BULK_LIMIT = 1000
BULK_PAGE = 250


class Bulk:
    """
    :param broker: the :class:`taskbroker.broker.core.Broker` this belongs
        to.
    """

    log = Logger()

    def __init__(self, broker):
        self._broker = broker
        #: Seconds a finished task is kept (``None``: for ever), once
        #: :meth:`start_retention` has read the database's default.
        self.keep_finished = None

    # -- deleting ------------------------------------------------------------

    @defer.inlineCallbacks
    def purge(
        self,
        finished_before,
        states=FINAL_STATES,
        handler=None,
        submitter=None,
        batches=None,
    ):
        """
        Delete finished tasks, a batch per transaction, until none is left
        or ``batches`` ran.

        :returns: a ``Deferred`` firing with ``(deleted, more)``: how many
            it deleted, and whether the last batch was full.
        """
        broker = self._broker
        deleted, more, done = 0, True, 0
        while (
            more and not broker.stopped and (batches is None or done < batches)
        ):
            if done:
                # Paced: back to back, batches would hold up the commits
                # of dispatch (measured: a 0.7 s wait for the tasks
                # submitted while 100,000 rows went at full speed).
                yield task.deferLater(broker.clock, PURGE_PAUSE, lambda: None)
            rows = yield broker.store.purge(
                finished_before, states, handler, submitter, PURGE_BATCH
            )
            done += 1
            deleted += len(rows)
            more = len(rows) == PURGE_BATCH
            counts = broker.status.tasks
            for priority, handler_name, state in rows:
                counts.move(priority, handler_name, state, None)
        if deleted:
            broker.metrics.purged(deleted)
        return (deleted, more)

    @defer.inlineCallbacks
    def start_retention(self):
        """
        Settle how long finished tasks are kept (``--keep-finished``, else
        the database's default) and say it, once.
        """
        broker = self._broker
        configured = broker.config.keep_finished
        if configured is not None:
            self.keep_finished = (
                None if configured == float("inf") else configured
            )
            source = "--keep-finished"
        else:
            text = yield broker.store.setting("default_keep_finished")
            try:
                self.keep_finished = parse_duration(
                    text or "none", allow_none=True
                )
            except ValueError:
                self.log.warn(
                    "the database's default_keep_finished "
                    "{text!r} is not a duration: finished tasks "
                    "are kept",
                    text=text,
                )
                self.keep_finished = None
            source = "the database's default; --keep-finished changes it"
        if self.keep_finished is None:
            self.log.info(
                "finished tasks are kept for ever ({source})", source=source
            )
        else:
            self.log.info(
                "finished tasks are deleted {duration} after they finish "
                "({source})",
                duration=format_duration(self.keep_finished),
                source=source,
            )

    @defer.inlineCallbacks
    def retain(self):
        """
        A round of retention: delete what finished before ``now -
        keep_finished``, in batches.
        """
        if self.keep_finished is None or self._broker.stopped:
            return
        before = self._broker.clock.seconds() - self.keep_finished
        deleted, _ = yield self.purge(before)
        if deleted:
            self.log.info(
                "deleted {count} tasks that finished over {duration} ago",
                count=deleted,
                duration=format_duration(self.keep_finished),
            )

    # -- requests ------------------------------------------------------------

    def on_PURGE(self, identity, body, key=None):
        return self._broker.requests.carry_out(
            self.purge_request, identity, body, key, "purging tasks"
        )

    def on_CANCEL_MANY(self, identity, body, key=None):
        return self._broker.requests.carry_out(
            self.cancel_many, identity, body, key, "cancelling tasks"
        )

    def on_RETRY_MANY(self, identity, body, key=None):
        return self._broker.requests.carry_out(
            self.retry_many, identity, body, key, "retrying tasks"
        )

    def purge_request(self, body, key):
        """
        Carry out a PURGE: at most ``PURGE_BATCHES_PER_REQUEST`` batches.

        :returns: a ``Deferred`` firing with ``{"deleted": n, "more":
            bool}``.
        """
        state = body.get("state")
        d = self.purge(
            self._broker.clock.seconds() - body["older_than"],
            (state,) if state else FINAL_STATES,
            body.get("handler"),
            self._broker.requests.scope(key),
            PURGE_BATCHES_PER_REQUEST,
        )
        return d.addCallback(
            lambda done: {"deleted": done[0], "more": done[1]}
        )

    def cancel_many(self, body, key):
        """
        Carry out a CANCEL_MANY: cancel the queued (or running) tasks, of
        a handler if it names one, from id ``after`` on; or, with
        ``count``, only count them.
        """
        return self._many(
            body,
            key,
            body.get("state") or "queued",
            self._broker.requests.cancel_task,
            "cancelled",
        )

    def retry_many(self, body, key):
        """
        Carry out a RETRY_MANY: queue the failed (or cancelled) tasks
        again, as RETRY does each.
        """
        return self._many(
            body,
            key,
            body.get("state") or "failed",
            self._broker.requests.retry_task,
            "retried",
        )

    @defer.inlineCallbacks
    def _many(self, body, key, state, act, done_key):
        broker = self._broker
        scope = broker.requests.scope(key)
        handler = body.get("handler")
        if body.get("count"):
            count = yield broker.store.count(state, handler, scope)
            return {"count": count}
        after = body.get("after") or 0
        acted = failed = 0
        more = True
        while more and acted + failed < BULK_LIMIT and not broker.stopped:
            rows = yield broker.store.list(
                state,
                handler,
                after,
                min(BULK_PAGE, BULK_LIMIT - acted - failed),
                submitter=scope,
            )
            more = len(rows) == min(BULK_PAGE, BULK_LIMIT - acted - failed)
            if not rows:
                break
            after = rows[-1].id
            results = yield defer.DeferredList(
                [defer.maybeDeferred(act, row.id) for row in rows],
                consumeErrors=True,
            )
            for ok, value in results:
                if ok:
                    acted += 1
                elif value.check(Refused):
                    failed += 1  # its state changed meanwhile, say
                else:
                    # The store's trouble fails the whole request.
                    value.raiseException()
        if acted:
            self.log.info(
                "{count} tasks {what} in bulk", count=acted, what=done_key
            )
        return {
            done_key: acted,
            "refused": failed,
            "next": after if more else None,
        }
