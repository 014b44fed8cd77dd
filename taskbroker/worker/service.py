# -*- test-case-name: tests.unit.test_worker -*-
"""
The worker daemon: announce, ask for one task per free slot, run it, report.

The worker keeps each result until the broker acknowledges it and sends it
again after a reconnection, so a slot takes new work as soon as its task
ends without risking the result.  A broker restart is invisible to ZeroMQ,
so the worker watches the broker's instance id (in ``WELCOME`` and
heartbeats) and its silence, and announces itself again when either says
the broker it knew is gone.
"""

import uuid

from twisted.application.service import Service
from twisted.internet import defer, task
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from taskbroker.interfaces import ITask
from taskbroker.protocol import codec
from taskbroker.protocol.codec import ProtocolError, dumps, encode
from taskbroker.transport.zmq import DealerSocket, ZmqFactoryService

#: Seconds before the first HELLO is repeated when no WELCOME comes.
HELLO_FIRST_RETRY = 0.05


@implementer(ITask)
class RunningTask:
    """
    What a handler receives.  ``clock`` is the worker's ``IReactorTime``,
    for handlers that wait.
    """

    __slots__ = ("id", "handler", "payload", "priority", "attempt",
                 "max_attempts", "clock")

    def __init__(self, body, clock):
        self.id = body["id"]
        self.handler = body["handler"]
        self.payload = body.get("payload")
        self.priority = body["priority"]
        self.attempt = body["attempt"]
        self.max_attempts = body["max_attempts"]
        self.clock = clock

    def __repr__(self):
        return f"<task {self.id} {self.handler} attempt {self.attempt}>"


def run_handler(handler, running_task, reactor, threadpool):
    """
    Run one task to its end.

    :returns: a ``Deferred`` that always succeeds, with ``(state, result,
        error)``: ``("succeeded", value, None)`` or ``("failed", None,
        "one line")``.
    """
    if handler.blocking:
        d = deferToThreadPool(reactor, threadpool, handler.run, running_task)
    else:
        d = defer.maybeDeferred(handler.run, running_task)

    def succeeded(value):
        try:
            dumps(value)
        except (TypeError, ValueError) as e:
            return ("failed", None,
                    f"result is not JSON-serialisable: {e}")
        return ("succeeded", value, None)

    def failed(reason):
        error = reason.value
        text = " ".join(str(error).split())
        return ("failed", None,
                f"{type(error).__name__}: {text}" if text else type(error).__name__)

    return d.addCallbacks(succeeded, failed)


