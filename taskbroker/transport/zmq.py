# -*- test-case-name: tests.unit.test_transport_zmq -*-
"""
The one module between txZMQ and the rest of taskbroker.

txZMQ is thin; this module adds what a daemon needs from it:

- ``ROUTER_MANDATORY``, so a send to a peer that is gone fails instead of
  vanishing, and ``ROUTER_HANDOVER``, so a peer that reconnects under its
  identity takes over its old route;
- ``MAXMSGSIZE``, set before binding, so that libzmq drops a peer that
  sends an oversized message before we ever allocate it;
- a bounded number of messages read per reactor turn: txZMQ drains every
  pending message at once, which would starve timers (heartbeats) under a
  flood.  The descriptor is edge-triggered, so a bounded read schedules its
  own continuation;
- cheap reads and sends: ``ZMQ_EVENTS`` is asked once per read, not once
  per message, and once after a :meth:`RouterSocket.batch` of sends, not
  after each of them;
- a catch-all around message handling: if ``messageReceived`` raised, the
  reactor would drop the descriptor and the daemon would go deaf without
  exiting;
- sends that report failure (peer gone, high-water mark) as ``False``
  instead of raising, so callers decide explicitly.

txZMQ reaches for the global reactor inside ``send`` and its reads, so this
module is tested with real sockets; everything above it takes an injected
reactor and clock.
"""

from contextlib import contextmanager
from typing import NamedTuple

import zmq
import zmq.backend
from twisted.application.service import Service
from twisted.logger import Logger
from txzmq import ZmqEndpoint, ZmqEndpointType, ZmqFactory
from txzmq.connection import ZmqConnection

from taskbroker.transport.options import (
    curve_server_options,
    dealer_options,
    router_options,
)

#: Messages handled per reactor turn before yielding to timers.
READ_BATCH = 256

# pyzmq's flags are enums, whose arithmetic costs microseconds per call on
# the hot path; plain ints do the same for a fraction of it.  Socket
# options are the exception: pyzmq turns every option into its enum, which
# is quickest when it already is one.
_NOBLOCK = int(zmq.NOBLOCK)
_SEND_MORE = int(zmq.SNDMORE) | _NOBLOCK
_EVENTS = zmq.EVENTS
_POLLIN = int(zmq.POLLIN)
_USER_ID = "User-Id"

# The backend's send.  The public class wraps it in a Python layer that
# only adds options of draft socket types (routing_id, group); without that
# layer, a message of four frames costs about 2.5 instead of 6 microseconds.
_send = zmq.backend.Socket.send


class Sender(NamedTuple):
    """
    Who sent a message to the ROUTER: its route, and (once links are
    authenticated) the key it proved it holds.

    :ivar identity: the peer's routing identity (``bytes``), to answer it.
    :ivar key: the peer's authenticated public key, or ``None`` on a link
        without authentication.
    """

    identity: bytes
    key: bytes | None = None


class ZmqFactoryService(Service):
    """
    Owns the process's ZeroMQ context; stopping it closes every socket.
    """

    def __init__(self, reactor, linger=0):
        self._reactor = reactor
        self._linger = linger
        self.factory = None

    def get_factory(self):
        if self.factory is None:
            self.factory = ZmqFactory()
            self.factory.reactor = self._reactor
            # Milliseconds to keep flushing at close.  Zero suits the
            # broker: everything it sends is acknowledged or resent.
            self.factory.lingerPeriod = self._linger
        return self.factory

    def stopService(self):
        Service.stopService(self)
        if self.factory is not None:
            factory, self.factory = self.factory, None
            factory.shutdown()


