# -*- test-case-name: tests.unit.test_client -*-
"""
The errors that both broker clients raise (the blocking one) or fail their
Deferreds with (the Twisted one).

Callers tell three situations apart: the broker did not answer
(:class:`BrokerUnavailable`: retrying later may help), the broker answered
with ``ERROR`` (:class:`RequestFailed` and its subclasses: retrying the same
request will not help, except for code ``unavailable``), and the client
refused to send a request the broker would refuse anyway
(:class:`InvalidRequest`).  A client that cannot use the CURVE key files
it is given is not made at all (:class:`InvalidKeys`).
"""

from taskbroker.errors import ConfigError, TaskbrokerError

__all__ = [
    "ClientError",
    "BrokerUnavailable",
    "RequestFailed",
    "TaskNotFound",
    "InvalidRequest",
    "InvalidKeys",
    "error_for_code",
]


class ClientError(TaskbrokerError):
    """
    Base of the errors of :mod:`taskbroker.client`.

    :ivar submitted: ``None``, except when ``submit_many`` fails after
        some of its chunks were committed: then the ``list`` of the task
        objects the broker had already accepted, in order.  A chunk that
        got no answer may also have been committed.
    """

    submitted = None


class BrokerUnavailable(ClientError):
    """
    The broker did not answer in time: it is not running, not reachable, or
    too busy.  For a request that changes state (``SUBMIT``, ``CANCEL``,
    ``RETRY``) the outcome is unknown: the broker may have carried it out.
    """


class RequestFailed(ClientError):
    """
    The broker answered ``ERROR``.

    :ivar code: the machine-readable reason (``bad_request``,
        ``unknown_priority``, ``not_found``, ``not_cancellable``,
        ``not_retryable``, ``refused``, ``unavailable``, ...; see
        docs/protocol.rst).
    :ivar message: one line for a person.
    """

    def __init__(self, code, message):
        """
        :param code: ``str``, the ERROR's ``code``.
        :param message: ``str``, the ERROR's ``message``.
        """
        ClientError.__init__(self, message)
        self.code = code
        self.message = message

    def __str__(self):
        return f"{self.message} ({self.code})"


class TaskNotFound(RequestFailed):
    """
    The broker has no task with that id (code ``not_found``).
    """


class InvalidRequest(RequestFailed, ValueError):
    """
    The request was not sent because the broker would refuse it (a field
    out of range, a payload or message too large).  ``code`` is the code the
    broker would have answered with, so callers can handle both alike.  It
    is also a ``ValueError``: it is raised for a bad argument.
    """


class InvalidKeys(ConfigError, ValueError):
    """
    A client's ``curve_server_key`` and ``curve_secret_key`` cannot be
    used: one is given without the other, a file is missing or holds no
    key, the secret file is readable by others than its owner, the
    broker's key is given as its secret file, or libzmq has no CURVE.
    The message is one line naming the argument and the file.

    It is a :class:`~taskbroker.errors.ConfigError`, as the daemons and
    the ``taskbroker`` command report the same files, and a
    ``ValueError``, as the clients report their other bad arguments.
    """


def error_for_code(code, message):
    """
    The exception for an ``ERROR`` reply.

    :param code: ``str``, the ERROR's ``code``.
    :param message: ``str``, the ERROR's ``message``.
    :returns: a :class:`RequestFailed`, or the subclass for ``code``.
    """
    if code == "not_found":
        return TaskNotFound(code, message)
    return RequestFailed(code, message)
