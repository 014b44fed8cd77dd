# -*- test-case-name: tests.unit.test_status -*-
"""
What the broker reports about itself: its workers, its counters, and how
many tasks there are in each state, for STATS and WORKERS today and for a
JSON API or a metrics exporter later.  Reading it costs nothing that grows with the table.

Task counts are kept incrementally: the broker reports each change it
makes (:meth:`TaskCounts.add`, :meth:`TaskCounts.move`), and a recount
from the store, first in the background once the broker listens and then
periodically, corrects what the broker cannot see (rows inserted or
changed by SQL between polls, other brokers on a shared database, delayed
tasks beyond the broker's window that came due).  Their age is shown, so a
reader knows how old the last correction is.
"""

from collections import Counter

from twisted.internet import defer
from twisted.logger import Logger

from taskbroker.protocol.objects import iso_time

#: Seconds between recounts of the tasks table.
RECOUNT_INTERVAL = 60.0

#: A pseudo-state: queued tasks whose ``run_at`` is still to come (a
#: subset of ``queued``).
DELAYED = "delayed"


class TaskCounts:
    """
    Tasks by state, priority level and handler.

    :param default_priority: the level a NULL priority runs at.
    """

    def __init__(self, default_priority):
        self._default = default_priority
        # (state, level, handler) -> count; state may be DELAYED.
        self._counts = Counter()
        #: The time of the last recount (``IReactorTime.seconds()``), or
        #: ``None`` before the first.
        self.counted_at = None

    def seed(self, counts, now):
        """
        Replace the counts with a recount.

        :param counts: as :meth:`taskbroker.interfaces.ITaskStore.counts`
            returns them.
        """
        fresh = Counter()
        for (state, priority, handler, delayed), n in counts.items():
            level = priority or self._default
            fresh[(state, level, handler)] += n
            if delayed:
                fresh[(DELAYED, level, handler)] += n
        self._counts = fresh
        self.counted_at = now

    def add(self, state, priority, handler, delayed=False, n=1):
        """
        ``n`` tasks came into ``state`` (inserted, or found by a poll).
        """
        level = priority or self._default
        self._counts[(state, level, handler)] += n
        if delayed:
            self._counts[(DELAYED, level, handler)] += n

    def move(self, priority, handler, old, new, n=1):
        """
        ``n`` tasks went from state ``old`` to state ``new`` (either may
        be :data:`DELAYED`: a delayed task that came due moves from
        ``DELAYED`` to ``None``, and one requeued with a backoff from
        ``None`` to ``DELAYED``).
        """
        level = priority or self._default
        if old is not None:
            key = (old, level, handler)
            # Never below zero: a recount may already have seen the change.
            self._counts[key] = max(0, self._counts[key] - n)
        if new is not None:
            self._counts[(new, level, handler)] += n

    def items(self):
        """
        ``((state, level, handler), count)`` pairs (state may be
        :data:`DELAYED`).
        """
        return self._counts.items()

    def summary(self):
        """
        :returns: ``(tasks, waiting, delayed)``: ``{state: {level: n}}``,
            ``{handler: n}`` of queued tasks that are due, and the number
            of delayed ones.
        """
        tasks, waiting, delayed = {}, {}, 0
        held = Counter()
        for (state, level, handler), n in self._counts.items():
            if n <= 0:
                continue
            if state == DELAYED:
                delayed += n
                held[handler] += n
                continue
            by_level = tasks.setdefault(state, {})
            by_level[level] = by_level.get(level, 0) + n
            if state == "queued":
                waiting[handler] = waiting.get(handler, 0) + n
        for handler, n in held.items():
            left = waiting.get(handler, 0) - n
            if left > 0:
                waiting[handler] = left
            else:
                waiting.pop(handler, None)
        return tasks, waiting, delayed