class _Connection(ZmqConnection):
    """
    A txZMQ connection with bounded reads and a catch-all around handling.
    """

    log = Logger()

    def __init__(
        self,
        factory,
        socket_type,
        on_message,
        options,
        endpoints,
        identity=None,
        keyed=False,
    ):
        self.socketType = socket_type
        self._on_message = on_message
        # With keyed, on_message also gets the key the peer authenticated
        # with (ZAP's User-Id), read from each message.
        self._keyed = keyed
        self.handler_errors = 0
        # True while reading or in a batch of sends (see send_frames).
        self._reading = False
        # Options that libzmq reads at bind/connect time must be set before
        # the endpoints are added, so none are passed to the constructor.
        ZmqConnection.__init__(self, factory, identity=identity)
        for option, value in options:
            self.socket.setsockopt(option, value)
        self.addEndpoints(endpoints)

    def doRead(self):
        if self.read_scheduled is not None:
            if not self.read_scheduled.called:
                self.read_scheduled.cancel()
            self.read_scheduled = None
        socket = self.socket
        # The descriptor signals for more than messages, and asking once is
        # cheaper than the exception of an empty read.  Asking again before
        # each message would cost a system call each time.
        if self.factory is None or not socket.getsockopt(_EVENTS) & _POLLIN:
            return
        self._reading = True
        try:
            for _ in range(READ_BATCH):
                try:
                    frame = socket.recv(_NOBLOCK, copy=False)
                except zmq.Again:
                    # All read.  The empty read processed libzmq's pending
                    # commands, so the descriptor will signal again.
                    return
                # A multipart message arrives whole: no Again from here.
                message = [frame.bytes]
                key = (
                    frame.get(_USER_ID).encode("ascii")
                    if self._keyed
                    else None
                )
                while frame.more:
                    frame = socket.recv(_NOBLOCK, copy=False)
                    message.append(frame.bytes)
                try:
                    if self._keyed:
                        self._on_message(message, key)
                    else:
                        self._on_message(message)
                except Exception:
                    self.handler_errors += 1
                    self.log.failure(
                        "error handling a message; message dropped"
                    )
                if self.factory is None:
                    return
        finally:
            self._reading = False
        # More may be waiting; the descriptor will not signal again for
        # them, so come back after timers have had their turn.
        if self.read_scheduled is None:
            self.read_scheduled = self.factory.reactor.callLater(
                0, self.doRead
            )

    def _look_for_input(self):
        """
        After sends: libzmq may have consumed the descriptor's readable
        edge while it sent, so if messages are waiting, read them soon.
        """
        if (
            self.read_scheduled is None
            and self.factory is not None
            and self.socket.getsockopt(_EVENTS) & _POLLIN
        ):
            self.read_scheduled = self.factory.reactor.callLater(
                0, self.doRead
            )

    @contextmanager
    def batch(self):
        """
        Send several messages with one look for input after them all.
        """
        if self._reading:
            yield
            return
        self._reading = True
        try:
            yield
        finally:
            self._reading = False
            self._look_for_input()

    def send_frames(self, frames, identity=None):
        """
        Send one multipart message.

        :param identity: a first frame (a ROUTER's peer) to send before
            ``frames``, or ``None``.
        :returns: ``True`` if ZeroMQ took it, ``False`` if the peer is
            gone (``ROUTER_MANDATORY``) or its queue is full.
        """
        socket = self.socket
        if socket is None:
            return False
        last = len(frames) - 1
        try:
            # A multipart message is atomic: only its first frame can be
            # refused (peer gone, queue full).
            if identity is not None:
                _send(socket, identity, _SEND_MORE)
            for i in range(last):
                _send(socket, frames[i], _SEND_MORE)
            _send(socket, frames[last], _NOBLOCK)
        except zmq.ZMQError as e:
            if e.errno in (zmq.EHOSTUNREACH, zmq.EAGAIN):
                return False
            raise
        finally:
            # While reading, the read goes on until libzmq has nothing left,
            # and a batch looks once at its end.
            if not self._reading:
                self._look_for_input()
        return True

    def last_endpoint(self):
        return self.socket.get(zmq.LAST_ENDPOINT).decode("ascii")

    def close(self):
        if self.socket is not None and self.factory is not None:
            self.shutdown()


class RouterSocket:
    """
    A bound ROUTER socket.

    :param on_message: called with ``(sender, frames)`` for each message,
        where ``sender`` is a :class:`Sender`; exceptions it raises are
        logged and counted, never propagated.
    """

    def __init__(
        self, factory, endpoint, on_message, max_message_size, curve=None
    ):
        """
        :param curve: ``(public, secret)``, the broker's CURVE keys (Z85):
            peers must then hold a key the context's ZAP handler admits
            (bind it first: see :mod:`taskbroker.transport.zap`), and
            each message's sender carries its key.
        """

        def deliver(message, key=None):
            if len(message) < 2:
                return
            on_message(Sender(message[0], key), message[1:])

        options = router_options(max_message_size)
        if curve is not None:
            options += curve_server_options(*curve)
        self._connection = _Connection(
            factory,
            zmq.ROUTER,
            deliver,
            options,
            [ZmqEndpoint(ZmqEndpointType.bind, endpoint)],
            keyed=curve is not None,
        )

    @property
    def endpoint(self):
        """
        The endpoint actually bound (the port filled in for ``tcp://...:*``).
        """
        return self._connection.last_endpoint()

    @property
    def handler_errors(self):
        return self._connection.handler_errors

    @property
    def zmq_socket(self):
        """
        The pyzmq socket, for a monitor.
        """
        return self._connection.socket

    def send(self, identity, frames):
        """
        :returns: ``True`` if sent, ``False`` if the peer is gone or full.
        """
        return self._connection.send_frames(frames, identity)

    def batch(self):
        """
        A context manager for sending many messages at once, such as a
        heartbeat to every worker: after each send outside a read, the
        socket must ask libzmq whether input arrived meanwhile (a system
        call); in a batch it asks once, at the end.
        """
        return self._connection.batch()

    def close(self):
        self._connection.close()


class DealerSocket:
    """
    A DEALER socket connected to one endpoint, under a chosen identity.
    """

    def __init__(
        self, factory, endpoint, on_message, identity=None, options=None
    ):
        """
        :param options: ``(option, value)`` pairs from
            :mod:`taskbroker.transport.options`; by default
            :func:`~taskbroker.transport.options.dealer_options`.
        """
        self._connection = _Connection(
            factory,
            zmq.DEALER,
            on_message,
            dealer_options() if options is None else options,
            [ZmqEndpoint(ZmqEndpointType.connect, endpoint)],
            identity=identity,
        )

    @property
    def handler_errors(self):
        return self._connection.handler_errors

    def send(self, frames):
        """
        :returns: ``True`` if queued, ``False`` if the queue is full (or,
            with ``immediate``, there is no connection).
        """
        return self._connection.send_frames(frames)

    def close(self):
        self._connection.close()
