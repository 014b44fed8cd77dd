"""
Database faults with real daemons: the database's files removed, moved,
replaced, made read-only, damaged or truncated under the broker, and
writes that fail for a while.

After each one: nothing is acknowledged that the database does not hold;
where the broker must exit, it exits 1 with one critical line; and after a
correct restart every acknowledged task reaches exactly one final state
and a new task finishes within a few seconds (:func:`still_serves`).

Tests that need a user other than root (root ignores file modes) run the
broker under ``setpriv`` as ``nobody``, in a folder under ``/tmp`` that
this user may enter (pytest's ``tmp_path`` sits in folders only root may
enter).
"""

import glob
import os
import pwd
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
from contextlib import closing

import pytest

from taskbroker.client.blocking import BlockingClient
from taskbroker.client.errors import BrokerUnavailable, RequestFailed
from tests.damage import damage_index_pages

from .daemons import Cluster
from .test_hardening import still_serves

HEARTBEAT = ("--heartbeat", "0.2")


def database(cluster):
    return os.path.join(cluster.folder, "tasks.sqlite")


def submit(cluster, count, handler="echo", payload=None):
    """
    :returns: the ids of ``count`` tasks, each acknowledged.
    """
    with BlockingClient(cluster.endpoint) as client:
        tasks, _ = client.submit_many(
            [{"handler": handler, "payload": payload}] * count
        )
    return [task["id"] for task in tasks]


def submits_after_a_fault(cluster, count):
    """
    Try up to ``count`` submits, one at a time, while the broker runs.

    :returns: the ids of those acknowledged.
    """
    acknowledged = []
    with BlockingClient(cluster.endpoint, timeout=2, retries=0) as client:
        for n in range(count):
            if not cluster.broker.alive():
                break
            try:
                task, _ = client.submit("echo", n)
            except (BrokerUnavailable, RequestFailed):
                continue
            acknowledged.append(task["id"])
    return acknowledged


def critical_lines(daemon):
    return [
        line.split("#critical] ", 1)[1]
        for line in daemon.lines
        if "#critical] " in line
    ]


def exits_with_one_line(daemon):
    """
    :returns: the one critical line of a daemon that exited 1.
    """
    assert daemon.wait_exit() == 1, daemon.output()
    [line] = critical_lines(daemon)
    return line


# Files removed, moved or replaced while the broker runs


def test_database_files_deleted_under_the_broker(cluster):
    cluster.start_broker(*HEARTBEAT)
    cluster.start_worker(*HEARTBEAT, name="w1")
    still_serves(cluster, submit(cluster, 5))
    path = database(cluster)
    for name in glob.glob(path + "*"):  # the lock file too
        os.unlink(name)
    # Before: 20 more submits acknowledged, then lost with the file.
    assert submits_after_a_fault(cluster, 20) == []
    assert exits_with_one_line(cluster.broker) == (
        f"taskbroker stopping: database {path} was removed while the broker "
        "was using it"
    )
    # Before: a restart created an empty database without a word.
    refused = cluster.start_broker(
        *HEARTBEAT, listen=cluster.endpoint, wait=False
    )
    assert exits_with_one_line(refused) == (
        f"taskbroker cannot start: database {path} does not exist, but its "
        f"lock file {path}.lock does: the database was probably deleted or "
        "moved; put it back, or start the broker with --create-database to "
        "begin with an empty one"
    )
    assert not os.path.exists(path)
    cluster.start_broker(
        *HEARTBEAT, "--create-database", listen=cluster.endpoint
    )
    still_serves(cluster)


@pytest.mark.parametrize("fault", ["moved away", "replaced"])
def test_a_database_moved_or_replaced_under_the_broker_loses_nothing(
    cluster, fault
):
    cluster.start_broker(*HEARTBEAT)
    cluster.start_worker(*HEARTBEAT, name="w1")
    # Still queued or running when the file goes.
    acknowledged = submit(cluster, 10, "sleep", {"seconds": 0.2})
    path = database(cluster)
    if fault == "moved away":
        os.rename(path, path + ".moved")
    else:
        os.link(path, path + ".orig")
        with closing(sqlite3.connect(path + ".new")) as other:
            other.execute("CREATE TABLE t (a)")
        os.replace(path + ".new", path)
    assert submits_after_a_fault(cluster, 20) == []
    line = exits_with_one_line(cluster.broker)
    seen_as = {"moved away": "removed", "replaced": "replaced"}[fault]
    assert line.startswith(
        f"taskbroker stopping: database {path} was "
        f"{seen_as} while the broker was using it"
    )
    # Put back as it was, the database holds every acknowledged task.
    os.replace(path + (".moved" if fault == "moved away" else ".orig"), path)
    cluster.start_broker(*HEARTBEAT, listen=cluster.endpoint)
    done = still_serves(cluster, acknowledged)
    assert {task["state"] for task in done} == {"succeeded"}


