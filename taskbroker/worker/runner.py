# -*- test-case-name: tests.unit.test_runner -*-
"""
Running one task of a handler that does not block, in the reactor: its
result judged as the worker judges it (JSON-serialisable, a failure with
its traceback, ``PermanentFailure`` permanent), under a time limit, and
cancellable.  Used by the worker, and by :func:`taskbroker.testing.run_task`.
"""

from twisted.internet import defer

from taskbroker.errors import PermanentFailure, describe
from taskbroker.protocol.codec import encode_value
from taskbroker.worker.children import Outcome


def run_handler(handler, running_task, clock, time_limit=None):
    """
    Run one task of a handler that does not block, in the reactor.

    :param time_limit: seconds the attempt may take, or ``None``.
    :returns: a ``Deferred`` that always succeeds, with an
        :class:`~taskbroker.worker.children.Outcome`.  Cancelling it stops
        the handler (cancels the handler's ``Deferred``) and fires it with
        a ``cancelled`` outcome.
    """
    timer = None

    def settle(outcome):
        if timer is not None and timer.active():
            timer.cancel()
        if not result.called:
            result.callback(outcome)

    def stop(_):
        settle(Outcome("cancelled", None, "cancelled"))
        handler_d.cancel()

    result = defer.Deferred(stop)

    def succeeded(value):
        try:
            text = encode_value(value, "result")
        except ValueError as e:
            return Outcome("failed", None, str(e))
        return Outcome("succeeded", value, None, result_json=text)

    def failed(reason):
        try:
            traceback = reason.getTraceback()
        except Exception:
            traceback = None
        return Outcome(
            "failed",
            None,
            describe(reason.value),
            traceback=traceback,
            permanent=bool(reason.check(PermanentFailure)),
        )

    handler_d = defer.maybeDeferred(handler.run, running_task)
    handler_d.addCallbacks(succeeded, failed).addCallback(settle)
    if time_limit is not None and not result.called:

        def expire():
            settle(
                Outcome(
                    "failed", None, f"time limit of {time_limit:g} s exceeded"
                )
            )
            handler_d.cancel()

        timer = clock.callLater(time_limit, expire)
    return result
