# -*- test-case-name: tests.unit.test_window -*-
"""
The backlog: the queued tasks this broker has claimed and holds in memory,
waiting for a credit or for their ``run_at``, and how it is fed from the
broker's claim source (:class:`taskbroker.interfaces.IClaimSource`).

The claim source's policy decides how much is held:

- a single owner (SQLite) claims ahead: however deep the store's queues,
  the backlog holds a bounded window of each
  (:mod:`taskbroker.broker.window`) and of the delayed tasks, read again
  as they drain; tasks that other programs inserted with SQL are found by
  a poll and admitted like submitted ones;
- a store shared by several brokers is claimed from only for idle
  credits (:class:`taskbroker.broker.feeder.Feeder`), on every wake-up: a credit that found
  nothing, a change signalled by the store, a delayed task coming due, the
  poll timer.  A task no credit of this broker takes goes back to the
  store for any broker to claim.

Rows are checked (:mod:`taskbroker.broker.validation`) before they are
held.  Due tasks go to the dispatcher, which may match them with a credit
at once; the broker then dispatches.
"""

import heapq
import math

from twisted.internet import defer
from twisted.logger import Logger

from taskbroker.broker.dispatch import Task
from taskbroker.broker.status import DELAYED
from taskbroker.broker.validation import (
    invalid_queue,
    invalid_row,
    with_defaults,
)
from taskbroker.broker.window import Windows

#: How many queued rows one poll reads at a time.
POLL_BATCH = 5000
#: The most tasks of one queue (level and handler) held in memory; the rest
#: wait in the store and are read as the window drains (window.py).
QUEUE_WINDOW = 1000
#: Seconds between a shared store's broker's looks for queued tasks no
#: broker can run.
SWEEP_INTERVAL = 10.0
#: The most delayed tasks held in memory, waiting for their time.
DELAYED_WINDOW = 1000

# The key of the delayed tasks' window (the queues' keys are tuples).
DELAYED_KEY = "delayed"
#: The largest payload (characters of JSON text) a task held in memory
#: keeps; a larger one is left in the store and read when the task is
#: dispatched, so that a window of large tasks costs at most this much
#: per task (16 MiB per queue) instead of up to 1 GB.
HELD_PAYLOAD = 16 * 1024


def held(row):
    """
    The row as the backlog holds it: without a payload larger than
    :data:`HELD_PAYLOAD` (``payload`` is then ``None``).
    """
    if row.payload is not None and len(row.payload) > HELD_PAYLOAD:
        return row._replace(payload=None)
    return row


