# -*- test-case-name: tests.unit.test_store -*-
"""
Helpers for testing code that uses taskbroker: the broker's own tests, and
the tests of handler plugins written by users.

Everything here is public API; see ``docs/testing.rst``.
"""

from twisted.python.failure import Failure

from taskbroker.store.memory import MemoryStore
from taskbroker.store.shared import SharedClaims, SharedMemoryDatabase

__all__ = ["MemoryStore", "SharedClaims", "SharedMemoryDatabase", "result_of"]


def result_of(d):
    """
    Return the result of a ``Deferred`` that has already fired, for tests
    that run without a reactor (with :class:`MemoryStore`, a ``Clock``
    and other fakes).

    A success stays in the ``Deferred`` for any later callbacks; a failure
    is consumed, so it is not also logged as unhandled.

    :param d: a :class:`twisted.internet.defer.Deferred`.
    :returns: its result.
    :raises: the exception it failed with.
    :raises AssertionError: if it has not fired yet.
    """
    # Checked first so that a Deferred that has not fired is left as it was.
    if not d.called:
        raise AssertionError(f"{d!r} has not fired yet")
    outcome = []

    def capture(result):
        outcome.append(result)
        return None if isinstance(result, Failure) else result

    d.addBoth(capture)
    if not outcome:
        # Fired, but paused while it waits for another Deferred.
        raise AssertionError(f"{d!r} is waiting for another Deferred")
    if isinstance(outcome[0], Failure):
        outcome[0].raiseException()
    return outcome[0]
