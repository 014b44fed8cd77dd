# -*- test-case-name: tests.unit.test_worker -*-
"""
The worker daemon: announce, ask for one task per free slot, run it, report.

The worker keeps each result until the broker acknowledges it and sends it
again after a reconnection (and while unacknowledged), so a slot takes new
work as soon as its task ends without risking the result.  A broker
restart is invisible to ZeroMQ, so the worker watches the broker's instance
id (in ``WELCOME`` and heartbeats) and its silence, and announces itself
again when either says the broker it knew is gone.

Given a failover list of brokers that share one database, the worker
connects to one at a time: first the one its name points to (a stable
hash, so a fleet spreads over the list), then, whenever it loses that
broker (silence, or no ``WELCOME`` within the allowance) or the broker
has reported for ``--failover-after`` seconds that it cannot write its
database, the next one, on a new socket.  There it announces itself as
after any reconnection: its ``HELLO`` lists the attempts it runs, for the
new broker to adopt, and its unacknowledged results follow the
``WELCOME``; their fencing tokens decide whether they still count.

With CURVE, the worker's DEALER proves the worker's key pair and talks
only to a broker that holds the secret of the configured server key.
Every broker of a failover list is expected to hold that one key pair (a
fleet shares it).  A broker with another key, or one that does not admit
the worker's key, is never heard from: ZeroMQ drops the connection during
its handshake and reports nothing to the socket's user, so the worker
warns when its HELLO stays unanswered.

Handlers that do not block run in the reactor; blocking ones run in child
processes (:mod:`taskbroker.worker.children`), so that a time limit or a
cancellation can stop them and a crash cannot take the worker down.
"""

import secrets

from twisted.application.service import Service
from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.python.threadable import isInIOThread

import taskbroker
from taskbroker.errors import one_line
from taskbroker.failover import EndpointRing, StoreWatch, start_position
from taskbroker.logs import TaskLog, cut, seconds
from taskbroker.protocol import codec
from taskbroker.protocol.codec import ProtocolError, encode, encode_value
from taskbroker.services import ServiceTree
from taskbroker.transport.options import curve_client_options, dealer_options
from taskbroker.transport.zmq import DealerSocket, ZmqFactoryService
from taskbroker.wording import counted
from taskbroker.worker.children import ChildPool, Outcome
from taskbroker.worker.progress import Throttle
from taskbroker.worker.runner import run_handler
from taskbroker.worker.task import RunningTask

#: Seconds before the first HELLO is repeated when no WELCOME comes.
HELLO_FIRST_RETRY = 0.05
#: The longest interval between two warnings that no WELCOME came (s).
UNWELCOMED_WARNING_MAX_INTERVAL = 600.0


#: The most text of an error or traceback sent back (characters); the
#: protocol refuses longer strings, and a result that can never be
#: delivered would be resent for ever.
MAX_ERROR_TEXT = 64 * 1024


def _clip(text):
    if text is None or len(text) <= MAX_ERROR_TEXT:
        return text
    return text[:MAX_ERROR_TEXT] + "\n[... cut]"


def _result_body(task_id, token, outcome):
    """
    The RESULT for an outcome, as JSON text, made to fit the protocol's
    limits: a result too large to carry fails the attempt instead.  A
    success's result is encoded once, by the runner if it has been.
    """
    if outcome.state == "succeeded":
        try:
            result = outcome.result_json or encode_value(
                outcome.result, "result"
            )
        except ValueError as e:
            outcome = Outcome("failed", None, str(e))
        else:
            return (
                '{"id":%d,"token":%d,"state":"succeeded","result":%s,'
                '"error":null,"traceback":null,"permanent":false}'
                % (task_id, token, result)
            )
    return codec.dumps(
        {
            "id": task_id,
            "token": token,
            "state": outcome.state,
            "result": outcome.result,
            "error": _clip(outcome.error),
            "traceback": _clip(outcome.traceback),
            "permanent": outcome.permanent,
        }
    )


#: Reads only the id and token of a TASK that failed its checks, so that
#: its attempt can be answered.
_TASK_REFERENCE = {b"TASK": codec.BROKER_TO_WORKER_COMMANDS[b"ACK"]}


