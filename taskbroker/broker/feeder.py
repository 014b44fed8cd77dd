# -*- test-case-name: tests.unit.test_shared_claims -*-
"""
Claiming for idle credits: how a broker on a store shared by several
brokers (:attr:`taskbroker.interfaces.IClaimSource.shared`) finds work.

It holds no window of queued tasks: whenever credits wait (a worker
asked for work and nothing it can run is held), and on every wake-up the
store sends (a task inserted, released or reclaimed), it claims at most as
many tasks as the waiting credits of each class of workers can take, the
most urgent first.  A broker on a single owner's store claims ahead in
windows instead (:mod:`taskbroker.broker.backlog`), and this does
nothing.
"""

from twisted.logger import Logger


class Feeder:
    """
    Claims tasks for the credits that wait.

    :param broker: the :class:`taskbroker.broker.core.Broker` this belongs
        to (its ``claims``, ``dispatcher`` and ``backlog``).
    """

    log = Logger()

    def __init__(self, broker):
        self._broker = broker
        # Capability classes with a claim for them under way, and those
        # woken again meanwhile.
        self._feeding = set()
        self._feed_again = set()

    def feed(self):
        """
        Claim tasks for the credits that wait, from a shared store: for
        each class of workers with idle credits, at most as many tasks as
        they have credits, the most urgent first.  A class whose claim is
        under way is claimed for again when it ends.
        """
        broker = self._broker
        if not broker.claims.shared or broker.stopped or broker.dispatcher.paused:
            return
        for levels, handlers, credits in broker.dispatcher.hungry():
            key = (levels, handlers)
            if key in self._feeding:
                self._feed_again.add(key)
                continue
            self._feeding.add(key)
            self._claim_for(key, credits)

    def _claim_for(self, key, credits):
        broker = self._broker
        levels, handlers = key
        names = [broker.levels[level] for level in sorted(levels)]
        if broker.config.default_priority in names:
            names.append(None)  # a NULL priority runs at the default level
        d = broker.claims.claim_for(names, sorted(handlers), credits,
                                    broker.clock.seconds())

        def claimed(rows):
            for row in rows:
                if broker.stopped:
                    broker.claims.release((row.id,))
                    continue
                # The store says it is queued and now ours: any attempt or
                # copy of it this broker still has is out of date.
                stale = broker.attempts.get(row.id)
                if stale is not None:
                    broker.stop_attempt(stale, "queued again in the store")
                broker.backlog.withdraw(row.id)
                row = broker.backlog.checked(row)
                if row is not None:
                    broker.backlog.enqueue(row)

        def done(_):
            self._feeding.discard(key)
            if key in self._feed_again:
                self._feed_again.discard(key)
                self.feed()

        d.addCallback(claimed).addErrback(broker.trouble, "claiming tasks",
                                          pause=True)
        d.addBoth(done)

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
        self.log.warn("claims lapsed: dropped {count} held tasks, stopped "
                      "{stopped} taken over; claiming afresh",
                      count=len(dropped), stopped=stopped)
        self.feed()
