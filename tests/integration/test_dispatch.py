"""
Real broker and workers: tasks are load-balanced by readiness and served
strictly by priority, and the recorded timeline proves it.
"""

import random
from datetime import datetime

from taskbroker.client.blocking import BlockingClient
from tests.timeline import (
    Capacity,
    idle_while_waiting,
    overcommitted,
    priority_inversions,
    runs_from_tasks,
)

LEVELS = ("high", "normal", "low")
#: Allowed dispatch latency when judging timelines (seconds): generous,
#: because CI machines are loaded; the rules are about whole task lengths.
TOLERANCE = 0.15


def capacities(client, levels=LEVELS):
    workers = {}
    for w in client.workers():
        workers[w["name"]] = Capacity(
            frozenset(levels.index(p) for p in w["priorities"]),
            frozenset(w["handlers"]),
            w["slots"],
            datetime.fromisoformat(w["connected_since"]).timestamp(),
        )
    return workers


def finish_all(client, tasks, timeout=120):
    return [client.wait(t["id"], timeout=timeout) for t in tasks]


def test_mixed_batch_is_balanced_and_strictly_prioritised(cluster):
    cluster.start_broker()
    cluster.start_worker(name="w1")
    cluster.start_worker(name="w2")
    rng = random.Random(7)
    specs = [
        {
            "handler": "record",
            "payload": {"seconds": rng.choice([0.05, 0.1, 0.3])},
            "priority": rng.choice(LEVELS),
        }
        for _ in range(40)
    ]
    with BlockingClient(cluster.endpoint) as client:
        workers = capacities(client)
        tasks, unserved = client.submit_many(specs)
        assert not unserved
        done = finish_all(client, tasks)

    assert [t["state"] for t in done] == ["succeeded"] * 40
    assert all(t["attempts"] == 1 for t in done)
    assert len({t["id"] for t in done}) == 40
    runs = runs_from_tasks(done, LEVELS)
    assert {r.worker for r in runs} == {"w1", "w2"}
    assert overcommitted(runs, workers, TOLERANCE) == []
    assert idle_while_waiting(runs, workers, TOLERANCE) == []
    assert priority_inversions(runs, workers, TOLERANCE) == []


def test_reserved_worker_serves_high_at_once(cluster):
    cluster.start_broker()
    cluster.start_worker(name="general-1")
    cluster.start_worker(name="general-2")
    cluster.start_worker("--priorities", "high", name="reserved")
    with BlockingClient(cluster.endpoint) as client:
        workers = capacities(client)
        low, _ = client.submit_many(
            [
                {
                    "handler": "record",
                    "payload": {"seconds": 0.5},
                    "priority": "low",
                }
                for _ in range(6)
            ]
        )
        highs = []
        for _ in range(4):
            task, _ = client.submit(
                "record", {"seconds": 0.05}, priority="high"
            )
            highs.append(client.wait(task["id"], timeout=30))
        done = finish_all(client, low) + highs

    runs = runs_from_tasks(done, LEVELS)
    for run in runs_from_tasks(highs, LEVELS):
        # Waited no longer than dispatch latency, although every general
        # worker was busy with low work.
        assert run.started - run.created < TOLERANCE
        assert run.worker == "reserved"
    assert {r.worker for r in runs if r.level == 2} == {
        "general-1",
        "general-2",
    }
    assert idle_while_waiting(runs, workers, TOLERANCE) == []
    assert overcommitted(runs, workers, TOLERANCE) == []


def test_task_for_missing_handler_waits_without_blocking_others(cluster):
    cluster.start_broker()
    cluster.start_worker(name="plain", handlers=False)
    with BlockingClient(cluster.endpoint) as client:
        waiting, unserved = client.submit("record", {"seconds": 0})
        assert unserved == ["record"]
        echoed, _ = client.submit("echo", {"x": 1})
        assert client.wait(echoed["id"], timeout=30)["result"] == {"x": 1}
        stats = client.stats()
        assert stats["waiting"] == {"record": 1}
        assert stats["unserved"] == ["record"]
        assert client.get(waiting["id"])["state"] == "queued"

        cluster.start_worker(name="full")
        done = client.wait(waiting["id"], timeout=30)
    assert done["state"] == "succeeded"
    assert done["worker"] == "full"


def test_blocking_handler_keeps_the_worker_responsive(cluster):
    cluster.start_broker()
    cluster.start_worker("--concurrency", "2", name="mixed")
    with BlockingClient(cluster.endpoint) as client:
        slow, _ = client.submit("blocking-sleep", {"seconds": 1.5})
        # While one slot blocks in a thread, the other keeps running tasks.
        quick = [client.submit("echo", i)[0] for i in range(20)]
        results = finish_all(client, quick)
        assert all(r["state"] == "succeeded" for r in results)
        assert client.get(slow["id"])["state"] == "running"
        assert client.wait(slow["id"], timeout=30)["result"] == 1.5


def test_failed_task_reports_its_error(cluster):
    cluster.start_broker()
    cluster.start_worker(name="w")
    with BlockingClient(cluster.endpoint) as client:
        task, _ = client.submit("fail", None, max_attempts=1)
        done = client.wait(task["id"], timeout=30)
    assert done["state"] == "failed"
    assert done["error"] == "RuntimeError: failed on purpose"
