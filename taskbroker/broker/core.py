# -*- test-case-name: tests.unit.test_broker -*-
"""
The broker's core: the parts that handle its messages, wired together, and
the one step they share, the dispatch of a task to a worker.

:class:`Broker` owns no socket and reads no clock of its own: it is given
a ``send(identity, frames)`` callable, a store, an ``IReactorTime`` and a
monotonic clock, so unit tests drive it with a ``MemoryStore`` and a
``Clock``.  The store is the truth: a task's state changes there before
anyone is told (a SUBMIT is answered, a TASK sent, a RESULT acknowledged
only after the commit).

The parts, each in its own module (see ``docs/architecture.rst``):

- :mod:`~taskbroker.broker.router`: decodes every message and routes it;
- :mod:`~taskbroker.broker.workers` over
  :mod:`~taskbroker.broker.sessions`: the workers' commands and liveness;
- :mod:`~taskbroker.broker.attempts`: which task runs where, under which
  fencing token;
- :mod:`~taskbroker.broker.outcomes`: results, retries, requeues, and
  waiting for a task to end;
- :mod:`~taskbroker.broker.backlog`: the queued tasks held in memory;
- :mod:`~taskbroker.broker.feeder`: claiming for idle credits, on a
  store shared by several brokers;
- :mod:`~taskbroker.broker.dispatch`: which task goes to which credit;
- :mod:`~taskbroker.broker.requests`: the clients' commands, and
  :mod:`~taskbroker.broker.admission`: how many of them at once;
- :mod:`~taskbroker.broker.status`: counters and task counts, for STATS.

Each part is given this broker and reaches its siblings through it, as
Buildbot's services reach theirs through their master.
"""

import hashlib
import random
import uuid

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from taskbroker.broker.admission import Admission
from taskbroker.broker.attempts import Attempt, Attempts
from taskbroker.broker.backlog import Backlog
from taskbroker.broker.bulk import Bulk
from taskbroker.broker.dispatch import Dispatcher
from taskbroker.broker.feeder import Feeder
from taskbroker.broker.metrics import Metrics
from taskbroker.broker.outcomes import Outcomes, RetryPolicy
from taskbroker.broker.progress import ProgressRecords
from taskbroker.broker.requests import Requests
from taskbroker.broker.router import Router
from taskbroker.broker.schedules import Schedules
from taskbroker.broker.sessions import Sessions
from taskbroker.broker.status import Status
from taskbroker.broker.validation import invalid_row
from taskbroker.broker.workers import Workers
from taskbroker.errors import StoreError, WriteRefused, one_line
from taskbroker.logs import TaskLog, seconds
from taskbroker.protocol.codec import dumps, encode

#: Database trouble: the first and the longest pause before trying again.
FIRST_STORE_BACKOFF = 0.5
MAX_STORE_BACKOFF = 30.0
#: The longest a worker's socket waits between reconnection attempts
#: (ZMQ_RECONNECT_IVL_MAX in the transport), in seconds.
RECONNECT_WAIT = 2.0
#: Seconds between looks for claims a broker on a shared store holds
#: without knowing.
RECONCILE_INTERVAL = 10.0


def _dispatch_details(task):
    return (
        f"{task['handler']}, priority {task['priority']}, attempt "
        f"{task['attempt']} of {task['max_attempts']}, "
        f"{seconds(task['waited'])} after it was created"
    )


