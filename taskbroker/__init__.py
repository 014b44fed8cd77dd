"""
taskbroker: durable, priority-aware task distribution over ZeroMQ.
"""

from taskbroker.errors import PermanentFailure

__all__ = ["PermanentFailure", "__version__", "handler"]

__version__ = "0.1.0"


def __getattr__(name):
    # Imported on first use: the command line and the clients need neither
    # twisted.plugin nor zope.interface's declarations.
    if name == "handler":
        from taskbroker.handlers import handler

        return handler
    raise AttributeError(f"module 'taskbroker' has no attribute {name!r}")
