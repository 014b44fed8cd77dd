"""
Several real brokers on one PostgreSQL database (a schema of the test's
own, tests/postgres.py): they share the work without ever running a task
twice, take over from a broker that went away, and survive losing the
database for a while.

Daemons run with a fast heartbeat (0.2 s, 3 misses) and a short lease
(2 s) so that the suite stays quick.
"""

import signal
import threading
import time
from datetime import datetime
from urllib.parse import urlsplit

import pytest

from taskbroker.client.blocking import BlockingClient
from taskbroker.failover import start_position
from tests.integration.test_faults import check_promises, events, running_on
from tests.postgres import connect
from tests.proxy import Proxy

HEARTBEAT = ("--heartbeat", "0.2")
LEASE = ("--lease", "2")
#: How long a lapsed broker's running tasks wait for their workers:
#: RECONNECT_WAIT plus twice the allowance.
GRACE = 2.0 + 2 * 0.6
SLOTS = ("--concurrency", "1")


@pytest.fixture
def record(tmp_path):
    folder = tmp_path / "record"
    folder.mkdir()
    return folder


def start_brokers(cluster, url, count):
    brokers = []
    for _ in range(count):
        daemon = cluster.start_broker(*HEARTBEAT, *LEASE, database=url)
        brokers.append((daemon, cluster.endpoint))
    return brokers


def start_worker(cluster, endpoint, name, record, failover=(), args=()):
    """
    Start a worker that starts at ``endpoint``; with ``failover`` (more
    endpoints) it moves down the list when it loses its broker.
    """
    endpoints = [endpoint, *failover]
    # Rotated so that the worker's name picks ``endpoint`` first.
    first = start_position(name, len(endpoints))
    endpoints = endpoints[-first:] + endpoints[:-first] if first else endpoints
    cluster.endpoint = ",".join(endpoints)
    return cluster.start_worker(
        *HEARTBEAT,
        *SLOTS,
        *args,
        name=name,
        env={"TASKBROKER_TEST_RECORD": str(record)},
    )


def wait_until(condition, timeout=120, what="the condition"):
    """
    Check ``condition`` every 50 ms until it holds.
    """
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def states(url):
    with connect(url) as connection:
        return dict(
            connection.execute(
                "SELECT state, count(*) FROM tasks GROUP BY state"
            ).fetchall()
        )


@pytest.mark.parametrize("brokers", [2, 3])
def test_brokers_share_the_work_and_run_each_task_once(
    cluster, postgres_url, record, brokers
):
    started = start_brokers(cluster, postgres_url, brokers)
    for i in range(6):
        start_worker(cluster, started[i % brokers][1], f"w{i}", record)
    total = 5000
    by_sql = 1000
    submitted = []

    def submit(endpoint, count):
        with BlockingClient(endpoint, timeout=30) as client:
            for start in range(0, count, 500):
                tasks, _ = client.submit_many(
                    [{"handler": "record"}] * min(500, count - start)
                )
                submitted.extend(tasks)

    share, extra = divmod(total - by_sql, brokers)
    threads = [
        threading.Thread(target=submit, args=(endpoint, share + (i < extra)))
        for i, (_, endpoint) in enumerate(started)
    ]
    for thread in threads:
        thread.start()
    with connect(postgres_url) as connection:
        for _ in range(by_sql // 100):
            connection.execute(
                "INSERT INTO tasks (handler, payload) "
                "SELECT 'record', '{}' FROM generate_series(1, 100)"
            )
    for thread in threads:
        thread.join()
    assert len(submitted) == total - by_sql
    wait_until(
        lambda: states(postgres_url) == {"succeeded": total},
        what=f"{total} tasks to succeed",
    )
    starts = [e for e in events(record) if e["event"] == "start"]
    by_task = {}
    for e in starts:
        by_task.setdefault(e["task"], []).append(e)
    assert len(by_task) == total
    twice = {task: runs for task, runs in by_task.items() if len(runs) > 1}
    assert twice == {}
    # Every broker dispatched some of them.
    with connect(postgres_url) as connection:
        owners = connection.execute(
            "SELECT count(DISTINCT owner) FROM tasks"
        ).fetchone()[0]
    assert owners == brokers


def test_a_paused_broker_past_its_lease_starts_over(
    cluster, postgres_url, record
):
    (a, a_endpoint), (b, b_endpoint) = start_brokers(cluster, postgres_url, 2)
    wa = start_worker(cluster, a_endpoint, "wa", record, [b_endpoint])
    start_worker(cluster, b_endpoint, "wb", record, [a_endpoint])
    with BlockingClient(a_endpoint) as client:
        task, _ = client.submit("record", {"seconds": 6})
        assert running_on(client, task["id"])["worker"] == "wa"
    mark = b.mark()
    a.signal(signal.SIGSTOP)
    try:
        # wa misses a's heartbeats and moves to b with its attempt, which
        # b adopts once a's lease lapsed: the task is not run again.
        wa.wait_for(r"leaving broker")
        b.wait_for(rf"adopted task {task['id']}", start=mark, timeout=30)
        mark = a.mark()
    finally:
        a.signal(signal.SIGCONT)
    # a finds its lease lapsed, starts over, and goes on serving.
    a.wait_for(r"claims lapsed", start=mark)
    with BlockingClient(b_endpoint) as client:
        [done] = check_promises(client, [task], record)
    assert (done["worker"], done["result"]["token"]) == ("wa", 1)
    starts = [e for e in events(record) if e["event"] == "start"]
    assert len(starts) == 1
    with BlockingClient(a_endpoint) as client:
        late, _ = client.submit("record", {})
        assert client.wait(late["id"], timeout=60)["state"] == "succeeded"


def test_a_killed_brokers_tasks_are_finished_by_the_others(
    cluster, postgres_url, record
):
    started = start_brokers(cluster, postgres_url, 3)
    endpoints = [endpoint for _, endpoint in started]
    for i in range(6):
        home = endpoints[i % 3]
        start_worker(
            cluster, home, f"w{i}", record, [e for e in endpoints if e != home]
        )
    victim, victim_endpoint = started[0]
    with BlockingClient(victim_endpoint, timeout=10) as client:
        tasks, _ = client.submit_many(
            [{"handler": "record", "payload": {"seconds": 1}}] * 6
            + [{"handler": "record", "payload": {"seconds": 0.01}}] * 300
        )
        running_on(client, tasks[0]["id"])
    killed_at = time.time()
    victim.signal(signal.SIGKILL)
    victim.wait_exit()
    with BlockingClient(",".join(endpoints[1:]), timeout=10) as client:
        done = check_promises(client, tasks, record)
    finished = max(
        datetime.fromisoformat(t["finished_at"]).timestamp() for t in done
    )
    print(
        f"\nbroker SIGKILL -> all its tasks done by the others: "
        f"{finished - killed_at:.2f} s (lease 2 s, heartbeat 0.2 s)"
    )
    # Each task started once, but for attempts running when it died.
    starts = {}
    for e in events(record):
        if e["event"] == "start":
            starts[e["task"]] = starts.get(e["task"], 0) + 1
    assert len(starts) == len(tasks)
    assert sum(n > 1 for n in starts.values()) <= 2 * 3


def proxied(url, proxy):
    """
    ``url`` with its host and port replaced by the proxy's.
    """
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)
    user = netloc[0] + "@" if len(netloc) == 2 else ""
    return parts._replace(netloc=f"{user}127.0.0.1:{proxy.port}").geturl()


