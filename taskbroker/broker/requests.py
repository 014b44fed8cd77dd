# -*- test-case-name: tests.unit.test_broker -*-
"""
The client side of the protocol: SUBMIT, GET, WAIT, LIST, CANCEL, RETRY,
WORKERS and STATS.

Every request gets exactly one answer: a REPLY, or an ERROR whose code
tells the client what to do (``unavailable``: try again; ``internal``: a
bug in the broker, logged with its traceback).

Each handler receives the sender's CURVE public key (``None`` without
CURVE).  The broker records it as the submitter of the tasks it submits,
and where the broker checks client keys, a key that is not an admin's
sees and changes only those tasks: any other is answered as a task that
does not exist (docs/security.rst).
"""

import dataclasses

from twisted.internet import defer
from twisted.logger import Logger

from taskbroker.broker.outcomes import BrokerStopping
from taskbroker.broker.status import DELAYED
from taskbroker.broker.validation import invalid_row
from taskbroker.errors import StoreError, WriteRefused, one_line
from taskbroker.protocol import codec
from taskbroker.protocol.codec import MAX_LIST_BYTES, dumps, encode
from taskbroker.protocol.objects import task_object
from taskbroker.store import FINAL_STATES, NewTask, text_size
from taskbroker.wording import nearest

#: The longest a WAIT is held when the client gives no timeout (seconds).
DEFAULT_WAIT = 30.0

#: The key of the requests the status site makes for the holder of its
#: token, who may do what an admin key may (docs/http.rst).
SITE = "the status site's token"


def submitter_of(key):
    """
    What a task or schedule records as made by ``key``: its text, or
    ``None`` for no key or the status site.
    """
    if key is None or key is SITE:
        return None
    return key.decode("ascii")


def is_admin(broker, key):
    """
    Whether ``key`` may see and change everything: no client checks, an
    admin key, or the status site's token.
    """
    keys = broker.peer_keys
    return keys is None or key is SITE or keys.is_admin(key)


class Refused(Exception):
    """
    A request the broker refuses: answered ``ERROR code`` (over HTTP, by
    the status the code maps to).
    """

    def __init__(self, code, message):
        Exception.__init__(self, message)
        self.code = code
        self.message = message


