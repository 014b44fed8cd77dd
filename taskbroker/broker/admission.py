# -*- test-case-name: tests.unit.test_admission -*-
"""
How much client work the broker takes on at once.

The broker reads every peer on one ROUTER socket, and reading less would
delay workers' results and heartbeats along with a flood of requests.  So
it reads everything and refuses what is over these bounds with
``ERROR busy``, before decoding it: a flood costs a copy of each message,
never memory that grows with the flood.  Clients back off and send again.
"""

from taskbroker.protocol.codec import MAX_LIST_BYTES, MAX_MESSAGE_SIZE

#: The client requests that take work (a database read or write) and so
#: count against the bounds.  STATS and WORKERS are answered from memory,
#: so that a broker under a flood can still be looked at.
COUNTED = frozenset((b"SUBMIT", b"GET", b"WAIT", b"LIST", b"CANCEL", b"RETRY"))
#: The most counted requests being worked on at once.
MAX_PENDING = 1000
#: The most bytes the counted requests being worked on may cost at once:
#: each costs its body, as received, and the reply it may make.
MAX_PENDING_BYTES = 16 * 1024 * 1024
#: The most WAITs held open at once.
MAX_WAITS = 10_000
#: What a reply may hold: one task (a GET, a SUBMIT's echo, ...), or a
#: LIST page, which ends after 1 MiB of task text and so holds at most
#: that and one more task.
_REPLY = MAX_MESSAGE_SIZE
_LIST_REPLY = MAX_LIST_BYTES + MAX_MESSAGE_SIZE


def cost(command, body):
    """
    What a request counts against :data:`MAX_PENDING_BYTES`: a read of
    large tasks costs its reply, not its few bytes of request.
    """
    return len(body) + (_LIST_REPLY if command == b"LIST" else _REPLY)


class Admission:
    """
    Counts the requests in progress against the bounds.
    """

    def __init__(
        self,
        max_pending=MAX_PENDING,
        max_pending_bytes=MAX_PENDING_BYTES,
        max_waits=MAX_WAITS,
    ):
        self.max_pending = max_pending
        self.max_pending_bytes = max_pending_bytes
        self.max_waits = max_waits
        self.pending = 0
        self.pending_bytes = 0
        self.waits = 0

    def admit(self, size):
        """
        Take on a request that costs ``size`` bytes (see :func:`cost`), if
        the bounds allow it.

        :returns: whether it was taken on; if so, :meth:`release` it when
            it has been answered.
        """
        if (
            self.pending >= self.max_pending
            or self.pending_bytes + size > self.max_pending_bytes
        ):
            return False
        self.pending += 1
        self.pending_bytes += size
        return True

    def release(self, size):
        self.pending -= 1
        self.pending_bytes -= size

    def hold_wait(self):
        """
        Hold one more WAIT open, if the bound allows it.

        :returns: whether it may be held; if so, :meth:`end_wait` it.
        """
        if self.waits >= self.max_waits:
            return False
        self.waits += 1
        return True

    def end_wait(self):
        self.waits -= 1
