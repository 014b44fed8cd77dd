# -*- test-case-name: tests.unit.test_broker -*-
"""
The broker's message handling: between the ROUTER socket, the dispatcher
and the store.

:class:`Broker` owns no socket and reads no clock of its own: it is given a
``send(identity, frames)`` callable, a store, an ``IReactorTime`` and a
monotonic clock, so unit tests drive it with a ``MemoryStore`` and a
``Clock``.  The store is the truth: a task's state changes there before
anyone is told (a SUBMIT is answered, a TASK sent, a RESULT acknowledged
only after the commit).

Every dispatch carries a fencing token, one more than the task's previous
one: a RESULT is taken only for the current token, so a worker presumed
lost can never overwrite the attempt that replaced it.
"""

import dataclasses
import heapq
import math
import random
import uuid

from twisted.internet import defer
from twisted.logger import Logger

from taskbroker.broker.dispatch import Dispatcher, Task
from taskbroker.broker.window import Windows
from taskbroker.errors import one_line
from taskbroker.protocol import codec
from taskbroker.protocol.codec import ProtocolError, dumps, encode
from taskbroker.protocol.objects import iso_time, task_object
from taskbroker.store import FINAL_STATES, NewTask

#: How many queued rows one poll reads at a time.
POLL_BATCH = 5000
#: The most tasks of one queue (level and handler) held in memory; the rest
#: wait in the store and are read as the window drains (window.py).
QUEUE_WINDOW = 1000
#: The most delayed tasks held in memory, waiting for their time.
DELAYED_WINDOW = 1000
#: The longest a WAIT is held when the client gives no timeout (seconds).
DEFAULT_WAIT = 30.0
#: Database trouble: the first and the longest pause before trying again.
FIRST_STORE_BACKOFF = 0.5
MAX_STORE_BACKOFF = 30.0
#: The longest a worker's socket waits between reconnection attempts
#: (ZMQ_RECONNECT_IVL_MAX in the transport), in seconds.
RECONNECT_WAIT = 2.0
#: One log line per peer per this many seconds for its bad messages.
BAD_MESSAGE_LOG_INTERVAL = 10.0


# The key of the delayed tasks' window (the queues' keys are tuples).
DELAYED = "delayed"

# An idle worker's heartbeat, byte for byte as taskbroker's workers send it.
_IDLE_HEARTBEAT = encode(b"HEARTBEAT", {"running": []})


class _Peer:
    """
    A connected worker.
    """

    __slots__ = ("identity", "name", "levels", "handlers", "slots",
                 "heartbeat", "connected_since", "last_seen", "seen_at",
                 "running", "sent_at")

    def __init__(self, identity, name, levels, handlers, slots, heartbeat,
                 now, monotonic_now):
        self.identity = identity
        self.name = name
        self.levels = levels
        self.handlers = handlers
        self.slots = slots
        self.heartbeat = heartbeat
        self.connected_since = now
        self.last_seen = now
        # Liveness is judged on a monotonic clock: a wall-clock step must
        # not expire every worker at once.
        self.seen_at = monotonic_now
        # task id -> token, for the tasks this worker runs
        self.running = {}
        # task id -> monotonic time its TASK was sent
        self.sent_at = {}


