# -*- test-case-name: tests.unit.test_broker -*-
"""
The broker's message handling: between the ROUTER socket, the dispatcher
and the store.

:class:`Broker` owns no socket and reads no clock of its own: it is given a
``send(identity, frames)`` callable, a store and an ``IReactorTime``, so
unit tests drive it with a ``MemoryStore`` and a ``Clock``.  The store is
the truth: a task's state changes there before anyone is told (a SUBMIT is
answered, a TASK sent, a RESULT acknowledged only after the commit).
"""

import uuid
from dataclasses import replace

from twisted.internet import defer
from twisted.logger import Logger

from taskbroker.broker.dispatch import Dispatcher, Task
from taskbroker.protocol import codec
from taskbroker.protocol.codec import ProtocolError, dumps, encode
from taskbroker.protocol.objects import iso_time, task_object
from taskbroker.store import FINAL_STATES, NewTask

#: How many queued rows one poll (or the start-up load) reads at a time.
POLL_BATCH = 5000
#: The longest a WAIT is held when the client gives no timeout (seconds).
DEFAULT_WAIT = 30.0


class _Peer:
    """
    A connected worker.
    """

    __slots__ = ("identity", "name", "levels", "handlers", "slots",
                 "heartbeat", "connected_since", "last_seen", "running")

    def __init__(self, identity, name, levels, handlers, slots, heartbeat,
                 now):
        self.identity = identity
        self.name = name
        self.levels = levels
        self.handlers = handlers
        self.slots = slots
        self.heartbeat = heartbeat
        self.connected_since = now
        self.last_seen = now
        # task id -> attempt, for the tasks this worker runs
        self.running = {}


