# -*- test-case-name: tests.unit.test_shared_claims -*-
"""
Claiming for idle credits: how a broker on a store shared by several
brokers (:attr:`taskbroker.interfaces.IClaimSource.shared`) finds work.

It holds no window of queued tasks: whenever credits wait (a worker
asked for work and nothing it can run is held), and on every wake-up the
store sends (a task inserted, released or reclaimed), it claims at most as
many tasks as the waiting credits of each class of workers can take, the
most urgent first, and dispatches them to those credits in the same
statement (so a task claimed is never held, and a claim costs no commit
of its own).  A broker on a single owner's store claims ahead in
windows instead (:mod:`taskbroker.broker.backlog`), and this does
nothing.
"""

from twisted.logger import Logger

from taskbroker.broker.validation import invalid_row
from taskbroker.errors import WriteRefused


class Feeder:
    """
    Claims tasks for the credits that wait.

    :param broker: the :class:`taskbroker.broker.core.Broker` this belongs
        to (its ``claims``, ``dispatcher`` and ``backlog``).
    """

    log = Logger()

    def __init__(self, broker):
        self._broker = broker
        # Counts the wake-ups (see wake), so that a claim that came back
        # short knows whether tasks may have come meanwhile.
        self._wakes = 0
        # The classes of workers for which the store had no task left at
        # the last claim, and no wake-up came since.
        self._starved = set()

    def feed(self, runs=None):
        """
        Claim and dispatch tasks for the credits that wait, from a shared
        store: for each class of workers with idle credits, at most as
        many tasks as they have credits, the most urgent first, each
        dispatched in the statement that claims it.  The credits are
        taken while their claim is under way; those it finds nothing for
        come back, and are claimed for again if the store signalled a
        change meanwhile, else not before the next wake-up (a credit
        that frees up finds the store empty without asking it).

        :param runs: if given, ``runs(levels, handlers)`` says whether a
            class claims now.
        """
        broker = self._broker
        if (
            not broker.claims.shared
            or broker.stopped
            or broker.dispatcher.paused
        ):
            return
        for levels, handlers, _ in broker.dispatcher.hungry():
            if (levels, handlers) in self._starved:
                continue
            if runs is not None and not runs(levels, handlers):
                continue
            slots = broker.dispatcher.take_credits(levels, handlers)
            if slots:
                self._dispatch_for(levels, handlers, slots)

    def wake(self):
        """
        Tasks may have become claimable (the store signalled a change, a
        delayed task came due, the poll's safety net): claim for the
        credits that wait, and again for those of a claim under way that
        comes back short.
        """
        self.unstarve()
        self.feed()

    def offer(self, row):
        """
        This broker inserted the task ``row`` unclaimed (its own writes do
        not wake it): every class may claim again, and the waiting credits
        of those that can run it claim now.  A credit that waited when the
        insert began took the task in it; one may have come back since
        from a claim that ran before the insert committed.
        """
        level = self._broker.level_of(row.priority)
        self.unstarve()
        self.feed(
            lambda levels, handlers: (
                level in levels and row.handler in handlers
            )
        )

    def unstarve(self):
        """
        This broker put claimable tasks in the store (its own writes do
        not wake it): the next credit of any class claims, and a claim
        under way that comes back short claims again.
        """
        self._wakes += 1
        self._starved.clear()

    def _dispatch_for(self, levels, handlers, slots):
        broker = self._broker
        sessions = [broker.sessions.get(slot.key) for slot in slots]
        wakes = self._wakes
        d = broker.claims.dispatch_for(
            self._names(levels),
            sorted(handlers),
            [session.name for session in sessions],
            broker.clock.seconds(),
            broker.config.default_priority,
            broker.config.max_attempts,
        )

        def dispatched(rows):
            for session, row in zip(sessions, rows):
                if row is None:
                    broker.give_back(session)
                else:
                    self._dispatched(session, row)
            if None not in rows:
                return
            if self._wakes != wakes:
                self.feed()
            else:
                # Nothing more to claim for this class until a wake-up:
                # its credits wait without asking the store again.
                self._starved.add((levels, handlers))

        def failed(reason):
            # Nothing was claimed.
            if reason.check(WriteRefused):
                # The database refused to dispatch one of the tasks (a
                # value out of range): claim without dispatching, and
                # dispatch one by one, so that it fails alone.
                for session in sessions:
                    broker.give_back(session)
                self._claim_for(levels, handlers, len(sessions))
                return None
            # The credits wait (paused, so that they do not ask again at
            # once) until the store works again.
            broker.dispatcher.paused = True
            for session in sessions:
                broker.give_back(session)
            return reason

        d.addCallbacks(dispatched, failed).addErrback(
            broker.trouble, "claiming tasks", pause=True
        )

    def _claim_for(self, levels, handlers, credits):
        """
        Claim tasks for the class's credits without dispatching them: they
        join the dispatcher, which gives them to the credits one by one.
        """
        broker = self._broker
        d = broker.claims.claim_for(
            self._names(levels),
            sorted(handlers),
            credits,
            broker.clock.seconds(),
        )

        def claimed(rows):
            for row in rows:
                if broker.stopped:
                    broker.claims.release((row.id,))
                    continue
                self._forget_copies(row.id)
                row = broker.backlog.checked(row)
                if row is not None:
                    broker.backlog.enqueue(row)

        d.addCallback(claimed).addErrback(
            broker.trouble, "claiming tasks", pause=True
        )

    def _forget_copies(self, task_id):
        """
        The store says a task is now this broker's to run afresh: any
        attempt or copy of it that the broker still has is out of date.
        """
        broker = self._broker
        stale = broker.attempts.get(task_id)
        if stale is not None:
            broker.stop_attempt(stale, "queued again in the store")
        broker.backlog.withdraw(task_id)

    def _names(self, levels):
        """
        The level names of level numbers, and ``None`` (a NULL priority)
        along with the default level.
        """
        broker = self._broker
        names = [broker.levels[level] for level in sorted(levels)]
        if broker.config.default_priority in names:
            names.append(None)
        return names

    def _dispatched(self, session, row):
        """
        A task claimed and dispatched to ``session`` committed: send it,
        unless its row cannot run (then it fails, and the credit finds
        other work).
        """
        broker = self._broker
        self._forget_copies(row.id)
        reason = invalid_row(row, broker.levels)
        if reason is None:
            broker.status.tasks.move(
                row.priority, row.handler, "queued", "running"
            )
            broker.claimed(session, row)
            return
        self.log.warn(
            "rejected task {task_id}: {reason}", task_id=row.id, reason=reason
        )
        d = broker.store.finish(
            row.id,
            row.token,
            "failed",
            None,
            reason,
            None,
            broker.clock.seconds(),
        )

        def failed(changed):
            if changed:
                broker.status.tasks.move(
                    row.priority, row.handler, "queued", "failed"
                )
                broker.outcomes.notify(row.id)

        d.addCallback(failed).addErrback(
            broker.trouble, "failing an invalid task"
        )
        broker.give_back(session)
        self.feed()

    def start_over(self, lost):
        """
        The broker's claims lapsed (it could not renew them in time), so
        other brokers may have claimed what it held: drop every task held,
        without dispatching it; stop the running attempts whose claims
        were taken, which other brokers run again; and claim afresh.

        :param lost: the ids of the running tasks whose claims were taken.
        """
        broker = self._broker
        # (Delayed tasks are kept: a shared store's broker holds them only
        # to time its next claim, not as claims.)
        dropped = broker.dispatcher.clear_tasks()
        stopped = 0
        for task_id in lost:
            attempt = broker.attempts.get(task_id)
            if attempt is not None:
                broker.stop_attempt(attempt, "taken over by another broker")
                stopped += 1
        self.log.warn(
            "claims lapsed: dropped {count} held tasks, stopped "
            "{stopped} taken over; claiming afresh",
            count=len(dropped),
            stopped=stopped,
        )
        self.wake()