class Status:
    """
    The broker's state as others read it.

    :param broker: the :class:`taskbroker.broker.core.Broker` this belongs
        to (its ``store``, ``clock``, ``sessions``, ``dispatcher`` and
        ``router``).
    """

    log = Logger()

    def __init__(self, broker):
        self._broker = broker
        self.counters = {
            "protocol_errors": 0,
            "internal_errors": 0,
            "stale_results": 0,
            "dispatched": 0,
            "completed": 0,
            "retried": 0,
            "lost_workers": 0,
            "store_errors": 0,
            "busy": 0,
            "refused_keys": 0,
        }
        self.tasks = TaskCounts(broker.config.default_priority)
        self._waiters = []

    def all_counters(self):
        """
        Every counter of the broker and its parts, by name.
        """
        broker = self._broker
        return dict(
            self.counters,
            dropped_credits=broker.dispatcher.dropped_credits,
            unlogged_bad_messages=broker.router.bad_messages.suppressed,
            requests_in_progress=broker.admission.pending,
            waits_held=broker.admission.waits,
        )

    def recount(self):
        """
        Count the tasks in the store again.  A recount asked for while one
        is under way shares it.

        :returns: a ``Deferred`` that fires when the counts are fresh, or
            fails if the store could not count.
        """
        waiter = defer.Deferred()
        self._waiters.append(waiter)
        if len(self._waiters) == 1:
            broker = self._broker

            def counted(counts):
                self.tasks.seed(counts, broker.clock.seconds())
                waiters, self._waiters = self._waiters, []
                for w in waiters:
                    w.callback(None)

            def failed(reason):
                waiters, self._waiters = self._waiters, []
                for w in waiters:
                    w.errback(reason)

            broker.store.counts(broker.clock.seconds()).addCallbacks(
                counted, failed
            )
        return waiter

    def counted(self):
        """
        :returns: a ``Deferred`` that fires once the tasks have been
            counted at least once (at once, after that).
        """
        if self.tasks.counted_at is not None:
            return defer.succeed(None)
        return self.recount()

    def workers(self):
        """
        The WORKERS reply's ``workers`` list (see ``docs/protocol.rst``),
        by name.
        """
        return [
            {
                "name": s.name,
                "priorities": list(s.levels),
                "handlers": sorted(s.handlers),
                "slots": s.slots,
                "busy": len(s.running),
                "connected_since": iso_time(s.connected_since),
                "last_seen": iso_time(s.last_seen),
                "key": None if s.key is None else s.key.decode("ascii"),
                "version": s.version,
            }
            for s in sorted(self._broker.sessions, key=lambda s: s.name)
        ]

    def running(self):
        """
        What each worker runs, from memory, for the dashboard: by worker
        name, ``[{"id", "handler", "priority", "progress", "message"}]``
        (``progress`` the handler's latest fraction, or ``None``).
        """
        broker = self._broker
        by_worker = {}
        for session in broker.sessions:
            tasks = []
            for task_id in sorted(session.running):
                attempt = broker.attempts.get(task_id)
                if attempt is None:
                    continue
                reported = attempt.progress or (None, None, None)
                tasks.append(
                    {
                        "id": task_id,
                        "handler": attempt.row.handler,
                        "priority": attempt.row.priority,
                        "progress": reported[0],
                        "message": reported[1],
                    }
                )
            by_worker[session.name] = tasks
        return by_worker

    def stats(self):
        """
        The STATS reply's ``stats`` object (see ``docs/protocol.rst``).
        """
        broker = self._broker
        tasks, waiting, delayed = self.tasks.summary()
        counted_at = self.tasks.counted_at
        write_error = broker.store.write_error
        return {
            # First: what a health check reads.
            "accepting_work": write_error is None,
            "write_error": write_error,
            "priorities": list(broker.levels),
            "tasks": tasks,
            "waiting": waiting,
            "delayed": delayed,
            "counts_age": (
                None
                if counted_at is None
                else round(max(0.0, broker.clock.seconds() - counted_at), 3)
            ),
            "unserved": sorted(
                h for h in waiting if not broker.dispatcher.served(h)
            ),
            "workers": len(broker.sessions),
            "slots": broker.sessions.total_slots(),
            "free_slots": broker.dispatcher.free_credits(),
            "dispatch_paused": broker.dispatcher.paused,
            "counters": self.all_counters(),
        }
