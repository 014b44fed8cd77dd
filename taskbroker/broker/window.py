# -*- test-case-name: tests.unit.test_window -*-
"""
Which queued tasks the broker holds in memory.

The store may hold far more queued tasks than a broker should keep in
memory (a million inserted by SQL, say).  For each queue, a (level,
handler) pair, the broker holds a *window*: its oldest queued tasks, up to
``size`` of them.  The others stay in the store until the window drains
below half, when the next ones are read in id order.

A queue the broker holds whole has no cursor.  A *truncated* queue has one:
every queued task of that queue at or before the cursor is held in memory
(or running); tasks after it may be in the store only.  Tasks new to the
broker (submitted, or found by the poller) join the window only while their
queue is whole and short of ``size``; otherwise they lower the cursor to
just before them, so that a load finds them.

Positions are whatever orders the queue and can be compared: task ids for
the queues of due tasks, ``(run_at, id)`` pairs for the delayed ones.  The
caller passes cursors, "just before" a task: ``id - 1``, or ``(run_at,
id - 1)``.

Pure bookkeeping, no I/O: the broker asks :meth:`Windows.start` whether to
load, reads the store, and reports with :meth:`Windows.loaded` or
:meth:`Windows.failed`.
"""


class Windows:
    """
    The cursors of the truncated queues, and the loads under way.

    :param size: the most tasks of one queue a load brings the window to;
        a load starts when fewer than half of them wait.
    """

    def __init__(self, size):
        self.size = size
        self.low = max(1, size // 2)
        # key -> cursor, for truncated queues.
        self._cursors = {}
        # key -> the lowest cursor a task left in the store asked for while
        # the load was under way (None: none did).
        self._loading = {}

    def __contains__(self, key):
        """
        Whether the queue ``key`` is truncated: the store may hold queued
        tasks of it that are not in memory.
        """
        return key in self._cursors

    def cursor(self, key):
        """
        :returns: the cursor of queue ``key``, or ``None`` if it is held
            whole.
        """
        return self._cursors.get(key)

    def truncated(self):
        """
        :returns: the keys of the truncated queues.
        """
        return list(self._cursors)

    def hold(self, key, before, waiting):
        """
        A queued task new to the broker: hold it in memory, or leave it in
        the store for a later load?

        :param before: the cursor just before the task.
        :param waiting: how many tasks of its queue wait in memory.
        :returns: ``True`` to hold it.
        """
        if key not in self._cursors and waiting < self.size:
            return True
        self.leave(key, before)
        return False

    def leave(self, key, before):
        """
        A queued task of queue ``key`` stays in the store only: the next
        load of the queue must reach it.

        :param before: the cursor just before the task.
        """
        cursor = before
        current = self._cursors.get(key)
        if current is None or cursor < current:
            self._cursors[key] = cursor
        if key in self._loading:
            pending = self._loading[key]
            if pending is None or cursor < pending:
                self._loading[key] = cursor

    def start(self, key, waiting, soon=False):
        """
        Whether to load more of queue ``key`` now: it is truncated, no load
        of it is under way, and fewer than half a window waits (or, if
        ``soon``, the window has any room: what comes next is needed soon).

        :returns: ``(after, limit)`` for the load, or ``None``: read up to
            ``limit`` tasks after the cursor ``after``.
        """
        if (
            key not in self._cursors
            or key in self._loading
            or waiting >= (self.size if soon else self.low)
        ):
            return None
        self._loading[key] = None
        return self._cursors[key], self.size - waiting

    def loaded(self, key, last, exhausted):
        """
        A load finished.

        :param last: the position of the last task it read (its ``after``
            if none).
        :param exhausted: whether it read fewer rows than its limit: the
            store held no more of the queue then.
        """
        pending = self._loading.pop(key)
        cursor = None if exhausted else last
        if pending is not None and (cursor is None or pending < cursor):
            cursor = pending
        if cursor is None:
            del self._cursors[key]
        else:
            self._cursors[key] = cursor

    def failed(self, key):
        """
        A load failed: the cursor stays, for the next try.
        """
        self._loading.pop(key)
