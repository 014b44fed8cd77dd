"""
Real daemons driven as an operator would: the command line, tasks
inserted with plain SQL, a broker restart, and the refusals that must be
one clear line.
"""

import json
import os
import sqlite3
import time

import pytest

from taskbroker.client.blocking import BlockingClient


def test_command_line_end_to_end(cluster):
    cluster.start_broker()
    cluster.start_worker(name="w1")

    submitted = cluster.cli(
        "submit", "echo", "--payload", '{"n": 1}', "--wait", "--json"
    )
    assert submitted.returncode == 0, submitted.stderr
    task = json.loads(submitted.stdout)
    assert task["state"] == "succeeded" and task["result"] == {"n": 1}
    assert task["worker"] == "w1"

    plain = cluster.cli("submit", "echo", "--payload", "[1, 2]")
    assert plain.returncode == 0, plain.stderr
    task_id = int(plain.stdout.strip())
    waited = cluster.cli("status", str(task_id), "--json")
    assert json.loads(waited.stdout)["id"] == task_id

    unserved = cluster.cli("submit", "nobody-has-this")
    assert unserved.returncode == 0
    assert (
        "no connected worker has handler 'nobody-has-this'" in unserved.stderr
    )
    queued_id = int(unserved.stdout.strip())

    listed = cluster.cli("list", "--state", "queued", "--json")
    assert [t["id"] for t in json.loads(listed.stdout)] == [queued_id]

    cancelled = cluster.cli("cancel", str(queued_id))
    assert cancelled.returncode == 0, cancelled.stderr
    status = json.loads(cluster.cli("status", str(queued_id), "--json").stdout)
    assert status["state"] == "cancelled"

    workers = json.loads(cluster.cli("workers", "--json").stdout)
    assert [w["name"] for w in workers] == ["w1"]
    stats = json.loads(cluster.cli("stats", "--json").stdout)
    assert stats["tasks"]["succeeded"] == {"normal": 2}
    assert stats["workers"] == 1

    failed = cluster.cli("submit", "fail", "--max-attempts", "1", "--wait")
    assert failed.returncode == 1
    assert failed.stderr.strip().count("\n") == 0

    missing = cluster.cli("status", "999999")
    assert missing.returncode == 4
    assert (
        missing.stderr.count("\n") == 1 and "Traceback" not in missing.stderr
    )

    bad_level = cluster.cli("submit", "echo", "--priority", "urgent")
    assert bad_level.returncode == 2
    assert "urgent" in bad_level.stderr and bad_level.stderr.count("\n") == 1


def test_command_line_without_broker(cluster, tmp_path):
    cluster.endpoint = "tcp://127.0.0.1:1"
    result = cluster.cli("--timeout", "0.5", "stats")
    assert result.returncode == 3
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_bulk_submit_from_file(cluster, tmp_path):
    cluster.start_broker()
    cluster.start_worker(name="w1")
    lines = [json.dumps({"handler": "echo", "payload": i}) for i in range(250)]
    path = tmp_path / "tasks.jsonl"
    path.write_text("\n".join(lines) + "\n")
    result = cluster.cli("submit", "--from", str(path))
    assert result.returncode == 0, result.stderr
    ids = [int(line) for line in result.stdout.split()]
    assert len(ids) == 250 and ids == sorted(ids)
    with BlockingClient(cluster.endpoint) as client:
        assert client.wait(ids[-1], timeout=60)["result"] == 249


def test_rows_inserted_with_sql(cluster):
    cluster.start_broker("--poll-interval", "0.2")
    cluster.start_worker(name="w1")
    database = os.path.join(cluster.folder, "tasks.sqlite")
    insert = "INSERT INTO tasks (handler, payload, priority) VALUES (?, ?, ?)"
    with sqlite3.connect(database) as db:
        rows = [
            ("echo", '{"ok": true}', None),  # default level
            ("echo", '"high one"', "high"),
            ("echo", "1", "urgent"),
        ]
        ids = [db.execute(insert, row).lastrowid for row in rows]
    # The schema's constraints refuse what is not JSON of at most 1 MiB.
    for payload in ("{not json", json.dumps("x" * (1024 * 1024 + 10))):
        with sqlite3.connect(database) as db:
            with pytest.raises(
                sqlite3.IntegrityError,
                match="CHECK constraint failed: payload",
            ):
                db.execute(insert, ("echo", payload, None))
    with BlockingClient(cluster.endpoint) as client:
        done = [client.wait(i, timeout=30) for i in ids]
    assert [t["state"] for t in done] == ["succeeded", "succeeded", "failed"]
    assert done[0]["priority"] == "normal" and done[0]["result"] == {
        "ok": True
    }
    assert done[0]["max_attempts"] == 3
    assert "unknown priority level 'urgent'" in done[2]["error"]
    # The broker survived all of it and still serves.
    with BlockingClient(cluster.endpoint) as client:
        task, _ = client.submit("echo", 5)
        assert client.wait(task["id"], timeout=30)["result"] == 5


