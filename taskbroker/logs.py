# -*- test-case-name: tests.unit.test_logs -*-
"""
Logging: each task's dispatch and end, as both daemons log them, and log
observers for twistd's ``--logger`` that write JSON lines.

A log event costs more than a task's whole dispatch once twistd's text
observer has formatted, dated and flushed it, so the lines about tasks
are gathered for :data:`GATHER` seconds and logged together, one event
for up to :data:`MOST_PER_EVENT` tasks: at a few tasks a second each
line tells of one task; at thousands, the log costs a few per cent of a
task's work instead of a third.
"""

import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.logger import Logger, jsonFileLogObserver

from taskbroker.errors import one_line

if TYPE_CHECKING:
    from twisted.internet.interfaces import IDelayedCall, IReactorTime

#: Seconds a line about tasks waits for others to share its event.
GATHER = 0.1

#: The most tasks one event tells of.
MOST_PER_EVENT = 100


class TaskLog:
    """
    Gathers the lines of one kind about tasks (dispatched, started,
    ended) and logs them together.

    :param log: the :class:`twisted.logger.Logger` to log to (at info).
    :param clock: an ``IReactorTime`` to time the gathering.
    :param kind: what happened, as the event's ``event`` field says it:
        ``"dispatched"``, ``"started"`` or ``"ended"``.
    :param one: how a line tells of one task: a function of the task's
        record (a ``dict``) that returns the text, e.g. ``task 7
        dispatched to w1: ...``.
    :param many: the same for a task among several, without ``task``:
        e.g. ``7 to w1 (...)``; the line starts ``tasks <kind>:``.
    """

    def __init__(
        self,
        log: Logger,
        clock: "IReactorTime",
        kind: str,
        one: Callable[[dict[str, Any]], str],
        many: Callable[[dict[str, Any]], str],
    ) -> None:
        self._log = log
        self._clock = clock
        self._kind = kind
        self._one = one
        self._many = many
        self._records: list[dict[str, Any]] = []
        self._call: IDelayedCall | None = None

    def add(self, **record: Any) -> None:
        """
        Tell of one task: ``record`` holds its fields (``id`` first),
        which the event carries as given.
        """
        self._records.append(record)
        if self._call is None:
            self._call = self._clock.callLater(GATHER, self.flush)

    def flush(self) -> None:
        """
        Log what was gathered (at once when the daemon stops).
        """
        if self._call is not None:
            if self._call.active():
                self._call.cancel()
            self._call = None
        records, self._records = self._records, []
        for start in range(0, len(records), MOST_PER_EVENT):
            chunk = records[start : start + MOST_PER_EVENT]
            if len(chunk) == 1:
                text = self._one(chunk[0])
            else:
                text = f"tasks {self._kind}: " + "; ".join(
                    map(self._many, chunk)
                )
            # The text is made here, with plain string operations: the
            # format that twisted parses for each event is one field.
            self._log.info("{text}", text=text, event=self._kind, tasks=chunk)


def cut(text: object, most: int = 200) -> str | None:
    """
    An error as a line about a task shows it: one line, at most ``most``
    characters (``taskbroker status`` shows it whole).
    """
    if text is None:
        return None
    line = one_line(text)
    return line if len(line) <= most else line[: most - 1] + "\u2026"


def seconds(value: object) -> str:
    """
    A duration as the lines about tasks show it: ``0.003s``, or ``?``.
    """
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{value:.3f}s"
    return "?"


# -- observers for twistd's --logger -----------------------------------------


def json_stdout():
    """
    One JSON object per line on standard output: for ``twistd -n`` under
    systemd or in a container (``twistd -n --logger
    taskbroker.logs.json_stdout taskbroker``).
    """
    return jsonFileLogObserver(sys.stdout, recordSeparator="")


def json_file():
    """
    One JSON object per line, appended to the file named by
    ``$JSON_LOG_FILE`` (default ``twistd.json``).
    """
    path = os.environ.get("JSON_LOG_FILE", "twistd.json")
    return jsonFileLogObserver(
        open(path, "a", encoding="utf-8"), recordSeparator=""
    )