class Broker:
    """
    Handles every message arriving on the broker's socket.

    :param config: a :class:`taskbroker.config.BrokerConfig`.
    :param store: an opened :class:`taskbroker.interfaces.ITaskStore`.
    :param clock: an ``IReactorTime``.
    :param send: ``send(identity, frames) -> bool``.
    """

    log = Logger()

    def __init__(self, config, store, clock, send, instance_id=None):
        self.config = config
        self.store = store
        self.clock = clock
        self._send = send
        self.instance_id = instance_id or uuid.uuid4().hex[:12]
        self.levels = tuple(config.priorities)
        self._level_index = {name: i for i, name in enumerate(self.levels)}
        self.dispatcher = Dispatcher(len(self.levels))
        self._peers = {}
        self._names = {}
        # task id -> (identity or None, attempt, row): dispatched attempts.
        # identity is None for attempts found running at start that no
        # worker has claimed yet.
        self._running = {}
        self._submitted_since_poll = set()
        self._watermark = 0
        self._polling = False
        self._waiters = {}
        self._orphan_deadline = None
        self._stopped = False
        self.counters = {
            "protocol_errors": 0,
            "stale_results": 0,
            "dispatched": 0,
            "completed": 0,
            "lost_workers": 0,
        }
        self._heartbeat_body = encode(
            b"HEARTBEAT", {"broker": self.instance_id})

    # -- start and stop --------------------------------------------------

    @defer.inlineCallbacks
    def load(self):
        """
        Load the store's running and queued tasks.  Running ones are
        attempts that workers may still be running: they are given one
        liveness allowance to be claimed before they are requeued.
        """
        for row in (yield self.store.running()):
            self._running[row.id] = (None, row.attempts, row)
        if self._running:
            self._orphan_deadline = self.clock.callLater(
                self._allowance(self.config.heartbeat), self._requeue_orphans)
        yield self.poll()

    def stop(self):
        """
        Stop timers and answer outstanding WAITs; the caller then closes
        the socket and the store.  Attempts being dispatched stay
        ``running`` in the store, to be reclaimed or requeued by the next
        broker.
        """
        self._stopped = True
        if self._orphan_deadline is not None and self._orphan_deadline.active():
            self._orphan_deadline.cancel()
        for waiters in self._waiters.values():
            for identity, req, timer in waiters:
                if timer.active():
                    timer.cancel()
                self._error(identity, req, "unavailable", "the broker is stopping")
        self._waiters.clear()

    # -- input -----------------------------------------------------------

    def handle(self, identity, frames):
        """
        Handle one message from ``identity``.  Never raises for bad input.
        """
        if self._stopped:
            return
        peer = self._peers.get(identity)
        if peer is not None:
            peer.last_seen = self.clock.seconds()
        try:
            command, body = codec.decode(frames, codec.BROKER_INBOUND)
        except ProtocolError as e:
            self.counters["protocol_errors"] += 1
            self.log.warn(
                "bad message from {peer!r}: {reason}",
                peer=identity, reason=e.message)
            if peer is None:
                self._error(identity, e.req, e.code, e.message)
            return
        getattr(self, "_on_" + command.decode("ascii"))(identity, peer, body)

    # -- workers ---------------------------------------------------------

    def _on_HELLO(self, identity, peer, body):
        name = body["name"]
        wanted = body.get("priorities")
        if wanted is None:
            wanted = list(self.levels)
        unknown = [level for level in wanted if level not in self._level_index]
        if unknown or not wanted:
            self._refuse(
                identity, "unknown_priority",
                "this broker has no priority level "
                + ", ".join(map(repr, unknown))
                + " (its levels: " + ",".join(self.levels) + ")")
            return
        holder = self._names.get(name)
        if holder is not None and holder != identity and holder in self._peers:
            self._refuse(
                identity, "name_taken",
                f"a live worker named {name!r} is already connected; "
                "give each worker a unique --name")
            return
        now = self.clock.seconds()
        previous = peer
        peer = _Peer(identity, name, tuple(wanted), tuple(body["handlers"]),
                     body["slots"], body.get("heartbeat", 1.0), now)
        if previous is not None:
            # The same connection announcing again: what it was given is
            # still its own, even tasks sent after it wrote this HELLO.
            self.dispatcher.remove_worker(identity)
            peer.running = previous.running
            peer.connected_since = previous.connected_since
        # Attempts the worker is still running (it reconnected, or this
        # broker restarted): claim those that are still current.
        for item in body.get("running", ()):
            entry = self._running.get(item["id"])
            if entry is not None and entry[1] == item["attempt"] and (
                    entry[0] is None or entry[0] not in self._peers):
                self._running[item["id"]] = (identity, entry[1], entry[2])
                peer.running[item["id"]] = entry[1]
        self._peers[identity] = peer
        self._names[name] = identity
        self.dispatcher.add_worker(
            identity, [self._level_index[level] for level in wanted],
            peer.handlers, peer.slots, busy=len(peer.running))
        self._send(identity, encode(b"WELCOME", {
            "broker": self.instance_id,
            "priorities": list(self.levels),
            "heartbeat": self.config.heartbeat,
        }))
        self.log.info(
            "worker {name} connected: {slots} slots, levels {levels}, "
            "handlers {handlers}", name=name, slots=peer.slots,
            levels=",".join(wanted), handlers=",".join(peer.handlers))

    def _refuse(self, identity, code, message):
        self.log.warn("refused a worker: {message}", message=message)
        self._send(identity, encode(
            b"ERROR", {"code": code, "message": message, "fatal": True}))

    def _on_READY(self, identity, peer, body):
        if peer is None:
            self._rehello(identity)
            return
        assignment = self.dispatcher.credit(identity)
        if assignment is not None:
            self._dispatch(assignment)

    def _on_HEARTBEAT(self, identity, peer, body):
        if peer is None:
            self._rehello(identity)

    def _on_BYE(self, identity, peer, body):
        if peer is not None:
            self.log.info("worker {name} left", name=peer.name)
            self._forget_peer(peer)

    def _on_RESULT(self, identity, peer, body):
        task_id, attempt = body["id"], body["attempt"]
        entry = self._running.get(task_id)
        if entry is not None and entry[1] == attempt:
            del self._running[task_id]
            holder = self._peers.get(entry[0]) if entry[0] else None
            if holder is not None:
                holder.running.pop(task_id, None)
                self.dispatcher.task_done(holder.identity)
        # It was decoded from JSON, so it encodes again.
        result_text = dumps(body.get("result"))
        if len(result_text.encode("utf-8")) > codec.MAX_PAYLOAD_SIZE:
            result_text = None
            body["state"] = "failed"
            body["error"] = "result exceeds the size limit"
        d = self.store.finish(task_id, attempt, body["state"], result_text,
                              body.get("error"), self.clock.seconds())

        def recorded(accepted):
            if accepted:
                self.counters["completed"] += 1
                self._notify(task_id)
            else:
                self.counters["stale_results"] += 1
                self.log.info(
                    "ignored a result for task {task_id} attempt {attempt}: "
                    "not the current attempt", task_id=task_id,
                    attempt=attempt)
            # Acknowledged either way: a stale result will never be taken.
            self._send(identity, encode(
                b"ACK", {"id": task_id, "attempt": attempt}))

        d.addCallbacks(recorded, self._store_failed,
                       errbackArgs=("recording a result",))
        if peer is None:
            self._rehello(identity)

    def _rehello(self, identity):
        self._send(identity, encode(b"REHELLO", {"broker": self.instance_id}))

    def _forget_peer(self, peer):
        """
        A worker left or was lost: requeue what it was running.
        """
        self._peers.pop(peer.identity, None)
        if self._names.get(peer.name) == peer.identity:
            del self._names[peer.name]
        self.dispatcher.remove_worker(peer.identity)
        running, peer.running = peer.running, {}
        for task_id, attempt in running.items():
            entry = self._running.get(task_id)
            if entry is not None and entry[1] == attempt:
                self._requeue(task_id, attempt, entry[2],
                              f"worker {peer.name} was lost")

    def _requeue(self, task_id, attempt, row, reason):
        del self._running[task_id]
        now = self.clock.seconds()
        max_attempts = row.max_attempts or self.config.max_attempts
        if attempt >= max_attempts:
            self.log.warn(
                "task {task_id} failed: {reason} during its last attempt "
                "({attempt} of {max_attempts})", task_id=task_id,
                reason=reason, attempt=attempt, max_attempts=max_attempts)
            d = self.store.finish(
                task_id, attempt, "failed", None,
                f"{reason} during attempt {attempt} of {max_attempts}", now)
            d.addCallback(lambda _: self._notify(task_id))
        else:
            self.log.info("task {task_id} requeued: {reason} during attempt "
                          "{attempt}", task_id=task_id, reason=reason,
                          attempt=attempt)
            d = self.store.requeue(task_id, attempt)

            def requeued(ok):
                if ok:
                    self._enqueue(replace(row, attempts=attempt), front=True)

            d.addCallback(requeued)
        d.addErrback(self._store_failed, "requeueing a task")

    def _requeue_orphans(self):
        self._orphan_deadline = None
        for task_id, (identity, attempt, row) in list(self._running.items()):
            if identity is None:
                self.log.info(
                    "task {task_id} attempt {attempt} was not claimed by "
                    "any worker after the restart; requeueing it",
                    task_id=task_id, attempt=attempt)
                self._requeue(task_id, attempt, row, "its worker was lost")

    def sweep(self):
        """
        Send heartbeats and forget workers silent for too long.
        """
        now = self.clock.seconds()
        for peer in list(self._peers.values()):
            if now - peer.last_seen > self._allowance(peer.heartbeat):
                self.counters["lost_workers"] += 1
                self.log.warn(
                    "worker {name} lost: silent for {silence:.1f}s",
                    name=peer.name, silence=now - peer.last_seen)
                self._forget_peer(peer)
            elif not self._send(peer.identity, self._heartbeat_body):
                self.log.warn("worker {name} is unreachable", name=peer.name)
                self._forget_peer(peer)

    def _allowance(self, heartbeat):
        return heartbeat * self.config.heartbeat_misses

    # -- dispatch --------------------------------------------------------

    def _enqueue(self, row, front=False):
        assignment = self.dispatcher.add_task(
            Task(row.id, self._level_index[row.priority], row.handler, row),
            front=front)
        if assignment is not None:
            self._dispatch(assignment)

    def _dispatch(self, assignment):
        row = assignment.task.data
        identity = assignment.worker.key
        peer = self._peers[identity]
        attempt = row.attempts + 1
        self._running[row.id] = (identity, attempt, row)
        peer.running[row.id] = attempt
        now = self.clock.seconds()
        d = self.store.dispatch(row.id, attempt, peer.name, now)

        def committed(ok):
            if self._stopped:
                return
            if not ok:
                # Changed behind our back (by SQL): forget it, free the slot.
                self._undispatch(row.id, identity, attempt)
                return
            self.counters["dispatched"] += 1
            body = (
                '{"id":%d,"handler":%s,"payload":%s,"priority":%s,'
                '"attempt":%d,"max_attempts":%d}' % (
                    row.id, dumps(row.handler), row.payload,
                    dumps(row.priority), attempt,
                    row.max_attempts or self.config.max_attempts))
            if not self._send(identity, encode(b"TASK", body)):
                current = self._peers.get(identity)
                if current is not None:
                    self.log.warn("worker {name} is unreachable",
                                  name=current.name)
                    self._forget_peer(current)

        def failed(reason):
            self._undispatch(row.id, identity, attempt)
            self._enqueue(row, front=True)
            self._store_failed(reason, "dispatching a task")

        d.addCallbacks(committed, failed)

    def _undispatch(self, task_id, identity, attempt):
        entry = self._running.get(task_id)
        if entry is not None and entry[1] == attempt:
            del self._running[task_id]
        peer = self._peers.get(identity)
        if peer is not None and peer.running.pop(task_id, None) is not None:
            self.dispatcher.task_done(identity)
            # The worker's credit was spent on nothing: give it back.
            assignment = self.dispatcher.credit(identity)
            if assignment is not None:
                self._dispatch(assignment)

    # -- the poller ------------------------------------------------------

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

        d = self._poll()
        d.addBoth(done)
        d.addErrback(self._store_failed, "polling for new tasks")
        return d

    @defer.inlineCallbacks
    def _poll(self):
        while True:
            rows = yield self.store.queued(self._watermark, POLL_BATCH)
            adopted, writes = [], []
            for row in rows:
                if row.id in self._submitted_since_poll or row.id in self.dispatcher:
                    continue
                reason = self._invalid(row)
                if reason is not None:
                    self.log.warn("rejected task {task_id}: {reason}",
                                  task_id=row.id, reason=reason)
                    writes.append(self.store.reject(
                        row.id, reason, self.clock.seconds()).addCallback(
                            lambda _, task_id=row.id: self._notify(task_id)))
                    continue
                if row.priority is None or row.max_attempts is None:
                    row = replace(
                        row,
                        priority=row.priority or self.config.default_priority,
                        max_attempts=row.max_attempts or self.config.max_attempts)
                    writes.append(self.store.fix(
                        row.id, row.priority, row.max_attempts))
                adopted.append(row)
            # All in one group commit; if it fails, the watermark stays and
            # the next poll tries these rows again.
            yield defer.gatherResults(writes, consumeErrors=True)
            if rows:
                self._watermark = max(self._watermark, rows[-1].id)
            self._submitted_since_poll = {
                i for i in self._submitted_since_poll if i > self._watermark}
            for row in sorted(adopted, key=lambda r: self._level_index[r.priority]):
                if row.id not in self._running and row.id not in self.dispatcher:
                    self._enqueue(row)
            if len(rows) < POLL_BATCH:
                return

    def _invalid(self, row):
        if not isinstance(row.handler, str) or not (
                0 < len(row.handler) <= codec.MAX_NAME):
            return "invalid handler name"
        if row.priority is not None and row.priority not in self._level_index:
            return (f"unknown priority level {row.priority!r} (levels: "
                    + ",".join(self.levels) + ")")
        if not isinstance(row.payload, str):
            return "payload is not JSON text"
        if len(row.payload.encode("utf-8")) > codec.MAX_PAYLOAD_SIZE:
            return (f"payload exceeds the limit of "
                    f"{codec.MAX_PAYLOAD_SIZE} bytes")
        try:
            codec.loads(row.payload)
        except ValueError:
            return "payload is not valid JSON"
        if row.max_attempts is not None and not (
                isinstance(row.max_attempts, int) and 1 <= row.max_attempts <= 1000):
            return "max_attempts must be from 1 to 1000"
        return None

    # -- clients ---------------------------------------------------------

    def _reply(self, identity, req, body):
        body["req"] = req
        self._send(identity, encode(b"REPLY", body))

    def _error(self, identity, req, code, message):
        self._send(identity, encode(
            b"ERROR", {"req": req, "code": code, "message": message}))

    def _store_failed(self, reason, doing, identity=None, req=None):
        self.log.failure("database error while {doing}", reason, doing=doing)
        if identity is not None:
            self._error(identity, req, "unavailable",
                        "the database cannot be used right now; try again")

    def _on_SUBMIT(self, identity, peer, body):
        req = body["req"]
        now = self.clock.seconds()
        new = []
        for spec in body["tasks"]:
            priority = spec.get("priority") or self.config.default_priority
            if priority not in self._level_index:
                self._error(identity, req, "unknown_priority",
                            f"unknown priority level {priority!r} (levels: "
                            + ",".join(self.levels) + ")")
                return
            payload = dumps(spec["payload"])
            if len(payload.encode("utf-8")) > codec.MAX_PAYLOAD_SIZE:
                self._error(identity, req, "too_large",
                            "payload exceeds the limit of "
                            f"{codec.MAX_PAYLOAD_SIZE} bytes")
                return
            new.append(NewTask(
                spec["handler"], payload, priority,
                spec.get("max_attempts") or self.config.max_attempts, now))
        d = self.store.submit(new)

        def committed(rows):
            self._submitted_since_poll.update(row.id for row in rows)
            self._reply(identity, req, {
                "tasks": [task_object(row) for row in rows],
                "unserved": sorted({
                    row.handler for row in rows
                    if not self.dispatcher.served(row.handler)}),
            })
            # Most urgent first, so that a batch's urgent tasks get first
            # pick of the free workers.
            for row in sorted(rows, key=lambda r: self._level_index[r.priority]):
                self._enqueue(row)

        d.addCallbacks(committed, self._store_failed,
                       errbackArgs=("submitting tasks", identity, req))

    def _on_GET(self, identity, peer, body):
        req = body["req"]
        d = self.store.get(body["id"])

        def found(row):
            if row is None:
                self._error(identity, req, "not_found",
                            f"no task with id {body['id']}")
            else:
                self._reply(identity, req, {"task": task_object(row)})

        d.addCallbacks(found, self._store_failed,
                       errbackArgs=("reading a task", identity, req))

    def _on_WAIT(self, identity, peer, body):
        req, task_id = body["req"], body["id"]
        timeout = body.get("timeout", DEFAULT_WAIT)
        d = self.store.get(task_id)

        def found(row):
            if row is None:
                self._error(identity, req, "not_found",
                            f"no task with id {task_id}")
            elif row.state in FINAL_STATES or timeout <= 0:
                self._reply(identity, req, {"task": task_object(row)})
            else:
                waiter = (identity, req, self.clock.callLater(
                    timeout, self._wait_expired, task_id, identity, req))
                self._waiters.setdefault(task_id, []).append(waiter)

        d.addCallbacks(found, self._store_failed,
                       errbackArgs=("reading a task", identity, req))

    def _wait_expired(self, task_id, identity, req):
        waiters = self._waiters.get(task_id, [])
        waiters[:] = [w for w in waiters if w[1] != req or w[0] != identity]
        if not waiters:
            self._waiters.pop(task_id, None)
        self._on_GET(identity, None, {"req": req, "id": task_id})

    def _notify(self, task_id):
        waiters = self._waiters.pop(task_id, None)
        if not waiters:
            return
        for identity, req, timer in waiters:
            if timer.active():
                timer.cancel()
            self._on_GET(identity, None, {"req": req, "id": task_id})

    def _on_LIST(self, identity, peer, body):
        req = body["req"]
        limit = body.get("limit") or 100
        d = self.store.list(body.get("state"), body.get("handler"),
                            body.get("after") or 0, limit + 1)

        def listed(rows):
            more = len(rows) > limit
            rows = rows[:limit]
            self._reply(identity, req, {
                "tasks": [task_object(row) for row in rows],
                "next": rows[-1].id if more else None,
            })

        d.addCallbacks(listed, self._store_failed,
                       errbackArgs=("listing tasks", identity, req))

    def _on_CANCEL(self, identity, peer, body):
        req, task_id = body["req"], body["id"]
        waiting = self.dispatcher.remove_task(task_id)
        d = self.store.cancel(task_id, self.clock.seconds())

        def cancelled(row):
            if row is None:
                self._error(identity, req, "not_found",
                            f"no task with id {task_id}")
            elif row.state == "cancelled":
                self._notify(task_id)
                self._reply(identity, req, {"task": task_object(row)})
            else:
                if waiting is not None and row.state == "queued":
                    self._enqueue(waiting.data)
                self._error(
                    identity, req, "not_cancellable",
                    f"task {task_id} is {row.state}; only queued tasks can "
                    "be cancelled")

        def failed(reason):
            if waiting is not None:
                self._enqueue(waiting.data, front=True)
            self._store_failed(reason, "cancelling a task", identity, req)

        d.addCallbacks(cancelled, failed)

    def _on_WORKERS(self, identity, peer, body):
        workers = []
        for p in sorted(self._peers.values(), key=lambda p: p.name):
            workers.append({
                "name": p.name,
                "priorities": list(p.levels),
                "handlers": sorted(p.handlers),
                "slots": p.slots,
                "busy": len(p.running),
                "connected_since": iso_time(p.connected_since),
                "last_seen": iso_time(p.last_seen),
            })
        self._reply(identity, body["req"], {"workers": workers})

    def _on_STATS(self, identity, peer, body):
        req = body["req"]
        d = self.store.counts()

        def counted(counts):
            tasks = {}
            for (state, level), n in counts.items():
                tasks.setdefault(state, {})[level] = n
            waiting = self.dispatcher.waiting_by_handler()
            self._reply(identity, req, {"stats": {
                "priorities": list(self.levels),
                "tasks": tasks,
                "waiting": waiting,
                "unserved": sorted(
                    h for h in waiting if not self.dispatcher.served(h)),
                "workers": len(self._peers),
                "slots": sum(p.slots for p in self._peers.values()),
                "free_slots": self.dispatcher.free_credits(),
                "counters": dict(self.counters,
                                 dropped_credits=self.dispatcher.dropped_credits),
            }})

        d.addCallbacks(counted, self._store_failed,
                       errbackArgs=("counting tasks", identity, req))