def test_queue_deeper_than_the_window_drains_once_in_order(cluster):
    """
    More queued tasks than the broker holds in memory (a window of 1,000
    per queue), inserted by SQL before it starts: every one runs exactly
    once, urgent queues first; rows no broker can run fail at start.
    """
    cluster.start_broker().stop()
    database = os.path.join(cluster.folder, "tasks.sqlite")
    soon = time.time() + 4.0
    with sqlite3.connect(database) as db:
        insert = (
            "INSERT INTO tasks (handler, payload, priority, run_at) "
            "VALUES (?, ?, ?, ?)"
        )
        db.executemany(
            insert, (("echo", str(i), "low", None) for i in range(2500))
        )
        db.executemany(
            insert, (("echo", str(i), None, None) for i in range(1200))
        )
        db.executemany(
            insert, (("echo", str(i), "urgent", None) for i in range(3))
        )
        db.executemany(
            insert, (("echo", str(i), "high", soon) for i in range(5))
        )
    cluster.start_broker()
    with BlockingClient(cluster.endpoint) as client:
        stats = client.stats()
        # The statistics count the store, not the broker's window.
        assert stats["waiting"] == {"echo": 3700}
        assert stats["delayed"] == 5
        assert stats["tasks"]["failed"] == {"urgent": 3}
    with sqlite3.connect(database) as db:
        # The last of each queue: the low ones run last, in id order.
        last = [
            i
            for (i,) in db.execute(
                "SELECT MAX(id) FROM tasks WHERE priority = 'low' UNION ALL "
                "SELECT id FROM tasks WHERE priority = 'high'"
            )
        ]
    cluster.start_worker(name="w1")
    cluster.start_worker(name="w2")
    with BlockingClient(cluster.endpoint) as client:
        for task_id in last:
            assert client.wait(task_id, timeout=120)["state"] == "succeeded"
        assert "queued" not in client.stats()["tasks"]
    with sqlite3.connect(database) as db:
        rows = db.execute(
            "SELECT priority, state, attempts, started_at, run_at FROM tasks "
            "WHERE priority != 'urgent' ORDER BY started_at"
        ).fetchall()
    assert len(rows) == 3705
    assert {
        (priority, state, attempts) for priority, state, attempts, _, _ in rows
    } == {
        ("low", "succeeded", 1),
        ("normal", "succeeded", 1),
        ("high", "succeeded", 1),
    }
    # Each queue in order: the 1,200 normal ones, then the 2,500 low ones;
    # the delayed high ones ran as soon as they were due.
    order = [priority for priority, *_ in rows if priority != "high"]
    assert order == ["normal"] * 1200 + ["low"] * 2500
    assert all(
        started >= run_at - 0.01
        for priority, _, _, started, run_at in rows
        if priority == "high"
    )


def test_clean_broker_restart_loses_nothing(cluster):
    broker = cluster.start_broker()
    worker = cluster.start_worker("--concurrency", "2", name="w1")
    with BlockingClient(cluster.endpoint) as client:
        long_ones, _ = client.submit_many(
            [{"handler": "record", "payload": {"seconds": 2}}] * 2
        )
        queued, _ = client.submit_many(
            [{"handler": "record", "payload": {"seconds": 0}}] * 5
        )
        for task in long_ones:
            while client.get(task["id"])["state"] != "running":
                client.wait(task["id"], timeout=0.05)

    broker.stop()
    # twistd re-raises SIGTERM after a clean shutdown, so look at the log.
    broker.wait_for(r"taskbroker stopped")
    mark = worker.mark()
    cluster.start_broker(listen=cluster.endpoint)
    # The worker notices the new broker by itself and announces again.
    worker.wait_for(r"welcomed by broker", start=mark)

    with BlockingClient(cluster.endpoint) as client:
        done = [client.wait(t["id"], timeout=60) for t in long_ones + queued]
    assert [t["state"] for t in done] == ["succeeded"] * 7
    # The long tasks were not run twice: the restart did not requeue them.
    assert [t["attempts"] for t in done[:2]] == [1, 1]


