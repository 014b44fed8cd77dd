# -*- test-case-name: tests.unit.test_broker -*-
"""
The broker's entry point for every message: decode it, count and drop what
is malformed, and route worker commands and client commands apart, under a
catch-all so that no message can raise into the socket layer (which would
leave the daemon deaf).
"""

from twisted.logger import Logger

from taskbroker.broker.admission import COUNTED, cost
from taskbroker.protocol import codec
from taskbroker.protocol.codec import CLIENT_COMMANDS, ProtocolError, encode

#: One log line per peer per this many seconds for its bad messages.
BAD_MESSAGE_LOG_INTERVAL = 10.0

#: The commands workers send; every other valid command is a client's.
WORKER_COMMANDS = frozenset(
    (b"HELLO", b"READY", b"HEARTBEAT", b"RESULT", b"BYE", b"PROGRESS")
)

# An idle worker's heartbeat, byte for byte as taskbroker's workers send it.
_IDLE_HEARTBEAT = encode(b"HEARTBEAT", {"running": []})


class RateLimit:
    """
    Allows one event per key per interval, and counts the rest.

    :param monotonic: a function returning seconds on a clock that never
        steps.
    :param size: the most keys remembered; past it, all are forgotten.
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


class Router:
    """
    Decodes each message and hands it to the workers' or the clients'
    handler.

    :param broker: the :class:`taskbroker.broker.core.Broker` this belongs
        to (its ``sessions``, ``workers``, ``requests`` and ``counters``).
    """

    log = Logger()

    def __init__(self, broker):
        self._broker = broker
        self.bad_messages = RateLimit(
            BAD_MESSAGE_LOG_INTERVAL, broker.monotonic
        )
        self.busy_logs = RateLimit(BAD_MESSAGE_LOG_INTERVAL, broker.monotonic)
        self.refusals = RateLimit(BAD_MESSAGE_LOG_INTERVAL, broker.monotonic)
        self._worker_handlers = {
            command: getattr(broker.workers, "on_" + command.decode())
            for command in WORKER_COMMANDS
        }
        # Each client command is handled by the first of these that has
        # an on_COMMAND.
        self._client_handlers = {
            command: next(
                getattr(owner, "on_" + command.decode())
                for owner in (broker.requests, broker.schedules, broker.bulk)
                if hasattr(owner, "on_" + command.decode())
            )
            for command in CLIENT_COMMANDS
        }

    def handle(self, sender, frames):
        """
        Handle one message.  Never raises.

        :param sender: a :class:`taskbroker.transport.zmq.Sender`.
        :param frames: the message's frames after the routing envelope.
        """
        broker = self._broker
        if broker.stopped:
            return
        identity = sender.identity
        if broker.peer_keys is not None and not self._authorized(
            sender, frames
        ):
            return
        session = broker.sessions.get(identity)
        if session is not None:
            session.seen_at = broker.monotonic()
            if not session.running and frames == _IDLE_HEARTBEAT:
                # Most of what a thousand idle workers send: nothing to
                # reconcile, so only note that they live, decoding nothing.
                session.last_seen = broker.clock.seconds()
                return
        size = None
        if len(frames) == 3 and frames[1] in COUNTED:
            size = cost(frames[1], frames[2])
            if not broker.admission.admit(size):
                self._busy(identity, frames)
                return
        answered = None
        try:
            answered = self._handle(sender, session, frames)
            if sender.key is not None and frames[1:2] == [b"HELLO"]:
                # A session opened by this message knows its key.
                opened = broker.sessions.get(identity)
                if opened is not None:
                    opened.key = sender.key
        finally:
            if size is not None:
                if answered is None:
                    broker.admission.release(size)
                else:
                    answered.addBoth(self._release, size)

    def _authorized(self, sender, frames):
        """
        Whether the sender's key has the role the command needs (see
        :mod:`taskbroker.broker.keys`); if not, refuse the message: a
        worker is told to stop (fatal), and its tasks are requeued.
        """
        broker = self._broker
        keys = broker.peer_keys
        command = frames[1] if len(frames) > 1 else b""
        as_worker = command in codec.WORKER_COMMANDS
        if (keys.may_work if as_worker else keys.may_ask)(sender.key):
            return True
        broker.counters["refused_keys"] += 1
        role = "worker" if as_worker else "client"
        if self.refusals.allow(sender.key):
            self.log.warn(
                "refused {command} from {key}: not an authorized {role} key "
                "(further refusals of this key are counted, not logged, for "
                "{interval:.0f}s)",
                command=command.decode("ascii", "replace"),
                key=keys.name(sender.key),
                role=role,
                interval=BAD_MESSAGE_LOG_INTERVAL,
            )
        message = f"this key may not act as a {role} on this broker"
        if as_worker:
            session = broker.sessions.get(sender.identity)
            if session is not None:
                broker.workers.forget(session)
            broker.workers.refuse(sender.identity, "forbidden", message)
        elif len(frames) == 3:
            broker.requests.error(
                sender.identity,
                codec.peek_req(frames[2]),
                "forbidden",
                message,
            )
        return False

    def _release(self, result, size):
        self._broker.admission.release(size)
        return result

    def _busy(self, identity, frames):
        broker = self._broker
        broker.counters["busy"] += 1
        if self.busy_logs.allow(identity):
            self.log.warn(
                "refused requests from {peer}: the broker is busy ("
                "{pending} requests, {size} bytes in progress; further "
                "refusals to this peer are counted, not logged, for "
                "{interval:.0f}s)",
                peer=broker.describe_peer(identity),
                pending=broker.admission.pending,
                size=broker.admission.pending_bytes,
                interval=BAD_MESSAGE_LOG_INTERVAL,
            )
        broker.requests.error(
            identity,
            codec.peek_req(frames[2]),
            "busy",
            "the broker has too many requests in progress; try again shortly",
        )

    def _handle(self, sender, session, frames):
        """
        Decode and route a message.

        :returns: the ``Deferred`` of a client request's answer, or
            ``None`` once it has been answered (or for a worker's message).
        """
        broker = self._broker
        identity = sender.identity
        try:
            command, body = codec.decode(frames, codec.BROKER_INBOUND)
        except ProtocolError as e:
            self._bad(identity, session, e)
            return None
        if session is not None:
            session.last_seen = broker.clock.seconds()
        worker_handler = self._worker_handlers.get(command)
        try:
            if worker_handler is not None:
                return worker_handler(identity, session, body)
            return self._client_handlers[command](identity, body, sender.key)
        except Exception:
            broker.counters["internal_errors"] += 1
            self.log.failure(
                "internal error while handling {command} from {peer}",
                command=command.decode(),
                peer=broker.describe_peer(identity),
            )
            if worker_handler is None:
                broker.requests.error(
                    identity,
                    body.get("req"),
                    "internal",
                    f"internal error while handling {command.decode()}; "
                    "see the broker's log",
                )
            return None

    def _bad(self, identity, session, error):
        self._broker.counters["protocol_errors"] += 1
        if self.bad_messages.allow(identity):
            self.log.warn(
                "bad message from {peer}: {reason} (further ones from "
                "this peer are counted, not logged, for {interval:.0f}s)",
                peer=self._broker.describe_peer(identity),
                reason=error.message,
                interval=BAD_MESSAGE_LOG_INTERVAL,
            )
        if session is None:
            self._broker.requests.error(
                identity, error.req, error.code, error.message
            )
