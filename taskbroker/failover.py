# -*- test-case-name: tests.unit.test_failover -*-
"""
Failover lists: what the worker and the clients share when they may reach
one of several brokers (brokers that share one database).

Everything here is pure: no sockets, no clock of its own.  It reads a
``--broker`` list, picks where a worker or a client starts in it, moves
along it, and judges when a broker that keeps reporting a failing
database has been failing long enough to leave.
"""

import re
import zlib

__all__ = [
    "parse_endpoints",
    "connect_endpoint",
    "start_position",
    "EndpointRing",
    "StoreWatch",
]

_ENDPOINT = re.compile(r"^(tcp://[^\s]+:(\d+|\*)|ipc://\S+|inproc://\S+)$")


def endpoint(text):
    """
    Check one ZeroMQ endpoint, to bind or to connect to.

    :param text: ``str``, e.g. ``"tcp://127.0.0.1:5555"``.
    :returns: ``text``.
    :raises ValueError: with a one-line reason.
    """
    match = _ENDPOINT.match(text)
    if not match:
        raise ValueError(
            "expected a ZeroMQ endpoint such as tcp://127.0.0.1:5555"
        )
    # libzmq takes a TCP port modulo 65536 (":70000" binds 4464).
    port = match.group(2)
    if port is not None and port != "*" and int(port) > 65535:
        raise ValueError("the port must be at most 65535")
    return text


def connect_endpoint(text):
    """
    Check an endpoint to connect to: a wildcard or port 0 names no peer.

    :raises ValueError: with a one-line reason.
    """
    endpoint(text)
    if text.startswith("tcp://") and text.rsplit(":", 1)[1] in ("*", "0"):
        raise ValueError("name the broker's port, e.g. tcp://127.0.0.1:5555")
    return text


def parse_endpoints(value):
    """
    Read a failover list of brokers.

    :param value: a ``str`` of comma-separated endpoints (spaces around
        the commas are ignored), or a ``list`` or ``tuple`` of ``str``.
    :returns: a ``tuple`` of one or more endpoints, in the given order.
    :raises ValueError: one line naming the first bad endpoint, an empty
        entry, or an endpoint listed twice.
    """
    if isinstance(value, str):
        items = [part.strip() for part in value.split(",")]
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        raise ValueError(
            "expected endpoints as a comma-separated string or a list of "
            f"strings, not {type(value).__name__}"
        )
    if not items:
        raise ValueError("expected at least one endpoint")
    seen = set()
    for item in items:
        if not isinstance(item, str):
            raise ValueError(f"endpoint {item!r} is not a string")
        if not item and len(items) > 1:
            raise ValueError("an endpoint in the list is empty")
        try:
            connect_endpoint(item)
        except ValueError as e:
            if len(items) == 1:
                raise
            raise ValueError(f"endpoint {item!r}: {e}") from None
        if item in seen:
            raise ValueError(f"endpoint {item!r} is listed twice")
        seen.add(item)
    return tuple(items)


def start_position(name, count):
    """
    Where a worker starts in a list of ``count`` brokers: a stable hash of
    its name, so that a fleet spreads over the list and a restarted worker
    goes back where it was.

    :param name: ``str``, the worker's name.
    :param count: ``int`` ≥ 1, the length of the list.
    :returns: ``int`` from 0 to ``count - 1``.
    """
    return zlib.crc32(name.encode("utf-8")) % count


class EndpointRing:
    """
    A failover list and the position in it: one endpoint at a time, the
    next one (wrapping around) after a move.

    :ivar endpoints: the ``tuple`` of endpoints.
    :ivar position: the index of the current one.
    """

    def __init__(self, endpoints, position=0):
        """
        :param endpoints: a non-empty sequence of endpoints.
        :param position: where to start (taken modulo the length).
        """
        self.endpoints = tuple(endpoints)
        if not self.endpoints:
            raise ValueError("expected at least one endpoint")
        self.position = position % len(self.endpoints)

    def __len__(self):
        return len(self.endpoints)

    @property
    def current(self):
        """
        The endpoint in use.
        """
        return self.endpoints[self.position]

    def advance(self):
        """
        Move to the next endpoint, wrapping around.

        :returns: ``(previous, current)`` endpoints (the same one for a
            list of one).
        """
        previous = self.current
        self.position = (self.position + 1) % len(self.endpoints)
        return previous, self.current


class StoreWatch:
    """
    Judges a broker by what its heartbeats say about its database: it is
    time to leave once the broker has reported a failing store without a
    break for ``failover_after`` seconds.

    :param failover_after: seconds (> 0).
    """

    def __init__(self, failover_after):
        self.failover_after = failover_after
        #: When the current run of failing reports began (seconds), or
        #: ``None`` while the store is reported fine.
        self.failing_since = None

    def report(self, now, failing):
        """
        Take one report.

        :param now: seconds on a monotonic clock.
        :param failing: ``True`` if the broker said its store fails.
        :returns: ``True`` if the store has been failing for
            ``failover_after`` seconds or more.
        """
        if not failing:
            self.failing_since = None
            return False
        if self.failing_since is None:
            self.failing_since = now
        return now - self.failing_since >= self.failover_after

    def failing_for(self, now):
        """
        :returns: seconds since the current run of failing reports began,
            or ``0.0``.
        """
        if self.failing_since is None:
            return 0.0
        return now - self.failing_since

    def reset(self):
        """
        Forget the reports: a new broker is judged afresh.
        """
        self.failing_since = None