def test_second_broker_on_same_database_is_refused(cluster):
    cluster.start_broker()
    second = cluster.start_broker(wait=False)
    assert second.wait_exit() == 1
    second.wait_for(r"taskbroker cannot start: .*in use by another broker")


def test_broker_lock_released_when_owner_is_killed(cluster):
    import signal

    first = cluster.start_broker()
    first.signal(signal.SIGKILL)
    first.wait_exit()
    cluster.start_broker()  # starts at once


def test_worker_with_unknown_level_is_refused(cluster):
    cluster.start_broker()
    worker = cluster.start_worker("--priorities", "high,urgent", wait=False)
    assert worker.wait_exit() == 1
    match = worker.wait_for(r"refused by the broker: (.*)")
    assert "urgent" in match.group(1)


def test_duplicate_worker_name_is_refused(cluster):
    cluster.start_broker()
    cluster.start_worker(name="same")
    second = cluster.start_worker(name="same", wait=False)
    assert second.wait_exit() == 1
    second.wait_for(r"refused by the broker: a live worker named 'same'")


def test_invalid_option_is_one_line(cluster):
    cluster.endpoint = "tcp://127.0.0.1:1"
    worker = cluster.start_worker("--concurrency", "zero", wait=False)
    assert worker.wait_exit() == 2
    lines = [line for line in worker.lines if line.strip()]
    assert len(lines) == 1 and "--concurrency" in lines[0], lines


def test_wait_for_tasks_already_submitted(cluster, tmp_path):
    broker = cluster.start_broker()
    worker = cluster.start_worker(name="w1")
    until = tmp_path / "release"
    ids = []
    for handler, payload in (
        ("echo", '"one"'),
        ("fail", "null"),
        ("progress", json.dumps({"steps": [], "until": str(until)})),
    ):
        run = cluster.cli(
            "submit", handler, "--payload", payload, "--max-attempts", "1"
        )
        assert run.returncode == 0, run.stderr
        ids.append(run.stdout.strip())
    # The third runs until released: not finished within the timeout.
    waited = cluster.cli("wait", *ids, "--timeout", "1")
    assert waited.returncode == 5, waited.stderr
    assert waited.stdout == '"one"\n'
    assert waited.stderr.splitlines() == [
        f"taskbroker: task {ids[1]} failed: RuntimeError: failed on purpose",
        f"taskbroker: task {ids[2]} is still running",
    ]
    until.touch()
    waited = cluster.cli("wait", ids[0], ids[2])
    assert (waited.returncode, waited.stdout) == (0, '"one"\n"done"\n')
    assert cluster.cli("wait", ids[1]).returncode == 1
    missing = cluster.cli("wait", ids[0], "999999")
    assert missing.returncode == 4
    assert "no task with id 999999" in missing.stderr
    # Both daemons told of each task's dispatch (or start) and end.
    broker.wait_for(
        rf"task {ids[0]} dispatched to w1: echo, priority "
        r"normal, attempt 1 of 1, \d+\.\d{3}s after it was "
        "created"
    )
    broker.wait_for(
        rf"task {ids[1]} failed: fail, priority normal, worker "
        r"w1, attempt 1, ran \d+\.\d{3}s: RuntimeError: failed "
        "on purpose"
    )
    worker.wait_for(
        rf"task {ids[2]} started: progress, priority normal, "
        "attempt 1 of 1"
    )
    worker.wait_for(rf"task {ids[2]} succeeded: progress, ran ")


def test_a_function_under_handler_runs_in_a_real_worker(cluster):
    cluster.start_broker()
    cluster.start_worker(name="w1")
    done = cluster.cli(
        "submit", "decorated-sum", "--payload", "[1, 2, 3]", "--wait"
    )
    assert (done.returncode, done.stdout) == (0, "6\n"), done.stderr
