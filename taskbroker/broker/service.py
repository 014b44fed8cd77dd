# -*- test-case-name: tests.unit.test_broker -*-
"""
The broker daemon as a service: the store, the ROUTER socket, the
:class:`taskbroker.broker.core.Broker` and its timers, started and stopped
in a fixed order.

Start: open the store (take ownership, create the schema), load its tasks,
bind the socket, start the poller and the heartbeat.  Stop: stop the
timers, close the socket (no new intake), then close the store, which
waits for in-flight writes before it closes its connection.
"""

import time

from twisted.application.service import Service
from twisted.internet import defer, task
from twisted.logger import Logger

from taskbroker.broker.core import Broker
from taskbroker.errors import one_line
from taskbroker.protocol.codec import MAX_MESSAGE_SIZE
from taskbroker.transport.zmq import RouterSocket, ZmqFactoryService


class BrokerService(Service):
    """
    A running broker.

    :param config: a :class:`taskbroker.config.BrokerConfig`.
    :param store: an unopened :class:`taskbroker.interfaces.ITaskStore`.
    :param reactor: the reactor (``IReactorTime`` and ``IReactorCore``).
    :param on_fatal: called with a one-line message when the broker cannot
        start; the daemon's tap logs it and exits non-zero.
    """

    log = Logger()

    def __init__(self, config, store, reactor, on_fatal=None):
        self.config = config
        self.store = store
        self.reactor = reactor
        self.on_fatal = on_fatal
        self.broker = None
        self.socket = None
        self._zmq = ZmqFactoryService(reactor)
        self._timers = []
        self._starting = None
        self._stopping = None

    def startService(self):
        if self.running:
            return
        Service.startService(self)
        self._starting = self._start()
        self._starting.addErrback(self._start_failed)

    @defer.inlineCallbacks
    def _start(self):
        yield self.store.open()
        self.broker = Broker(self.config, self.store, self.reactor,
                             self._send, monotonic=time.monotonic)
        yield self.broker.load()
        if not self.running:
            return
        try:
            self.socket = RouterSocket(
                self._zmq.get_factory(), self.config.listen,
                self.broker.handle, MAX_MESSAGE_SIZE)
        except Exception as e:
            raise RuntimeError(
                f"cannot listen on {self.config.listen}: {e}") from None
        for interval, call in ((self.config.poll_interval, self.broker.poll),
                               (self.config.heartbeat, self._sweep)):
            loop = task.LoopingCall(call)
            loop.clock = self.reactor
            loop.start(interval, now=False).addErrback(
                self.log.failure, "timer failed")
            self._timers.append(loop)
        self.log.info(
            "taskbroker ready: listening on {endpoint}, database {database}, "
            "levels {levels}, instance {instance}",
            endpoint=self.socket.endpoint, database=self.config.database,
            levels=",".join(self.config.priorities),
            instance=self.broker.instance_id)

    def _sweep(self):
        # A heartbeat to every worker: one look for input after them all,
        # not one after each.
        with self.socket.batch():
            self.broker.sweep()

    def _start_failed(self, reason):
        message = one_line(reason.value)
        self.log.critical("taskbroker cannot start: {message}",
                          message=message)
        if self.on_fatal is not None:
            self.on_fatal(message)

    def _send(self, identity, frames):
        if self.socket is None:
            return False
        return self.socket.send(identity, frames)

    @property
    def endpoint(self):
        """
        The endpoint bound (with the port filled in), once started.
        """
        return self.socket.endpoint if self.socket is not None else None

    def stopService(self):
        if self._stopping is not None:
            return self._stopping
        Service.stopService(self)
        self._stopping = self._stop()
        return self._stopping

    @defer.inlineCallbacks
    def _stop(self):
        for loop in self._timers:
            if loop.running:
                loop.stop()
        self._timers = []
        if self._starting is not None and not self._starting.called:
            # Let a start in progress (opening the store) finish first.
            yield self._starting
        if self.broker is not None:
            self.broker.stop()
        if self.socket is not None:
            self.socket.close()
            self.socket = None
        self._zmq.stopService()
        yield self.store.close()
        self.log.info("taskbroker stopped")
