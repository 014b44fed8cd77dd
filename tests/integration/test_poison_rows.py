"""
The rows of the hardening issue that poisoned the broker ("token 'abc'
stops all dispatch", an id at 2**63 - 1 that makes every later insert
fail, ...), against real daemons: a schema 4 database refuses each at
INSERT, naming its CHECK; a version 3 database that already holds them is
upgraded by the broker at start, which fails them alone; and when the ids
run out, a refused SUBMIT fails alone too.  After each, every task ends
once and a new task runs at once (:func:`still_serves`).
"""

import json
import os
import sqlite3
from contextlib import closing

import pytest

from taskbroker.client.blocking import BlockingClient
from taskbroker.store import _schema

from .test_hardening import HEARTBEAT, still_serves

#: (the column whose CHECK refuses it, the columns of the INSERT).
POISON = [
    ("token", {"token": "abc"}),
    ("token", {"token": 2**63 - 1}),
    ("attempts", {"attempts": "abc"}),
    ("created_at", {"created_at": "yesterday"}),
    ("run_at", {"run_at": 1e300}),
    # Last: in a version 3 database, nothing can be inserted after it.
    ("id", {"id": 2**63 - 1}),
]


def database(cluster):
    return os.path.join(cluster.folder, "tasks.sqlite")


def insert(path, **columns):
    columns = {"handler": "echo", **columns}
    with closing(sqlite3.connect(path)) as db:
        with db:
            return db.execute(
                f"INSERT INTO tasks ({', '.join(columns)}) "
                f"VALUES ({', '.join('?' for _ in columns)})",
                tuple(columns.values()),
            ).lastrowid


def test_poison_rows_are_refused_at_insert(cluster):
    cluster.start_broker(*HEARTBEAT, "--poll-interval", "0.1")
    cluster.start_worker(*HEARTBEAT, name="w1")
    for column, columns in POISON:
        with pytest.raises(sqlite3.IntegrityError) as refused:
            insert(database(cluster), **columns)
        assert str(refused.value) == f"CHECK constraint failed: {column}"
    with closing(sqlite3.connect(database(cluster))) as db:
        assert db.execute("SELECT count(*) FROM tasks").fetchone() == (0,)
    still_serves(cluster)


def test_a_version_3_database_with_poison_rows_is_upgraded(cluster):
    path = database(cluster)
    with closing(sqlite3.connect(path)) as db:
        db.executescript(
            _schema.read_script(_schema.schema_directory("sqlite"), "v3.sql")
        )
        db.execute("INSERT INTO taskbroker_schema VALUES (3)")
        db.commit()
    good = insert(path, payload='"before"')
    poison = {insert(path, **columns): column for column, columns in POISON}
    # What version 3 made of the last one: no insert goes through any more.
    with pytest.raises(sqlite3.OperationalError, match="full"):
        insert(path)

    broker = cluster.start_broker(*HEARTBEAT, "--poll-interval", "0.1")
    latest = _schema.latest_version(_schema.schema_directory("sqlite"))
    broker.wait_for(
        r"upgraded database \S+ from schema version 3 to " + str(latest)
    )
    cluster.start_worker(*HEARTBEAT, name="w1")
    listed = cluster.cli("list", "--json")
    assert listed.returncode == 0, listed.stderr
    tasks = json.loads(listed.stdout)
    assert len(tasks) == 1 + len(POISON)
    # The row that was 2**63 - 1 has the next id now.
    renumbered = [
        task["id"]
        for task in tasks
        if task["error"] and task["error"].startswith("id ")
    ]
    poison[renumbered[0]] = poison.pop(2**63 - 1)
    done = still_serves(cluster, [good, *poison])
    assert done[0]["state"] == "succeeded" and done[0]["result"] == "before"
    for task, column in zip(done[1:], poison.values()):
        assert task["state"] == "failed", task
        assert task["error"].startswith(f"{column} "), task
        assert task["error"].endswith("(found by the upgrade to schema 4)")
        assert task["started_at"] is None  # never dispatched


def test_when_the_ids_run_out_a_submit_is_refused_alone(cluster):
    cluster.start_broker(*HEARTBEAT, "--poll-interval", "0.1")
    cluster.start_worker(*HEARTBEAT, name="w1")
    path = database(cluster)
    # The highest id the CHECK allows, set by hand: the next one is not.
    last = insert(path, id=2**53 - 2, payload='"last"')
    refused = cluster.cli("submit", "echo", "--payload", '"refused"')
    assert refused.returncode == 2
    assert refused.stderr == (
        "taskbroker: the database refused it: submit failed: CHECK "
        "constraint failed: id (refused)\n"
    )
    # Not database trouble: dispatch goes on, nothing is paused.
    stats = cluster.cli("stats", "--json")
    assert stats.returncode == 0, stats.stderr
    stats = json.loads(stats.stdout)
    assert stats["dispatch_paused"] is False
    assert stats["counters"]["store_errors"] == 0
    with BlockingClient(cluster.endpoint) as client:
        assert client.wait(last, timeout=30)["result"] == "last"
    # The way out (docs/operations.rst): with the broker stopped, delete
    # the row and take the sequence back down.
    cluster.broker.stop()
    with closing(sqlite3.connect(path)) as db:
        with db:
            db.execute("DELETE FROM tasks WHERE id = ?", (last,))
            db.execute(
                "UPDATE sqlite_sequence SET seq = "
                "(SELECT coalesce(max(id), 0) FROM tasks) "
                "WHERE name = 'tasks'"
            )
    cluster.start_broker(*HEARTBEAT, listen=cluster.endpoint)
    still_serves(cluster)
