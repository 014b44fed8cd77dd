"""
Periodic tasks, retention, purges and bulk changes with real brokers:
two brokers on one PostgreSQL database enqueue each tick once, even when
one stops; retention deletes old finished tasks on both stores, and says
at start how long it keeps them.
"""

import json
import re
import time
from contextlib import closing
from datetime import datetime
from zoneinfo import ZoneInfo

import pytest

from tests.integration.test_postgresql import HEARTBEAT, LEASE, wait_until
from tests.postgres import connect

KEY = re.compile(r"\Aschedule:([^:]+):(.+)\Z")


def scheduled(url, name):
    """
    The ticks (Unix times) of the tasks that schedule ``name`` enqueued,
    from their unique keys, in id order.
    """
    with connect(url) as connection:
        keys = [
            key
            for (key,) in connection.execute(
                "SELECT unique_key FROM tasks WHERE unique_key LIKE %s "
                "ORDER BY id",
                (f"schedule:{name}:%",),
            ).fetchall()
        ]
    return [
        datetime.fromisoformat(KEY.match(key).group(2)).timestamp()
        for key in keys
    ]


def test_two_brokers_on_postgresql_enqueue_each_tick_once(
    cluster, postgres_url
):
    first = cluster.start_broker(*HEARTBEAT, *LEASE, database=postgres_url)
    first_endpoint = cluster.endpoint
    second = cluster.start_broker(*HEARTBEAT, *LEASE, database=postgres_url)
    second_endpoint = cluster.endpoint
    cluster.endpoint = first_endpoint
    added = cluster.cli(
        "schedule",
        "add",
        "tick",
        "--every",
        "1",
        "echo",
        "--payload",
        '{"n": 1}',
    )
    assert added.returncode == 0, added.stderr
    wait_until(
        lambda: len(scheduled(postgres_url, "tick")) >= 5,
        timeout=60,
        what="five ticks",
    )
    # One broker stops; the other goes on with the schedule.
    first.stop()
    stopped_at = time.time()
    wait_until(
        lambda: scheduled(postgres_url, "tick")[-1] > stopped_at + 3,
        timeout=60,
        what="ticks after a broker stopped",
    )
    ticks = scheduled(postgres_url, "tick")
    # Each tick once, none skipped, a second apart.
    assert len(set(ticks)) == len(ticks)
    assert [round(b - a, 6) for a, b in zip(ticks, ticks[1:])] == [1.0] * (
        len(ticks) - 1
    )
    # Each tick was handled by one broker, as their logs say.
    logged = [
        int(n)
        for daemon in (first, second)
        for n in re.findall(
            r"schedule tick: task (\d+) for the tick", daemon.output()
        )
    ]
    assert sorted(logged) == sorted(set(logged))
    assert len(logged) == len(ticks)
    cluster.endpoint = second_endpoint
    listed = json.loads(cluster.cli("schedule", "list", "--json").stdout)
    assert [
        (s["name"], s["every"], s["last_task_id"] is not None) for s in listed
    ] == [("tick", 1, True)]


def test_a_cron_schedule_in_a_time_zone(cluster):
    cluster.start_broker()
    added = cluster.cli(
        "schedule",
        "add",
        "report",
        "--cron",
        "30 9 * * mon-fri",
        "--timezone",
        "Europe/Paris",
        "report",
        "--json",
    )
    assert added.returncode == 0, added.stderr
    schedule = json.loads(added.stdout)
    tick = datetime.fromisoformat(schedule["next_tick"])
    paris = tick.astimezone(ZoneInfo("Europe/Paris"))
    assert (paris.hour, paris.minute, paris.weekday() < 5) == (9, 30, True)


def insert_history(url_or_path, count, finished_ago, sql_placeholder):
    """
    ``count`` succeeded tasks that finished ``finished_ago`` seconds ago,
    as another program's INSERT would write them.
    """
    now = time.time()
    rows = [
        (
            "echo",
            "null",
            "succeeded",
            1,
            now - finished_ago - 1,
            now - finished_ago - 1,
            now - finished_ago,
        )
    ] * count
    p = sql_placeholder
    statement = (
        "INSERT INTO tasks (handler, payload, state, attempts, created_at, "
        f"started_at, finished_at) VALUES ({p}, {p}, {p}, {p}, {p}, {p}, {p})"
    )
    if p == "?":
        import sqlite3

        with closing(sqlite3.connect(url_or_path)) as db, db:
            db.executemany(statement, rows)
    else:
        with connect(url_or_path) as db:
            with db.cursor() as cursor:
                cursor.executemany(statement, rows)


