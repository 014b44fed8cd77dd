# -*- test-case-name: tests.unit.test_transport_zmq -*-
"""
The ZeroMQ socket options of every socket taskbroker makes: the broker's
ROUTER, the worker's DEALER, and the clients' DEALERs (the Twisted client
through txZMQ, the blocking client with plain pyzmq).  One place, so that
a limit or, later, a security setting is never applied to one socket and
forgotten on another.

Each function returns ``(option, value)`` pairs, to be set before the
socket binds or connects (libzmq reads most of them then).
"""

import zmq

from taskbroker.protocol.codec import MAX_MESSAGE_SIZE

#: Messages queued per peer before sends fail (``EAGAIN``) or reads stop.
HIGH_WATER_MARK = 100_000
#: Messages the broker's ROUTER queues from one peer before it stops
#: reading that peer's connection (TCP then holds the sender back; nothing
#: is dropped).  The broker reads as fast as it can and refuses what is
#: over its bounds at once, so the queue is short in practice; this caps
#: it at this many messages of at most MAX_MESSAGE_SIZE per peer.  Not
#: lower: libzmq lets the reading side acknowledge only every half of it,
#: and at 100 the bulk throughput of `make bench` fell by a third.
ROUTER_RECEIVE_HWM = 1000
#: How long a connection may take to finish ZeroMQ's handshake, in ms,
#: before it is dropped (libzmq's default is 30 s): bare TCP connections
#: that never speak hold a descriptor no longer than this.
HANDSHAKE_IVL_MS = 5000
#: A DEALER's first wait before reconnecting, and the longest, in ms.
RECONNECT_IVL_MS = 100
RECONNECT_IVL_MAX_MS = 2000
#: The domain the broker's socket names in its requests to the ZAP
#: handler (:mod:`taskbroker.transport.zap`).
ZAP_DOMAIN = b"taskbroker"


def router_options(max_message_size=MAX_MESSAGE_SIZE):
    """
    The broker's ROUTER: a send to a peer that is gone fails instead of
    vanishing (``ROUTER_MANDATORY``), a peer that reconnects under its
    identity takes over its route (``ROUTER_HANDOVER``), and libzmq drops
    a peer that sends an oversized message before we allocate it.
    """
    return [
        (zmq.ROUTER_MANDATORY, 1),
        (zmq.ROUTER_HANDOVER, 1),
        (zmq.HANDSHAKE_IVL, HANDSHAKE_IVL_MS),
        (zmq.MAXMSGSIZE, max_message_size),
        (zmq.SNDHWM, HIGH_WATER_MARK),
        (zmq.RCVHWM, ROUTER_RECEIVE_HWM),
    ]


def dealer_options(max_message_size=-1, immediate=False):
    """
    A DEALER connected to the broker.

    :param max_message_size: the largest message accepted, in bytes; -1
        for no limit.
    :param immediate: refuse sends while not connected instead of queueing
        them, for a peer that repeats or resends what matters anyway.
    """
    return [
        (zmq.IMMEDIATE, int(immediate)),
        (zmq.MAXMSGSIZE, max_message_size),
        (zmq.SNDHWM, HIGH_WATER_MARK),
        (zmq.RCVHWM, HIGH_WATER_MARK),
        (zmq.RECONNECT_IVL, RECONNECT_IVL_MS),
        (zmq.RECONNECT_IVL_MAX, RECONNECT_IVL_MAX_MS),
    ]


def client_options():
    """
    A client's DEALER: as any DEALER, and unsent requests are dropped at
    close, since they are worthless once the client gave up on them.
    """
    return dealer_options() + [(zmq.LINGER, 0)]


def curve_server_options(public, secret):
    """
    The broker's ROUTER with CURVE: encrypted links, and peers
    authenticated by the context's ZAP handler (the domain names the
    broker's requests to it).

    :param public: the broker's public key, Z85 ``bytes``.
    :param secret: its secret key.
    """
    return [
        (zmq.CURVE_SERVER, 1),
        (zmq.CURVE_PUBLICKEY, public),
        (zmq.CURVE_SECRETKEY, secret),
        (zmq.ZAP_DOMAIN, ZAP_DOMAIN),
    ]


def curve_client_options(server, public, secret):
    """
    A DEALER with CURVE: it talks only to a broker that holds the secret
    of ``server`` (a process that took the broker's port gets nothing),
    and proves its own key pair.

    :param server: the broker's public key, Z85 ``bytes``.
    :param public: this peer's public key.
    :param secret: its secret key.
    """
    return [
        (zmq.CURVE_SERVERKEY, server),
        (zmq.CURVE_PUBLICKEY, public),
        (zmq.CURVE_SECRETKEY, secret),
    ]
