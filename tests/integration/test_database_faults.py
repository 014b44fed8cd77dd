"""
Database faults with real daemons: database files that the broker cannot
write.

After each one: nothing is acknowledged that the database does not hold;
where the broker must exit, it exits 1 with one critical line; and after a
correct restart every acknowledged task reaches exactly one final state
and a new task finishes within a few seconds (:func:`still_serves`).

Tests that need a user other than root (root ignores file modes) run the
broker under ``setpriv`` as ``nobody``, in a folder under ``/tmp`` that
this user may enter (pytest's ``tmp_path`` sits in folders only root may
enter).
"""

import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile

import pytest

from taskbroker.client.blocking import BlockingClient

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
            [{"handler": handler, "payload": payload}] * count)
    return [task["id"] for task in tasks]


def critical_lines(daemon):
    return [line.split("#critical] ", 1)[1] for line in daemon.lines
            if "#critical] " in line]


def exits_with_one_line(daemon):
    """
    :returns: the one critical line of a daemon that exited 1.
    """
    assert daemon.wait_exit() == 1, daemon.output()
    [line] = critical_lines(daemon)
    return line


# Files the broker's user cannot write (root writes anything)


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
        pytest.skip("needs setpriv to run the broker as another user")
    nobody = pwd.getpwnam("nobody")
    prefix = ("setpriv", f"--reuid={nobody.pw_uid}",
              f"--regid={nobody.pw_gid}", "--clear-groups")
    probe = subprocess.run(
        [*prefix, sys.executable, "-c", "import taskbroker.broker.tap"],
        cwd="/", capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip("nobody cannot run this Python: " + probe.stderr[-200:])
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
        open_cluster, other_user):
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
        "the folder it is in, and the -wal and -shm files next to it")
    os.chmod(path, 0o644)
    cluster.start_broker(*HEARTBEAT, prefix=prefix)
    cluster.start_worker(*HEARTBEAT, name="w1")
    still_serves(cluster, acknowledged)


def test_an_shm_file_the_broker_cannot_write_is_refused_at_start(
        open_cluster, other_user):
    cluster, (prefix, user, uid, gid) = open_cluster, other_user
    if os.geteuid() != 0:
        pytest.skip("needs root to give the -shm file to another user")
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
        "the folder it is in, and the -wal and -shm files next to it")
    os.chown(shm, uid, gid)
    cluster.start_broker(*HEARTBEAT, prefix=prefix)
    cluster.start_worker(*HEARTBEAT, name="w1")
    still_serves(cluster, acknowledged)
