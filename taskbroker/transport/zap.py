# -*- test-case-name: tests.unit.test_zap -*-
"""
ZAP, ZeroMQ's authentication protocol (RFC 27), served in the reactor.

When a peer connects to a CURVE server socket, libzmq asks the ZAP
handler bound at ``inproc://zeromq.zap.01`` in the same context whether
the peer's public key may in, and stamps every message that peer sends
with the ``User-Id`` the handler answered (here: the key's Z85 text).
Where no handler is bound, libzmq admits every key; so the broker binds
this one before its socket, and a broker that cannot bind it does not
start.

The handler is a REP socket read by the reactor, as the broker's ROUTER
is: the sets of admitted keys live in the reactor thread and are replaced
there on a reload, with no lock and no thread to hand them to (pyzmq's
``ThreadAuthenticator`` would answer from a thread of its own, reading
sets the reactor changes).  A handshake waits for the reactor's next
turn, which is as long as any message waits.
"""

import zmq
from twisted.internet import task
from twisted.logger import Logger
from txzmq import ZmqEndpoint, ZmqEndpointType
from zmq.utils import monitor, z85

from taskbroker.transport.zmq import _Connection

#: Where libzmq looks for the ZAP handler of a context.
ZAP_ENDPOINT = "inproc://zeromq.zap.01"

_VERSION = b"1.0"


def answer(request, refusal):
    """
    The reply to one ZAP request.

    :param request: the request's frames: version, request id, domain,
        address, routing identity, mechanism, then the credentials (for
        CURVE, the 32-byte public key).
    :param refusal: ``refusal(key)``: why a Z85 key (``bytes``) may not
        connect, or ``None`` if it may.
    :returns: ``(reply frames, key or None, reason)``: the key that asked
        (Z85, ``None`` if none was given) and why it was refused (``None``
        when admitted).
    """
    request_id = request[1] if len(request) > 1 else b""
    if len(request) < 6 or request[0] != _VERSION:
        return (
            _reply(request_id, b"400", b"Bad request"),
            None,
            "a malformed request",
        )
    mechanism, credentials = request[5], request[6:]
    if (
        mechanism != b"CURVE"
        or len(credentials) != 1
        or len(credentials[0]) != 32
    ):
        return (
            _reply(request_id, b"400", b"CURVE only"),
            None,
            f"mechanism {mechanism.decode('ascii', 'replace')}",
        )
    key = z85.encode(credentials[0])
    reason = refusal(key)
    if reason is not None:
        return _reply(request_id, b"400", b"Refused"), key, reason
    return _reply(request_id, b"200", b"OK", key), key, None


def _reply(request_id, code, text, user_id=b""):
    return [_VERSION, request_id, code, text, user_id, b""]


class ZapHandler:
    """
    The ZAP handler of one ZeroMQ context.

    :param factory: the txZMQ factory (its context).
    :param refusal: ``refusal(key)``, called in the reactor for each
        peer that connects: why it may not, or ``None``.
    :param refused: called with ``(key, reason, address)`` for each peer
        refused (``key`` ``None`` when it gave none), to be logged.
    :raises zmq.ZMQError: if the handler cannot be bound (another one is
        bound in this context).
    """

    log = Logger()

    def __init__(self, factory, refusal, refused):
        self._refusal = refusal
        self._refused = refused
        self._connection = _Connection(factory, zmq.REP, self._handle, [], [])
        try:
            self._connection.addEndpoints(
                [ZmqEndpoint(ZmqEndpointType.bind, ZAP_ENDPOINT)]
            )
        except Exception:
            self._connection.close()
            raise

    def _handle(self, request):
        reply, key, reason = answer(request, self._refusal)
        if reason is not None:
            address = (
                request[3].decode("utf-8", "replace")
                if len(request) > 3
                else "?"
            )
            self._refused(key, reason, address)
        # (A REP socket must answer each request before the next.)
        self._connection.send_frames(reply)

    def close(self):
        self._connection.close()


#: Where the broker's ROUTER reports failed handshakes, in its context.
MONITOR_ENDPOINT = "inproc://taskbroker.handshakes"
#: Seconds between reads of those reports.
MONITOR_INTERVAL = 1.0

_FAILED = (
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
)
_WHY = {
    zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH: "it does not use CURVE",
    zmq.PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC: "its keys do not fit (it takes another key for the broker's?)",
}


def why_failed(event, value):
    """
    A handshake failure as the log says it.
    """
    if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL and value in _WHY:
        return _WHY[value]
    return (
        f"error {value:#x} (a peer without CURVE, or one that takes "
        "another key for the broker's?)"
    )


class HandshakeMonitor:
    """
    Tells of the peers whose handshake failed before ZAP could see them
    (a peer without CURVE, or one that takes another key for the
    broker's): libzmq's socket monitor, read by the reactor every
    :data:`MONITOR_INTERVAL` seconds (a log line, not a reply, depends on
    it).

    :param factory: the txZMQ factory of the socket's context (its
        ``reactor`` runs the reads).
    :param socket: the monitored pyzmq socket.
    :param failed: called with the reason of each failure.
    """

    def __init__(self, factory, socket, failed):
        self._socket = socket
        self._failed = failed
        socket.monitor(MONITOR_ENDPOINT, _FAILED)
        self._events = factory.context.socket(zmq.PAIR)
        self._events.connect(MONITOR_ENDPOINT)
        self._reads = task.LoopingCall(self._read)
        self._reads.clock = factory.reactor
        self._reads.start(MONITOR_INTERVAL, now=False)

    def _read(self):
        while True:
            try:
                frames = self._events.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                event = monitor.parse_monitor_message(frames)
            except Exception:
                continue
            self._failed(why_failed(event["event"], event["value"]))

    def close(self):
        if self._reads.running:
            self._reads.stop()
        try:
            self._socket.disable_monitor()
        except zmq.ZMQError:
            pass
        self._events.close(linger=0)