class Backlog:
    """
    The queued tasks in memory, their windows, the delayed tasks' timer
    and the poller.

    :param broker: the :class:`taskbroker.broker.core.Broker` this belongs
        to (its ``store``, ``clock``, ``config``, ``dispatcher``,
        ``attempts``, ``outcomes``, and ``dispatch`` for the assignments
        that a new task makes).
    """

    log = Logger()

    def __init__(self, broker):
        self._broker = broker
        self._windows = Windows(QUEUE_WINDOW)
        self._delayed_window = Windows(DELAYED_WINDOW)
        # Tasks waiting for their run_at: a heap of (run_at, id) and the
        # rows by id (a row missing from the dict was withdrawn).
        self._heap = []
        self.delayed = {}
        self._delay_timer = None
        self._polling = False
        self._next_sweep = 0.0
        self.stopped = False

    @property
    def _shared(self):
        return self._broker.claims.shared

    # -- start and stop ----------------------------------------------------

    @defer.inlineCallbacks
    def load(self):
        """
        Read a window of each queue, and of the delayed tasks.  However
        deep the queues, this reads one window per queue, not every task.
        Queues no broker can run are failed whole.

        :returns: a ``Deferred`` that fires when done.
        """
        broker = self._broker
        self._delayed_window.leave(DELAYED_KEY, (-math.inf, 0))
        if self._shared:
            # Nothing is claimed ahead: the first credits will ask.
            yield self._load_delayed()
            return
        pairs = yield broker.claims.queues()
        now = broker.clock.seconds()
        rejected = []
        for handler, priority in pairs:
            reason = invalid_queue(handler, priority, broker.levels)
            if reason is not None:
                self.log.warn(
                    "rejected the queued tasks of handler {handler!r} and "
                    "priority {priority!r}: {reason}",
                    handler=handler,
                    priority=priority,
                    reason=reason,
                )
                rejected.append(
                    broker.store.reject_group(handler, priority, reason, now)
                )
                continue
            level = broker.level_of(priority or broker.config.default_priority)
            # Truncated at the start: the first load reads its oldest tasks.
            self._windows.leave((level, handler), 0)
        yield defer.gatherResults(rejected, consumeErrors=True)
        loads = [self._refill(key) for key in self._windows.truncated()]
        yield defer.gatherResults(
            [d for d in loads if d is not None], consumeErrors=True
        )
        yield self._load_delayed()

    def stop(self):
        self.stopped = True
        if self._delay_timer is not None and self._delay_timer.active():
            self._delay_timer.cancel()

    # -- what is held --------------------------------------------------------

    def holds(self, task_id):
        """
        Whether the task waits in memory (for a credit or its time).
        """
        return task_id in self._broker.dispatcher or task_id in self.delayed

    def is_truncated(self, key):
        """
        Whether older tasks of queue ``key`` (a ``(level, handler)`` pair)
        may wait in the store: a new one must not overtake them.
        """
        return key in self._windows

    def _held(self, task_id):
        return task_id in self._broker.attempts or self.holds(task_id)

    # -- in --------------------------------------------------------------------

    def admit(self, row):
        """
        A queued task new to the broker (submitted, or found by the
        poller): hold it in memory if its window has room, else leave it in
        the store for a later load.  (A shared store's brokers hold no new
        task: it waits in the store, unclaimed, for an idle credit to claim
        it, and the store wakes them.)
        """
        broker = self._broker
        if self._shared:
            # Inserted unclaimed: it waits in the store for any broker's
            # idle credit (see Feeder.offer).
            if broker.outcomes.is_waited(row.id):
                broker.requests.watch(row.id)
            if self._delays(row):
                broker.feeder.unstarve()
                self._delay(row)  # only to time the next claim
            else:
                broker.feeder.offer(row)
            return
        if self._delays(row):
            # Held if it comes before what waits in the store (a load
            # reads it otherwise); _delay keeps the window's size.
            cursor = self._delayed_window.cursor(DELAYED_KEY)
            if cursor is None or (row.run_at, row.id) <= cursor:
                self._delay(row)
            return
        key = (broker.level_of(row.priority), row.handler)
        if self._windows.hold(
            key, row.id - 1, broker.dispatcher.waiting(*key)
        ):
            self.enqueue(row)
        else:
            self._refill(key)

    def enqueue(self, row, front=False):
        """
        Hold a task in memory: waiting for a worker, or for its run_at.

        :param front: put it before the other tasks of its queue (it was
            dispatched before them and comes back).
        """
        broker = self._broker
        if self._delays(row):
            self._delay(row)
            if self._shared:
                # Not claimed until due: any broker may run it then.
                self._give_back(row.id)
            return
        assignment = broker.dispatcher.add_task(
            Task(
                row.id, broker.level_of(row.priority), row.handler, held(row)
            ),
            front=front,
        )
        if assignment is not None:
            broker.dispatch(assignment)
        elif self._shared:
            # No idle credit of ours takes it: back to the store, for any
            # broker's idle credit.
            broker.dispatcher.remove_task(row.id)
            self._give_back(row.id)

    def _give_back(self, task_id):
        """
        A shared store's task this broker will not run now: back to the
        store, for any broker; a WAIT here for it must then hear of its
        end from whichever broker ends it.
        """
        broker = self._broker
        broker.claims.release((task_id,))
        # A credit may take it back; and once the release commits, the
        # claim source wakes the broker again.
        broker.feeder.unstarve()
        if broker.outcomes.is_waited(task_id):
            broker.requests.watch(task_id)

    def _delays(self, row):
        return (
            row.run_at is not None
            and row.run_at > self._broker.clock.seconds()
        )

    def withdraw(self, task_id):
        """
        Take a waiting (or delayed) task out of memory.

        :returns: its row, or ``None`` if it was not waiting.
        """
        task = self._broker.dispatcher.remove_task(task_id)
        if task is not None:
            return task.data
        return self.delayed.pop(task_id, None)

    def dispatched(self, key):
        """
        A task of queue ``key`` went to a worker: read more if it ran low.
        """
        self._refill(key)

    def checked(self, row, writes=None):
        """
        A row as read from the store, with the broker's defaults for what
        its inserter left NULL; or ``None`` if it cannot run, after
        failing it.

        :param writes: a ``list`` to add the write that fails it to, for a
            caller that waits for it; else its failure is logged.
        """
        broker = self._broker
        reason = invalid_row(row, broker.levels)
        if reason is not None:
            self.log.warn(
                "rejected task {task_id}: {reason}",
                task_id=row.id,
                reason=reason,
            )
            d = broker.store.reject(row.id, reason, broker.clock.seconds())

            def rejected(_):
                broker.status.tasks.move(
                    row.priority, row.handler, "queued", "failed"
                )
                broker.outcomes.notify(row.id)

            d.addCallback(rejected)
            if writes is not None:
                writes.append(d)
            else:
                d.addErrback(broker.trouble, "failing an invalid task")
            return None
        return self.with_defaults(row)

    def with_defaults(self, row):
        """
        The row with the broker's defaults for what SQL left NULL.
        """
        config = self._broker.config
        return with_defaults(row, config.default_priority, config.max_attempts)

    # -- windows -------------------------------------------------------------

    def _refill(self, key):
        """
        Read the next tasks of a truncated queue whose window is low.

        :returns: ``None`` if no load is due, else a ``Deferred`` that
            fires when the window is full again or the store has no more
            (never fails).
        """
        if key not in self._windows or self.stopped:
            return None  # the common case, at every dispatch
        broker = self._broker
        load = self._windows.start(key, broker.dispatcher.waiting(*key))
        if load is None:
            return None
        after_id, limit = load
        level, handler = key
        name = broker.levels[level]
        priorities = (
            (name, None) if name == broker.config.default_priority else (name,)
        )
        d = broker.claims.claim_queue(
            handler, priorities, after_id, limit, broker.clock.seconds()
        )

        def loaded(rows):
            # Held before the window is told, so that dispatches on the way
            # do not start another load of this queue meanwhile.
            try:
                if not self.stopped:
                    for row in rows:
                        self._take_loaded(row)
            finally:
                self._windows.loaded(
                    key,
                    rows[-1].id if rows else after_id,
                    exhausted=len(rows) < limit,
                )
            return self._refill(key)

        def failed(reason):
            self._windows.failed(key)
            broker.trouble(reason, "reading queued tasks")

        return d.addCallbacks(loaded, failed).addErrback(
            broker.trouble, "loading queued tasks"
        )

    def _load_delayed(self):
        """
        Read the next delayed tasks, by run_at, if their window is low or
        the next one in the store comes due before the poll after next.

        :returns: a ``Deferred`` (never fails).
        """
        broker = self._broker
        cursor = self._delayed_window.cursor(DELAYED_KEY)
        soon = cursor is not None and cursor[0] <= (
            broker.clock.seconds() + 2 * broker.config.poll_interval + 1.0
        )
        load = (
            None
            if self.stopped
            else self._delayed_window.start(
                DELAYED_KEY, len(self.delayed), soon
            )
        )
        if load is None:
            return defer.succeed(None)
        after, limit = load
        d = broker.claims.upcoming(after, limit)

        def loaded(rows):
            try:
                now = broker.clock.seconds()
                for row in rows if not self.stopped else ():
                    # One due already joins its queue's window, or waits
                    # in the store for that queue's next load.
                    due = row.run_at <= now
                    self._take_loaded(row, self._came_due if due else None)
            finally:
                self._delayed_window.loaded(
                    DELAYED_KEY,
                    (rows[-1].run_at, rows[-1].id) if rows else after,
                    exhausted=len(rows) < limit,
                )

        def failed(reason):
            self._delayed_window.failed(DELAYED_KEY)
            broker.trouble(reason, "reading delayed tasks")

        return d.addCallbacks(loaded, failed).addErrback(
            broker.trouble, "loading delayed tasks"
        )

    def _take_loaded(self, row, hold=None):
        """
        Hold a task read from the store (with ``hold``, by default
        :meth:`enqueue`), unless it is held already.
        """
        if not self._held(row.id):
            row = self.checked(row)
            if row is not None:
                (hold or self.enqueue)(row)

    # -- delayed tasks -----------------------------------------------------------

    def _delay(self, row):
        self.delayed[row.id] = held(row)
        heapq.heappush(self._heap, (row.run_at, row.id))
        if len(self.delayed) > DELAYED_WINDOW:
            # Over the window: the one due last goes back to the store
            # (it is queued there), for a later load.
            last = max(self.delayed.values(), key=lambda r: (r.run_at, r.id))
            del self.delayed[last.id]
            self._delayed_window.leave(DELAYED_KEY, (last.run_at, last.id - 1))
        if self._heap[0][1] == row.id:
            self._schedule_delayed()

    def _schedule_delayed(self):
        if self._delay_timer is not None and self._delay_timer.active():
            self._delay_timer.cancel()
        self._delay_timer = None
        while self._heap and self._heap[0][1] not in self.delayed:
            heapq.heappop(self._heap)
        if self._heap and not self.stopped:
            clock = self._broker.clock
            wait = max(0.0, self._heap[0][0] - clock.seconds())
            self._delay_timer = clock.callLater(wait, self._release_due)

    def _release_due(self):
        self._delay_timer = None
        broker = self._broker
        now = broker.clock.seconds()
        due = []
        while self._heap and self._heap[0][0] <= now:
            _, task_id = heapq.heappop(self._heap)
            row = self.delayed.pop(task_id, None)
            if row is not None:
                due.append(row)
        for row in sorted(due, key=lambda r: broker.level_of(r.priority)):
            broker.status.tasks.move(row.priority, row.handler, DELAYED, None)
            if not self._shared:
                self.enqueue(row)
        if self._shared and due:
            self._broker.feeder.wake()
        self._schedule_delayed()
        self._load_delayed()

    def _came_due(self, row):
        self._broker.status.tasks.move(
            row.priority, row.handler, DELAYED, None
        )
        if self._shared:
            self._broker.feeder.wake()
        else:
            self.admit(row)

    # -- the poller ----------------------------------------------------------------

    def poll(self):
        """
        Adopt queued tasks that other programs inserted.

        :returns: a ``Deferred`` that fires when done (at once if a poll is
            already under way: polls never overlap).
        """
        if self._polling:
            return defer.succeed(None)
        self._polling = True

        def done(result):
            self._polling = False
            return result

        if self._shared:
            # New work is claimed on wake-ups; the poll is one more, in
            # case a signal was lost.
            self._polling = False
            self._broker.feeder.wake()
            if self._broker.clock.seconds() >= self._next_sweep:
                self._next_sweep = (
                    self._broker.clock.seconds() + SWEEP_INTERVAL
                )
                self._sweep_unrunnable().addErrback(
                    self._broker.trouble, "failing tasks no broker can run"
                )
            return self._load_delayed()
        d = self._poll()
        d.addBoth(done)
        d.addErrback(self._broker.trouble, "polling for new tasks")
        return d

    @defer.inlineCallbacks
    def _sweep_unrunnable(self):
        """
        On a shared store, where brokers claim only what their workers can
        run: fail the queued tasks of queues no broker can ever run (an
        unknown level, a handler name no worker can have), which nobody
        would otherwise claim.  Every broker may do it; failing a queue
        twice changes nothing.
        """
        broker = self._broker
        pairs = yield broker.claims.queues()
        now = broker.clock.seconds()
        for handler, priority in pairs:
            reason = invalid_queue(handler, priority, broker.levels)
            if reason is None:
                continue
            count = yield broker.store.reject_group(
                handler, priority, reason, now
            )
            if count:
                self.log.warn(
                    "failed {count} queued tasks of handler {handler!r} and "
                    "priority {priority!r}: {reason}",
                    count=count,
                    handler=handler,
                    priority=priority,
                    reason=reason,
                )

    @defer.inlineCallbacks
    def _poll(self):
        broker = self._broker
        while True:
            rows, cursor = yield broker.claims.poll(POLL_BATCH)
            if cursor is None:
                break  # nothing new: the scan reached the end
            found, rejected = [], []
            now = broker.clock.seconds()
            for row in rows:
                if self._held(row.id):
                    continue
                # New to the broker: inserted by SQL since the last poll.
                broker.status.tasks.add(
                    "queued",
                    row.priority,
                    row.handler,
                    delayed=isinstance(row.run_at, (int, float))
                    and row.run_at > now,
                )
                row = self.checked(row, rejected)
                if row is not None:
                    found.append(row)
            # If failing the invalid rows fails, the poll is not confirmed
            # and the next one reads them again.
            yield defer.gatherResults(rejected, consumeErrors=True)
            for row in sorted(
                found, key=lambda r: broker.level_of(r.priority)
            ):
                if not self._held(row.id):
                    self.admit(row)
            broker.claims.polled(cursor)
        # Loads that failed earlier are tried again here.
        for key in self._windows.truncated():
            self._refill(key)
        yield self._load_delayed()
