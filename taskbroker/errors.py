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


class WriteRefused(StoreError):
    """
    The database refused one write for what it would have written (a
    CHECK, UNIQUE or NOT NULL constraint).  The other writes of its group
    commit went through and the database works: this is not database
    trouble to wait out, and the same write would be refused again.
    """


class StoreLost(StoreError):
    """
    The store can no longer keep its promises and the broker must stop:
    its database file was removed or replaced while it was in use, or the
    database is damaged.
    """


class PermanentFailure(Exception):
    """
    Raised by a handler to fail its task at once, without any retry.

    (Not a :class:`TaskbrokerError`: handlers raise it, the package does
    not.)
    """


def one_line(text):
    """
    ``text`` (or an exception's message) on one line, with its runs of
    whitespace collapsed: for log fields and error replies that must stay
    one line.  An exception without a message gives its type's name; an
    object whose ``str()`` fails gives a placeholder.
    """
    try:
        line = " ".join(str(text).split())
    except Exception:
        return "(its message could not be shown)"
    if not line and isinstance(text, BaseException):
        return type(text).__name__
    return line


def describe(error):
    """
    ``"Type: message"`` on one line, or just ``"Type"`` when there is no
    message (a ``SyntaxError`` would otherwise bring its source line and
    caret).
    """
    name = type(error).__name__
    text = one_line(error)
    return name if text == name else f"{name}: {text}"