class WorkerService(Service):
    """
    A running worker.

    :param config: a :class:`taskbroker.config.WorkerConfig`.
    :param handlers: ``{name: ITaskHandler}``.
    :param reactor: the reactor (``IReactorTime``, ``IReactorProcess``).
    :param on_fatal: called with a one-line reason when the broker refuses
        this worker; the tap exits non-zero.
    :param connect: ``connect(endpoint, on_message) -> socket`` (with
        ``send(frames) -> bool`` and ``close()``); by default a DEALER
        socket to the broker at ``endpoint``, made with ``zmq``.  It is
        called again, with the next endpoint, at each move along a
        failover list.  Tests pass a fake.
    :param zmq: the :class:`~taskbroker.transport.zmq.ZmqFactoryService`
        the default ``connect`` uses; it is started before this service and
        stopped after it (see :func:`make_worker_service`).
    :param children: runs blocking handlers; by default a
        :class:`~taskbroker.worker.children.ChildPool` with one child
        process per slot.
    :param monotonic: seconds on a clock that never steps, for noticing a
        silent broker; default ``reactor.seconds``.
    :param curve: ``None`` for plain links, or the CURVE keys ``(server,
        public, secret)`` (Z85 ``bytes``, from
        :func:`taskbroker.curve.load_peer_keys`) of the default
        ``connect``'s sockets: the one server key is every broker's of the
        failover list.
    """

    log = Logger()

    def __init__(
        self,
        config,
        handlers,
        reactor,
        on_fatal=None,
        connect=None,
        children=None,
        monotonic=None,
        zmq=None,
        curve=None,
    ):
        self.config = config
        self.handlers = handlers
        self.reactor = reactor
        self.on_fatal = on_fatal
        # The route carries 128 random bits, so that another peer cannot
        # guess it and take the worker's place; it is never shown (the
        # broker shows the name).
        self.identity = (config.name + "/" + secrets.token_hex(16)).encode(
            "utf-8"
        )
        self._zmq = zmq
        self._curve = curve
        self._connect = connect or self._connect_dealer
        # One broker at a time, from the failover list, starting where the
        # name points.
        self._ring = EndpointRing(
            config.broker, start_position(config.name, len(config.broker))
        )
        self._store_watch = StoreWatch(config.failover_after)
        self._children = children
        self._monotonic = monotonic or reactor.seconds
        self.socket = None
        # The next heartbeat (a DelayedCall), and the timer of the checks.
        self._heartbeat = None
        self._checks = None
        # The broker instance that welcomed us, or None while unwelcomed.
        self.broker_instance = None
        self._time_limit = None
        self._broker_takes_progress = False
        # (task id, token) -> the Throttle of its progress reports
        self._throttles = {}
        # (task id, token) -> (monotonic time it started, handler name)
        self._started = {}
        self._start_log = TaskLog(
            self.log,
            reactor,
            "started",
            lambda t: f"task {t['id']} started: {_start_details(t)}",
            lambda t: f"{t['id']} ({_start_details(t)})",
        )
        self._end_log = TaskLog(
            self.log,
            reactor,
            "ended",
            lambda t: f"task {t['id']} {t['outcome']}: {_end_details(t)}",
            lambda t: f"{t['id']} {t['outcome']} ({_end_details(t)})",
        )
        self._broker_heartbeat = None
        self._broker_seen = 0.0
        self._hello_retry = None
        self._hello_delay = HELLO_FIRST_RETRY
        # When the current announcement began, and how long into it the
        # next warning that no WELCOME came is due.
        self._announced_at = None
        self._unwelcomed_warning_at = None
        # task id -> (token, Deferred of its Outcome)
        self.tasks = {}
        # (task id, token) -> [RESULT body, monotonic time last sent]
        self.unacked = {}
        self._stopping = None
        self._idle = None

    @property
    def endpoint(self):
        """
        The endpoint of the broker in use.
        """
        return self._ring.current

    @property
    def free_slots(self):
        return max(0, self.config.concurrency - len(self.tasks))

    def startService(self):
        if self.running:
            return
        Service.startService(self)
        if self._children is None and any(
            h.blocking for h in self.handlers.values()
        ):
            self._children = ChildPool(
                self.reactor,
                self.config.handlers_path,
                self.config.concurrency,
            )
        self.socket = self._connect(self.endpoint, self._on_message)
        self._broker_seen = self._monotonic()
        self._announce()
        self._heartbeat = self.reactor.callLater(
            self.config.heartbeat, self._beat
        )
        self._checks = task.LoopingCall(self._check)
        self._checks.clock = self.reactor
        self._checks.start(self.config.heartbeat, now=False)
        self.log.info(
            "taskworker {name} started: broker {broker}, {slots_text}, "
            "levels {levels}, handlers {handlers}",
            name=self.config.name,
            broker=self.endpoint
            + (
                ""
                if len(self._ring) == 1
                else " (failover list " + ",".join(self._ring.endpoints) + ")"
            ),
            slots=self.config.concurrency,
            slots_text=counted(self.config.concurrency, "slot"),
            levels=",".join(self.config.priorities or ("all",)),
            handlers=",".join(sorted(self.handlers)) or "none",
        )

    def _connect_dealer(self, endpoint, on_message):
        options = dealer_options(
            codec.MAX_MESSAGE_SIZE,
            # While the broker is away, HELLO is repeated, results are
            # kept until acknowledged and credits are re-sent after
            # WELCOME: nothing needs queueing, and a stale queue would
            # replay a burst of old HELLOs and credits at the next broker.
            immediate=True,
        )
        if self._curve is not None:
            options += curve_client_options(*self._curve)
        return DealerSocket(
            self._zmq.get_factory(),
            endpoint,
            on_message,
            identity=self.identity,
            options=options,
        )

    # -- sending ---------------------------------------------------------

    def _send(self, command, body):
        # A failed send needs no handling: see ``immediate`` above.
        if self.socket is not None:
            self.socket.send(encode(command, body))

    @property
    def _allowance(self):
        """
        How long the broker may be silent: its announced heartbeat times
        our misses allowance (our own heartbeat until it has announced).
        """
        return (self._broker_heartbeat or self.config.heartbeat) * (
            self.config.heartbeat_misses
        )

    def _announce(self):
        """
        Say HELLO until a broker answers, quickly at first, then backing
        off to one allowance: sends fail while there is no connection.
        """
        self.broker_instance = None
        self._hello_delay = HELLO_FIRST_RETRY
        self._announced_at = self._monotonic()
        self._unwelcomed_warning_at = self._allowance
        self._hello()

    def _hello(self):
        if self._hello_retry is not None and self._hello_retry.active():
            self._hello_retry.cancel()
        self._hello_retry = None
        # While stopping, announce only the busy slots: no new work.
        self._send(
            b"HELLO",
            self._hello_body(
                slots=len(self.tasks) if self._stopping is not None else None
            ),
        )
        self._hello_retry = self.reactor.callLater(
            self._hello_delay, self._hello_unanswered
        )

    def _hello_body(self, slots=None):
        return {
            "name": self.config.name,
            "slots": slots or self.config.concurrency,
            "priorities": (
                list(self.config.priorities)
                if self.config.priorities
                else None
            ),
            "handlers": sorted(self.handlers),
            "running": [
                {"id": i, "token": t} for i, (t, _) in self.tasks.items()
            ],
            "heartbeat": self.config.heartbeat,
            "version": taskbroker.__version__,
        }

    def _hello_unanswered(self):
        self._hello_retry = None
        if self.broker_instance is None:
            self._hello_delay = min(self._hello_delay * 2, self._allowance)
            self._hello()

    def _beat(self):
        """
        Send a heartbeat now, and the next one a whole interval later
        unless the broker's heartbeat brings it forward.
        """
        if self._heartbeat is None:
            return  # stopped
        if self._heartbeat.active():
            self._heartbeat.reset(self.config.heartbeat)
        else:
            self._heartbeat = self.reactor.callLater(
                self.config.heartbeat, self._beat
            )
        # What we run, so the broker can find a TASK lost on the way.  Only
        # heartbeats carry it, so other messages never stand in for one.
        self._send(
            b"HEARTBEAT",
            {
                "running": [
                    {"id": i, "token": t} for i, (t, _) in self.tasks.items()
                ]
            },
        )

    def _check(self):
        """
        Every heartbeat interval: notice a silent broker, and resend
        results whose acknowledgement is overdue.
        """
        now = self._monotonic()
        silence = now - self._broker_seen
        if self.broker_instance is None:
            # Announcing.  With other brokers to go to, one that has not
            # answered within an allowance is left for the next (and the
            # move is logged); with one, the wait is.
            if len(self._ring) > 1:
                if silence > self._allowance:
                    self._move(
                        "no answer to HELLO for {silence:.1f}s",
                        silence=silence,
                    )
            else:
                self._warn_unwelcomed(now)
            return
        if silence > self._allowance:
            if len(self._ring) > 1:
                self._move("broker silent for {silence:.1f}s", silence=silence)
            else:
                self.log.warn(
                    "broker silent for {silence:.1f}s; announcing again",
                    silence=silence,
                )
                self._announce()
            self._check_idle()
            return
        # A result whose acknowledgement was lost goes again.
        for entry in self.unacked.values():
            if now - entry[1] > self._allowance:
                entry[1] = now
                self._send(b"RESULT", entry[0])

    def _warn_unwelcomed(self, now):
        """
        Warn that HELLO got no WELCOME, an allowance after the
        announcement began, then each time the wait has doubled (at least
        every :data:`UNWELCOMED_WARNING_MAX_INTERVAL`).
        """
        waited = now - self._announced_at
        if waited < self._unwelcomed_warning_at:
            return
        self._unwelcomed_warning_at = waited + min(
            waited, UNWELCOMED_WARNING_MAX_INTERVAL
        )
        if self._curve is None:
            self.log.warn(
                "not welcomed: no answer to HELLO from broker {endpoint} "
                "for {waited:.1f}s; still trying",
                endpoint=self.endpoint,
                waited=waited,
            )
        else:
            # The handshake's failures are not reported to us: say what
            # they may be.
            self.log.warn(
                "not welcomed: no answer to HELLO from broker {endpoint} "
                "for {waited:.1f}s; still trying (with CURVE, check that "
                "--curve-server-key is this broker's public key and that "
                "it authorizes this worker's key)",
                endpoint=self.endpoint,
                waited=waited,
            )

    def _move(self, reason, **fields):
        """
        Leave the broker in use for the next one of the failover list: a
        new socket, and a new announcement there (listing the attempts
        that run here, for the new broker to adopt; the unacknowledged
        results follow its WELCOME).

        :param reason: why, a format string of ``fields``.
        """
        if self.socket is None:
            return  # stopped
        previous, endpoint = self._ring.advance()
        self.log.warn(
            "leaving broker {previous} for {endpoint}: " + reason,
            previous=previous,
            endpoint=endpoint,
            **fields,
        )
        self.socket.close()
        self.socket = self._connect(endpoint, self._on_message)
        self._store_watch.reset()
        # Until the new broker announces its interval, ours is the measure.
        self._broker_heartbeat = None
        self._broker_seen = self._monotonic()
        self._announce()

    # -- receiving -------------------------------------------------------

    def _on_message(self, frames):
        try:
            command, body = codec.decode(
                frames, codec.BROKER_TO_WORKER_COMMANDS
            )
        except ProtocolError as e:
            self.log.warn(
                "bad message from the broker: {reason}", reason=e.message
            )
            self._unreadable_task(frames, e.message)
            return
        self._broker_seen = self._monotonic()
        getattr(self, "_on_" + command.decode("ascii"))(body)

    def _unreadable_task(self, frames, reason):
        """
        Fail the attempt of a TASK that cannot be run as sent, if its id
        and token can be read: its slot is free again at once, and the
        task's error says why, instead of the broker finding it "never
        received" heartbeats later.
        """
        try:
            _, body = codec.decode(frames, _TASK_REFERENCE)
        except ProtocolError:
            return
        self._start(
            body["id"],
            body["token"],
            lambda: defer.succeed(
                Outcome(
                    "failed",
                    None,
                    f"worker {self.config.name} could not read the "
                    f"task: {reason}",
                )
            ),
        )

    def _on_WELCOME(self, body):
        if self._hello_retry is not None and self._hello_retry.active():
            self._hello_retry.cancel()
        self._hello_retry = None
        self.broker_instance = body["broker"]
        self._time_limit = body.get("time_limit")
        self._broker_takes_progress = bool(body.get("progress"))
        theirs = body.get("version")
        if theirs != taskbroker.__version__:
            self.log.warn(
                "broker {endpoint} runs taskbroker {theirs}, this worker "
                "{ours}: upgrade them together (docs/operations.rst, "
                '"Upgrades")',
                endpoint=self.endpoint,
                theirs=theirs or "older than 0.1.0",
                ours=taskbroker.__version__,
            )
        self._broker_heartbeat = body["heartbeat"]
        self._store_watch.reset()
        self.log.info(
            "welcomed by broker {instance} at {endpoint}",
            instance=body["broker"],
            endpoint=self.endpoint,
        )
        # Results first, so the broker frees their slots before it counts
        # our credits.  A WELCOME always starts a fresh count of credits
        # at the broker; any it already had are dropped there.
        now = self._monotonic()
        for entry in self.unacked.values():
            entry[1] = now
            self._send(b"RESULT", entry[0])
        if self._stopping is None:
            for _ in range(self.free_slots):
                self._send(b"READY", {})

    def _on_HEARTBEAT(self, body):
        if self.broker_instance is None:
            return
        if body["broker"] != self.broker_instance:
            self.log.info(
                "broker restarted (instance {instance}); announcing again",
                instance=body["broker"],
            )
            self._announce()
            return
        if self._store_failing(body.get("store") == "failing"):
            return
        # Answer at once if our heartbeat is due before the broker's next
        # one.  The broker sends its heartbeats to all workers together,
        # so their answers reach it together too, and it reads them in a
        # few batches instead of waking once for each worker's timer.  The
        # next one goes a whole interval later, so a worker still sends one
        # per interval, now in step with the broker.  Not if ours went
        # within the last tenth of the shorter interval: the two crossed.
        if self._heartbeat is None:
            return
        interval = self.config.heartbeat
        due_in = self._heartbeat.getTime() - self.reactor.seconds()
        if (
            due_in < self._broker_heartbeat
            and interval - due_in >= min(interval, self._broker_heartbeat) / 10
        ):
            self._beat()

    def _store_failing(self, failing):
        """
        Take the broker's word on its database, and leave it for the next
        broker of the list once it has failed for ``failover_after``
        seconds without a break.

        :returns: ``True`` if the worker moved.
        """
        watch = self._store_watch
        was_failing = watch.failing_since is not None
        now = self._monotonic()
        if not watch.report(now, failing):
            if failing and not was_failing:
                self.log.warn(
                    "broker {endpoint} cannot write its database"
                    + (
                        "; leaving it if that lasts {after:g}s"
                        if len(self._ring) > 1
                        else ""
                    ),
                    endpoint=self.endpoint,
                    after=self.config.failover_after,
                )
            elif was_failing and not failing:
                self.log.info(
                    "broker {endpoint} can write its database again",
                    endpoint=self.endpoint,
                )
            return False
        if len(self._ring) == 1:
            return False
        self._move(
            "its database has been failing for {failing:.1f}s "
            "(--failover-after {after:g})",
            failing=watch.failing_for(now),
            after=self.config.failover_after,
        )
        return True

    def _on_REHELLO(self, body):
        # While announcing, HELLOs are already on their way.
        if self.broker_instance is not None:
            self._announce()

    def _on_ERROR(self, body):
        message = one_line(body["message"])
        if body.get("fatal"):
            self.log.critical(
                "taskworker refused by the broker: {message}", message=message
            )
            if self.on_fatal is not None:
                self.on_fatal(message)
        else:
            self.log.warn("error from the broker: {message}", message=message)

    def _on_ACK(self, body):
        self.unacked.pop((body["id"], body["token"]), None)
        self._check_idle()

    def _on_CANCEL(self, body):
        entry = self.tasks.get(body["id"])
        if entry is None or entry[0] != body["token"]:
            return
        self.log.info(
            "stopping task {task_id}: the broker cancelled it or "
            "gave it to another worker",
            task_id=body["id"],
        )
        # The broker has forgotten this attempt: no result goes back, and
        # the slot asks for new work once the handler has stopped.
        del self.tasks[body["id"]]
        entry[1].addCallback(self._slot_freed)
        entry[1].cancel()

    def _on_TASK(self, body):
        self._start(body["id"], body["token"], lambda: self._run(body))

    def _start(self, task_id, token, run):
        """
        Start an attempt unless it is here already or we are stopping.

        :param run: makes the ``Deferred`` of the attempt's ``Outcome``.
        """
        if task_id in self.tasks:
            self.log.warn(
                "task {task_id} is already running here; ignored",
                task_id=task_id,
            )
            return
        if self._stopping is not None:
            # Sent before the broker heard we are stopping: hand it back.
            self.log.info(
                "task {task_id} handed back: shutting down", task_id=task_id
            )
            self._send(
                b"RESULT", {"id": task_id, "token": token, "state": "released"}
            )
            return
        d = run()
        self.tasks[task_id] = (token, d)
        d.addCallback(self._finished, task_id, token)

    def _run(self, body):
        handler = self.handlers.get(body["handler"])
        self._started[(body["id"], body["token"])] = (
            self._monotonic(),
            body["handler"],
        )
        self._start_log.add(
            id=body["id"],
            handler=body["handler"],
            priority=body["priority"],
            attempt=body["attempt"],
            max_attempts=body["max_attempts"],
            token=body["token"],
            blocking=getattr(handler, "blocking", False),
        )
        if handler is None:
            return defer.succeed(
                Outcome(
                    "failed",
                    None,
                    f"no handler {body['handler']!r} on worker {self.config.name}",
                )
            )
        time_limit = (
            body.get("time_limit")
            or getattr(handler, "time_limit", None)
            or self._time_limit
        )
        report = self._progress_of(body["id"], body["token"])
        if handler.blocking:
            return self._children.run(body, time_limit, report)
        return run_handler(
            handler,
            RunningTask(body, self.reactor, report),
            self.reactor,
            time_limit,
        )

    def _progress_of(self, task_id, token):
        """
        Where an attempt's progress reports go: thinned out, and sent to
        the broker while the attempt runs here, if the broker takes them.

        :returns: a function of ``(fraction, message)``, for any thread.
        """

        def send(fraction, message):
            # (A handler may report before its run() returns, before the
            # attempt is in self.tasks; the throttle is dropped when the
            # attempt ends, and cancelled with it.)
            if self._broker_takes_progress:
                self._send(
                    b"PROGRESS",
                    {
                        "id": task_id,
                        "token": token,
                        "fraction": fraction,
                        "message": message,
                    },
                )

        throttle = self._throttles[(task_id, token)] = Throttle(
            send, self._monotonic, self.reactor.callLater
        )

        def report(fraction, message):
            if isInIOThread():
                throttle(fraction, message)
            else:
                self.reactor.callFromThread(throttle, fraction, message)

        return report

    def _finished(self, outcome, task_id, token):
        throttle = self._throttles.pop((task_id, token), None)
        if throttle is not None:
            throttle.finish()
        started = self._started.pop((task_id, token), None)
        if started is not None:
            self._end_log.add(
                id=task_id,
                handler=started[1],
                outcome=outcome.state,
                ran=self._monotonic() - started[0],
                token=token,
                error=cut(outcome.error),
            )
        entry = self.tasks.get(task_id)
        if entry is None or entry[0] != token:
            # Cancelled or handed back: nothing to report.
            return outcome
        del self.tasks[task_id]
        body = _result_body(task_id, token, outcome)
        self.unacked[(task_id, token)] = [body, self._monotonic()]
        # The freed slot's credit rides with the result (but not when the
        # result is resent later).
        ready = self._stopping is None and self.broker_instance is not None
        self._send(b"RESULT", body[:-1] + ',"ready":true}' if ready else body)
        self._check_idle()
        return outcome

    def _slot_freed(self, _=None):
        if self._stopping is None and self.broker_instance is not None:
            self._send(b"READY", {})
        self._check_idle()

    # -- stopping --------------------------------------------------------

    def _waiting_on(self):
        """
        Whether stopping must wait: for running tasks, and for
        acknowledgements while a broker is there to send them.
        """
        return bool(
            self.tasks or (self.unacked and self.broker_instance is not None)
        )

    def _check_idle(self):
        if self._idle is not None and not self._waiting_on():
            idle, self._idle = self._idle, None
            idle.callback(None)

    def stopService(self):
        if self._stopping is not None:
            return self._stopping
        Service.stopService(self)
        self._stopping = self._stop()
        return self._stopping

    @defer.inlineCallbacks
    def _stop(self):
        """
        Take no more work; give running tasks ``grace`` seconds to finish
        and their results time to be acknowledged; then stop what still
        runs and hand it back: the broker requeues it without counting
        the attempt.
        """
        if self._hello_retry is not None and self._hello_retry.active():
            self._hello_retry.cancel()
        if self.tasks and self.broker_instance is not None:
            # Announcing only the busy slots makes the broker drop the
            # credits it holds for us: no more work comes our way.
            self._send(b"HELLO", self._hello_body(slots=len(self.tasks)))
        if self._waiting_on():
            self.log.info(
                "stopping: waiting up to {grace}s for {running} running "
                "tasks and {unacked} unacknowledged results",
                running=len(self.tasks),
                unacked=len(self.unacked),
                grace=self.config.grace,
            )
            self._idle = defer.Deferred()
            self._idle.addTimeout(self.config.grace, self.reactor)
            try:
                yield self._idle
            except defer.TimeoutError:
                pass
            self._idle = None
        if self._heartbeat is not None:
            if self._heartbeat.active():
                self._heartbeat.cancel()
            self._heartbeat = None
        if self._checks is not None and self._checks.running:
            self._checks.stop()
        # Announcing may have started again meanwhile (a silent broker, a
        # move to the next one); nothing more is announced now.
        if self._hello_retry is not None and self._hello_retry.active():
            self._hello_retry.cancel()
        self._hello_retry = None
        abandoned, self.tasks = self.tasks, {}
        for task_id, (token, d) in abandoned.items():
            self.log.info("handing back task {task_id}", task_id=task_id)
            self._send(
                b"RESULT", {"id": task_id, "token": token, "state": "released"}
            )
            d.cancel()
        self._send(b"BYE", {})
        self._start_log.flush()
        self._end_log.flush()
        if self._children is not None:
            yield self._children.stop()
        if self.socket is not None:
            self.socket.close()
            self.socket = None