def server_of(url):
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or 5432


def test_a_broker_cut_off_from_the_database_pauses_and_resumes(
    cluster, postgres_url, record
):
    with Proxy(*server_of(postgres_url)) as proxy:
        url = proxied(postgres_url, proxy)
        broker = cluster.start_broker(*HEARTBEAT, *LEASE, database=url)
        for i in range(2):
            start_worker(cluster, cluster.endpoint, f"w{i}", record)
        with BlockingClient(cluster.endpoint, timeout=10) as client:
            tasks, _ = client.submit_many(
                [{"handler": "record", "payload": {"seconds": 0.05}}] * 60
            )
            mark = broker.mark()
            proxy.sever()
            broker.wait_for(r"dispatch paused", start=mark)
            proxy.restore()
            broker.wait_for(r"work again", start=mark)
            check_promises(client, tasks, record)
    starts = [e["task"] for e in events(record) if e["event"] == "start"]
    assert sorted(set(starts)) == sorted(t["id"] for t in tasks)


def test_a_broker_cut_off_from_the_database_but_not_its_workers(
    cluster, postgres_url, record
):
    with Proxy(*server_of(postgres_url)) as proxy:
        a = cluster.start_broker(
            *HEARTBEAT, *LEASE, database=proxied(postgres_url, proxy)
        )
        a_endpoint = cluster.endpoint
        b = cluster.start_broker(*HEARTBEAT, *LEASE, database=postgres_url)
        b_endpoint = cluster.endpoint
        wa = start_worker(
            cluster,
            a_endpoint,
            "wa",
            record,
            [b_endpoint],
            args=("--failover-after", "1"),
        )
        start_worker(cluster, b_endpoint, "wb", record, [a_endpoint])
        with BlockingClient(a_endpoint) as client:
            task, _ = client.submit("record", {"seconds": 5})
            assert running_on(client, task["id"])["worker"] == "wa"
        mark = b.mark()
        a_mark = a.mark()
        proxy.sever()
        # a's heartbeats tell wa that a cannot write; wa moves to b with
        # its attempt, which b adopts once a's lease lapsed.
        wa.wait_for(r"leaving broker")
        b.wait_for(rf"adopted task {task['id']}", start=mark, timeout=30)
        proxy.restore()
        a.wait_for(r"claims lapsed", start=a_mark, timeout=30)
        with BlockingClient(b_endpoint) as client:
            [done] = check_promises(client, [task], record)
        assert (done["worker"], done["result"]["token"]) == ("wa", 1)
        with BlockingClient(a_endpoint) as client:
            late, _ = client.submit("record", {})
            assert client.wait(late["id"], timeout=60)["state"] == "succeeded"
