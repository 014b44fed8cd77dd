"""
A handler's progress, from ``task.progress()`` in a real worker (in the
reactor and in a handler process) to the broker's database and back out
through ``taskbroker status`` and ``list``.
"""

import json
import time

import pytest

#: The longest a report may take to show (the broker writes at most one
#: a second per task).
SHOWN_WITHIN = 15.0


def status(cluster, task_id):
    run = cluster.cli("status", str(task_id), "--json")
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


def until_shown(cluster, task_id, wanted):
    """
    Ask for the task until its progress is ``wanted`` (fraction, message).
    """
    deadline = time.monotonic() + SHOWN_WITHIN
    while True:
        task = status(cluster, task_id)
        progress = task["progress"]
        if progress and (progress["fraction"], progress["message"]) == wanted:
            return task
        assert time.monotonic() < deadline, task


@pytest.mark.parametrize("handler", ["progress", "progress-blocking"])
def test_progress_shows_while_the_task_runs(cluster, tmp_path, handler):
    cluster.start_broker()
    cluster.start_worker(name="w1")
    until = tmp_path / "release"
    steps = [[0.1, "starting"], [0.25, None], [0.5, "half way"]]
    run = cluster.cli(
        "submit",
        handler,
        "--payload",
        json.dumps({"steps": steps, "until": str(until)}),
    )
    assert run.returncode == 0, run.stderr
    task_id = int(run.stdout)
    # The latest report wins, however close together they came.
    task = until_shown(cluster, task_id, (0.5, "half way"))
    assert task["state"] == "running"
    assert task["progress"]["at"] >= task["started_at"]
    listed = cluster.cli("list")
    assert "50%" in listed.stdout.splitlines()[1], listed.stdout
    text = cluster.cli("status", str(task_id)).stdout
    assert "progress: 50% half way (at " in text
    until.touch()
    deadline = time.monotonic() + SHOWN_WITHIN
    while task["state"] != "succeeded":
        assert time.monotonic() < deadline, task
        task = status(cluster, task_id)
    # The last report stays with the finished task.
    assert task["progress"]["fraction"] == 0.5
