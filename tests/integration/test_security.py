"""
CURVE against a real broker: who gets in, and as what.

Peers here are raw pyzmq DEALER sockets, so that each test sets exactly
the keys it means to (or none), and then real workers and ``taskbroker``
commands given their keys.
"""

import json
import os
import re
import signal
import sqlite3
import subprocess

import pytest
import pytest_twisted
import zmq

from taskbroker import curve
from taskbroker.client.api import BrokerClient
from taskbroker.client.blocking import BlockingClient
from taskbroker.protocol import codec
from tests.integration.daemons import CLI, clean_environment
from tests.proxy import Proxy

#: Milliseconds a refused peer is given to get an answer it must not get.
SILENCE_MS = 1500


@pytest.fixture
def keys(tmp_path):
    """
    A folder of key pairs (broker, w1, c1, c2, ops, stranger) and the
    broker's authorization folders: w1 may work, c1 and c2 may ask, ops
    is an admin.
    """
    folder = tmp_path / "keys"
    for name in ("broker", "w1", "c1", "c2", "ops", "stranger"):
        curve.keygen(str(folder), name)
    for role, names in (
        ("workers", ("w1",)),
        ("clients", ("c1", "c2")),
        ("admins", ("ops",)),
    ):
        (tmp_path / role).mkdir()
        for name in names:
            os.link(folder / f"{name}.key", tmp_path / role / f"{name}.key")
    return tmp_path


def curve_broker(cluster, keys, *extra):
    return cluster.start_broker(
        "--curve-secret-key",
        str(keys / "keys" / "broker.key_secret"),
        "--authorized-workers",
        str(keys / "workers"),
        "--authorized-clients",
        str(keys / "clients"),
        "--admin-clients",
        str(keys / "admins"),
        *extra,
    )


class Peer:
    """
    A DEALER connected to the broker, with the key pair ``name`` (or
    without CURVE when ``name`` is ``None``).
    """

    def __init__(
        self,
        cluster,
        keys,
        name,
        server="broker",
        endpoint=None,
        identity=None,
    ):
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        if identity is not None:
            self.socket.setsockopt(zmq.ROUTING_ID, identity)
        if name is not None:
            public, secret = curve.load_secret(
                str(keys / "keys" / f"{name}.key_secret"), "test"
            )
            self.socket.curve_serverkey = curve.load_public(
                str(keys / "keys" / f"{server}.key"), "test"
            )
            self.socket.curve_publickey = public
            self.socket.curve_secretkey = secret
        self.socket.connect(endpoint or cluster.endpoint)

    def ask(self, command, body, timeout=5000):
        """
        :returns: ``(command, body)`` of the answer, or ``None``.
        """
        self.socket.send_multipart(codec.encode(command, body))
        if not self.socket.poll(timeout):
            return None
        frames = self.socket.recv_multipart()
        return frames[1], json.loads(frames[2])

    def close(self):
        self.socket.close()
        self.context.term()


@pytest.fixture
def peers(cluster, keys):
    opened = []

    def peer(name, **kwargs):
        opened.append(Peer(cluster, keys, name, **kwargs))
        return opened[-1]

    yield peer
    for p in opened:
        p.close()


STATS = (b"STATS", {"req": "s"})
HELLO = (
    b"HELLO",
    {"name": "intruder", "slots": 1, "handlers": ["echo"], "heartbeat": 1.0},
)


def test_an_authorized_client_is_answered(cluster, keys, peers):
    curve_broker(cluster, keys)
    command, body = peers("c1").ask(*STATS)
    assert command == b"REPLY" and body["req"] == "s"


def test_a_worker_key_may_not_ask_and_a_client_key_may_not_work(
    cluster, keys, peers
):
    broker = curve_broker(cluster, keys)
    command, body = peers("w1").ask(*STATS)
    assert (command, body["code"]) == (b"ERROR", "forbidden")
    command, body = peers("c1").ask(*HELLO)
    assert (command, body["code"], body["fatal"]) == (
        b"ERROR",
        "forbidden",
        True,
    )
    broker.wait_for(r"refused STATS from w1 \(")
    broker.wait_for(r"refused HELLO from c1 \(")