def counts(url):
    with connect(url) as connection:
        return dict(
            connection.execute(
                "SELECT state, count(*) FROM tasks GROUP BY state"
            ).fetchall()
        )


def test_retention_on_two_postgresql_brokers(cluster, postgres_url):
    # The tables are made by the first broker; its history is made next.
    first = cluster.start_broker(
        *HEARTBEAT, *LEASE, "--keep-finished", "none", database=postgres_url
    )
    first.wait_for("finished tasks are kept for ever \\(--keep-finished\\)")
    insert_history(postgres_url, 3000, 2 * 86400, "%s")
    insert_history(postgres_url, 5, 3600, "%s")
    assert counts(postgres_url) == {"succeeded": 3005}
    # Two brokers that keep a day delete the old ones between them, a
    # batch at a time, and keep the recent ones.
    brokers = [
        cluster.start_broker(
            *HEARTBEAT, *LEASE, "--keep-finished", "1d", database=postgres_url
        )
        for _ in range(2)
    ]
    brokers[0].wait_for(
        "finished tasks are deleted 1d after they finish \\(--keep-finished\\)"
    )
    wait_until(
        lambda: counts(postgres_url) == {"succeeded": 5},
        timeout=60,
        what="the old tasks deleted",
    )
    # Each round says what it deleted once its last batch committed.

    def logged():
        return sum(
            int(n)
            for broker in brokers
            for n in re.findall(
                r"deleted (\d+) tasks that finished over 1d ago",
                broker.output(),
            )
        )

    wait_until(lambda: logged() == 3000, timeout=60, what="rounds logged")
    assert counts(postgres_url) == {"succeeded": 5}


def test_retention_purge_and_bulk_changes_on_sqlite(cluster):
    broker = cluster.start_broker()
    # A new database keeps a week, and says so.
    broker.wait_for(
        "finished tasks are deleted 7d after they finish \\("
        "the database's default; --keep-finished changes it\\)"
    )
    # History written while no broker runs (one that runs may delete it
    # at once).
    broker.stop()
    path = f"{cluster.folder}/tasks.sqlite"
    insert_history(path, 20, 8 * 86400, "?")
    insert_history(path, 3, 86400, "?")
    broker = cluster.start_broker()
    broker.wait_for(r"deleted 20 tasks that finished over 7d ago")

    # By hand: purge what finished over an hour ago.
    purged = cluster.cli("purge", "--older-than", "1h")
    assert (purged.returncode, purged.stdout) == (0, "deleted 3 tasks\n")

    # Bulk cancel and retry, with a count and --yes.
    for _ in range(4):
        cluster.cli("submit", "nobody")
    asked = cluster.cli("cancel", "--state", "queued", "--handler", "nobody")
    assert asked.returncode == 2
    assert (
        "cancel 4 queued tasks of handler nobody: not on a terminal"
        in asked.stderr
    )
    done = cluster.cli(
        "cancel", "--state", "queued", "--handler", "nobody", "--yes"
    )
    assert (done.returncode, done.stdout) == (
        0,
        "cancelled 4 queued tasks of handler nobody\n",
    )
    done = cluster.cli("retry", "--state", "cancelled", "--yes")
    assert (done.returncode, done.stdout) == (
        0,
        "queued again 4 cancelled tasks\n",
    )
    listed = json.loads(cluster.cli("list", "--json").stdout)
    assert [task["state"] for task in listed] == ["queued"] * 4


@pytest.mark.parametrize(
    "value, message",
    [
        ("59", "--keep-finished: must be at least 1m and at most 100 years"),
        (
            "7w",
            "--keep-finished: expected seconds or a number with s, m, h or d",
        ),
    ],
)
def test_a_bad_keep_finished_is_one_line(cluster, value, message):
    broker = cluster.start_broker("--keep-finished", value, wait=False)
    broker.wait_exit()
    assert message in broker.output()
    assert "Traceback" not in broker.output()