def _start_details(task):
    return (
        f"{task['handler']}, priority {task['priority']}, attempt "
        f"{task['attempt']} of {task['max_attempts']}"
        + (", in a handler process" if task["blocking"] else "")
    )


def _end_details(task):
    return f"{task['handler']}, ran {seconds(task['ran'])}" + (
        "" if task["error"] is None else f": {task['error']}"
    )


def make_worker_service(
    config, handlers, reactor, on_fatal=None, monotonic=None, curve=None
):
    """
    The worker daemon as a tree of services (:mod:`taskbroker.services`):
    the ZeroMQ context, then the worker; at the end the worker hands back
    its tasks and says BYE before the context closes.

    :param curve: the CURVE keys, or ``None``, as :class:`WorkerService`
        takes them.
    :returns: a :class:`~taskbroker.services.ServiceTree` whose child
        ``"worker"`` is the :class:`WorkerService`.
    """
    tree = ServiceTree(on_fatal=on_fatal)
    tree.setName("taskworker")
    # Linger: a second to flush the last RESULTs and BYE at close.
    zmq = ZmqFactoryService(reactor, linger=1000)
    zmq.setName("zmq")
    zmq.setServiceParent(tree)
    worker = WorkerService(
        config,
        handlers,
        reactor,
        on_fatal=on_fatal,
        monotonic=monotonic,
        zmq=zmq,
        curve=curve,
    )
    worker.setName("worker")
    worker.setServiceParent(tree)
    return tree
