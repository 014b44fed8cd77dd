"""
Failover lists against real daemons: two SQLite brokers, each with its
own database file, stand in for brokers sharing one database.  A worker
given both starts on the one its name points to and moves to the other
when that one is stopped; the command line given both submits through
the one that answers; a worker leaves a broker that cannot write its
database.
"""

import os
import re
import signal
import sqlite3
from contextlib import closing

import pytest

from taskbroker.client.blocking import BlockingClient
from taskbroker.client.errors import RequestFailed
from taskbroker.failover import start_position

HEARTBEAT = ("--heartbeat", "0.2")


def two_brokers(cluster):
    """
    Start two brokers with their own databases.

    :returns: ``(daemons, endpoints)``, in the order of the list.
    """
    daemons, endpoints = [], []
    for name in ("a", "b"):
        daemons.append(
            cluster.start_broker(
                *HEARTBEAT, database=f"sqlite:///{name}.sqlite"
            )
        )
        endpoints.append(cluster.endpoint)
    cluster.endpoint = ",".join(endpoints)
    return daemons, endpoints


def run_echo(endpoint, value):
    with BlockingClient(endpoint, timeout=10) as client:
        task, _ = client.submit("echo", value)
        return client.wait(task["id"], timeout=30)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL])
def test_a_worker_moves_to_the_next_broker_when_its_own_stops(cluster, signum):
    daemons, endpoints = two_brokers(cluster)
    name = "fleet-7"
    first = start_position(name, 2)
    second = 1 - first
    worker = cluster.start_worker(*HEARTBEAT, name=name, wait=False)
    started = worker.wait_for(r"welcomed by broker \S+ at (\S+)")
    assert started.group(1) == endpoints[first]

    done = run_echo(endpoints[first], {"on": "first"})
    assert (done["state"], done["worker"]) == ("succeeded", name)

    mark = worker.mark()
    daemons[first].signal(signum)
    daemons[first].wait_exit()
    moved = worker.wait_for(r"leaving broker (\S+) for (\S+): ", start=mark)
    assert moved.groups() == (endpoints[first], endpoints[second])
    welcomed = worker.wait_for(
        r"welcomed by broker \S+ at (\S+)", start=worker.after_match
    )
    assert welcomed.group(1) == endpoints[second]

    done = run_echo(endpoints[second], {"on": "second"})
    assert (done["state"], done["result"], done["worker"]) == (
        "succeeded",
        {"on": "second"},
        name,
    )


def test_a_worker_leaves_a_broker_that_cannot_write_its_database(cluster):
    daemons, endpoints = two_brokers(cluster)
    name = "fleet-3"
    first = start_position(name, 2)
    second = 1 - first
    worker = cluster.start_worker(
        *HEARTBEAT, "--failover-after", "1", name=name, wait=False
    )
    assert (
        worker.wait_for(r"welcomed by broker \S+ at (\S+)").group(1)
        == (endpoints[first])
    )
    path = os.path.join(cluster.folder, "ab"[first] + ".sqlite")
    with closing(sqlite3.connect(path, isolation_level=None)) as other:
        # Another program holds the write lock for longer than the
        # broker's busy timeout: the broker's next write fails.
        other.execute("BEGIN IMMEDIATE")
        mark = worker.mark()
        with BlockingClient(endpoints[first], timeout=10, retries=0) as client:
            with pytest.raises(RequestFailed) as refused:
                client.submit("echo")
        assert refused.value.code == "unavailable"
        worker.wait_for(r"broker \S+ cannot write its database", start=mark)
        moved = worker.wait_for(
            r"leaving broker (\S+) for (\S+): its "
            r"database has been failing",
            start=mark,
        )
        other.execute("ROLLBACK")
    assert moved.groups() == (endpoints[first], endpoints[second])
    worker.wait_for(
        r"welcomed by broker \S+ at " + re.escape(endpoints[second]),
        start=worker.after_match,
    )
    done = run_echo(endpoints[second], "still served")
    assert (done["state"], done["worker"]) == ("succeeded", name)


def test_the_command_line_submits_through_the_broker_that_answers(cluster):
    daemons, endpoints = two_brokers(cluster)
    cluster.start_worker(*HEARTBEAT, "--broker", endpoints[1], name="on-b")
    daemons[0].signal(signal.SIGTERM)
    daemons[0].wait_exit()
    # The command starts at a random broker of the list: run it a few
    # times, so that it starts at the stopped one too.
    for n in range(4):
        result = cluster.cli(
            "--timeout", "1", "submit", "echo", "--payload", str(n), "--wait"
        )
        assert result.returncode == 0, result.stderr
    with BlockingClient(endpoints[1], timeout=10) as client:
        tasks = client.list(state="succeeded")
    assert [t["result"] for t in tasks] == [0, 1, 2, 3]
    assert {t["worker"] for t in tasks} == {"on-b"}


def test_a_bad_failover_list_is_one_line(cluster):
    cluster.endpoint = "tcp://127.0.0.1:1,tcp://127.0.0.1:1"
    worker = cluster.start_worker(name="w", wait=False, handlers=False)
    assert worker.wait_exit() == 2
    assert worker.last_line() == (
        "twistd taskworker: --broker: endpoint 'tcp://127.0.0.1:1' is listed "
        "twice (got 'tcp://127.0.0.1:1,tcp://127.0.0.1:1')"
    )
