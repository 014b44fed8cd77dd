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
from twisted.logger import Logger
from zmq.utils import z85
from txzmq import ZmqEndpoint, ZmqEndpointType

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
        return _reply(request_id, b"400", b"Bad request"), None, \
            "a malformed request"
    mechanism, credentials = request[5], request[6:]
    if mechanism != b"CURVE" or len(credentials) != 1 \
            or len(credentials[0]) != 32:
        return _reply(request_id, b"400", b"CURVE only"), None, \
            f"mechanism {mechanism.decode('ascii', 'replace')}"
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
        self._connection = _Connection(factory, zmq.REP, self._handle, [],
                                       [])
        try:
            self._connection.addEndpoints(
                [ZmqEndpoint(ZmqEndpointType.bind, ZAP_ENDPOINT)])
        except Exception:
            self._connection.close()
            raise

    def _handle(self, request):
        reply, key, reason = answer(request, self._refusal)
        if reason is not None:
            address = request[3].decode("utf-8", "replace") \
                if len(request) > 3 else "?"
            self._refused(key, reason, address)
        # (A REP socket must answer each request before the next.)
        self._connection.send_frames(reply)

    def close(self):
        self._connection.close()
