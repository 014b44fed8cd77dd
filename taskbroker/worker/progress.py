# -*- test-case-name: tests.unit.test_progress -*-
"""
Progress reports from handlers, on their way to the broker: checked where
the handler calls, and thinned out on the way, so that a handler may call
``task.progress()`` for each of a million items at little cost.

Shared by the worker and its handler processes: it imports neither
ZeroMQ nor the reactor.
"""

import math
import threading
from numbers import Real

from taskbroker.protocol.codec import MAX_PROGRESS_MESSAGE as MAX_MESSAGE

#: Seconds between two reports of one task passed on: from a handler
#: process to the worker, and from the worker to the broker.
INTERVAL = 0.5


def checked(fraction, message):
    """
    A handler's report as the protocol carries it.

    :returns: ``(fraction, message)``, the message cut to
        :data:`MAX_MESSAGE` characters.
    :raises ValueError: if ``fraction`` is not a number from 0 to 1.
    :raises TypeError: if ``message`` is neither ``None`` nor a string.
    """
    if (
        isinstance(fraction, bool)
        or not isinstance(fraction, Real)
        or not math.isfinite(fraction)
        or not 0 <= fraction <= 1
    ):
        raise ValueError(
            f"progress must be a number from 0 to 1, not {fraction!r}"
        )
    if message is not None:
        if not isinstance(message, str):
            raise TypeError(
                "a progress message must be a string or None, "
                f"not {type(message).__name__}"
            )
        if len(message) > MAX_MESSAGE:
            message = message[: MAX_MESSAGE - 1] + "\u2026"
    return float(fraction), message


class Throttle:
    """
    Passes on the latest of a stream of reports, at most one per
    ``interval``: the first at once, and the last one always, at the end
    of the interval it fell in.  Safe to call from any thread; once
    :meth:`cancel` has returned, nothing more is sent.

    :param send: called with each report passed on (``fraction,
        message``).
    :param monotonic: a clock that never steps.
    :param call_later: ``call_later(delay, f)`` runs ``f`` after ``delay``
        seconds and returns an object with ``cancel()``.
    """

    def __init__(self, send, monotonic, call_later, interval=INTERVAL):
        self._send = send
        self._monotonic = monotonic
        self._call_later = call_later
        self._interval = interval
        # Held while sending too, so that cancel() waits for a send under
        # way (a handler process sends its answer right after).
        self._lock = threading.RLock()
        self._last = None
        self._pending = None
        self._timer = None
        self._cancelled = False

    def __call__(self, fraction, message):
        with self._lock:
            if self._cancelled:
                return
            now = self._monotonic()
            if self._timer is None and (
                self._last is None or now - self._last >= self._interval
            ):
                self._last = now
                self._send(fraction, message)
                return
            self._pending = (fraction, message)
            if self._timer is None:
                self._timer = self._call_later(
                    self._last + self._interval - now, self._flush
                )

    def _flush(self):
        with self._lock:
            self._timer = None
            due, self._pending = self._pending, None
            if due is None or self._cancelled:
                return
            self._last = self._monotonic()
            self._send(*due)

    def finish(self):
        """
        The task ended: send what is pending now (before the result goes,
        so the last report is the one the task keeps), and nothing more.
        """
        with self._lock:
            due, self._pending = self._pending, None
            self.cancel()
            if due is not None:
                self._send(*due)

    def cancel(self):
        """
        Drop what is pending, and send nothing more.
        """
        with self._lock:
            self._cancelled = True
            self._pending = None
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None


def thread_timer(delay, function):
    """
    ``call_later`` for a process without a reactor: a daemon thread.
    """
    timer = threading.Timer(delay, function)
    timer.daemon = True
    timer.start()
    return timer
