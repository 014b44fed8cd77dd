"""
Checkers that judge a finished run from its recorded timestamps.

The integration tests run real daemons, then read every task's
``created_at``, ``started_at`` (dispatch), ``finished_at`` and ``worker``
back from the broker and ask these functions whether the dispatch rules
held.  Every time here comes from the broker's clock, and each check allows
a stated ``tolerance`` for message latency.  tests/unit/test_timeline.py
shows each checker rejecting a synthetic round-robin or prefetching
timeline.
"""

from dataclasses import dataclass
from datetime import datetime


@dataclass(frozen=True)
class Run:
    """
    One task's recorded life.
    """

    id: int
    level: int
    handler: str
    created: float
    started: float
    finished: float
    worker: str


@dataclass(frozen=True)
class Capacity:
    """
    One worker: what it serves, how many slots, and since when.
    """

    levels: frozenset
    handlers: frozenset
    slots: int
    since: float


def _seconds(text):
    return datetime.fromisoformat(text).timestamp()


def runs_from_tasks(tasks, levels):
    """
    :param tasks: task objects (dicts) as the protocol returns them, all
        finished.
    :param levels: the broker's level names, most urgent first.
    """
    index = {name: i for i, name in enumerate(levels)}
    return [
        Run(
            t["id"],
            index[t["priority"]],
            t["handler"],
            _seconds(t["created_at"]),
            _seconds(t["started_at"]),
            _seconds(t["finished_at"]),
            t["worker"],
        )
        for t in tasks
    ]


def _busy_intervals(runs, worker):
    return sorted((r.started, r.finished) for r in runs if r.worker == worker)


def _free_intervals(runs, worker, capacity, end):
    """
    Intervals in [capacity.since, end] during which ``worker`` had fewer
    tasks than slots.
    """
    events = []
    for started, finished in _busy_intervals(runs, worker):
        events.append((started, 1))
        events.append((finished, -1))
    events.sort(key=lambda e: (e[0], e[1]))
    free = []
    busy = 0
    cursor = capacity.since
    for when, change in events:
        if busy < capacity.slots and when > cursor:
            free.append((cursor, when))
        busy += change
        cursor = max(cursor, when)
    if busy < capacity.slots and end > cursor:
        free.append((cursor, end))
    return free


def overcommitted(runs, workers, tolerance):
    """
    Prefetching shows as a worker holding more tasks than it has slots.

    :returns: a list of ``(worker, time, tasks held)`` violations.
    """
    violations = []
    for name, capacity in workers.items():
        events = []
        for started, finished in _busy_intervals(runs, name):
            events.append((started + tolerance, 1))
            events.append((finished, -1))
        events.sort(key=lambda e: (e[0], e[1]))
        busy = 0
        for when, change in events:
            busy += change
            if busy > capacity.slots:
                violations.append((name, when, busy))
    return violations


def idle_while_waiting(runs, workers, tolerance):
    """
    Round-robin and prefetching both leave a worker idle while a task it
    could run waits (for another worker).

    :param workers: ``{name: Capacity}``.
    :returns: a list of ``(task id, worker, overlap seconds)`` violations:
        the task waited for longer than ``tolerance`` while that worker,
        able to run it, had a free slot.
    """
    end = max((r.finished for r in runs), default=0)
    free = {
        name: _free_intervals(runs, name, cap, end)
        for name, cap in workers.items()
    }
    violations = []
    for run in runs:
        wait_from, wait_to = run.created + tolerance, run.started - tolerance
        if wait_to <= wait_from:
            continue
        for name, capacity in workers.items():
            if (
                run.level not in capacity.levels
                or run.handler not in capacity.handlers
            ):
                continue
            overlap = sum(
                max(0.0, min(b, wait_to) - max(a, wait_from))
                for a, b in free[name]
            )
            if overlap > tolerance:
                violations.append((run.id, name, overlap))
    return violations


def priority_inversions(runs, workers, tolerance):
    """
    A task started on a worker while a more urgent task that worker could
    run had been waiting (for longer than ``tolerance``).

    :returns: a list of ``(started task id, passed-over task id)``.
    """
    violations = []
    for run in runs:
        capacity = workers[run.worker]
        for other in runs:
            if (
                other.level < run.level
                and other.level in capacity.levels
                and other.handler in capacity.handlers
                and other.created + tolerance < run.started
                and other.started > run.started + tolerance
            ):
                violations.append((run.id, other.id))
    return violations