# Files the broker's user cannot write (root writes anything)


def cannot(reason):
    """
    Skip a test this machine cannot run; under CI (``CI=true``), where the
    machine is set up for the whole suite, fail it instead.
    """
    if os.environ.get("CI") == "true":
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture
def other_user():
    """
    The command prefix that runs a daemon as ``nobody`` (nothing when the
    tests already run as someone other than root), and that user's name
    and ids.
    """
    if os.geteuid() != 0:
        me = pwd.getpwuid(os.geteuid())
        return (), me.pw_name, me.pw_uid, me.pw_gid
    if shutil.which("setpriv") is None:
        cannot("needs setpriv to run the broker as another user")
    nobody = pwd.getpwnam("nobody")
    prefix = (
        "setpriv",
        f"--reuid={nobody.pw_uid}",
        f"--regid={nobody.pw_gid}",
        "--clear-groups",
    )
    probe = subprocess.run(
        [*prefix, sys.executable, "-c", "import taskbroker.broker.tap"],
        cwd="/",
        capture_output=True,
        text=True,
    )
    if probe.returncode != 0:
        cannot("nobody cannot run this Python: " + probe.stderr[-200:])
    return prefix, nobody.pw_name, nobody.pw_uid, nobody.pw_gid


@pytest.fixture
def open_cluster(other_user):
    """
    A cluster in a folder of ``other_user``'s, under ``/tmp``.
    """
    _, _, uid, gid = other_user
    folder = tempfile.mkdtemp(prefix="taskbroker-faults-")
    os.chmod(folder, 0o755)
    os.chown(folder, uid, gid)
    cluster = Cluster(folder)
    try:
        yield cluster
    finally:
        cluster.stop_all()
        shutil.rmtree(folder, ignore_errors=True)


def test_a_database_the_broker_cannot_write_is_refused_at_start(
    open_cluster, other_user
):
    cluster, (prefix, user, _, _) = open_cluster, other_user
    cluster.start_broker(*HEARTBEAT, prefix=prefix)
    acknowledged = submit(cluster, 5)
    cluster.broker.stop()
    path = database(cluster)
    os.chmod(path, 0o444)
    # Before: "ready", stats answered, every write "unavailable".
    refused = cluster.start_broker(*HEARTBEAT, prefix=prefix, wait=False)
    assert exits_with_one_line(refused) == (
        f"taskbroker cannot start: cannot write {path} as user {user}: "
        "permission denied; the broker must be able to write its database, "
        "the folder it is in, and the -wal and -shm files next to it"
    )
    os.chmod(path, 0o644)
    cluster.start_broker(*HEARTBEAT, prefix=prefix)
    cluster.start_worker(*HEARTBEAT, name="w1")
    still_serves(cluster, acknowledged)


def test_an_shm_file_the_broker_cannot_write_is_refused_at_start(
    open_cluster, other_user
):
    cluster, (prefix, user, uid, gid) = open_cluster, other_user
    if os.geteuid() != 0:
        cannot("needs root to give the -shm file to another user")
    cluster.start_broker(*HEARTBEAT, prefix=prefix)
    acknowledged = submit(cluster, 5)
    # Killed, the broker leaves its -wal and -shm files; one that another
    # user's program (root's sqlite3) made its own cannot be written.
    cluster.broker.signal(signal.SIGKILL)
    cluster.broker.wait_exit()
    shm = database(cluster) + "-shm"
    os.chown(shm, 0, 0)
    os.chmod(shm, 0o644)
    refused = cluster.start_broker(*HEARTBEAT, prefix=prefix, wait=False)
    assert exits_with_one_line(refused) == (
        f"taskbroker cannot start: cannot write {shm} as user {user}: "
        "permission denied; the broker must be able to write its database, "
        "the folder it is in, and the -wal and -shm files next to it"
    )
    os.chown(shm, uid, gid)
    cluster.start_broker(*HEARTBEAT, prefix=prefix)
    cluster.start_worker(*HEARTBEAT, name="w1")
    still_serves(cluster, acknowledged)


