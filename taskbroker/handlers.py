# -*- test-case-name: tests.unit.test_handlers -*-
"""
The short way to write a handler: a module-level function under
:func:`handler`::

    from taskbroker import handler

    @handler("acme.checksum", blocking=True, time_limit=600)
    def checksum(task):
        ...

The decorator makes the plugin object (an :class:`ITaskHandler` and a
``twisted.plugin`` plugin) from the function, so a worker finds it like
any other handler in its ``--handlers-path``.  The object is still
called as the function was, for tests.
"""

from numbers import Real

from twisted.plugin import IPlugin
from zope.interface import implementer

from taskbroker.interfaces import ITaskHandler
from taskbroker.protocol.codec import MAX_SECONDS, check_name


@implementer(IPlugin, ITaskHandler)
class FunctionHandler:
    """
    A handler made from a function by :func:`handler`.
    """

    def __init__(self, name, function, blocking, time_limit):
        self.name = name
        self.function = function
        self.blocking = blocking
        if time_limit is not None:
            self.time_limit = time_limit
        self.__doc__ = function.__doc__
        self.__wrapped__ = function

    def run(self, task):
        return self.function(task)

    def __call__(self, task):
        return self.function(task)

    def __repr__(self):
        return (
            f"<handler {self.name!r}: "
            f"{self.function.__module__}.{self.function.__qualname__}>"
        )


def handler(name, blocking=False, time_limit=None):
    """
    Make a module-level function a task handler.

    :param name: the handler's name, which tasks name (1 to 200 printable
        characters).
    :param blocking: ``True`` if the function blocks (CPU work, blocking
        I/O): the worker runs it in a handler process.  ``False`` if it
        returns at once with a value or a ``Deferred``; it then runs in
        the reactor and must never block.
    :param time_limit: seconds an attempt may run unless the task says
        otherwise, or ``None`` for the broker's default.
    :raises ValueError: for a name or time limit no worker could use
        (when the module is imported).
    """
    try:
        check_name(name)
    except ValueError as e:
        raise ValueError(f"handler name {name!r} {e}") from None
    if not isinstance(blocking, bool):
        raise ValueError(f"blocking must be True or False, not {blocking!r}")
    if time_limit is not None and (
        isinstance(time_limit, bool)
        or not isinstance(time_limit, Real)
        or not 0.001 <= time_limit <= MAX_SECONDS
    ):
        raise ValueError(
            f"time_limit must be a number of seconds from 0.001 "
            f"to {MAX_SECONDS:g}, or None, not {time_limit!r}"
        )

    def wrap(function):
        if not callable(function):
            raise TypeError(
                f"@handler({name!r}) decorates a function, not {function!r}"
            )
        return FunctionHandler(name, function, blocking, time_limit)

    return wrap
