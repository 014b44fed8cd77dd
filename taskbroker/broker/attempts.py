# -*- test-case-name: tests.unit.test_attempts -*-
"""
The attempt ledger: which task runs on which session, under which fencing
token.

Every dispatch carries a token, one more than the task's previous one, and
a worker's report counts only for the attempt that is current: a worker
presumed lost can never overwrite the attempt that replaced it.  An
attempt whose session is unknown (found ``running`` at start, or whose
result could not be written) is an *orphan*: it waits until a deadline for
a worker to claim or report it, and is requeued after.

Pure bookkeeping: no store, no socket, no clock (times are passed in).
"""

from collections.abc import Callable
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from twisted.internet.interfaces import IDelayedCall

    from taskbroker.store import TaskRow

#: What :meth:`Attempts.claim` found.
Claimed = Literal["claimed", "held", "stale"]


class Attempt:
    """
    One dispatched attempt.

    :ivar task_id: the task's id.
    :ivar token: the attempt's fencing token.
    :ivar row: the task's :class:`taskbroker.store.TaskRow` as it was
        before this dispatch (its ``attempts`` and ``token`` not yet
        counting it), to requeue or fail it from.
    :ivar session: the identity of the session running it, or ``None``
        for an orphan.
    :ivar progress: the latest ``(fraction, message, at)`` its handler
        reported, or ``None``; ``progress_written`` (monotonic seconds)
        and ``progress_timer`` belong to
        :class:`taskbroker.broker.progress.ProgressRecords`.
    """

    __slots__ = (
        "task_id",
        "token",
        "row",
        "session",
        "progress",
        "progress_written",
        "progress_timer",
    )

    def __init__(
        self, task_id: int, token: int, row: "TaskRow", session: bytes | None
    ) -> None:
        self.task_id = task_id
        self.token = token
        self.row = row
        self.session = session
        self.progress: tuple[float, str | None, float] | None = None
        self.progress_written: float | None = None
        self.progress_timer: IDelayedCall | None = None

    def __repr__(self) -> str:
        return (
            f"Attempt({self.task_id!r}, token={self.token!r}, "
            f"session={self.session!r})"
        )


class Attempts:
    """
    The current attempt of every task dispatched and not yet ended.
    """

    def __init__(self) -> None:
        # task id -> Attempt
        self._current: dict[int, Attempt] = {}
        # task id -> deadline, for orphans
        self._deadlines: dict[int, float] = {}

    def __contains__(self, task_id: object) -> bool:
        return task_id in self._current

    def __len__(self) -> int:
        return len(self._current)

    def get(self, task_id: int) -> Attempt | None:
        """
        :returns: the task's current :class:`Attempt`, or ``None``.
        """
        return self._current.get(task_id)

    def current(self, task_id: int, token: int) -> Attempt | None:
        """
        :returns: the task's current :class:`Attempt` if its token is
            ``token``, else ``None``.
        """
        attempt = self._current.get(task_id)
        if attempt is not None and attempt.token == token:
            return attempt
        return None

    def start(
        self, task_id: int, token: int, row: "TaskRow", session: bytes
    ) -> Attempt:
        """
        Record a dispatch to ``session``; it replaces any earlier attempt.

        :returns: the new :class:`Attempt`.
        """
        attempt = self._current[task_id] = Attempt(
            task_id, token, row, session
        )
        self._deadlines.pop(task_id, None)
        return attempt

    def orphan(
        self, task_id: int, token: int, row: "TaskRow", deadline: float
    ) -> None:
        """
        Record an attempt that no live session holds, to be requeued at
        ``deadline`` unless a worker claims or reports it first.
        """
        self._current[task_id] = Attempt(task_id, token, row, None)
        self._deadlines[task_id] = deadline

    def end(self, task_id: int, token: int | None = None) -> Attempt | None:
        """
        Forget a task's attempt: any attempt if ``token`` is ``None``, else
        only the current one with that token.

        :returns: the :class:`Attempt` forgotten, or ``None``.
        """
        attempt = self._current.get(task_id)
        if attempt is None or (token is not None and attempt.token != token):
            return None
        del self._current[task_id]
        self._deadlines.pop(task_id, None)
        return attempt

    def claim(
        self,
        task_id: int,
        token: int,
        session: bytes,
        is_live: Callable[[bytes], bool],
    ) -> Claimed:
        """
        A worker that reconnected says it runs ``task_id`` under ``token``.

        :param is_live: ``is_live(session) -> bool``: whether a session is
            connected.
        :returns: ``"claimed"`` if the attempt is now ``session``'s,
            ``"held"`` if it is current but another live session holds it,
            ``"stale"`` if it is not current (the worker must stop it).
        """
        attempt = self.current(task_id, token)
        if attempt is None:
            return "stale"
        if (
            attempt.session is not None
            and attempt.session != session
            and is_live(attempt.session)
        ):
            return "held"
        attempt.session = session
        self._deadlines.pop(task_id, None)
        return "claimed"

    def expired(
        self, now: float, is_live: Callable[[bytes], bool]
    ) -> list[Attempt]:
        """
        Take the orphans whose deadline has passed and that no live session
        claimed meanwhile.

        :returns: a ``list`` of the :class:`Attempt` objects taken, to be
            requeued.
        """
        due = [
            task_id
            for task_id, deadline in self._deadlines.items()
            if deadline <= now
        ]
        taken = []
        for task_id in due:
            del self._deadlines[task_id]
            attempt = self._current.get(task_id)
            if attempt is not None and (
                attempt.session is None or not is_live(attempt.session)
            ):
                del self._current[task_id]
                taken.append(attempt)
        return taken