# The -shm file truncated under the broker


def test_an_shm_file_truncated_under_the_broker_ends_it_with_sigbus(cluster):
    """
    SQLite maps the -shm file into memory; cut short, the mapping's pages
    no longer exist and the next look at them ends the process with
    SIGBUS, which no code can catch.  Python's fault handler says so on
    standard error, and nothing acknowledged is lost: the -wal file holds
    every commit, and the next broker rebuilds the -shm from it.
    """
    cluster.start_broker(*HEARTBEAT)
    acknowledged = submit(cluster, 5)
    os.truncate(database(cluster) + "-shm", 0)
    assert submits_after_a_fault(cluster, 20) == []
    assert cluster.broker.wait_exit() == -signal.SIGBUS
    output = cluster.broker.output(200)
    assert "Fatal Python error: Bus error" in output
    assert "taskbroker/store/" in output.split("Current thread")[1]
    cluster.start_broker(*HEARTBEAT, listen=cluster.endpoint)
    cluster.start_worker(*HEARTBEAT, name="w1")
    still_serves(cluster, acknowledged)


# Damage


def test_a_damaged_database_stops_the_broker_once_it_listens(cluster):
    cluster.start_broker(*HEARTBEAT)
    acknowledged = submit(cluster, 1000, payload="x" * 500)
    cluster.broker.stop()
    path = database(cluster)
    damage_index_pages(path)
    # Before: "ready", then "try again" for ever.  The check starts once
    # the broker listens, so as not to delay the first dispatch.
    broker = cluster.start_broker(*HEARTBEAT)
    line = exits_with_one_line(broker)
    assert line.startswith(
        f"taskbroker stopping: database {path} is "
        "damaged: PRAGMA quick_check found: Page "
    )
    assert "btreeInitPage() returns error code 11" in line
    if shutil.which("sqlite3") is None:
        return  # the recovery the docs describe needs the sqlite3 program
    # Recovered as the docs say, the database holds every task.
    subprocess.run(
        f"sqlite3 {path} .dump | sqlite3 {path}.recovered",
        shell=True,
        check=True,
        cwd=cluster.folder,
    )
    os.replace(path + ".recovered", path)
    for suffix in ("-wal", "-shm"):
        if os.path.exists(path + suffix):
            os.unlink(path + suffix)
    cluster.start_broker(*HEARTBEAT, listen=cluster.endpoint)
    cluster.start_worker(*HEARTBEAT, "--concurrency", "4", name="w1")
    done = still_serves(cluster, acknowledged)
    assert len(done) == 1000


# Writes that fail for a while


def test_health_tells_accepting_work_from_up_but_cannot_write(cluster):
    cluster.start_broker(*HEARTBEAT)
    cluster.start_worker(*HEARTBEAT, name="w1")
    healthy = cluster.cli("health")
    assert (healthy.returncode, healthy.stdout) == (0, "accepting work\n")
    path = database(cluster)
    with closing(sqlite3.connect(path, isolation_level=None)) as other:
        # Another program holds the write lock for longer than the
        # broker's 5 s busy timeout.
        other.execute("BEGIN IMMEDIATE")
        refused = cluster.cli("submit", "echo", "--timeout", "10")
        assert refused.returncode == 3
        sick = cluster.cli("health")
        assert (sick.returncode, sick.stdout) == (3, "")
        assert sick.stderr == (
            f"taskbroker: up but cannot write: database {path}: transaction "
            "failed: database is locked\n"
        )
        stats = cluster.cli("stats", "--json")
        assert '"accepting_work":false' in stats.stdout
        mark = cluster.broker.mark()
        other.execute("ROLLBACK")
    # Nobody writes: the broker finds out by itself.
    cluster.broker.wait_for(r"writes to database \S+ work again", start=mark)
    assert cluster.cli("health").returncode == 0
    still_serves(cluster)
