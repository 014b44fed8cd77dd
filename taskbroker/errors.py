"""
Exceptions shared across the package.
"""


class TaskbrokerError(Exception):
    """
    Base of the errors this package raises on purpose.
    """


class ConfigError(TaskbrokerError):
    """
    A setting is invalid; the message is one line meant for a person.
    """


class StoreError(TaskbrokerError):
    """
    The database cannot be used.
    """


class StoreLocked(StoreError):
    """
    Another broker owns the database.
    """


class PermanentFailure(Exception):
    """
    Raised by a handler to fail its task at once, without any retry.

    (Not a :class:`TaskbrokerError`: handlers raise it, the package does
    not.)
    """
