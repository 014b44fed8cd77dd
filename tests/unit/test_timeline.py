"""
The timeline checkers reject what they exist to catch: synthetic
round-robin and prefetching timelines, and priority inversions.
"""

from tests.timeline import (
    Capacity,
    Run,
    idle_while_waiting,
    overcommitted,
    priority_inversions,
)

ALL = frozenset({0, 1, 2})
ECHO = frozenset({"echo"})
TOL = 0.05


def two_workers():
    return {"a": Capacity(ALL, ECHO, 1, 0.0), "b": Capacity(ALL, ECHO, 1, 0.0)}


def test_load_balanced_timeline_passes():
    # Four 1 s tasks queued at 0; each worker takes the next as it frees.
    runs = [
        Run(1, 1, "echo", 0.0, 0.0, 1.0, "a"),
        Run(2, 1, "echo", 0.0, 0.0, 3.0, "b"),  # a long one
        Run(3, 1, "echo", 0.0, 1.0, 2.0, "a"),
        Run(4, 1, "echo", 0.0, 2.0, 3.0, "a"),
    ]
    workers = two_workers()
    assert idle_while_waiting(runs, workers, TOL) == []
    assert overcommitted(runs, workers, TOL) == []
    assert priority_inversions(runs, workers, TOL) == []


def test_round_robin_timeline_is_rejected():
    # Round-robin: task 3 is pushed to b behind the long task 2 while a
    # sits idle from t=1.
    runs = [
        Run(1, 1, "echo", 0.0, 0.0, 1.0, "a"),
        Run(2, 1, "echo", 0.0, 0.0, 3.0, "b"),
        Run(3, 1, "echo", 0.0, 3.0, 4.0, "b"),
    ]
    violations = idle_while_waiting(runs, two_workers(), TOL)
    assert [(task, worker) for task, worker, _ in violations] == [(3, "a")]


def test_prefetching_timeline_is_rejected():
    # Prefetch: b was handed task 3 at t=0 while still running task 2.
    runs = [
        Run(1, 1, "echo", 0.0, 0.0, 1.0, "a"),
        Run(2, 1, "echo", 0.0, 0.0, 3.0, "b"),
        Run(3, 1, "echo", 0.0, 0.0, 4.0, "b"),
    ]
    assert overcommitted(runs, two_workers(), TOL)


def test_worker_that_cannot_run_a_task_may_idle():
    runs = [
        Run(1, 0, "echo", 0.0, 0.0, 1.0, "a"),
        Run(2, 0, "echo", 0.0, 1.0, 2.0, "a"),
    ]
    workers = {
        "a": Capacity(ALL, ECHO, 1, 0.0),
        "low": Capacity(frozenset({2}), ECHO, 1, 0.0),
    }
    assert idle_while_waiting(runs, workers, TOL) == []


def test_priority_inversion_is_rejected():
    # The high task (level 0) waited from 0.5 while a low one started at 1.
    runs = [
        Run(1, 2, "echo", 0.0, 0.0, 1.0, "a"),
        Run(2, 2, "echo", 0.0, 1.0, 2.0, "a"),
        Run(3, 0, "echo", 0.5, 2.0, 3.0, "a"),
    ]
    workers = {"a": Capacity(ALL, ECHO, 1, 0.0)}
    assert priority_inversions(runs, workers, TOL) == [(2, 3)]


def test_within_tolerance_is_not_a_violation():
    runs = [
        Run(1, 1, "echo", 0.0, 0.0, 1.0, "a"),
        Run(2, 1, "echo", 0.0, 1.02, 2.0, "a"),
    ]
    workers = {"a": Capacity(ALL, ECHO, 1, 0.0)}
    assert idle_while_waiting(runs, workers, TOL) == []