class _RateLimit:
    """
    Allows one event per key per interval, and counts the rest.
    """

    def __init__(self, interval, monotonic, size=1024):
        self._interval = interval
        self._monotonic = monotonic
        self._last = {}
        self._size = size
        self.suppressed = 0

    def allow(self, key):
        now = self._monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self._interval:
            self.suppressed += 1
            return False
        if len(self._last) >= self._size:
            self._last.clear()
        self._last[key] = now
        return True


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
    """

    log = Logger()

    def __init__(self, config, store, clock, send, instance_id=None,
                 monotonic=None, rng=None):
        self.config = config
        self.store = store
        self.clock = clock
        self._send = send
        self._monotonic = monotonic or clock.seconds
        self._random = rng or random.Random()
        self.instance_id = instance_id or uuid.uuid4().hex[:12]
        self.levels = tuple(config.priorities)
        self._level_index = {name: i for i, name in enumerate(self.levels)}
        self.dispatcher = Dispatcher(len(self.levels))
        # Queues are keyed (level, handler); DELAYED is the delayed tasks.
        self._windows = Windows(QUEUE_WINDOW)
        self._delayed_window = Windows(DELAYED_WINDOW)
        self._peers = {}
        self._names = {}
        # task id -> (identity or None, token, row): dispatched attempts.
        # identity is None for attempts whose worker is unknown (found
        # running at start, or whose result could not be written).
        self._running = {}
        # task id -> monotonic deadline for unclaimed attempts (identity
        # None) to be claimed or reported before they are requeued.
        self._orphans = {}
        # Tasks waiting for their run_at: a heap of (run_at, id) and the
        # rows by id (a row missing from the dict was withdrawn).
        self._delayed = []
        self._delayed_rows = {}
        self._delay_timer = None
        self._submitted_since_poll = set()
        self._watermark = 0
        self._polling = False
        self._waiters = {}
        self._stopped = False
        self._store_backoff = 0.0
        self._resume_call = None
        self._bad_messages = _RateLimit(BAD_MESSAGE_LOG_INTERVAL, self._monotonic)
        self.counters = {
            "protocol_errors": 0,
            "stale_results": 0,
            "dispatched": 0,
            "completed": 0,
            "retried": 0,
            "lost_workers": 0,
            "store_errors": 0,
        }
        self._heartbeat_body = encode(
            b"HEARTBEAT", {"broker": self.instance_id})

    # -- start and stop --------------------------------------------------

    @defer.inlineCallbacks
    def load(self):
        """
        Load the store's running tasks, and a window of each queue.
        Running ones are attempts that workers may still be running: they
        are given time to be claimed before they are requeued.  However
        deep the queues, this reads one window per queue, not every task.
        """
        deadline = self._monotonic() + self._reclaim_window()
        for row in (yield self.store.running()):
            # Rows in memory are as they were before their dispatch.
            self._running[row.id] = (
                None, row.token, row._replace(attempts=row.attempts - 1))
            self._orphans[row.id] = deadline
        pairs, last_id = yield self.store.queued_groups()
        now = self.clock.seconds()
        rejected = []
        for handler, priority in pairs:
            reason = self._invalid_queue(handler, priority)
            if reason is not None:
                self.log.warn(
                    "rejected the queued tasks of handler {handler!r} and "
                    "priority {priority!r}: {reason}", handler=handler,
                    priority=priority, reason=reason)
                rejected.append(self.store.reject_group(
                    handler, priority, reason, now))
                continue
            level = self._level_index[priority or self.config.default_priority]
            # Truncated at the start: the first load reads its oldest tasks.
            self._windows.leave((level, handler), 0)
        self._delayed_window.leave(DELAYED, (-math.inf, 0))
        yield defer.gatherResults(rejected, consumeErrors=True)
        # Every queued task up to here belongs to a queue just found: the
        # poller only looks above.
        self._watermark = last_id
        loads = [self._refill(key) for key in self._windows.truncated()]
        yield defer.gatherResults([d for d in loads if d is not None],
                                  consumeErrors=True)
        yield self._load_delayed()

    def stop(self):
        """
        Stop timers and answer outstanding WAITs; the caller then closes
        the socket and the store.  Attempts being dispatched stay
        ``running`` in the store, to be reclaimed or requeued by the next
        broker.
        """
        self._stopped = True
        for call in (self._delay_timer, self._resume_call):
            if call is not None and call.active():
                call.cancel()
        for waiters in self._waiters.values():
            for identity, req, timer in waiters:
                if timer.active():
                    timer.cancel()
                self._error(identity, req, "unavailable",
                            "the broker is stopping")
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
            peer.seen_at = self._monotonic()
            if not peer.running and frames == _IDLE_HEARTBEAT:
                # Most of what a thousand idle workers send: nothing to
                # reconcile, so only note that they live, decoding nothing.
                peer.last_seen = self.clock.seconds()
                return
        try:
            command, body = codec.decode(frames, codec.BROKER_INBOUND)
        except ProtocolError as e:
            self.counters["protocol_errors"] += 1
            if self._bad_messages.allow(identity):
                self.log.warn(
                    "bad message from {peer!r}: {reason} (further ones from "
                    "this peer are counted, not logged, for {interval:.0f}s)",
                    peer=identity, reason=e.message,
                    interval=BAD_MESSAGE_LOG_INTERVAL)
            if peer is None:
                self._error(identity, e.req, e.code, e.message)
            return
        if peer is not None:
            peer.last_seen = self.clock.seconds()
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
        previous = peer
        peer = _Peer(identity, name, tuple(wanted), tuple(body["handlers"]),
                     body["slots"], body.get("heartbeat", 1.0),
                     self.clock.seconds(), self._monotonic())
        if previous is not None:
            # The same connection announcing again: what it was given is
            # still its own, even tasks sent after it wrote this HELLO.
            self.dispatcher.remove_worker(identity)
            peer.running = previous.running
            peer.connected_since = previous.connected_since
        # Attempts the worker is still running (it reconnected, or this
        # broker restarted): claim those that are still current, and tell
        # the worker to stop the others: they were requeued or cancelled.
        for item in body.get("running", ()):
            task_id, token = item["id"], item["token"]
            entry = self._running.get(task_id)
            if entry is not None and entry[1] == token:
                if entry[0] is None or entry[0] not in self._peers:
                    self._running[task_id] = (identity, token, entry[2])
                    self._orphans.pop(task_id, None)
                    peer.running[task_id] = token
            else:
                self._stop_stale(identity, task_id, token)
        self._peers[identity] = peer
        self._names[name] = identity
        self.dispatcher.add_worker(
            identity, [self._level_index[level] for level in wanted],
            peer.handlers, peer.slots, busy=len(peer.running))
        self._send(identity, encode(b"WELCOME", {
            "broker": self.instance_id,
            "priorities": list(self.levels),
            "heartbeat": self.config.heartbeat,
            "time_limit": self.config.time_limit,
        }))
        self.log.info(
            "worker {name} connected: {slots} slots, levels {levels}, "
            "handlers {handlers}", name=name, slots=peer.slots,
            levels=",".join(wanted), handlers=",".join(peer.handlers))

    def _refuse(self, identity, code, message):
        self.log.warn("refused a worker: {message}", message=message)
        self._send(identity, encode(
            b"ERROR", {"code": code, "message": message, "fatal": True}))

    def _stop_stale(self, identity, task_id, token):
        self.log.info(
            "task {task_id} token {token} is no longer current; telling "
            "{peer!r} to stop it", task_id=task_id, token=token,
            peer=identity)
        self._send(identity, encode(b"CANCEL", {"id": task_id, "token": token}))

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
        elif "running" in body:
            self._reconcile(peer, {(item["id"], item["token"])
                                   for item in body["running"]})

    def _reconcile(self, peer, listed):
        """
        Compare what a worker says it runs with what we gave it.  A TASK
        can be lost with a dropped connection that ZeroMQ silently
        re-establishes: a task the worker still lacks two heartbeats after
        it was sent is requeued (the attempt did not count).  An attempt
        the worker runs that is no longer current is stopped.
        """
        now = self._monotonic()
        for task_id, sent in list(peer.sent_at.items()):
            token = peer.running.get(task_id)
            if token is None or (task_id, token) in listed:
                del peer.sent_at[task_id]
            elif now - sent > 2 * peer.heartbeat:
                del peer.sent_at[task_id]
                del peer.running[task_id]
                self.dispatcher.task_done(peer.identity)
                entry = self._running.get(task_id)
                if entry is not None and entry[1] == token:
                    del self._running[task_id]
                    self._requeue(task_id, token, entry[2],
                                  f"worker {peer.name} never received it",
                                  consumed=False)
        for task_id, token in listed:
            entry = self._running.get(task_id)
            if entry is None or entry[1] != token:
                self._stop_stale(peer.identity, task_id, token)

    def _on_BYE(self, identity, peer, body):
        if peer is not None:
            self.log.info("worker {name} left", name=peer.name)
            # A worker leaving on purpose has handed back what it ran;
            # those attempts do not count against the tasks.
            self._forget_peer(peer, consumed=False)

    def _on_RESULT(self, identity, peer, body):
        self._result(identity, peer, body)
        if body.get("ready") and peer is not None:
            # The slot that ran it asks for work in the same message.
            self._on_READY(identity, peer, body)

    def _result(self, identity, peer, body):
        task_id, token = body["id"], body["token"]
        entry = self._running.get(task_id)
        if entry is None or entry[1] != token:
            self.counters["stale_results"] += 1
            self.log.info(
                "ignored a result for task {task_id} token {token}: not the "
                "current attempt", task_id=task_id, token=token)
            # Acknowledged: a stale result will never be taken.
            self._ack(identity, task_id, token)
            if peer is None:
                self._rehello(identity)
            return
        del self._running[task_id]
        self._orphans.pop(task_id, None)
        holder = self._peers.get(entry[0]) if entry[0] is not None else None
        if holder is not None and holder.running.pop(task_id, None) is not None:
            self.dispatcher.task_done(holder.identity)
        row = entry[2]
        state = body["state"]
        now = self.clock.seconds()
        if state == "released":
            d = self._requeue(task_id, token, row, "handed back by its worker",
                              consumed=False)
        elif state == "succeeded":
            # It was decoded from JSON, so it encodes again.
            result = dumps(body.get("result"))
            if len(result.encode("utf-8")) > codec.MAX_PAYLOAD_SIZE:
                d = self.store.finish(
                    task_id, token, "failed", None,
                    f"result exceeds the limit of {codec.MAX_PAYLOAD_SIZE} "
                    "bytes", None, now)
                final = None
            else:
                d = self.store.finish(task_id, token, "succeeded", result,
                                      None, None, now)
                # The row as the store now has it, so that waiting clients
                # are answered without reading it back.
                final = row._replace(
                    state="succeeded", attempts=row.attempts + 1, token=token,
                    finished_at=now, result=result, error=None,
                    traceback=None)
            d.addCallback(self._finished, task_id, final)
        else:
            d = self._failed(task_id, token, row, body.get("error") or "failed",
                             body.get("traceback"), body.get("permanent"))

        def recorded(_):
            self.counters["completed"] += state != "released"
            self._ack(identity, task_id, token)

        def failed(reason):
            # Not acknowledged: the worker resends it within its own
            # allowance.  Until then the attempt is an orphan, requeued
            # only if nobody reports it for twice as long.
            self._orphan(task_id, token, row,
                         2 * self._allowance(self.config.heartbeat))
            self._store_trouble(reason, "recording a result")

        d.addCallbacks(recorded, failed)
        if peer is None:
            self._rehello(identity)

    def _ack(self, identity, task_id, token):
        self._send(identity, encode(b"ACK", {"id": task_id, "token": token}))

    def _finished(self, changed, task_id, final=None):
        if changed:
            self._notify(task_id, final)
        return changed

    def _failed(self, task_id, token, row, error, traceback, permanent):
        """
        An attempt failed: retry after a backoff, or fail the task.
        """
        used = row.attempts + 1
        max_attempts = row.max_attempts or self.config.max_attempts
        now = self.clock.seconds()
        if permanent or used >= max_attempts:
            d = self.store.finish(task_id, token, "failed", None, error,
                                  traceback, now)
            return d.addCallback(self._finished, task_id)
        delay = self._backoff(used)
        run_at = now + delay
        self.counters["retried"] += 1
        self.log.info(
            "task {task_id} attempt {attempt} of {max_attempts} failed "
            "({error}); retrying in {delay:.1f}s", task_id=task_id,
            attempt=used, max_attempts=max_attempts, error=error, delay=delay)
        d = self.store.requeue(task_id, token, run_at=run_at, error=error,
                               traceback=traceback, consumed=True)

        def requeued(changed):
            if changed:
                self._enqueue(row._replace(
                    state="queued", attempts=used, token=token,
                    run_at=run_at, error=error, traceback=traceback))

        return d.addCallback(requeued)

    def _backoff(self, attempt):
        """
        Exponential backoff with "equal jitter": half fixed, half random,
        so that tasks failing together do not all come back together.
        """
        delay = min(self.config.retry_max_delay,
                    self.config.retry_delay * 2 ** (attempt - 1))
        return delay / 2 + self._random.uniform(0, delay / 2)

    def _rehello(self, identity):
        self._send(identity, encode(b"REHELLO", {"broker": self.instance_id}))

    def _forget_peer(self, peer, consumed=True):
        """
        A worker left or was lost: requeue what it was running.
        """
        self._peers.pop(peer.identity, None)
        if self._names.get(peer.name) == peer.identity:
            del self._names[peer.name]
        self.dispatcher.remove_worker(peer.identity)
        running, peer.running = peer.running, {}
        for task_id, token in running.items():
            entry = self._running.get(task_id)
            if entry is not None and entry[1] == token:
                del self._running[task_id]
                self._requeue(task_id, token, entry[2],
                              f"worker {peer.name} was lost" if consumed
                              else f"worker {peer.name} left",
                              consumed=consumed)

    def _requeue(self, task_id, token, row, reason, consumed):
        """
        Put an attempt's task back at the head of its level, or fail it if
        the attempt counted and was its last.
        """
        now = self.clock.seconds()
        used = row.attempts + 1
        max_attempts = row.max_attempts or self.config.max_attempts
        if consumed and used >= max_attempts:
            self.log.warn(
                "task {task_id} failed: {reason} during its last attempt "
                "({attempt} of {max_attempts})", task_id=task_id,
                reason=reason, attempt=used, max_attempts=max_attempts)
            d = self.store.finish(
                task_id, token, "failed", None,
                f"{reason} during attempt {used} of {max_attempts}", None, now)
            d.addCallback(self._finished, task_id)
        else:
            self.log.info("task {task_id} requeued: {reason}",
                          task_id=task_id, reason=reason)
            d = self.store.requeue(task_id, token, consumed=consumed)

            def requeued(changed):
                if changed:
                    self._enqueue(row._replace(
                        state="queued", token=token, run_at=None,
                        attempts=used if consumed else row.attempts),
                        front=True)

            d.addCallback(requeued)

        def failed(reason):
            # Try again later: the attempt becomes an orphan, which the
            # sweep requeues when its deadline passes.
            self._orphan(task_id, token, row,
                         self._allowance(self.config.heartbeat))
            self._store_trouble(reason, "requeueing a task")

        return d.addErrback(failed)

    def _orphan(self, task_id, token, row, wait):
        """
        Remember a running attempt that no live worker holds; the sweep
        requeues it ``wait`` seconds from now unless a worker claims or
        reports it first.
        """
        self._running[task_id] = (None, token, row)
        self._orphans[task_id] = self._monotonic() + wait

    def sweep(self):
        """
        Send heartbeats, forget workers silent for too long, and requeue
        attempts nobody claimed in time.
        """
        now = self._monotonic()
        for peer in list(self._peers.values()):
            if now - peer.seen_at > self._allowance(peer.heartbeat):
                self.counters["lost_workers"] += 1
                self.log.warn(
                    "worker {name} lost: silent for {silence:.1f}s",
                    name=peer.name, silence=now - peer.seen_at)
                self._forget_peer(peer)
            elif not self._send(peer.identity, self._heartbeat_body):
                self.log.warn("worker {name} is unreachable", name=peer.name)
                self._forget_peer(peer)
        for task_id, deadline in list(self._orphans.items()):
            if deadline > now:
                continue
            del self._orphans[task_id]
            entry = self._running.get(task_id)
            if entry is not None and (entry[0] is None or entry[0] not in self._peers):
                del self._running[task_id]
                self.log.info(
                    "task {task_id} token {token} was not claimed by any "
                    "worker in time", task_id=task_id, token=entry[1])
                self._requeue(task_id, entry[1], entry[2],
                              "its worker was lost", consumed=False)

    def _allowance(self, heartbeat):
        return heartbeat * self.config.heartbeat_misses

    def _reclaim_window(self):
        """
        How long a worker may take to claim its attempts after this broker
        starts: ZeroMQ's reconnection (up to RECONNECT_WAIT), the worker's
        next heartbeat to be answered with REHELLO, and its HELLO, with an
        allowance's margin on each side.
        """
        return RECONNECT_WAIT + 2 * self._allowance(self.config.heartbeat)

    # -- dispatch --------------------------------------------------------

    def _admit(self, row):
        """
        A queued task new to the broker (submitted, or found by the
        poller): hold it in memory if its window has room, else leave it in
        the store for a later load.
        """
        if row.run_at is not None and row.run_at > self.clock.seconds():
            # Held if it comes before what waits in the store (a load
            # reads it otherwise); _delay keeps the window's size.
            cursor = self._delayed_window.cursor(DELAYED)
            if cursor is None or (row.run_at, row.id) <= cursor:
                self._delay(row)
            return
        key = (self._level_index[row.priority], row.handler)
        if self._windows.hold(key, row.id - 1, self.dispatcher.waiting(*key)):
            self._enqueue(row)
        else:
            self._refill(key)

    def _refill(self, key):
        """
        Read the next tasks of a truncated queue whose window is low.

        :returns: ``None`` if no load is due, else a ``Deferred`` that
            fires when the window is full again or the store has no more
            (never fails).
        """
        if key not in self._windows or self._stopped:
            return None  # the common case, at every dispatch
        load = self._windows.start(key, self.dispatcher.waiting(*key))
        if load is None:
            return None
        after_id, limit = load
        level, handler = key
        name = self.levels[level]
        priorities = ((name, None) if name == self.config.default_priority
                      else (name,))
        d = self.store.queued_window(handler, priorities, after_id, limit,
                                     self.clock.seconds())

        def loaded(rows):
            # Held before the window is told, so that dispatches on the way
            # do not start another load of this queue meanwhile.
            try:
                if not self._stopped:
                    for row in rows:
                        self._take_loaded(row)
            finally:
                self._windows.loaded(key, rows[-1].id if rows else after_id,
                                     exhausted=len(rows) < limit)
            return self._refill(key)

        def failed(reason):
            self._windows.failed(key)
            self._store_trouble(reason, "reading queued tasks")

        return d.addCallbacks(loaded, failed).addErrback(
            self.log.failure, "loading queued tasks")

    def _load_delayed(self):
        """
        Read the next delayed tasks, by run_at, if their window is low or
        the next one in the store comes due before the poll after next.

        :returns: a ``Deferred`` (never fails).
        """
        cursor = self._delayed_window.cursor(DELAYED)
        soon = cursor is not None and cursor[0] <= (
            self.clock.seconds() + 2 * self.config.poll_interval + 1.0)
        load = None if self._stopped else self._delayed_window.start(
            DELAYED, len(self._delayed_rows), soon)
        if load is None:
            return defer.succeed(None)
        after, limit = load
        d = self.store.delayed_window(after, limit)

        def loaded(rows):
            try:
                now = self.clock.seconds()
                for row in rows if not self._stopped else ():
                    # One due already joins its queue's window, or waits
                    # in the store for that queue's next load.
                    due = row.run_at <= now
                    self._take_loaded(row, self._admit if due else None)
            finally:
                self._delayed_window.loaded(
                    DELAYED,
                    (rows[-1].run_at, rows[-1].id) if rows else after,
                    exhausted=len(rows) < limit)

        def failed(reason):
            self._delayed_window.failed(DELAYED)
            self._store_trouble(reason, "reading delayed tasks")

        return d.addCallbacks(loaded, failed).addErrback(
            self.log.failure, "loading delayed tasks")

    def _take_loaded(self, row, hold=None):
        """
        Hold a task read from the store (with ``hold``, by default
        :meth:`_enqueue`), unless it is held already.
        """
        if not self._held(row.id):
            row = self._checked(row)
            if row is not None:
                (hold or self._enqueue)(row)

    def _held(self, task_id):
        return (task_id in self._running or task_id in self.dispatcher
                or task_id in self._delayed_rows)

    def _checked(self, row, writes=None):
        """
        A row as read from the store, with the broker's defaults for what
        its inserter left NULL; or ``None`` if it cannot run, after
        failing it.

        :param writes: a ``list`` to add the write that fails it to, for a
            caller that waits for it; else its failure is logged.
        """
        reason = self._invalid(row)
        if reason is not None:
            self.log.warn("rejected task {task_id}: {reason}",
                          task_id=row.id, reason=reason)
            d = self.store.reject(row.id, reason, self.clock.seconds())
            d.addCallback(lambda _: self._notify(row.id))
            if writes is not None:
                writes.append(d)
            else:
                d.addErrback(self._store_trouble, "failing an invalid task")
            return None
        return self._with_defaults(row)

    def _with_defaults(self, row):
        """
        The row with the broker's defaults for the priority and
        max_attempts that SQL left NULL (the dispatch writes them).
        """
        if row.priority is None or row.max_attempts is None:
            row = row._replace(
                priority=row.priority or self.config.default_priority,
                max_attempts=row.max_attempts or self.config.max_attempts)
        return row

    def _enqueue(self, row, front=False):
        """
        Hold a task in memory: waiting for a worker, or for its run_at.
        """
        if row.run_at is not None and row.run_at > self.clock.seconds():
            self._delay(row)
            return
        assignment = self.dispatcher.add_task(
            Task(row.id, self._level_index[row.priority], row.handler, row),
            front=front)
        if assignment is not None:
            self._dispatch(assignment)

    def _delay(self, row):
        self._delayed_rows[row.id] = row
        heapq.heappush(self._delayed, (row.run_at, row.id))
        if len(self._delayed_rows) > DELAYED_WINDOW:
            # Over the window: the one due last goes back to the store
            # (it is queued there), for a later load.
            last = max(self._delayed_rows.values(),
                       key=lambda r: (r.run_at, r.id))
            del self._delayed_rows[last.id]
            self._delayed_window.leave(DELAYED, (last.run_at, last.id - 1))
        if self._delayed[0][1] == row.id:
            self._schedule_delayed()

    def _schedule_delayed(self):
        if self._delay_timer is not None and self._delay_timer.active():
            self._delay_timer.cancel()
        self._delay_timer = None
        while self._delayed and self._delayed[0][1] not in self._delayed_rows:
            heapq.heappop(self._delayed)
        if self._delayed and not self._stopped:
            wait = max(0.0, self._delayed[0][0] - self.clock.seconds())
            self._delay_timer = self.clock.callLater(wait, self._release_due)

    def _release_due(self):
        self._delay_timer = None
        now = self.clock.seconds()
        due = []
        while self._delayed and self._delayed[0][0] <= now:
            _, task_id = heapq.heappop(self._delayed)
            row = self._delayed_rows.pop(task_id, None)
            if row is not None:
                due.append(row)
        for row in sorted(due, key=lambda r: self._level_index[r.priority]):
            self._enqueue(row)
        self._schedule_delayed()
        self._load_delayed()

    def _withdraw(self, task_id):
        """
        Take a waiting (or delayed) task out of memory.

        :returns: its row, or ``None`` if it was not waiting.
        """
        task = self.dispatcher.remove_task(task_id)
        if task is not None:
            return task.data
        return self._delayed_rows.pop(task_id, None)

    def _dispatch(self, assignment):
        row = assignment.task.data
        identity = assignment.worker.key
        peer = self._peers[identity]
        token = row.token + 1
        now = self.clock.seconds()
        # Remembered as the store records it (worker, started_at), but with
        # attempts and token as they were before this dispatch.
        row = row._replace(worker=peer.name, started_at=now)
        self._running[row.id] = (identity, token, row)
        peer.running[row.id] = token
        d = self.store.dispatch(row.id, token, peer.name, now, row.priority,
                                row.max_attempts or self.config.max_attempts)

        def committed(ok):
            self._store_backoff = 0.0
            if self._stopped:
                return
            if not ok:
                # Changed behind our back (by SQL): forget it, free the slot.
                self._undispatch(row.id, identity, token)
                return
            self._send_task(identity, row, token)

        def failed(reason):
            # Nothing changed in the store: undo in memory, and hold task
            # and credit (paused, so they are not matched again at once)
            # until the store works again.
            self.dispatcher.paused = True
            entry = self._running.get(row.id)
            if entry is not None and entry[1] == token:
                del self._running[row.id]
            current = self._peers.get(identity)
            if current is not None and current.running.pop(row.id, None) is not None:
                self.dispatcher.task_done(identity)
                self.dispatcher.credit(identity)
            self._enqueue(row, front=True)
            self._store_trouble(reason, "dispatching a task", pause=True)

        d.addCallbacks(committed, failed)
        self._refill((assignment.task.level, row.handler))

    def _send_task(self, identity, row, token):
        """
        Send a committed dispatch to its worker.  ``row`` is the task as
        it was before the dispatch.
        """
        self.counters["dispatched"] += 1
        peer = self._peers.get(identity)
        if peer is not None:
            peer.sent_at[row.id] = self._monotonic()
        body = (
            '{"id":%d,"handler":%s,"payload":%s,"priority":%s,'
            '"attempt":%d,"max_attempts":%d,"token":%d,"time_limit":%s}' % (
                row.id, dumps(row.handler), row.payload,
                dumps(row.priority), row.attempts + 1,
                row.max_attempts or self.config.max_attempts, token,
                dumps(row.time_limit)))
        if not self._send(identity, encode(b"TASK", body)) and peer is not None:
            self.log.warn("worker {name} is unreachable", name=peer.name)
            self._forget_peer(peer)

    def _give_back(self, peer):
        """
        A credit of ``peer`` was taken for a task that will not run on it
        after all: free the slot and let the credit find other work.  A
        worker gone, or announced again (its slots counted anew), has
        nothing to give back.
        """
        if self._peers.get(peer.identity) is not peer:
            return
        self.dispatcher.task_done(peer.identity)
        assignment = self.dispatcher.credit(peer.identity)
        if assignment is not None:
            self._dispatch(assignment)

    def _undispatch(self, task_id, identity, token):
        entry = self._running.get(task_id)
        if entry is not None and entry[1] == token:
            del self._running[task_id]
        peer = self._peers.get(identity)
        if peer is not None and peer.running.pop(task_id, None) is not None:
            # The worker's credit was spent on nothing: give it back.
            self._give_back(peer)

    def _store_trouble(self, reason, doing, pause=False):
        """
        The store failed: log it clearly and, for dispatch, pause until a
        backoff has passed (doubling while the trouble lasts).
        """
        self.counters["store_errors"] += 1
        error = one_line(reason.value)
        if not pause:
            self.log.error("database error while {doing}: {error}",
                           doing=doing, error=error)
            return
        if self._resume_call is not None and self._resume_call.active():
            return
        self._store_backoff = min(
            MAX_STORE_BACKOFF,
            max(FIRST_STORE_BACKOFF, self._store_backoff * 2))
        self.log.error(
            "database error while {doing}: {error}; dispatch paused, "
            "trying again in {delay:.1f}s", doing=doing, error=error,
            delay=self._store_backoff)
        self._resume_call = self.clock.callLater(
            self._store_backoff, self._resume)

    def _resume(self):
        self._resume_call = None
        if self._stopped:
            return
        for assignment in self.dispatcher.resume():
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
        d.addErrback(self._store_trouble, "polling for new tasks")
        return d

    @defer.inlineCallbacks
    def _poll(self):
        while True:
            start = self._watermark
            rows, last_id = yield self.store.scan_queued(
                self._watermark, POLL_BATCH,
                frozenset(self._submitted_since_poll))
            found, rejected = [], []
            for row in rows:
                if row.id in self._submitted_since_poll or self._held(row.id):
                    continue
                row = self._checked(row, rejected)
                if row is not None:
                    found.append(row)
            # If failing the invalid rows fails, the watermark stays and
            # the next poll reads them again.
            yield defer.gatherResults(rejected, consumeErrors=True)
            for row in sorted(found, key=lambda r: self._level_index[r.priority]):
                if not self._held(row.id):
                    self._admit(row)
            self._watermark = max(self._watermark, last_id)
            self._submitted_since_poll = {
                i for i in self._submitted_since_poll if i > self._watermark}
            if last_id == start:
                break  # nothing new: the scan reached the end
        # Loads that failed earlier are tried again here.
        for key in self._windows.truncated():
            self._refill(key)
        yield self._load_delayed()

    def _invalid_queue(self, handler, priority):
        """
        Why tasks with this handler and priority, as stored, cannot run,
        or ``None``.
        """
        if not isinstance(handler, str) or not (
                0 < len(handler) <= codec.MAX_NAME and handler.isprintable()):
            return (f"invalid handler name (1 to {codec.MAX_NAME} printable "
                    "characters)")
        if priority is not None and (
                not isinstance(priority, str)
                or priority not in self._level_index):
            return (f"unknown priority level {priority!r} (levels: "
                    + ",".join(self.levels) + ")")
        return None

    def _invalid(self, row):
        """
        Why a row another program inserted cannot run, or ``None``.
        """
        reason = self._invalid_queue(row.handler, row.priority)
        if reason is not None:
            return reason
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
                type(row.max_attempts) is int and 1 <= row.max_attempts <= 1000):
            return "max_attempts must be a whole number from 1 to 1000"
        if row.run_at is not None and not isinstance(row.run_at, (int, float)):
            return "run_at must be a Unix time in seconds"
        if row.time_limit is not None and not (
                isinstance(row.time_limit, (int, float)) and row.time_limit > 0):
            return "time_limit must be a positive number of seconds"
        return None

    # -- clients ---------------------------------------------------------

    def _reply(self, identity, req, body):
        body["req"] = req
        self._send(identity, encode(b"REPLY", body))

    def _error(self, identity, req, code, message):
        self._send(identity, encode(
            b"ERROR", {"req": req, "code": code, "message": message}))

    def _client_store_failed(self, reason, doing, identity, req):
        self._store_trouble(reason, doing)
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
            delay = spec.get("delay")
            new.append(NewTask(
                spec["handler"], payload, priority,
                spec.get("max_attempts") or self.config.max_attempts, now,
                run_at=now + delay if delay else None,
                unique_key=spec.get("unique_key"),
                request_id=body.get("request_id"),
                time_limit=spec.get("time_limit")))
        # A task a ready worker can run now is dispatched in the
        # transaction that inserts it, most urgent first: one commit
        # before its TASK instead of two.
        claims = {}
        for i in sorted(range(len(new)),
                        key=lambda i: self._level_index[new[i].priority]):
            task = new[i]
            key = (self._level_index[task.priority], task.handler)
            if task.run_at is not None or key in self._windows:
                continue  # delayed, or older tasks of its queue wait
            slot = self.dispatcher.claim(*key)
            if slot is not None:
                peer = self._peers[slot.key]
                claims[i] = peer
                new[i] = dataclasses.replace(task, worker=peer.name)
        d = self.store.submit(new)

        def committed(results):
            # Tasks that were not inserted (a resent request, a unique key
            # taken) give back their claims; inserted ones are running.
            for i, peer in claims.items():
                row, created = results[i] if i < len(results) else (None, False)
                if created:
                    self._claimed(peer, row)
                else:
                    self._give_back(peer)
            rows = [row for row, _ in results]
            self._submitted_since_poll.update(row.id for row in rows)
            request_id = body.get("request_id")
            # A resent request is answered with what the first one made.
            replayed = request_id is not None and all(
                not created and row.request_id == request_id
                for row, created in results)
            self._reply(identity, req, {
                "tasks": [task_object(row) for row in rows],
                "replayed": replayed,
                "existing": [] if replayed else [
                    row.id for row, created in results if not created],
                "unserved": sorted({
                    row.handler for row in rows
                    if not self.dispatcher.served(row.handler)}),
            })
            # Most urgent first, so that a batch's urgent tasks get first
            # pick of the free workers.
            fresh = [row for row, created in results
                     if created and row.state == "queued"]
            for row in sorted(fresh, key=lambda r: self._level_index[r.priority]):
                self._admit(row)

        def failed(reason):
            for peer in claims.values():
                self._give_back(peer)
            self._client_store_failed(reason, "submitting tasks", identity, req)

        d.addCallbacks(committed, failed)

    def _claimed(self, peer, row):
        """
        A task was inserted already dispatched to ``peer`` (token 1): send
        it, unless the worker went away meanwhile.
        """
        before = row._replace(state="queued", attempts=0, token=0)
        if self._stopped:
            return  # running in the store: the next broker reclaims it
        if self._peers.get(peer.identity) is not peer:
            # Lost or announced again while the insert committed: the
            # attempt never reached it, so it does not count.
            self._requeue(row.id, 1, before, f"worker {peer.name} went away "
                          "before it got the task", consumed=False)
            return
        self._running[row.id] = (peer.identity, 1, before)
        peer.running[row.id] = 1
        self._send_task(peer.identity, before, 1)

    def _on_GET(self, identity, peer, body):
        req = body["req"]
        d = self.store.get(body["id"])

        def found(row):
            if row is None:
                self._error(identity, req, "not_found",
                            f"no task with id {body['id']}")
            else:
                self._reply(identity, req, {"task": task_object(row)})

        d.addCallbacks(found, self._client_store_failed,
                       errbackArgs=("reading a task", identity, req))

    def _on_WAIT(self, identity, peer, body):
        req, task_id = body["req"], body["id"]
        timeout = body.get("timeout", DEFAULT_WAIT)
        if timeout > 0 and (task_id in self._running
                            or task_id in self.dispatcher
                            or task_id in self._delayed_rows):
            # Live, so not final: wait without reading it.
            self._add_waiter(task_id, identity, req, timeout)
            return
        d = self.store.get(task_id)

        def found(row):
            if row is None:
                self._error(identity, req, "not_found",
                            f"no task with id {task_id}")
            elif row.state in FINAL_STATES or timeout <= 0:
                self._reply(identity, req, {"task": task_object(row)})
            else:
                self._add_waiter(task_id, identity, req, timeout)

        d.addCallbacks(found, self._client_store_failed,
                       errbackArgs=("reading a task", identity, req))

    def _add_waiter(self, task_id, identity, req, timeout):
        waiter = (identity, req, self.clock.callLater(
            timeout, self._wait_expired, task_id, identity, req))
        self._waiters.setdefault(task_id, []).append(waiter)

    def _wait_expired(self, task_id, identity, req):
        waiters = self._waiters.get(task_id, [])
        waiters[:] = [w for w in waiters if w[1] != req or w[0] != identity]
        if not waiters:
            self._waiters.pop(task_id, None)
        self._on_GET(identity, None, {"req": req, "id": task_id})

    def _notify(self, task_id, final=None):
        """
        Answer the clients waiting for a task that has ended.

        :param final: the task's row as committed, if known; else it is
            read from the store.
        """
        waiters = self._waiters.pop(task_id, None)
        if not waiters:
            return
        for identity, req, timer in waiters:
            if timer.active():
                timer.cancel()
            if final is not None:
                self._reply(identity, req, {"task": task_object(final)})
            else:
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

        d.addCallbacks(listed, self._client_store_failed,
                       errbackArgs=("listing tasks", identity, req))

    def _on_CANCEL(self, identity, peer, body):
        req, task_id = body["req"], body["id"]
        waiting = self._withdraw(task_id)
        d = self.store.cancel(task_id, self.clock.seconds())

        def cancelled(row):
            if row is None:
                self._error(identity, req, "not_found",
                            f"no task with id {task_id}")
                return
            if row.state != "cancelled":
                if waiting is not None and row.state == "queued":
                    self._enqueue(waiting)
                self._error(
                    identity, req, "not_cancellable",
                    f"task {task_id} is {row.state}; only queued and running "
                    "tasks can be cancelled")
                return
            entry = self._running.pop(task_id, None)
            if entry is not None:
                self._orphans.pop(task_id, None)
                holder = self._peers.get(entry[0]) if entry[0] else None
                if holder is not None:
                    if holder.running.pop(task_id, None) is not None:
                        self.dispatcher.task_done(holder.identity)
                    self._send(holder.identity, encode(
                        b"CANCEL", {"id": task_id, "token": entry[1]}))
            self.log.info("task {task_id} cancelled", task_id=task_id)
            self._notify(task_id)
            self._reply(identity, req, {"task": task_object(row)})

        def failed(reason):
            if waiting is not None:
                self._enqueue(waiting, front=True)
            self._client_store_failed(reason, "cancelling a task", identity, req)

        d.addCallbacks(cancelled, failed)

    def _on_RETRY(self, identity, peer, body):
        req, task_id = body["req"], body["id"]

        @defer.inlineCallbacks
        def retry():
            row = yield self.store.get(task_id)
            if row is None:
                self._error(identity, req, "not_found",
                            f"no task with id {task_id}")
                return
            if row.state in ("queued", "running"):
                # Already going to run (a resent RETRY, say): nothing to do.
                self._reply(identity, req, {"task": task_object(row)})
                return
            if row.state not in ("failed", "cancelled"):
                self._error(
                    identity, req, "not_retryable",
                    f"task {task_id} is {row.state}; only failed and "
                    "cancelled tasks can be retried")
                return
            row = yield self.store.retry(task_id)
            if row.state != "queued":
                self._error(
                    identity, req, "not_retryable",
                    f"task {task_id} cannot be retried: another live task "
                    f"holds its unique key {row.unique_key!r}")
                return
            reason = self._invalid(row)
            if reason is not None:
                yield self.store.reject(task_id, reason, self.clock.seconds())
                self._error(identity, req, "not_retryable",
                            f"task {task_id} cannot run: {reason}")
                return
            self._submitted_since_poll.add(task_id)
            if task_id not in self.dispatcher and task_id not in self._delayed_rows:
                self._enqueue(self._with_defaults(row))
            self.log.info("task {task_id} retried", task_id=task_id)
            self._reply(identity, req, {"task": task_object(row)})

        retry().addErrback(self._client_store_failed, "retrying a task",
                           identity, req)

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
        d = self.store.counts(self.clock.seconds())

        def counted(counts):
            tasks, waiting, delayed = {}, {}, 0
            for (state, level, handler, is_delayed), n in counts.items():
                # A NULL priority (a row inserted by SQL) runs at the
                # default level.
                level = level or self.config.default_priority
                by_level = tasks.setdefault(state, {})
                by_level[level] = by_level.get(level, 0) + n
                if is_delayed:
                    delayed += n
                elif state == "queued":
                    waiting[handler] = waiting.get(handler, 0) + n
            self._reply(identity, req, {"stats": {
                "priorities": list(self.levels),
                "tasks": tasks,
                "waiting": waiting,
                "delayed": delayed,
                "unserved": sorted(
                    h for h in waiting if not self.dispatcher.served(h)),
                "workers": len(self._peers),
                "slots": sum(p.slots for p in self._peers.values()),
                "free_slots": self.dispatcher.free_credits(),
                "dispatch_paused": self.dispatcher.paused,
                "counters": dict(
                    self.counters,
                    dropped_credits=self.dispatcher.dropped_credits,
                    unlogged_bad_messages=self._bad_messages.suppressed),
            }})

        d.addCallbacks(counted, self._client_store_failed,
                       errbackArgs=("counting tasks", identity, req))