class Broker:
    """
    Handles every message arriving on the broker's socket.

    :param config: a :class:`taskbroker.config.BrokerConfig`.
    :param store: an opened :class:`taskbroker.interfaces.ITaskStore`.
    :param clock: an ``IReactorTime``: timers, and the times recorded on
        tasks.
    :param send: ``send(identity, frames) -> bool``.
    :param monotonic: a function returning seconds on a clock that never
        steps, for liveness; default ``clock.seconds``.
    :param rng: a ``random.Random`` for retry jitter.
    :param claims: the :class:`taskbroker.interfaces.IClaimSource` to
        claim tasks from; by default the store's, for this broker.
    """

    log = Logger()

    def __init__(
        self,
        config,
        store,
        clock,
        send,
        instance_id=None,
        monotonic=None,
        rng=None,
        claims=None,
    ):
        self.config = config
        self.store = store
        self.clock = clock
        self.send = send
        self.monotonic = monotonic or clock.seconds
        self.instance_id = instance_id or uuid.uuid4().hex[:12]
        self.claims = (
            store.claims(self.instance_id) if claims is None else claims
        )
        self.levels = tuple(config.priorities)
        self._level_index = {name: i for i, name in enumerate(self.levels)}
        self.status = Status(self)
        self.counters = self.status.counters
        #: With CURVE, the :class:`taskbroker.broker.keys.PeerKeys` whose
        #: roles each message's key must have; ``None`` when any key (or
        #: none) may do anything.
        self.peer_keys = None
        self.dispatcher = Dispatcher(len(self.levels))
        self.sessions = Sessions()
        self.attempts = Attempts()
        self.outcomes = Outcomes(
            self, RetryPolicy(config, rng or random.Random())
        )
        self.backlog = Backlog(self)
        self.progress = ProgressRecords(self)
        self.metrics = Metrics(self)
        self.dispatch_log = TaskLog(
            self.log,
            clock,
            "dispatched",
            lambda t: (
                f"task {t['id']} dispatched to {t['worker']}: "
                f"{_dispatch_details(t)}"
            ),
            lambda t: f"{t['id']} to {t['worker']} ({_dispatch_details(t)})",
        )
        self.feeder = Feeder(self)
        self.workers = Workers(self)
        self.admission = Admission()
        self.requests = Requests(self)
        self.schedules = Schedules(self)
        self.bulk = Bulk(self)
        self.router = Router(self)
        self.handle = self.router.handle
        self.stopped = False
        self._store_backoff = 0.0
        self._resume_call = None
        # A shared store's claims this broker may hold without knowing,
        # and when to look for them next (see _reconcile).
        self._stray = set()
        self._next_reconcile = 0.0

    def describe_peer(self, identity):
        """
        How logs name a peer: a worker by its name, anyone else by a
        fingerprint of its route.  A route itself is never shown: a
        worker's carries 128 random bits so that no other peer can take
        its place by connecting under it.
        """
        session = self.sessions.get(identity)
        if session is not None:
            return f"worker {session.name}"
        return "peer " + hashlib.blake2b(identity, digest_size=4).hexdigest()

    def level_of(self, name):
        """
        :returns: the number of the level ``name``, 0 the most urgent.
        """
        return self._level_index[name]

    def allowance(self) -> float:
        """
        How long a peer may stay silent, at the broker's heartbeat, before
        it is presumed lost.
        """
        return self.config.heartbeat * self.config.heartbeat_misses

    # -- start and stop ------------------------------------------------------

    @defer.inlineCallbacks
    def load(self):
        """
        Load the store's running tasks, and a window of each queue.
        Running ones are attempts that workers may still be running: they
        are given time to be claimed before they are requeued.  A running
        row that could not run again (another program broke a column) is
        failed, alone, naming the column.
        """
        deadline = self.monotonic() + self._reclaim_window()
        now = self.clock.seconds()
        running = yield self.claims.start(
            now, self.feeder.wake, self._finished_elsewhere
        )
        failed = []
        for row in running:
            reason = invalid_row(row, self.levels)
            if reason is not None:
                self.log.warn(
                    "failed running task {task_id}: {reason}",
                    task_id=row.id,
                    reason=reason,
                )
                failed.append(
                    self.store.finish(
                        row.id, row.token, "failed", None, reason, None, now
                    )
                )
                continue
            # Rows in memory are as they were before their dispatch (the
            # store's requeue never takes attempts below 0 either).
            self.attempts.orphan(
                row.id,
                row.token,
                self.backlog.with_defaults(
                    row._replace(attempts=max(row.attempts - 1, 0))
                ),
                deadline,
            )
        # As for the queues failed whole at start: if failing them fails,
        # the broker does not start, and the next start tries again.
        yield defer.gatherResults(failed, consumeErrors=True)
        yield self.backlog.load()
        yield self.bulk.start_retention()

    def _finished_elsewhere(self, task_ids):
        """
        Other brokers ended tasks: the WAITs here for them read them again.
        """
        if task_ids is None:
            task_ids = self.outcomes.waited()
        for task_id in task_ids:
            self.outcomes.notify(task_id)

    def _reclaim_window(self):
        """
        How long a worker may take to claim its attempts after this broker
        starts: ZeroMQ's reconnection (up to RECONNECT_WAIT), the worker's
        next heartbeat to be answered with REHELLO, and its HELLO, with an
        allowance's margin on each side.
        """
        return RECONNECT_WAIT + 2 * self.allowance()

    def stop(self):
        """
        Stop timers and answer outstanding WAITs; the caller then closes
        the socket and the store.  Attempts being dispatched stay
        ``running`` in the store, to be reclaimed or requeued by the next
        broker.
        """
        self.stopped = True
        if self._resume_call is not None and self._resume_call.active():
            self._resume_call.cancel()
        self.backlog.stop()
        self.outcomes.stop()
        self.dispatch_log.flush()

    def poll(self):
        """
        Adopt queued tasks that other programs inserted.

        :returns: a ``Deferred`` that fires when done.
        """
        return self.backlog.poll()

    def sweep(self):
        """
        Send heartbeats, forget workers silent for too long, and requeue
        attempts nobody claimed in time.
        """
        self.workers.sweep()

    @defer.inlineCallbacks
    def keep_claims(self):
        """
        Renew this broker's claims, and take back those of brokers that
        stopped renewing theirs (a store shared by several brokers).  If
        this broker's own claims lapsed, it starts over.

        :returns: a ``Deferred`` that fires when done.
        """
        now = self.clock.seconds()
        lost = yield self.claims.renew(now)
        if lost is not None:
            self.feeder.start_over(lost)
        freed = yield self.claims.reclaim(now, self._reclaim_window())
        if freed:
            self.log.info(
                "took back {count} tasks from brokers that "
                "stopped renewing their claims",
                count=freed,
            )
            self.feeder.wake()
        if now >= self._next_reconcile:
            self._next_reconcile = now + RECONCILE_INTERVAL
            yield self._reconcile()

    @defer.inlineCallbacks
    def _reconcile(self):
        """
        Let go of what the store says this broker holds and it does not:
        claims whose commit succeeded while its answer was lost with the
        connection.  A task must look stray twice in a row, so that a
        claim on its way back from the store is not taken for one.
        """
        holding = yield self.claims.holding()
        stray = {
            task_id
            for task_id in holding
            if task_id not in self.attempts and not self.backlog.holds(task_id)
        }
        suspects, self._stray = self._stray, stray
        confirmed = stray & suspects
        if confirmed:
            count = yield self.claims.let_go(confirmed)
            if count:
                self.log.warn(
                    "let go of {count} tasks the database said "
                    "this broker held and it did not (a commit "
                    "whose answer was lost)",
                    count=count,
                )

    # -- dispatch ------------------------------------------------------------

    def dispatch(self, assignment):
        """
        Run the dispatcher's decision: record the attempt, commit it, then
        send the TASK.
        """
        row = assignment.task.data
        identity = assignment.worker.key
        session = self.sessions.get(identity)
        token = row.token + 1
        now = self.clock.seconds()
        # Remembered as the store records it (worker, started_at), but with
        # attempts and token as they were before this dispatch.
        row = row._replace(worker=session.name, started_at=now)
        self.attempts.start(row.id, token, row, identity)
        session.running[row.id] = token
        d = self.store.dispatch(
            row.id,
            token,
            session.name,
            now,
            row.priority,
            row.max_attempts or self.config.max_attempts,
        )

        def committed(ok):
            self._store_backoff = 0.0
            if self.stopped:
                return
            if not ok:
                # Changed behind our back (by SQL): forget it, free the slot.
                self._undispatch(row.id, identity, token)
                return
            self.status.tasks.move(
                row.priority, row.handler, "queued", "running"
            )
            if self.attempts.current(row.id, token) is None:
                # Its worker went away while the dispatch committed, and
                # the requeue issued then may have run first (on another
                # writer) and found nothing running: requeue it now (a
                # second requeue of the same attempt changes nothing).
                self.outcomes.requeue(
                    Attempt(row.id, token, row, None),
                    "its worker went away before it got the task",
                    consumed=False,
                )
                return
            if row.payload is None:
                return self._send_large_task(identity, row, token)
            self._send_task(identity, row, token)

        def failed(reason):
            if reason.check(WriteRefused):
                self._refused(row, identity, token, reason)
                return
            # Nothing changed in the store: undo in memory, and hold task
            # and credit (paused, so they are not matched again at once)
            # until the store works again.
            self.dispatcher.paused = True
            self.attempts.end(row.id, token)
            current = self.sessions.get(identity)
            if (
                current is not None
                and current.running.pop(row.id, None) is not None
            ):
                self.dispatcher.task_done(identity)
                self.dispatcher.credit(identity)
            self.backlog.enqueue(row, front=True)
            self.trouble(reason, "dispatching a task", pause=True)

        d.addCallbacks(committed, failed).addErrback(
            self.trouble, "sending a task"
        )
        self.backlog.dispatched((assignment.task.level, row.handler))

    def claimed(self, session, row):
        """
        A task was dispatched to ``session`` in the transaction that
        inserted or claimed it (``row`` is as it committed, running):
        send it, unless the worker went away meanwhile.
        """
        token = row.token
        # As it was before the dispatch, as dispatch() remembers it.
        before = row._replace(
            state="queued", attempts=row.attempts - 1, token=token - 1
        )
        if self.stopped:
            return  # running in the store: the next broker reclaims it
        if not self.sessions.is_current(session):
            # Lost or announced again while the commit ran: the attempt
            # never reached it, so it does not count.
            self.outcomes.requeue(
                Attempt(row.id, token, before, None),
                f"worker {session.name} went away before it got the task",
                consumed=False,
            )
            return
        self.attempts.start(row.id, token, before, session.identity)
        session.running[row.id] = token
        self._send_task(session.identity, before, token)

    def stop_attempt(self, attempt, reason):
        """
        End an attempt that is no longer this broker's to run (taken over
        through the store, or replaced): free its slot and tell its worker
        to stop it.  Nothing is written: the store already says so.
        """
        if self.claims.shared and self.outcomes.is_waited(attempt.task_id):
            # Another broker runs it now: a WAIT here must hear of its end.
            self.requests.watch(attempt.task_id)
        self.attempts.end(attempt.task_id, attempt.token)
        session = (
            self.sessions.get(attempt.session)
            if attempt.session is not None
            else None
        )
        if session is None:
            return
        if session.running.get(attempt.task_id) == attempt.token:
            del session.running[attempt.task_id]
            session.sent_at.pop(attempt.task_id, None)
            self.dispatcher.task_done(session.identity)
        self.log.info(
            "task {task_id} token {token}: {reason}; telling "
            "{worker} to stop it",
            task_id=attempt.task_id,
            token=attempt.token,
            reason=reason,
            worker=session.name,
        )
        self.workers.cancel(session.identity, attempt.task_id, attempt.token)

    def _send_task(self, identity, row, token):
        """
        Send a committed dispatch to its worker.  ``row`` is the task as
        it was before the dispatch.
        """
        self.counters["dispatched"] += 1
        session = self.sessions.get(identity)
        if session is not None:
            session.sent_at[row.id] = self.monotonic()
        max_attempts = row.max_attempts or self.config.max_attempts
        waited = row.started_at - row.created_at
        self.dispatch_log.add(
            id=row.id,
            handler=row.handler,
            priority=row.priority,
            worker=row.worker,
            attempt=row.attempts + 1,
            max_attempts=max_attempts,
            token=token,
            waited=waited,
        )
        self.metrics.dispatched(row.priority, row.handler, waited)
        body = (
            '{"id":%d,"handler":%s,"payload":%s,"priority":%s,'
            '"attempt":%d,"max_attempts":%d,"token":%d,"time_limit":%s}'
            % (
                row.id,
                dumps(row.handler),
                row.payload,
                dumps(row.priority),
                row.attempts + 1,
                max_attempts,
                token,
                dumps(row.time_limit),
            )
        )
        if (
            not self.send(identity, encode(b"TASK", body))
            and session is not None
        ):
            self.log.warn("worker {name} is unreachable", name=session.name)
            self.workers.forget(session)

    def _send_large_task(self, identity, row, token):
        """
        Send a task whose large payload the backlog left in the store
        (:data:`taskbroker.broker.backlog.HELD_PAYLOAD`).  Should the read
        fail, the worker never gets the TASK, and the heartbeats that do
        not list it requeue the task.
        """
        session = self.sessions.get(identity)
        if session is not None:
            session.sent_at[row.id] = self.monotonic()

        def read(stored):
            if stored is not None and self.sessions.get(identity) is not None:
                self._send_task(
                    identity, row._replace(payload=stored.payload), token
                )

        return self.store.get(row.id).addCallback(read)

    def give_back(self, session):
        """
        A credit of ``session`` was taken for a task that will not run on
        it after all: free the slot and let the credit find other work.  A
        worker gone, or announced again (its slots counted anew), has
        nothing to give back.
        """
        if not self.sessions.is_current(session):
            return
        self.dispatcher.task_done(session.identity)
        assignment = self.dispatcher.credit(session.identity)
        if assignment is not None:
            self.dispatch(assignment)

    def _refused(self, row, identity, token, reason):
        """
        The database refused this task's dispatch for what it would have
        written (a constraint): the task cannot run, and fails alone; the
        worker's credit goes to the next task, and dispatch goes on.
        """
        error = one_line(reason.value)
        self.log.warn(
            "task {task_id} failed: the database refused its "
            "dispatch: {error}",
            task_id=row.id,
            error=error,
        )
        self._undispatch(row.id, identity, token)
        self.feeder.feed()  # a shared store's broker claims for the credit
        d = self.store.reject(row.id, error, self.clock.seconds())

        def rejected(_):
            self.status.tasks.move(
                row.priority, row.handler, "queued", "failed"
            )
            self.outcomes.notify(row.id)

        d.addCallback(rejected).addErrback(
            self.trouble, "failing a refused task"
        )

    def _undispatch(self, task_id, identity, token):
        self.attempts.end(task_id, token)
        session = self.sessions.get(identity)
        if (
            session is not None
            and session.running.pop(task_id, None) is not None
        ):
            # The worker's credit was spent on nothing: give it back.
            self.give_back(session)

    # -- trouble -------------------------------------------------------------

    def trouble(
        self, reason: Failure, doing: str, pause: bool = False
    ) -> None:
        """
        An errback for work that failed.  The store's errors are logged as
        database trouble and, for dispatch, pause it until a backoff has
        passed (doubling while the trouble lasts); a write the database
        refused for its own values is not trouble (the same write would be
        refused again): it is only logged.  Anything else is a bug, logged
        with its traceback.
        """
        if reason.check(WriteRefused):
            self.log.warn(
                "the database refused a write while {doing}: {error}",
                doing=doing,
                error=one_line(reason.value),
            )
            return
        if reason.check(StoreError):
            self.counters["store_errors"] += 1
            kind, error = "database", one_line(reason.value)
        else:
            self.counters["internal_errors"] += 1
            self.log.failure(
                "internal error while {doing}", reason, doing=doing
            )
            kind, error = "internal", one_line(reason.value)
        if not pause:
            if kind == "database":
                self.log.error(
                    "database error while {doing}: {error}",
                    doing=doing,
                    error=error,
                )
            return
        self.dispatcher.paused = True
        if self._resume_call is not None and self._resume_call.active():
            return
        self._store_backoff = min(
            MAX_STORE_BACKOFF,
            max(FIRST_STORE_BACKOFF, self._store_backoff * 2),
        )
        self.log.error(
            "{kind} error while {doing}: {error}; dispatch paused, "
            "trying again in {delay:.1f}s",
            kind=kind,
            doing=doing,
            error=error,
            delay=self._store_backoff,
        )
        self._resume_call = self.clock.callLater(
            self._store_backoff, self._resume
        )

    def _resume(self):
        self._resume_call = None
        if self.stopped:
            return
        for assignment in self.dispatcher.resume():
            self.dispatch(assignment)
        self.feeder.wake()