def test_unknown_keys_and_plain_peers_get_nothing(cluster, keys, peers):
    broker = curve_broker(cluster, keys)
    assert peers("stranger").ask(*STATS, timeout=SILENCE_MS) is None
    stranger = curve.load_public(str(keys / "keys" / "stranger.key"), "t")
    broker.wait_for(
        "refused a connection from .*a key not authorized, "
        "unknown key " + _escaped(stranger)
    )
    assert peers(None).ask(*STATS, timeout=SILENCE_MS) is None
    # A client that holds a good key but takes the wrong broker key for
    # the broker's gets nothing either.
    assert (
        peers("c1", server="stranger").ask(*STATS, timeout=SILENCE_MS) is None
    )
    # The broker still serves.
    assert peers("c1").ask(*STATS)[0] == b"REPLY"


def test_a_peer_without_curve_is_logged(cluster, keys, peers):
    # Its handshake fails before ZAP sees it; libzmq's monitor tells.
    broker = curve_broker(cluster, keys)
    assert peers(None).ask(*STATS, timeout=SILENCE_MS) is None
    broker.wait_for("refused a connection that failed the CURVE handshake")


def test_a_broker_with_curve_and_no_folders_refuses_to_start(cluster, keys):
    broker = cluster.start_broker(
        "--curve-secret-key",
        str(keys / "keys" / "broker.key_secret"),
        wait=False,
    )
    assert broker.wait_exit() == 2
    assert (
        "give --authorized-workers and --authorized-clients" in broker.output()
    )


def test_a_secret_key_readable_by_others_is_refused(cluster, keys):
    secret = keys / "keys" / "broker.key_secret"
    os.chmod(secret, 0o640)
    broker = cluster.start_broker(
        "--curve-secret-key",
        str(secret),
        "--authorized-clients",
        str(keys / "clients"),
        wait=False,
    )
    assert broker.wait_exit() == 2
    assert f"chmod 600 {secret}" in broker.output()


def _escaped(key):
    return re.escape(key.decode())


