"""
CURVE against a real broker: who gets in, and as what.

Peers here are raw pyzmq DEALER sockets, so that each test sets exactly
the keys it means to (or none).
"""

import json
import os
import re
import subprocess

import pytest
import zmq

from taskbroker import curve
from taskbroker.protocol import codec
from tests.integration.daemons import CLI

#: Milliseconds a refused peer is given to get an answer it must not get.
SILENCE_MS = 1500


@pytest.fixture
def keys(tmp_path):
    """
    A folder of key pairs (broker, w1, c1, stranger) and the broker's
    authorization folders: w1 may work, c1 may ask.
    """
    folder = tmp_path / "keys"
    for name in ("broker", "w1", "c1", "stranger"):
        curve.keygen(str(folder), name)
    for role, name in (("workers", "w1"), ("clients", "c1")):
        (tmp_path / role).mkdir()
        os.link(folder / f"{name}.key", tmp_path / role / f"{name}.key")
    return tmp_path


def curve_broker(cluster, keys, *extra):
    return cluster.start_broker(
        "--curve-secret-key", str(keys / "keys" / "broker.key_secret"),
        "--authorized-workers", str(keys / "workers"),
        "--authorized-clients", str(keys / "clients"), *extra)


class Peer:
    """
    A DEALER connected to the broker, with the key pair ``name`` (or
    without CURVE when ``name`` is ``None``).
    """

    def __init__(self, cluster, keys, name, server="broker"):
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        if name is not None:
            public, secret = curve.load_secret(
                str(keys / "keys" / f"{name}.key_secret"), "test")
            self.socket.curve_serverkey = curve.load_public(
                str(keys / "keys" / f"{server}.key"), "test")
            self.socket.curve_publickey = public
            self.socket.curve_secretkey = secret
        self.socket.connect(cluster.endpoint)

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
HELLO = (b"HELLO", {"name": "intruder", "slots": 1, "handlers": ["echo"],
                    "heartbeat": 1.0})


def test_an_authorized_client_is_answered(cluster, keys, peers):
    curve_broker(cluster, keys)
    command, body = peers("c1").ask(*STATS)
    assert command == b"REPLY" and body["req"] == "s"


def test_a_worker_key_may_not_ask_and_a_client_key_may_not_work(
        cluster, keys, peers):
    broker = curve_broker(cluster, keys)
    command, body = peers("w1").ask(*STATS)
    assert (command, body["code"]) == (b"ERROR", "forbidden")
    command, body = peers("c1").ask(*HELLO)
    assert (command, body["code"], body["fatal"]) == (
        b"ERROR", "forbidden", True)
    broker.wait_for(r"refused STATS from w1 \(")
    broker.wait_for(r"refused HELLO from c1 \(")


def test_unknown_keys_and_plain_peers_get_nothing(cluster, keys, peers):
    broker = curve_broker(cluster, keys)
    assert peers("stranger").ask(*STATS, timeout=SILENCE_MS) is None
    stranger = curve.load_public(str(keys / "keys" / "stranger.key"), "t")
    broker.wait_for("refused a connection from .*a key not authorized, "
                    "unknown key " + _escaped(stranger))
    assert peers(None).ask(*STATS, timeout=SILENCE_MS) is None
    # A client that holds a good key but takes the wrong broker key for
    # the broker's gets nothing either.
    assert peers("c1", server="stranger").ask(
        *STATS, timeout=SILENCE_MS) is None
    # The broker still serves.
    assert peers("c1").ask(*STATS)[0] == b"REPLY"


def test_a_broker_with_curve_and_no_folders_refuses_to_start(cluster, keys):
    broker = cluster.start_broker(
        "--curve-secret-key", str(keys / "keys" / "broker.key_secret"),
        wait=False)
    assert broker.wait_exit() == 2
    assert "give --authorized-workers and --authorized-clients" in \
        broker.output()


def test_a_secret_key_readable_by_others_is_refused(cluster, keys):
    secret = keys / "keys" / "broker.key_secret"
    os.chmod(secret, 0o640)
    broker = cluster.start_broker(
        "--curve-secret-key", str(secret),
        "--authorized-clients", str(keys / "clients"), wait=False)
    assert broker.wait_exit() == 2
    assert f"chmod 600 {secret}" in broker.output()


def _escaped(key):
    return re.escape(key.decode())


def test_keygen_from_the_command_line(tmp_path):
    run = subprocess.run([CLI, "keygen", str(tmp_path / "k"),
                          "--name", "node1"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert oct(os.stat(tmp_path / "k" / "node1.key_secret").st_mode)[-3:] \
        == "600"
    again = subprocess.run([CLI, "keygen", str(tmp_path / "k"),
                            "--name", "node1"], capture_output=True, text=True)
    assert again.returncode == 2
    assert again.stderr == (f"taskbroker: {tmp_path / 'k' / 'node1.key'}: "
                            "exists; a key is never overwritten (remove it "
                            "first to replace it)\n")
