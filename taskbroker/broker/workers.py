# -*- test-case-name: tests.unit.test_broker -*-
"""
The worker side of the protocol: HELLO, READY, HEARTBEAT, RESULT and BYE,
and the sweep that sends heartbeats and notices lost workers.

What a worker may do is checked against what the broker gave it: a RESULT
counts only for the attempt that is current (its fencing token), and an
attempt a worker announces is claimed only if no live session holds it.
"""

from twisted.logger import Logger

import taskbroker
from taskbroker.broker.router import BAD_MESSAGE_LOG_INTERVAL, RateLimit
from taskbroker.broker.sessions import Session
from taskbroker.protocol.codec import encode
from taskbroker.wording import counted

#: The shortest heartbeat interval a worker may announce (seconds).
MIN_WORKER_HEARTBEAT = 0.1
#: How many times in a row a task may be "never received" before that
#: counts as a failed attempt: a TASK that no worker can take must end.
MAX_UNRECEIVED = 3
#: How many such tasks are remembered (the oldest is forgotten first).
_UNRECEIVED_KEPT = 10_000


#: Seconds between attempts to adopt a task another broker still holds.
ADOPT_RETRY = 1.0


class Workers:
    """
    Handles the messages of workers.

    :param broker: the :class:`taskbroker.broker.core.Broker` this belongs
        to (its ``sessions``, ``attempts``, ``dispatcher``, ``outcomes``,
        ``send`` and ``dispatch``).
    """

    log = Logger()

    def __init__(self, broker):
        self._broker = broker
        # Encoded once each: the heartbeat says whether this broker can
        # use its database, so that a worker with other brokers to go to
        # can leave one whose database has been failing for a while.
        self._heartbeat_bodies = {
            failing: encode(
                b"HEARTBEAT",
                {
                    "broker": broker.instance_id,
                    "store": "failing" if failing else "ok",
                },
            )
            for failing in (False, True)
        }
        # task id -> times in a row it was sent and never received
        self._unreceived = {}
        # (identity, task id) -> a RESULT for an attempt being adopted; at
        # most one per slot of a session, each bounded by the codec.
        self._early = {}
        # One line per peer and kind per interval for what a peer can
        # repeat at will (refused HELLOs, results or attempts not its own).
        self._logs = RateLimit(BAD_MESSAGE_LOG_INTERVAL, broker.monotonic)

    # -- commands ----------------------------------------------------------

    def on_HELLO(self, identity, session, body):
        broker = self._broker
        name = body["name"]
        wanted = body.get("priorities")
        if wanted is None:
            wanted = list(broker.levels)
        problem = self._bad_hello(body)
        if problem is not None:
            self.refuse(identity, "bad_request", problem)
            return
        unknown = [level for level in wanted if level not in broker.levels]
        if unknown or not wanted:
            self.refuse(
                identity,
                "unknown_priority",
                "this broker has no priority level "
                + ", ".join(map(repr, unknown))
                + " (its levels: "
                + ",".join(broker.levels)
                + ")",
            )
            return
        holder = broker.sessions.holder_of(name)
        if holder is not None and holder.identity != identity:
            self.refuse(
                identity,
                "name_taken",
                f"a live worker named {name!r} is already connected; "
                "give each worker a unique --name",
            )
            return
        previous = session
        session = Session(
            identity,
            name,
            tuple(wanted),
            tuple(body["handlers"]),
            body["slots"],
            body.get("heartbeat", 1.0),
            broker.clock.seconds(),
            broker.monotonic(),
        )
        session.version = body.get("version")
        if previous is not None:
            # The same connection announcing again: what it was given is
            # still its own, even tasks sent after it wrote this HELLO.
            broker.dispatcher.remove_worker(identity)
            session.running = previous.running
            session.connected_since = previous.connected_since
            broker.sessions.remove(previous)
        # Attempts the worker is still running (it reconnected, or this
        # broker restarted): claim those that are still current, and tell
        # the worker to stop the others: they were requeued or cancelled.
        # On a shared store, an attempt unknown here may come from a
        # broker the worker moved away from: adopt it if that broker's
        # lease lapsed.
        adopting = []
        for item in body.get("running", ()):
            task_id, token = item["id"], item["token"]
            outcome = broker.attempts.claim(
                task_id, token, identity, broker.sessions.__contains__
            )
            if outcome == "claimed":
                session.running[task_id] = token
            elif (
                outcome == "stale"
                and broker.claims.shared
                and task_id not in broker.attempts
            ):
                adopting.append((task_id, token))
            elif outcome == "stale":
                self._stop_stale(identity, task_id, token)
        broker.sessions.add(session)
        broker.dispatcher.add_worker(
            identity,
            [broker.level_of(level) for level in wanted],
            session.handlers,
            session.slots,
            busy=len(session.running) + len(adopting),
        )
        for task_id, token in adopting:
            session.adopting[task_id] = token
            self._adopt(session, task_id, token)
        broker.send(
            identity,
            encode(
                b"WELCOME",
                {
                    "broker": broker.instance_id,
                    "priorities": list(broker.levels),
                    "heartbeat": broker.config.heartbeat,
                    "time_limit": broker.config.time_limit,
                    "progress": True,
                    "version": taskbroker.__version__,
                },
            ),
        )
        theirs = body.get("version")
        if theirs != taskbroker.__version__:
            self.log.warn(
                "worker {name} runs taskbroker {theirs}, this broker {ours}: "
                'upgrade them together (docs/operations.rst, "Upgrades")',
                name=name,
                theirs=theirs or "older than 0.1.0",
                ours=taskbroker.__version__,
            )
        self.log.info(
            "worker {name} connected: {slots_text}, levels {levels}, "
            "handlers {handlers}",
            name=name,
            slots=session.slots,
            slots_text=counted(session.slots, "slot"),
            levels=",".join(wanted),
            handlers=",".join(session.handlers),
        )

    def _adopt(self, session, task_id, token):
        """
        Take over an attempt a worker brought from another broker, whose
        slot counts as busy meanwhile; tell the worker to stop it if it is
        not to be had.  A result the worker sends meanwhile waits in
        ``self._early`` until the store has answered.
        """
        broker = self._broker
        identity = session.identity

        def adopted(outcome):
            state, row = outcome
            current = broker.sessions.is_current(session)
            if state == "held" and current and not broker.stopped:
                # Its broker still holds its lease, and may come back:
                # ask again until it lapses.
                broker.clock.callLater(
                    ADOPT_RETRY, self._adopt, session, task_id, token
                )
                return
            session.adopting.pop(task_id, None)
            early = self._early.pop((identity, task_id), None)
            if state != "adopted" or task_id in broker.attempts:
                if current:
                    self._not_adopted(session, task_id, token, early)
                return
            # Remembered as it was before its dispatch, as at start.
            before = broker.backlog.with_defaults(
                row._replace(attempts=max(row.attempts - 1, 0))
            )
            if not current:
                # Gone meanwhile: an orphan, requeued unless it comes back.
                broker.attempts.orphan(
                    task_id,
                    token,
                    before,
                    broker.monotonic() + 2 * broker.allowance(),
                )
                return
            broker.attempts.start(task_id, token, before, identity)
            session.running[task_id] = token
            # Confirmed by the worker's next heartbeats, like a TASK sent.
            session.sent_at[task_id] = broker.monotonic()
            self.log.info(
                "adopted task {task_id} from a broker that went "
                "away: worker {name} runs it",
                task_id=task_id,
                name=session.name,
            )
            if early is not None:
                self.on_RESULT(identity, session, early)

        def failed(reason):
            session.adopting.pop(task_id, None)
            early = self._early.pop((identity, task_id), None)
            if broker.sessions.is_current(session):
                self._not_adopted(session, task_id, token, early)
            broker.trouble(reason, "adopting a running task")

        broker.claims.adopt(task_id, token).addCallbacks(
            adopted, failed
        ).addErrback(broker.trouble, "adopting a task")

    def _not_adopted(self, session, task_id, token, early):
        """
        An attempt a worker brought is not this broker's: free its slot,
        and stop the attempt, or drop the result it already sent.
        """
        identity = session.identity
        self._broker.dispatcher.task_done(identity)
        if early is None:
            self._stop_stale(identity, task_id, token)
            return
        self._ack(identity, task_id, token)
        if early.get("ready"):
            self.on_READY(identity, session, early)

    def _bad_hello(self, body):
        """
        What makes a HELLO unacceptable beyond its shape, or ``None``: a
        heartbeat that would let a silent connection hold a name and its
        tasks for long, or more running tasks than slots.
        """
        longest = self._broker.config.max_worker_heartbeat
        heartbeat = body.get("heartbeat", 1.0)
        if not MIN_WORKER_HEARTBEAT <= heartbeat <= longest:
            return (
                f"heartbeat {heartbeat:g} s is not from "
                f"{MIN_WORKER_HEARTBEAT:g} to {longest:g} s (this "
                "broker's --max-worker-heartbeat)"
            )
        running = len(body.get("running", ()))
        if running > body["slots"]:
            return (
                f"{running} running tasks announced for {body['slots']} slots"
            )
        return None

    def on_READY(self, identity, session, body):
        if session is None:
            self.rehello(identity)
            return
        broker = self._broker
        assignment = broker.dispatcher.credit(identity)
        if assignment is not None:
            broker.dispatch(assignment)
        else:
            broker.feeder.feed()

    def on_HEARTBEAT(self, identity, session, body):
        if session is None:
            self.rehello(identity)
        elif len(body.get("running", ())) > session.slots:
            # More than it can run: not reconciled, so that one message
            # costs no more than a worker's slots.
            self._broker.counters["protocol_errors"] += 1
        elif "running" in body:
            self._reconcile(
                session,
                {(item["id"], item["token"]) for item in body["running"]},
            )

    def on_BYE(self, identity, session, body):
        if session is not None:
            self.log.info("worker {name} left", name=session.name)
            # A worker leaving on purpose has handed back what it ran;
            # those attempts do not count against the tasks.
            self.forget(session, consumed=False)

    def on_RESULT(self, identity, session, body):
        if (
            session is not None
            and session.adopting.get(body["id"]) == body["token"]
        ):
            # Brought from another broker and not adopted yet: its result
            # (and the slot's request for work) waits for the store.
            self._early[(identity, body["id"])] = body
            return
        attempt = self._take_result(identity, session, body)
        if body.get("ready") and session is not None:
            # The slot that ran it asks for work in the same message.  Its
            # next task's dispatch is queued first, so that it commits in
            # the same transaction as the result and its TASK leaves
            # before the result's bookkeeping and ACK.
            self.on_READY(identity, session, body)
        if attempt is not None:
            self._record(identity, attempt, body)

    def _take_result(self, identity, session, body):
        """
        End the attempt a RESULT reports and free its slot.

        :returns: the :class:`~taskbroker.broker.attempts.Attempt` to
            record, or ``None`` when there is nothing to record (the
            sender must announce itself, or the attempt is not its).
        """
        broker = self._broker
        task_id, token = body["id"], body["token"]
        if session is None:
            # Only a worker that announced itself may report: this one is
            # asked to, and resends its result after its HELLO.  Nothing
            # is recorded from a peer that never said who it is.
            self.rehello(identity)
            return
        attempt = broker.attempts.current(task_id, token)
        if attempt is None or not self._holds(session, attempt):
            broker.counters["stale_results"] += 1
            if self._logs.allow((identity, "result")):
                self.log.info(
                    "ignored a result for task {task_id} token {token} from "
                    "{name}: not an attempt it holds (further ones from this "
                    "worker are counted, not logged, for {interval:.0f}s)",
                    task_id=task_id,
                    token=token,
                    name=session.name,
                    interval=BAD_MESSAGE_LOG_INTERVAL,
                )
            # Acknowledged: it will never be taken.
            self._ack(identity, task_id, token)
            return None
        broker.attempts.end(task_id, token)
        holder = (
            broker.sessions.get(attempt.session)
            if attempt.session is not None
            else None
        )
        if (
            holder is not None
            and holder.running.pop(task_id, None) is not None
        ):
            broker.dispatcher.task_done(holder.identity)
        return attempt

    def _record(self, identity, attempt, body):
        """
        Write a RESULT's outcome, then acknowledge it.
        """
        broker = self._broker
        task_id, token = attempt.task_id, attempt.token
        state = body["state"]
        d = broker.outcomes.report(attempt, state, body)

        def recorded(_):
            broker.counters["completed"] += state != "released"
            self._ack(identity, task_id, token)

        def failed(reason):
            # Not acknowledged: the worker resends it within its own
            # allowance.  Until then the attempt is an orphan, requeued
            # only if nobody reports it for twice as long.
            broker.attempts.orphan(
                task_id,
                token,
                attempt.row,
                broker.monotonic() + 2 * broker.allowance(),
            )
            broker.trouble(reason, "recording a result")

        d.addCallbacks(recorded, failed).addErrback(
            broker.trouble, "acknowledging a result"
        )

    def on_PROGRESS(self, identity, session, body):
        # Only from the session that runs the current attempt; anything
        # else is late (the attempt ended) and simply dropped.
        attempt = self._broker.attempts.current(body["id"], body["token"])
        if session is None or attempt is None or attempt.session != identity:
            return
        self._broker.progress.report(
            attempt, body["fraction"], body.get("message")
        )

    def _holds(self, session, attempt):
        """
        Whether ``session`` may report ``attempt``: it was dispatched to
        it, or it is unclaimed (after a broker restart, or a result that
        could not be written) and was given to a worker of that name,
        which reconnected.  A guessed token from any other peer counts for
        nothing.
        """
        if attempt.session == session.identity:
            return True
        if (
            attempt.session is not None
            and attempt.session in self._broker.sessions
        ):
            return False
        return attempt.row.worker == session.name

    # -- replies ---------------------------------------------------------------

    def rehello(self, identity):
        """
        Ask a peer the broker does not know to announce itself.
        """
        broker = self._broker
        broker.send(
            identity, encode(b"REHELLO", {"broker": broker.instance_id})
        )

    def _ack(self, identity, task_id, token):
        self._broker.send(
            identity, encode(b"ACK", {"id": task_id, "token": token})
        )

    def refuse(self, identity, code, message):
        if self._logs.allow((identity, "refused")):
            self.log.warn("refused a worker: {message}", message=message)
        self._broker.send(
            identity,
            encode(
                b"ERROR", {"code": code, "message": message, "fatal": True}
            ),
        )

    def _stop_stale(self, identity, task_id, token):
        if self._logs.allow((identity, "stale")):
            self.log.info(
                "task {task_id} token {token} is no longer current; telling "
                "{peer} to stop it",
                task_id=task_id,
                token=token,
                peer=self._broker.describe_peer(identity),
            )
        self.cancel(identity, task_id, token)

    def cancel(self, identity, task_id, token):
        """
        Tell a worker to stop an attempt.
        """
        self._broker.send(
            identity, encode(b"CANCEL", {"id": task_id, "token": token})
        )

    # -- liveness ----------------------------------------------------------------

    def _reconcile(self, session, listed):
        """
        Compare what a worker says it runs with what we gave it.  A TASK
        can be lost with a dropped connection that ZeroMQ silently
        re-establishes: a task the worker still lacks two heartbeats after
        it was sent is requeued, and the attempt counts only when that
        happened :data:`MAX_UNRECEIVED` times in a row.  An attempt the
        worker runs that is no longer current is stopped.
        """
        broker = self._broker
        now = broker.monotonic()
        for task_id, sent in list(session.sent_at.items()):
            token = session.running.get(task_id)
            if token is None or (task_id, token) in listed:
                del session.sent_at[task_id]
                self._unreceived.pop(task_id, None)
            elif now - sent > 2 * session.heartbeat:
                del session.sent_at[task_id]
                del session.running[task_id]
                broker.dispatcher.task_done(session.identity)
                attempt = broker.attempts.end(task_id, token)
                if attempt is not None:
                    self._never_received(session, attempt)
        for task_id, token in listed:
            if (
                broker.attempts.current(task_id, token) is None
                and session.adopting.get(task_id) != token
            ):
                self._stop_stale(session.identity, task_id, token)

    def _never_received(self, session, attempt):
        task_id = attempt.task_id
        times = self._unreceived.pop(task_id, 0) + 1
        if times < MAX_UNRECEIVED:
            if len(self._unreceived) >= _UNRECEIVED_KEPT:
                del self._unreceived[next(iter(self._unreceived))]
            self._unreceived[task_id] = times
            reason = f"worker {session.name} never received it"
        else:
            reason = (
                f"workers never received it ({times} times in a "
                f"row, last {session.name})"
            )
        broker = self._broker
        broker.outcomes.requeue(
            attempt, reason, consumed=times >= MAX_UNRECEIVED
        )

    def forget(self, session, consumed=True):
        """
        A worker left or was lost: requeue what it was running.
        """
        broker = self._broker
        broker.sessions.remove(session)
        broker.dispatcher.remove_worker(session.identity)
        running, session.running = session.running, {}
        for task_id, token in running.items():
            attempt = broker.attempts.end(task_id, token)
            if attempt is not None:
                broker.outcomes.requeue(
                    attempt,
                    f"worker {session.name} was lost"
                    if consumed
                    else f"worker {session.name} left",
                    consumed=consumed,
                )

    def sweep(self):
        """
        Send heartbeats, forget workers silent for too long, and requeue
        attempts nobody claimed in time.
        """
        broker = self._broker
        now = broker.monotonic()
        silent = set(
            broker.sessions.silent(now, broker.config.heartbeat_misses)
        )
        heartbeat = self._heartbeat_bodies[
            broker.store.write_error is not None
        ]
        for session in broker.sessions:
            if session in silent:
                broker.counters["lost_workers"] += 1
                self.log.warn(
                    "worker {name} lost: silent for {silence:.1f}s",
                    name=session.name,
                    silence=now - session.seen_at,
                )
                self.forget(session)
            elif not broker.send(session.identity, heartbeat):
                self.log.warn(
                    "worker {name} is unreachable", name=session.name
                )
                self.forget(session)
        for attempt in broker.attempts.expired(
            now, broker.sessions.__contains__
        ):
            self.log.info(
                "task {task_id} token {token} was not claimed by any "
                "worker in time",
                task_id=attempt.task_id,
                token=attempt.token,
            )
            broker.outcomes.requeue(
                attempt, "its worker was lost", consumed=False
            )