def test_keygen_from_the_command_line(tmp_path):
    run = subprocess.run(
        [CLI, "keygen", str(tmp_path / "k"), "--name", "node1"],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    assert (
        oct(os.stat(tmp_path / "k" / "node1.key_secret").st_mode)[-3:] == "600"
    )
    again = subprocess.run(
        [CLI, "keygen", str(tmp_path / "k"), "--name", "node1"],
        capture_output=True,
        text=True,
    )
    assert again.returncode == 2
    assert again.stderr == (
        f"taskbroker: {tmp_path / 'k' / 'node1.key'}: "
        "exists; a key is never overwritten (remove it "
        "first to replace it)\n"
    )


# -- workers and the command line with their keys ----------------------------


def key_options(keys, key, server="broker"):
    return [
        "--curve-server-key",
        str(keys / "keys" / f"{server}.key"),
        "--curve-secret-key",
        str(keys / "keys" / f"{key}.key_secret"),
    ]


def curve_worker(cluster, keys, *extra, key="w1", server="broker", **kwargs):
    return cluster.start_worker(
        *key_options(keys, key, server), *extra, **kwargs
    )


def curve_cli(cluster, keys, *args, key="c1", server="broker"):
    return cluster.cli(*key_options(keys, key, server), *args)


def test_a_worker_and_the_command_with_keys_run_a_task(cluster, keys):
    curve_broker(cluster, keys)
    curve_worker(cluster, keys, name="w1")
    run = curve_cli(
        cluster, keys, "submit", "echo", "--payload", '"x"', "--wait"
    )
    assert (run.returncode, run.stdout, run.stderr) == (0, '"x"\n', "")
    # The keys may also come from the environment; the workers are an
    # admin's to see.
    env = {
        "TASKBROKER_CLIENT_CURVE_SERVER_KEY": str(
            keys / "keys" / "broker.key"
        ),
        "TASKBROKER_CLIENT_CURVE_SECRET_KEY": str(
            keys / "keys" / "ops.key_secret"
        ),
    }
    run = subprocess.run(
        [CLI, "--broker", cluster.endpoint, "workers", "--json"],
        env=clean_environment(env),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    w1 = curve.load_public(str(keys / "keys" / "w1.key"), "t").decode()
    assert [(w["name"], w["key"]) for w in json.loads(run.stdout)] == [
        ("w1", w1)
    ]


def test_a_worker_that_trusts_another_broker_key_gets_no_task(cluster, keys):
    # The broker runs with the pair B2; the worker's key is authorized,
    # but the worker takes B1 for the broker's key.
    curve.keygen(str(keys / "keys"), "broker2")
    cluster.start_broker(
        "--curve-secret-key",
        str(keys / "keys" / "broker2.key_secret"),
        "--authorized-workers",
        str(keys / "workers"),
        "--authorized-clients",
        str(keys / "clients"),
        "--admin-clients",
        str(keys / "admins"),
    )
    submitted = curve_cli(cluster, keys, "submit", "echo", server="broker2")
    assert submitted.returncode == 0, submitted.stderr
    task_id = submitted.stdout.strip()
    worker = curve_worker(
        cluster, keys, "--heartbeat", "0.2", name="w1", wait=False
    )
    # Told after an allowance (3 x 0.2 s), then after each doubling.
    worker.wait_for(
        r"not welcomed: no answer to HELLO from broker "
        + re.escape(cluster.endpoint)
        + r" for .*curve-server-key"
    )
    worker.wait_for(r"not welcomed: ", start=worker.after_match)
    status = curve_cli(
        cluster, keys, "status", task_id, "--json", server="broker2"
    )
    assert json.loads(status.stdout)["state"] == "queued"
    workers = curve_cli(
        cluster, keys, "workers", "--json", key="ops", server="broker2"
    )
    assert json.loads(workers.stdout) == []
    assert "welcomed by broker" not in worker.output()
    assert worker.alive()


@pytest_twisted.ensureDeferred
async def test_the_python_clients_with_keys(cluster, keys):
    from twisted.internet import reactor

    curve_broker(cluster, keys)
    curve_worker(cluster, keys, name="w1")
    paths = {
        "curve_server_key": keys / "keys" / "broker.key",
        "curve_secret_key": keys / "keys" / "c1.key_secret",
    }
    client = BrokerClient(reactor, cluster.endpoint, timeout=10, **paths)
    try:
        task, _ = await client.submit("echo", {"via": "twisted"})
        done = await client.wait(task["id"])
    finally:
        await client.close()
    assert done["result"] == {"via": "twisted"}
    with BlockingClient(cluster.endpoint, timeout=10, **paths) as blocking:
        task, _ = blocking.submit("echo", {"via": "blocking"})
        assert blocking.wait(task["id"])["result"] == {"via": "blocking"}


def test_the_command_with_a_wrong_server_key_finds_no_broker(cluster, keys):
    curve_broker(cluster, keys)
    run = curve_cli(
        cluster, keys, "--timeout", "0.5", "stats", server="stranger"
    )
    assert (run.returncode, run.stdout) == (3, "")
    [line] = run.stderr.splitlines()
    assert line.startswith(
        f"taskbroker: no answer from {cluster.endpoint} within 0.5 s to STATS"
    )
    assert "with CURVE, a wrong server key" in line
    # The right key gets an answer.
    assert curve_cli(cluster, keys, "stats").returncode == 0


def test_a_worker_with_a_client_key_is_refused(cluster, keys):
    broker = curve_broker(cluster, keys)
    worker = curve_worker(cluster, keys, key="c1", name="intruder", wait=False)
    # A fatal ERROR: the worker says why and exits 1.
    assert worker.wait_exit() == 1
    assert re.search(
        r"taskworker refused by the broker: this key may not "
        r"act as a worker on this broker",
        worker.output(),
    )
    broker.wait_for(r"refused HELLO from c1 \(")


def test_a_worker_with_an_unusable_key_does_not_start(cluster, keys):
    curve_broker(cluster, keys)
    public = keys / "keys" / "w1.key"
    worker = cluster.start_worker(
        "--curve-server-key",
        str(keys / "keys" / "broker.key"),
        "--curve-secret-key",
        str(public),
        wait=False,
    )
    assert worker.wait_exit() == 2
    assert worker.output() == (
        f"twistd taskworker: --curve-secret-key: {public}: no secret key in "
        "it (a public .key file? the secret one ends in .key_secret)"
    )


def test_keys_added_and_removed_take_effect_without_a_restart(
    cluster, keys, peers
):
    broker = curve_broker(cluster, keys)
    assert peers("stranger").ask(*STATS, timeout=SILENCE_MS) is None
    os.link(keys / "keys" / "stranger.key", keys / "clients" / "stranger.key")
    broker.wait_for(r"authorized keys changed: clients \+stranger")
    late = peers("stranger")
    assert late.ask(*STATS)[0] == b"REPLY"
    os.unlink(keys / "clients" / "stranger.key")
    # SIGHUP reads the folders at once (test_tap checks that it asks;
    # the timer does within 2 s, so this step cannot tell them apart).
    mark = broker.mark()
    broker.signal(signal.SIGHUP)
    broker.wait_for(r"authorized keys changed: clients -stranger", start=mark)
    # Still connected, but refused at its next message.
    command, body = late.ask(*STATS)
    assert (command, body["code"]) == (b"ERROR", "forbidden")


@pytest.mark.parametrize("with_curve", [True, False])
def test_payloads_cross_the_wire_only_encrypted(cluster, keys, with_curve):
    # A relay between client and broker records every byte: with CURVE it
    # never sees the payload or the result; without, it does (so this
    # test can fail).
    if with_curve:
        curve_broker(cluster, keys)
    else:
        cluster.start_broker()
    host, port = cluster.endpoint[len("tcp://") :].rsplit(":", 1)
    secret = "unmistakable-payload-4f9c2a"
    with Proxy(host, int(port), record=True) as relay:
        peer = Peer(
            cluster,
            keys,
            "c1" if with_curve else None,
            endpoint=f"tcp://127.0.0.1:{relay.port}",
        )
        try:
            command, body = peer.ask(
                b"SUBMIT",
                {
                    "req": "r",
                    "tasks": [{"handler": "echo", "payload": secret}],
                },
            )
            assert command == b"REPLY"
            assert body["tasks"][0]["payload"] == secret
        finally:
            peer.close()
        seen = bytes(relay.recorded)
    assert (secret.encode() in seen) is not with_curve


def test_require_curve_refuses_to_start_without_it(cluster):
    # (The warning a broker without CURVE gives when it listens beyond
    # loopback is tested in test_broker_service: tests bind loopback only.)
    refusing = cluster.start_broker("--require-curve", wait=False)
    assert refusing.wait_exit() == 2
    assert "--require-curve: give --curve-secret-key" in refusing.output()


def test_the_fleet_set_up_of_the_security_page(cluster, tmp_path):
    # docs/security.rst, "A fleet, step by step", with its paths under
    # tmp_path: four hosts' folders, and only public files copied.
    broker_host, worker_host, app_host, ops_home = (
        tmp_path / "broker-host",
        tmp_path / "worker-host",
        tmp_path / "app-host",
        tmp_path / "ops-home",
    )
    broker_keys, worker_keys, app_keys, ops_keys = (
        broker_host / "keys",
        worker_host / "keys",
        app_host / "keys",
        ops_home / ".taskbroker",
    )

    def run(*argv):
        done = subprocess.run(
            [str(arg) for arg in argv],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        return done

    run(CLI, "keygen", broker_keys, "--name", "broker")
    run(
        "mkdir",
        broker_host / "workers",
        broker_host / "clients",
        broker_host / "admins",
    )
    run(CLI, "keygen", worker_keys, "--name", "worker-1")
    run(CLI, "keygen", app_keys, "--name", "reports")
    run(CLI, "keygen", ops_keys, "--name", "ops")
    run("cp", worker_keys / "worker-1.key", broker_host / "workers")
    run("cp", app_keys / "reports.key", broker_host / "clients")
    run("cp", ops_keys / "ops.key", broker_host / "admins")
    for keys in (worker_keys, app_keys, ops_keys):
        run("cp", broker_keys / "broker.key", keys)
    cluster.start_broker(
        "--curve-secret-key",
        str(broker_keys / "broker.key_secret"),
        "--authorized-workers",
        str(broker_host / "workers"),
        "--authorized-clients",
        str(broker_host / "clients"),
        "--admin-clients",
        str(broker_host / "admins"),
    )
    cluster.start_worker(
        "--curve-server-key",
        str(worker_keys / "broker.key"),
        "--curve-secret-key",
        str(worker_keys / "worker-1.key_secret"),
        name="worker-1",
    )
    reports, ops = (
        [
            "--curve-server-key",
            str(keys / "broker.key"),
            "--curve-secret-key",
            str(keys / f"{name}.key_secret"),
        ]
        for keys, name in ((app_keys, "reports"), (ops_keys, "ops"))
    )
    done = cluster.cli(
        *reports, "submit", "echo", "--payload", '"fleet"', "--wait"
    )
    assert (done.returncode, done.stdout) == (0, '"fleet"\n'), done.stderr
    stats = cluster.cli(*ops, "stats")
    assert stats.returncode == 0 and "workers: 1" in stats.stdout, stats
    workers = cluster.cli(*ops, "workers")
    assert workers.returncode == 0 and "worker-1" in workers.stdout, workers
    assert cluster.cli(*reports, "workers").returncode != 0


def test_a_worker_whose_key_is_removed_is_refused_at_once(
    cluster, keys, peers
):
    # Not at its next message: a worker that stays silent must get no
    # more tasks.
    broker = curve_broker(cluster, keys)
    worker = peers("w1")
    assert worker.ask(*HELLO)[0] == b"WELCOME"
    os.unlink(keys / "workers" / "w1.key")
    broker.signal(signal.SIGHUP)
    # Past the broker's heartbeats, which a worker gets every second.
    command, body = b"HEARTBEAT", b"{}"
    while command == b"HEARTBEAT" and worker.socket.poll(10_000):
        command, body = worker.socket.recv_multipart()[1:]
    assert (command, json.loads(body)["code"]) == (b"ERROR", "forbidden")
    broker.wait_for(r"worker intruder: its key .* \(w1\) was removed")


def test_each_client_key_sees_and_changes_only_its_own_tasks(cluster, keys):
    broker = curve_broker(cluster, keys)

    def cli(key, *args):
        return curve_cli(cluster, keys, *args, key=key)

    def public(name):
        return curve.load_public(
            str(keys / "keys" / f"{name}.key"), "t"
        ).decode()

    # No worker: c1's task stays queued.
    submitted = cli(
        "c1",
        "submit",
        "echo",
        "--payload",
        '"c1 secret"',
        "--unique-key",
        "nightly",
        "--json",
    )
    assert submitted.returncode == 0, submitted.stderr
    task = json.loads(submitted.stdout)
    assert task["submitter"] == public("c1")
    task_id = str(task["id"])
    for args in (
        ("status", task_id),
        ("status", task_id, "--json"),
        ("cancel", task_id),
        ("retry", task_id),
    ):
        run = cli("c2", *args)
        assert run.returncode != 0 and run.stdout == "", (args, run)
        assert f"no task with id {task_id}" in run.stderr, (args, run)
    listed = cli("c2", "list", "--json")
    assert (listed.returncode, json.loads(listed.stdout)) == (0, [])
    # A submit that meets c1's unique key learns its id, nothing more.
    again = cli("c2", "submit", "echo", "--unique-key", "nightly", "--json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout) == {"id": task["id"]}
    assert "c1 secret" not in again.stdout + again.stderr
    # The workers are the admins' to see; the counts anyone's.
    workers = cli("c2", "workers")
    assert workers.returncode != 0
    assert "listing the workers needs an admin key" in workers.stderr
    assert cli("c2", "stats").returncode == 0
    # A worker key reads nothing.
    assert cli("w1", "list").returncode != 0
    broker.wait_for(r"refused LIST from w1 \(")
    # Its submitter and an admin see and change it.
    for key in ("c1", "ops"):
        status = cli(key, "status", task_id, "--json")
        assert json.loads(status.stdout)["payload"] == "c1 secret"
        listed = json.loads(cli(key, "list", "--json").stdout)
        assert [t["id"] for t in listed] == [task["id"]]
    cancelled = cli("c1", "cancel", task_id)
    assert cancelled.returncode == 0, cancelled.stderr
    retried = cli("ops", "retry", task_id)
    assert retried.returncode == 0, retried.stderr
    # A task inserted by SQL has no submitter: it is the admins'.
    with sqlite3.connect(os.path.join(cluster.folder, "tasks.sqlite")) as db:
        db.execute("INSERT INTO tasks (handler) VALUES ('echo')")
    assert len(json.loads(cli("ops", "list", "--json").stdout)) == 2
    assert len(json.loads(cli("c1", "list", "--json").stdout)) == 1


def test_a_client_key_cannot_take_over_a_workers_route(cluster, keys, peers):
    # The broker's socket gives a route to whoever connects under its
    # routing identity (so that a worker that reconnects keeps its own).
    # What keeps a client from taking a worker's route, and its TASKs, is
    # that a worker's identity ends in 128 random bits that nothing shows.
    broker = curve_broker(cluster, keys)
    worker = curve_worker(cluster, keys, name="w1")
    ran = curve_cli(
        cluster, keys, "submit", "echo", "--payload", '"a"', "--wait"
    )
    assert ran.returncode == 0, ran.stderr
    shown = "\n".join(
        [
            broker.output(),
            worker.output(),
            curve_cli(cluster, keys, "workers", "--json", key="ops").stdout,
            curve_cli(cluster, keys, "stats", "--json", key="ops").stdout,
            curve_cli(cluster, keys, "list", "--json", key="ops").stdout,
        ]
    )
    assert '"name":"w1"' in shown
    assert not re.search(r"w1/[0-9a-f]{32}", shown), shown
    # A client that tries the identities it might guess takes no route.
    for guess in (b"w1", b"w1/", b"w1/" + b"0" * 32, b"w1/0"):
        assert peers("c1", identity=guess).ask(*STATS)[0] == b"REPLY"
    ran = curve_cli(
        cluster,
        keys,
        "submit",
        "echo",
        "--payload",
        '"b"',
        "--wait",
        "--timeout",
        "20",
    )
    assert (ran.returncode, ran.stdout) == (0, '"b"\n'), ran.stderr
    # Were an identity known, its route would be taken: a worker (w1's
    # key, another name) whose identity a client knows...
    known = peers("w1", identity=b"w9/known")
    assert (
        known.ask(
            b"HELLO",
            {
                "name": "w9",
                "slots": 1,
                "handlers": ["only-w9"],
                "heartbeat": 5.0,
            },
        )[0]
        == b"WELCOME"
    )
    known.socket.send_multipart(codec.encode(b"READY", {}))
    thief = peers("c1", identity=b"w9/known")
    # Connected: the route is its (what comes first may be the broker's
    # heartbeat to w9).
    answers = [thief.ask(*STATS)[0]]
    while answers[-1] == b"HEARTBEAT" and thief.socket.poll(10_000):
        answers.append(thief.socket.recv_multipart()[1])
    assert answers[-1] == b"REPLY", answers
    assert curve_cli(cluster, keys, "submit", "only-w9").returncode == 0
    # (The broker's heartbeats to w9's route reach the thief too.)
    received = []
    while b"TASK" not in received and thief.socket.poll(10_000):
        received.append(thief.socket.recv_multipart()[1])
    assert b"TASK" in received, received
