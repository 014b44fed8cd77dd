# -*- test-case-name: tests.unit.test_progress -*-
"""
Handlers' progress reports, kept in the store: the first report of an
attempt at once, then at most one write per :data:`WRITE_INTERVAL` for
each task, with the latest value.  A report only counts for the current
attempt, from the session that holds it; what is still unwritten when the
attempt ends is dropped (its result says more), and the next dispatch
clears what was written.
"""

#: The least time between two writes of one task's progress (seconds).
WRITE_INTERVAL = 1.0


class ProgressRecords:
    """
    :param broker: the :class:`taskbroker.broker.core.Broker` this belongs
        to (its store, clocks and attempts).
    """

    def __init__(self, broker):
        self._broker = broker

    def report(self, attempt, fraction, message):
        """
        Take a report for ``attempt`` (an
        :class:`~taskbroker.broker.attempts.Attempt` its sender holds).
        """
        broker = self._broker
        attempt.progress = (fraction, message, broker.clock.seconds())
        if attempt.progress_timer is not None:
            return  # a write is due, and takes the latest
        now = broker.monotonic()
        last = attempt.progress_written
        if last is None or now - last >= WRITE_INTERVAL:
            self._write(attempt)
        else:
            attempt.progress_timer = broker.clock.callLater(
                last + WRITE_INTERVAL - now, self._due, attempt
            )

    def flush(self, attempt):
        """
        ``attempt`` ended: write the report that waits for its turn, if
        any, in the transaction that records the end (so a task keeps
        its handler's last word, 100 % as often as not).
        """
        if attempt.progress_timer is not None:
            attempt.progress_timer.cancel()
            attempt.progress_timer = None
            self._write(attempt)

    def _due(self, attempt):
        attempt.progress_timer = None
        broker = self._broker
        if (
            not broker.stopped
            and broker.attempts.get(attempt.task_id) is attempt
        ):
            self._write(attempt)

    def _write(self, attempt):
        broker = self._broker
        attempt.progress_written = broker.monotonic()
        fraction, message, at = attempt.progress
        broker.store.progress(
            attempt.task_id,
            attempt.token,
            fraction,
            message,
            at,
        ).addErrback(broker.trouble, "recording a task's progress")