class Requests:
    """
    Handles the messages of clients.

    :param broker: the :class:`taskbroker.broker.core.Broker` this belongs
        to.
    """

    log = Logger()

    def __init__(self, broker):
        self._broker = broker

    # -- answers -----------------------------------------------------------

    def reply(self, identity, req, body):
        body["req"] = req
        self._broker.send(identity, encode(b"REPLY", body))

    def error(self, identity, req, code, message):
        self._broker.send(
            identity,
            encode(b"ERROR", {"req": req, "code": code, "message": message}),
        )

    def failed(self, reason, doing, identity, req):
        """
        An errback that answers a request whose work failed: with its code
        for a request refused, ``refused`` for a write the database
        refused for its values, ``unavailable`` for the store's other
        errors, ``internal`` (logged with its traceback) for anything
        else.
        """
        if reason.check(Refused):
            self.error(identity, req, reason.value.code, reason.value.message)
            return
        self._broker.trouble(reason, doing)
        if reason.check(WriteRefused):
            self.error(
                identity,
                req,
                "refused",
                f"the database refused it: {one_line(reason.value)}",
            )
        elif reason.check(StoreError):
            self.error(
                identity,
                req,
                "unavailable",
                "the database cannot be used right now; try again",
            )
        else:
            self.error(
                identity,
                req,
                "internal",
                f"internal error while {doing}; see the broker's log",
            )

    def carry_out(self, call, identity, body, key, doing):
        """
        Answer a request with what ``call(body, key)`` returns (a reply's
        body, or a ``Deferred`` of one), or with the error it fails with.
        """
        req = body["req"]
        d = defer.maybeDeferred(call, body, key)
        d.addCallback(lambda answer: self.reply(identity, req, answer))
        return self._answered(d, doing, identity, req)

    def _answered(self, d, doing, identity, req):
        # Every chain ends here, so that an exception anywhere in it is
        # answered and logged rather than lost.
        return d.addErrback(self.failed, doing, identity, req)

    # -- whose tasks -------------------------------------------------------

    def scope(self, key):
        """
        The tasks a client key may see and change: ``None`` for all of
        them (no client checks, or an admin key), else the key's text,
        which the tasks it submitted name.
        """
        if is_admin(self._broker, key):
            return None
        return key.decode("ascii") if key is not None else ""

    @staticmethod
    def _not_found(task_id):
        return Refused("not_found", f"no task with id {task_id}")

    def _found(self, row, task_id, scope):
        """
        ``row`` (a task read for a client) if the client may see it.

        :raises Refused: ``not_found`` if it does not exist, or belongs
            to another key: a client learns nothing of others' tasks.
        """
        if row is None or (scope is not None and row.submitter != scope):
            raise self._not_found(task_id)
        return row

    def _read(self, task_id, scope):
        """
        Read a task for a client.

        :returns: a ``Deferred`` firing with its row; it fails with
            ``not_found`` (see :meth:`_found`).
        """
        return self._broker.store.get(task_id).addCallback(
            self._found, task_id, scope
        )

    # -- submit ------------------------------------------------------------

    def on_SUBMIT(self, identity, body, key=None):
        req = body["req"]
        d = self.submit(
            body, key, lambda answer: self.reply(identity, req, answer)
        )
        return self._answered(d, "submitting tasks", identity, req)

    def submit(self, body, key, answer):
        """
        Carry out a SUBMIT (its body as the codec checked it) for a client
        with ``key``.

        :param answer: called with the reply's body once the tasks are
            committed, before they are handed out.
        :returns: a ``Deferred`` that fires when done, or fails with
            :class:`Refused` or the store's error.
        """
        broker = self._broker
        scope = self.scope(key)
        try:
            new = self._new_tasks(body, key)
        except Refused as refused:
            return defer.fail(refused)
        claims = self._claim_workers(new)
        d = broker.store.submit(new)

        def committed(results):
            # What it inserted is this broker's claim (a shared store's
            # broker then lets go of what it does not run at once).
            broker.claims.inserted(
                [row.id for row, created in results if created]
            )
            # Tasks that were not inserted (a resent request, a unique key
            # taken) give back their credits; inserted ones are running.
            for i, session in claims.items():
                row, created = (
                    results[i] if i < len(results) else (None, False)
                )
                if created:
                    broker.claimed(session, row)
                else:
                    broker.give_back(session)
            now = broker.clock.seconds()
            for row, created in results:
                if created:
                    broker.status.tasks.add(
                        row.state,
                        row.priority,
                        row.handler,
                        delayed=row.run_at is not None and row.run_at > now,
                    )
            unserved = sorted(
                {
                    task.handler
                    for task in new
                    if not broker.dispatcher.served(task.handler)
                }
            )
            request_id = body.get("request_id")
            # A resent request is answered with what the first one made.
            replayed = request_id is not None and all(
                not created and row.request_id == request_id
                for row, created in results
            )
            answer(
                {
                    # Another key's task (one that holds a unique key asked
                    # for) is shown by its id alone.
                    "tasks": [
                        task_object(row)
                        if created or scope is None or row.submitter == scope
                        else {"id": row.id}
                        for row, created in results
                    ],
                    "replayed": replayed,
                    "existing": []
                    if replayed
                    else [row.id for row, created in results if not created],
                    "unserved": unserved,
                    "suggestions": self._suggestions(unserved),
                }
            )
            # Most urgent first, so that a batch's urgent tasks get first
            # pick of the free workers.
            fresh = [
                row
                for row, created in results
                if created and row.state == "queued"
            ]
            for row in sorted(
                fresh, key=lambda r: broker.level_of(r.priority)
            ):
                broker.backlog.admit(row)

        def not_committed(reason):
            for session in claims.values():
                broker.give_back(session)
            return reason

        return d.addCallbacks(committed, not_committed)

    def _suggestions(self, unserved):
        """
        For each handler no worker has, the one a worker has that it was
        probably meant to be (a typo), if any.
        """
        if not unserved:
            return {}
        served = self._broker.dispatcher.served_handlers()
        meant = {name: nearest(name, served) for name in unserved}
        return {
            name: other for name, other in meant.items() if other is not None
        }

    def _new_tasks(self, body, key):
        """
        The tasks a SUBMIT asks for, with the broker's defaults, submitted
        by ``key``.

        :returns: a ``list`` of :class:`taskbroker.store.NewTask`.
        :raises Refused: for a task the broker cannot take.
        """
        broker = self._broker
        now = broker.clock.seconds()
        submitter = submitter_of(key)
        new = []
        for spec in body["tasks"]:
            priority = spec.get("priority") or broker.config.default_priority
            if priority not in broker.levels:
                raise Refused(
                    "unknown_priority",
                    f"unknown priority level {priority!r} "
                    "(levels: " + ",".join(broker.levels) + ")",
                )
            payload = dumps(spec["payload"])
            if len(payload.encode("utf-8")) > codec.MAX_PAYLOAD_SIZE:
                raise Refused(
                    "too_large",
                    "payload exceeds the limit of "
                    f"{codec.MAX_PAYLOAD_SIZE} bytes",
                )
            delay = spec.get("delay")
            new.append(
                NewTask(
                    spec["handler"],
                    payload,
                    priority,
                    spec.get("max_attempts") or broker.config.max_attempts,
                    now,
                    run_at=now + delay if delay else None,
                    unique_key=spec.get("unique_key"),
                    request_id=body.get("request_id"),
                    time_limit=spec.get("time_limit"),
                    submitter=submitter,
                )
            )
        return new

    def _claim_workers(self, new):
        """
        A task a ready worker can run now is dispatched in the transaction
        that inserts it, most urgent first: one commit before its TASK
        instead of two.  Marks those tasks in ``new`` with their worker.

        :returns: a ``dict``: index in ``new`` -> the claimed
            :class:`taskbroker.broker.sessions.Session`.
        """
        broker = self._broker
        claims = {}
        for i in sorted(
            range(len(new)), key=lambda i: broker.level_of(new[i].priority)
        ):
            task = new[i]
            key = (broker.level_of(task.priority), task.handler)
            if task.run_at is not None or broker.backlog.is_truncated(key):
                continue  # delayed, or older tasks of its queue wait
            slot = broker.dispatcher.claim(*key)
            if slot is not None:
                session = broker.sessions.get(slot.key)
                claims[i] = session
                new[i] = dataclasses.replace(task, worker=session.name)
        return claims

    # -- reading -----------------------------------------------------------

    def on_GET(self, identity, body, key=None):
        req = body["req"]
        d = self.get(body["id"], key)
        d.addCallback(lambda answer: self.reply(identity, req, answer))
        return self._answered(d, "reading a task", identity, req)

    def get(self, task_id, key):
        """
        Read a task for a client with ``key``.

        :returns: a ``Deferred`` firing with the reply's body, or failing
            with :class:`Refused` (``not_found``) or the store's error.
        """
        return self._read(task_id, self.scope(key)).addCallback(
            lambda row: {"task": task_object(row)}
        )

    def on_WAIT(self, identity, body, key=None):
        req, task_id = body["req"], body["id"]
        timeout = body.get("timeout", DEFAULT_WAIT)
        scope = self.scope(key)
        if timeout > 0 and self._live_for(task_id, scope):
            # Live, so not final: wait without reading it.
            self._wait(identity, req, task_id, timeout, key)
            return None

        def found(row):
            if row.state in FINAL_STATES or timeout <= 0:
                self.reply(identity, req, {"task": task_object(row)})
            else:
                self._wait(identity, req, task_id, timeout, key)

        d = self._read(task_id, scope).addCallback(found)
        return self._answered(d, "reading a task", identity, req)

    def _live_for(self, task_id, scope):
        """
        Whether the task is known to be live, and the client may see it,
        without reading it.
        """
        broker = self._broker
        if scope is not None:
            # Only a running task's row is at hand to tell whose it is.
            attempt = broker.attempts.get(task_id)
            return attempt is not None and attempt.row.submitter == scope
        return (
            task_id in broker.attempts
            or broker.backlog.holds(task_id)
            or broker.outcomes.reporting(task_id)
        )

    def _wait(self, identity, req, task_id, timeout, key):
        broker = self._broker
        if not broker.admission.hold_wait():
            self.error(
                identity,
                req,
                "busy",
                "the broker holds too many WAITs open; try again shortly",
            )
            return
        d = broker.outcomes.when_final(task_id)
        timer = broker.clock.callLater(timeout, d.cancel)

        def ended(final):
            if timer.active():
                timer.cancel()
            if final is not None:
                self.reply(identity, req, {"task": task_object(final)})
            else:
                self.on_GET(identity, {"req": req, "id": task_id}, key)

        def timed_out(reason):
            reason.trap(defer.CancelledError)
            self.on_GET(identity, {"req": req, "id": task_id}, key)

        def stopping(reason):
            reason.trap(BrokerStopping)
            if timer.active():
                timer.cancel()
            self.error(identity, req, "unavailable", "the broker is stopping")

        def held(result):
            broker.admission.end_wait()
            return result

        d.addCallbacks(ended, timed_out).addErrback(stopping).addBoth(held)
        self._answered(d, "waiting for a task", identity, req)
        if (
            broker.claims.shared
            and task_id not in broker.attempts
            and not broker.outcomes.reporting(task_id)
        ):
            self.watch(task_id)

    def watch(self, task_id):
        """
        On a shared store another broker may end a task waited for here
        (one this broker does not run, or no longer runs): ask to be told,
        then read it once more, in case it ended before the store heard.
        """
        broker = self._broker

        def read_again(_):
            return broker.store.get(task_id).addCallback(ended)

        def ended(row):
            if row is not None and row.state in FINAL_STATES:
                broker.outcomes.notify(task_id, row)

        broker.claims.watch(task_id).addCallback(read_again).addErrback(
            broker.trouble, "watching a task"
        )

    def on_LIST(self, identity, body, key=None):
        req = body["req"]
        d = self.list_tasks(body, key)
        d.addCallback(lambda answer: self.reply(identity, req, answer))
        return self._answered(d, "listing tasks", identity, req)

    def list_tasks(self, body, key):
        """
        Carry out a LIST (its body as the codec checked it) for a client
        with ``key``.

        :returns: a ``Deferred`` firing with the reply's body, or failing
            with the store's error.
        """
        limit = body.get("limit") or 100
        # Oldest first unless asked: what clients from before 'order' mean.
        order = body.get("order") or "oldest"
        d = self._broker.store.list(
            body.get("state"),
            body.get("handler"),
            body.get("after") or 0,
            limit + 1,
            MAX_LIST_BYTES,
            submitter=self.scope(key),
            priority=body.get("priority"),
            before_id=body.get("before"),
            newest_first=order == "newest",
        )

        def listed(rows):
            more = (
                len(rows) > limit
                or sum(map(text_size, rows)) >= MAX_LIST_BYTES
            )
            rows = rows[:limit]
            return {
                "tasks": [task_object(row) for row in rows],
                # The cursor of the next page: its 'after' (oldest first)
                # or its 'before' (newest first).
                "next": rows[-1].id if more else None,
                # Echoed, so that a client can tell a broker that ignored
                # it (one from before it).
                "order": order,
            }

        return d.addCallback(listed)

    # -- changing tasks ----------------------------------------------------

    def on_CANCEL(self, identity, body, key=None):
        req = body["req"]
        d = self.cancel(body["id"], key)
        d.addCallback(lambda answer: self.reply(identity, req, answer))
        return self._answered(d, "cancelling a task", identity, req)

    def cancel(self, task_id, key):
        """
        Cancel a task for a client with ``key``.

        :returns: a ``Deferred`` firing with the reply's body, or failing
            with :class:`Refused` or the store's error.
        """
        scope = self.scope(key)
        if scope is None:
            return self.cancel_task(task_id)
        return self._read(task_id, scope).addCallback(
            lambda _: self.cancel_task(task_id)
        )

    def cancel_task(self, task_id):
        """
        Cancel a task, whoever submitted it (the caller checked).
        """
        broker = self._broker
        waiting = broker.backlog.withdraw(task_id)
        d = broker.store.cancel(task_id, broker.clock.seconds())

        def cancelled(row):
            if row is None:
                raise self._not_found(task_id)
            if row.state != "cancelled":
                if waiting is not None and row.state == "queued":
                    broker.backlog.enqueue(waiting)
                raise Refused(
                    "not_cancellable",
                    f"task {task_id} is {row.state}; only queued and running "
                    "tasks can be cancelled",
                )
            attempt = broker.attempts.end(task_id)
            counts = broker.status.tasks
            counts.move(
                row.priority,
                row.handler,
                "queued" if attempt is None else "running",
                "cancelled",
            )
            if (
                attempt is None
                and isinstance(row.run_at, (int, float))
                and row.run_at > broker.clock.seconds()
            ):
                counts.move(row.priority, row.handler, DELAYED, None)
            holder = (
                broker.sessions.get(attempt.session)
                if attempt is not None and attempt.session is not None
                else None
            )
            if holder is not None:
                if holder.running.pop(task_id, None) is not None:
                    broker.dispatcher.task_done(holder.identity)
                broker.workers.cancel(holder.identity, task_id, attempt.token)
            self.log.info("task {task_id} cancelled", task_id=task_id)
            broker.metrics.ended(
                row.priority or broker.config.default_priority,
                row.handler,
                "cancelled",
            )
            broker.outcomes.notify(task_id)
            return {"task": task_object(row)}

        def not_cancelled(reason):
            if waiting is not None:
                broker.backlog.enqueue(waiting, front=True)
            return reason

        return d.addCallbacks(cancelled, not_cancelled)

    def on_RETRY(self, identity, body, key=None):
        req = body["req"]
        d = self.retry(body["id"], key)
        d.addCallback(lambda answer: self.reply(identity, req, answer))
        return self._answered(d, "retrying a task", identity, req)

    def retry(self, task_id, key):
        """
        Queue a failed or cancelled task again, for a client with ``key``.

        :returns: a ``Deferred`` firing with the reply's body, or failing
            with :class:`Refused` or the store's error.
        """
        return self._read(task_id, self.scope(key)).addCallback(self._retry)

    def retry_task(self, task_id):
        """
        Queue a failed or cancelled task again, whoever submitted it (the
        caller checked).
        """
        return self._read(task_id, None).addCallback(self._retry)

    @defer.inlineCallbacks
    def _retry(self, row):
        broker = self._broker
        task_id = row.id
        if row.state in ("queued", "running"):
            # Already going to run (a resent RETRY, say): nothing to do.
            return {"task": task_object(row)}
        if row.state not in ("failed", "cancelled"):
            raise Refused(
                "not_retryable",
                f"task {task_id} is {row.state}; only "
                "failed and cancelled tasks can be retried",
            )
        previous = row.state
        row = yield broker.store.retry(task_id)
        if row.state != "queued":
            raise Refused(
                "not_retryable",
                f"task {task_id} cannot be retried: another live task "
                f"holds its unique key {row.unique_key!r}",
            )
        broker.status.tasks.move(row.priority, row.handler, previous, "queued")
        reason = invalid_row(row, broker.levels)
        if reason is not None:
            yield broker.store.reject(task_id, reason, broker.clock.seconds())
            broker.status.tasks.move(
                row.priority, row.handler, "queued", "failed"
            )
            raise Refused(
                "not_retryable", f"task {task_id} cannot run: {reason}"
            )
        broker.claims.inserted((task_id,))
        # Queued again in the store: an attempt or a held copy this broker
        # still has (ended behind its back, by another broker) is stale.
        stale = broker.attempts.get(task_id)
        if stale is not None:
            broker.stop_attempt(stale, "retried")
        broker.backlog.withdraw(task_id)
        broker.backlog.enqueue(broker.backlog.with_defaults(row))
        self.log.info("task {task_id} retried", task_id=task_id)
        return {"task": task_object(row)}

    # -- the fleet ---------------------------------------------------------

    def on_WORKERS(self, identity, body, key=None):
        # Names hosts, keys and the tasks each worker runs: an admin's.
        if self.scope(key) is not None:
            self.error(
                identity,
                body["req"],
                "forbidden",
                "listing the workers needs an admin key (--admin-clients)",
            )
            return
        self.reply(
            identity, body["req"], {"workers": self._broker.status.workers()}
        )

    def on_STATS(self, identity, body, key=None):
        # Counts only, no task's content: any client may see them.
        # From memory, except for the very first, which waits for the
        # broker's first count of the table.
        status = self._broker.status
        req = body["req"]
        d = status.counted()
        d.addCallback(
            lambda _: self.reply(identity, req, {"stats": status.stats()})
        )
        return self._answered(d, "counting tasks", identity, req)