class WorkerService(Service):
    """
    A running worker.

    :param config: a :class:`taskbroker.config.WorkerConfig`.
    :param handlers: ``{name: ITaskHandler}``.
    :param reactor: the reactor (``IReactorTime``, ``IReactorThreads``).
    :param on_fatal: called with a one-line reason when the broker refuses
        this worker; the tap exits non-zero.
    :param connect: ``connect(on_message) -> socket`` (with ``send(frames)
        -> bool`` and ``close()``); by default a DEALER socket to the
        broker.  Tests pass a fake.
    """

    log = Logger()

    def __init__(self, config, handlers, reactor, on_fatal=None,
                 connect=None):
        self.config = config
        self.handlers = handlers
        self.reactor = reactor
        self.on_fatal = on_fatal
        self.identity = (
            config.name + "/" + uuid.uuid4().hex[:8]).encode("utf-8")
        self._zmq = ZmqFactoryService(reactor, linger=1000)
        self._connect = connect or self._connect_dealer
        self.socket = None
        self._heartbeat = None
        self._threadpool = None
        # The broker instance that welcomed us, or None while unwelcomed.
        self.broker_instance = None
        self._broker_seen = 0.0
        self._hello_retry = None
        self._hello_delay = HELLO_FIRST_RETRY
        # task id -> (attempt, Deferred) for the tasks running now.
        self.tasks = {}
        # (task id, attempt) -> RESULT body, until acknowledged.
        self.unacked = {}
        self.completed = 0
        self._stopping = None

    @property
    def free_slots(self):
        return max(0, self.config.concurrency - len(self.tasks))

    def startService(self):
        if self.running:
            return
        Service.startService(self)
        if any(h.blocking for h in self.handlers.values()):
            self._threadpool = ThreadPool(
                minthreads=0, maxthreads=self.config.concurrency,
                name="taskworker-handlers")
            self._threadpool.start()
        self.socket = self._connect(self._on_message)
        self._announce()
        self._heartbeat = task.LoopingCall(self._beat)
        self._heartbeat.clock = self.reactor
        self._heartbeat.start(self.config.heartbeat, now=False)
        self.log.info(
            "taskworker {name} started: broker {broker}, {slots} slots, "
            "levels {levels}, handlers {handlers}",
            name=self.config.name, broker=self.config.broker,
            slots=self.config.concurrency,
            levels=",".join(self.config.priorities or ("all",)),
            handlers=",".join(sorted(self.handlers)) or "none")

    def _connect_dealer(self, on_message):
        return DealerSocket(
            self._zmq.get_factory(), self.config.broker, on_message,
            identity=self.identity, max_message_size=codec.MAX_MESSAGE_SIZE,
            # While the broker is away, HELLO is repeated, results are kept
            # until acknowledged and credits are re-sent after WELCOME:
            # nothing needs queueing, and a stale queue would replay a burst
            # of old HELLOs and credits at the next broker.
            immediate=True)

    # -- sending ---------------------------------------------------------

    def _send(self, command, body):
        # A failed send needs no handling: see ``immediate`` above.
        if self.socket is not None:
            self.socket.send(encode(command, body))

    @property
    def _allowance(self):
        return self.config.heartbeat * self.config.heartbeat_misses

    def _announce(self):
        """
        Say HELLO until a broker answers, quickly at first, then backing
        off to one allowance: sends fail while there is no connection.
        """
        self.broker_instance = None
        self._hello_delay = HELLO_FIRST_RETRY
        self._hello()

    def _hello(self):
        if self._hello_retry is not None and self._hello_retry.active():
            self._hello_retry.cancel()
        self._hello_retry = None
        if self._stopping is not None:
            return
        self._send(b"HELLO", {
            "name": self.config.name,
            "slots": self.config.concurrency,
            "priorities": (list(self.config.priorities)
                           if self.config.priorities else None),
            "handlers": sorted(self.handlers),
            "running": [{"id": i, "attempt": a}
                        for i, (a, _) in self.tasks.items()],
            "heartbeat": self.config.heartbeat,
        })
        self._hello_retry = self.reactor.callLater(
            self._hello_delay, self._hello_unanswered)

    def _hello_unanswered(self):
        self._hello_retry = None
        if self.broker_instance is None:
            self._hello_delay = min(self._hello_delay * 2, self._allowance)
            self._hello()

    def _beat(self):
        now = self.reactor.seconds()
        self._send(b"HEARTBEAT", {})
        if (self.broker_instance is not None
                and now - self._broker_seen > self._allowance):
            self.log.warn(
                "broker silent for {silence:.1f}s; announcing again",
                silence=now - self._broker_seen)
            self._announce()

    # -- receiving -------------------------------------------------------

    def _on_message(self, frames):
        try:
            command, body = codec.decode(
                frames, codec.BROKER_TO_WORKER_COMMANDS)
        except ProtocolError as e:
            self.log.warn("bad message from the broker: {reason}",
                          reason=e.message)
            return
        self._broker_seen = self.reactor.seconds()
        getattr(self, "_on_" + command.decode("ascii"))(body)

    def _on_WELCOME(self, body):
        if self._stopping is not None:
            return
        self.broker_instance = body["broker"]
        if self._hello_retry is not None and self._hello_retry.active():
            self._hello_retry.cancel()
        self._hello_retry = None
        if self.config.priorities:
            missing = set(self.config.priorities) - set(body["priorities"])
            if missing:  # the broker refuses these too; belt and braces
                return
        self.log.info("welcomed by broker {instance}",
                      instance=body["broker"])
        # Results first, so the broker frees their slots before it counts
        # our credits.  A WELCOME always starts a fresh count of credits
        # at the broker; any it already had are dropped there.
        for result in list(self.unacked.values()):
            self._send(b"RESULT", result)
        for _ in range(self.free_slots):
            self._send(b"READY", {})

    def _on_HEARTBEAT(self, body):
        if self.broker_instance is not None and body["broker"] != self.broker_instance:
            self.log.info("broker restarted (instance {instance}); "
                          "announcing again", instance=body["broker"])
            self._announce()

    def _on_REHELLO(self, body):
        # While announcing, HELLOs are already on their way.
        if self.broker_instance is not None:
            self._announce()

    def _on_ERROR(self, body):
        message = " ".join(body["message"].split())
        if body.get("fatal"):
            self.log.critical("taskworker refused by the broker: {message}",
                              message=message)
            if self.on_fatal is not None:
                self.on_fatal(message)
        else:
            self.log.warn("error from the broker: {message}", message=message)

    def _on_ACK(self, body):
        self.unacked.pop((body["id"], body["attempt"]), None)

    def _on_TASK(self, body):
        task_id, attempt = body["id"], body["attempt"]
        if task_id in self.tasks:
            self.log.warn("task {task_id} is already running here; ignored",
                          task_id=task_id)
            return
        handler = self.handlers.get(body["handler"])
        running_task = RunningTask(body, self.reactor)
        if handler is None:
            d = defer.succeed(("failed", None,
                               f"no handler {body['handler']!r} on worker "
                               f"{self.config.name}"))
        else:
            d = run_handler(handler, running_task, self.reactor,
                            self._threadpool)
        self.tasks[task_id] = (attempt, d)
        d.addCallback(self._finished, task_id, attempt)

    def _finished(self, outcome, task_id, attempt):
        state, result, error = outcome
        if self.tasks.pop(task_id, None) is None:
            # Abandoned at shutdown: the broker requeues it after BYE.
            return
        self.completed += 1
        body = {"id": task_id, "attempt": attempt, "state": state,
                "result": result, "error": error}
        self.unacked[(task_id, attempt)] = body
        self._send(b"RESULT", body)
        if self._stopping is None and self.broker_instance is not None:
            self._send(b"READY", {})

    # -- stopping --------------------------------------------------------

    def stopService(self):
        if self._stopping is not None:
            return self._stopping
        Service.stopService(self)
        self._stopping = self._stop()
        return self._stopping

    @defer.inlineCallbacks
    def _stop(self):
        if self._heartbeat is not None and self._heartbeat.running:
            self._heartbeat.stop()
        if self._hello_retry is not None and self._hello_retry.active():
            self._hello_retry.cancel()
        abandoned, self.tasks = self.tasks, {}
        for _, d in abandoned.values():
            d.cancel()
        self._send(b"BYE", {})
        if self._threadpool is not None:
            yield deferToThreadPool(self.reactor, self.reactor.getThreadPool(),
                                    self._threadpool.stop)
        if self.socket is not None:
            self.socket.close()
            self.socket = None
        self._zmq.stopService()
        self.log.info("taskworker stopped")
