"""
CURVE keys: making and reading them (taskbroker.curve), and the broker's
key sets by role (taskbroker.broker.keys).
"""

import os
import stat

import pytest
import zmq
import zmq.auth

from taskbroker import curve
from taskbroker.broker.keys import PeerKeys
from taskbroker.errors import ConfigError


def test_keygen_writes_a_pair_pyzmq_reads(tmp_path):
    public_path, secret_path = curve.keygen(str(tmp_path / "new"), "w1")
    assert (public_path, secret_path) == (
        str(tmp_path / "new" / "w1.key"),
        str(tmp_path / "new" / "w1.key_secret"),
    )
    assert stat.S_IMODE(os.stat(secret_path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(public_path).st_mode) == 0o644
    public, secret = zmq.auth.load_certificate(secret_path)
    assert zmq.auth.load_certificate(public_path) == (public, None)
    assert zmq.curve_public(secret) == public
    assert curve.load_secret(secret_path, "--x") == (public, secret)
    assert curve.load_public(public_path, "--x") == public


def test_keygen_never_overwrites(tmp_path):
    curve.keygen(str(tmp_path), "w1")
    before = (tmp_path / "w1.key_secret").read_text()
    with pytest.raises(
        ConfigError, match="w1.key: exists; a key is never overwritten"
    ):
        curve.keygen(str(tmp_path), "w1")
    assert (tmp_path / "w1.key_secret").read_text() == before
    # Not even the secret alone, left by someone else.
    (tmp_path / "w2.key_secret").write_text("mine")
    with pytest.raises(ConfigError, match="w2.key_secret: exists"):
        curve.keygen(str(tmp_path), "w2")
    assert not (tmp_path / "w2.key").exists()


@pytest.mark.parametrize(
    "name", ["", "../x", "a/b", ".hidden", "x" * 101, "sp ace"]
)
def test_keygen_refuses_names_that_are_not_plain(tmp_path, name):
    with pytest.raises(ConfigError, match="is not a key name"):
        curve.keygen(str(tmp_path), name)
    assert os.listdir(tmp_path) == []


def test_keys_made_by_pyzmq_load(tmp_path):
    public_path, secret_path = zmq.auth.create_certificates(
        str(tmp_path), "py"
    )
    os.chmod(secret_path, 0o600)
    public, secret = curve.load_secret(secret_path, "--x")
    assert curve.load_public(public_path, "--x") == public


def test_a_secret_key_others_may_read_is_refused(tmp_path):
    _, secret_path = curve.keygen(str(tmp_path), "b")
    os.chmod(secret_path, 0o644)
    with pytest.raises(ConfigError) as e:
        curve.load_secret(secret_path, "--curve-secret-key")
    assert str(e.value) == (
        f"--curve-secret-key: {secret_path}: a secret key readable by "
        f"others (mode 644) is refused; chmod 600 {secret_path}"
    )


@pytest.mark.parametrize(
    "content, reason",
    [
        (None, "No such file or directory"),
        ("hello\n", "no public key in it"),
        (
            'curve\n    public-key = "short"\n',
            "not a CURVE key file (a key is 40 characters of Z85)",
        ),
    ],
)
def test_files_that_are_not_keys_are_refused_in_one_line(
    tmp_path, content, reason
):
    path = tmp_path / "k.key_secret"
    if content is not None:
        path.write_text(content)
        os.chmod(path, 0o600)
    with pytest.raises(ConfigError) as e:
        curve.load_secret(str(path), "--curve-secret-key")
    assert str(e.value) == f"--curve-secret-key: {path}: {reason}"


@pytest.mark.parametrize("mode", [0o600, 0o644])
def test_a_public_file_given_as_the_secret_one_is_named(tmp_path, mode):
    # Readable by all, as keygen leaves it: the advice is not to chmod it.
    public_path, _ = curve.keygen(str(tmp_path), "b")
    os.chmod(public_path, mode)
    with pytest.raises(ConfigError) as e:
        curve.load_secret(public_path, "--curve-secret-key")
    assert str(e.value) == (
        f"--curve-secret-key: {public_path}: no secret key in it (a public "
        ".key file? the secret one ends in .key_secret)"
    )


def test_a_pair_that_does_not_belong_together_is_refused(tmp_path):
    _, one = curve.keygen(str(tmp_path), "one")
    _, two = curve.keygen(str(tmp_path), "two")
    mixed = tmp_path / "mixed.key_secret"
    public = zmq.auth.load_certificate(one)[0].decode()
    secret = zmq.auth.load_certificate(two)[1].decode()
    mixed.write_text(
        f'curve\n    public-key = "{public}"\n    secret-key = "{secret}"\n'
    )
    os.chmod(mixed, 0o600)
    with pytest.raises(ConfigError, match="do not belong together"):
        curve.load_secret(str(mixed), "--curve-secret-key")


# -- a worker's or a client's keys ---------------------------------------------


def test_a_peer_reads_the_brokers_public_key_and_its_own_pair(curve_keys):
    server, public, secret = curve.load_peer_keys(
        curve_keys("broker.key"), curve_keys("w1.key_secret"), "worker"
    )
    assert server == curve.load_public(curve_keys("broker.key"), "t")
    assert (public, secret) == curve.load_secret(
        curve_keys("w1.key_secret"), "t"
    )
    assert curve.load_peer_keys(None, None, "worker") is None


@pytest.mark.parametrize(
    "server, secret, expected",
    [
        (
            "broker.key",
            None,
            "--curve-server-key without --curve-secret-key: give both (the "
            "broker's public key file and this worker's NAME.key_secret file) or "
            "neither",
        ),
        (
            None,
            "w1.key_secret",
            "--curve-secret-key without --curve-server-key: give both (the "
            "broker's public key file and this worker's NAME.key_secret file) or "
            "neither",
        ),
        (
            "missing.key",
            "w1.key_secret",
            "--curve-server-key: {missing.key}: No such file or directory",
        ),
        (
            "broker.key",
            "missing.key_secret",
            "--curve-secret-key: {missing.key_secret}: No such file or directory",
        ),
        (
            "broker.key_secret",
            "w1.key_secret",
            "--curve-server-key: {broker.key_secret}: holds a secret key; give the "
            "broker's public .key file, and keep its secret on the broker",
        ),
        (
            "broker.key",
            "w1.key",
            "--curve-secret-key: {w1.key}: no secret key in it (a public .key "
            "file? the secret one ends in .key_secret)",
        ),
        (
            "notes.txt",
            "w1.key_secret",
            "--curve-server-key: {notes.txt}: no public key in it",
        ),
    ],
)
def test_a_peers_unusable_keys_are_refused_in_one_line(
    curve_keys, server, secret, expected
):
    with open(curve_keys("notes.txt"), "w") as f:
        f.write("not a key\n")
    with pytest.raises(ConfigError) as e:
        curve.load_peer_keys(
            server and curve_keys(server),
            secret and curve_keys(secret),
            "worker",
        )
    for name in (
        "missing.key",
        "missing.key_secret",
        "broker.key_secret",
        "w1.key",
        "notes.txt",
    ):
        expected = expected.replace("{" + name + "}", curve_keys(name))
    assert str(e.value) == expected


def test_a_peers_secret_key_readable_by_others_is_refused(curve_keys):
    os.chmod(curve_keys("w1.key_secret"), 0o640)
    with pytest.raises(ConfigError, match="readable by others"):
        curve.load_peer_keys(
            curve_keys("broker.key"), curve_keys("w1.key_secret"), "worker"
        )


def test_peer_keys_by_role_and_reloaded(tmp_path):
    keys_folder = tmp_path / "all"
    for name in ("w1", "c1", "both", "later"):
        curve.keygen(str(keys_folder), name)

    def key(name):
        return curve.load_public(str(keys_folder / f"{name}.key"), "t")

    workers, clients = tmp_path / "workers", tmp_path / "clients"
    workers.mkdir()
    clients.mkdir()
    for folder, names in (
        (workers, ("w1", "both")),
        (clients, ("c1", "both")),
    ):
        for name in names:
            os.link(keys_folder / f"{name}.key", folder / f"{name}.key")
    (workers / "broken.key").write_text("nothing")
    (workers / "notes.txt").write_text("not a key file")
    peers = PeerKeys(str(workers), str(clients))
    assert len(peers.problems) == 1 and "broken.key" in peers.problems[0]
    assert (peers.may_work(key("w1")), peers.may_ask(key("w1"))) == (
        True,
        False,
    )
    assert (peers.may_work(key("c1")), peers.may_ask(key("c1"))) == (
        False,
        True,
    )
    assert peers.may_work(key("both")) and peers.may_ask(key("both"))
    assert not peers.admits(key("later")) and not peers.may_ask(None)
    assert peers.name(key("w1")) == f"w1 ({key('w1').decode()})"
    os.link(keys_folder / "later.key", clients / "later.key")
    os.unlink(workers / "w1.key")
    peers.reload()
    assert peers.may_ask(key("later")) and not peers.admits(key("w1"))


def test_an_admin_key_is_a_client_key_with_every_task(tmp_path):
    keys_folder, clients, admins = (
        tmp_path / name for name in ("all", "clients", "admins")
    )
    for name in ("c1", "root"):
        curve.keygen(str(keys_folder), name)
    clients.mkdir()
    admins.mkdir()
    os.link(keys_folder / "c1.key", clients / "c1.key")
    os.link(keys_folder / "root.key", admins / "root.key")
    peers = PeerKeys(None, str(clients), str(admins))
    c1, root = (
        curve.load_public(str(keys_folder / f"{name}.key"), "t")
        for name in ("c1", "root")
    )
    assert peers.admits(root) and peers.may_ask(root) and peers.is_admin(root)
    assert not peers.may_work(root)
    assert peers.may_ask(c1) and not peers.is_admin(c1)
    assert peers.name(root) == f"root ({root.decode()})"
    before = peers.snapshot()
    os.link(keys_folder / "c1.key", admins / "c1.key")
    os.unlink(admins / "root.key")
    peers.reload()
    assert peers.is_admin(c1) and not peers.admits(root)
    assert peers.changes(before) == "admins +c1 -root"


def test_which_endpoints_other_hosts_may_reach():
    from taskbroker.broker.keys import reachable_from_afar

    for endpoint in (
        "tcp://127.0.0.1:5555",
        "tcp://127.8.0.1:1",
        "tcp://[::1]:5555",
        "tcp://localhost:5555",
        "tcp://lo:5555",
        "ipc:///run/tb.sock",
        "inproc://x",
    ):
        assert not reachable_from_afar(endpoint), endpoint
    for endpoint in (
        "tcp://0.0.0.0:5555",
        "tcp://*:5555",
        "tcp://[::]:1",
        "tcp://10.0.0.5:5555",
        "tcp://eth0:5555",
        "tcp://broker.example.com:5555",
    ):
        assert reachable_from_afar(endpoint), endpoint


def test_require_curve_refuses_a_broker_without_it():
    from taskbroker.config import BrokerConfig

    with pytest.raises(
        ConfigError, match="--require-curve: give --curve-secret-key"
    ):
        BrokerConfig(require_curve=True)


def test_a_key_file_that_cannot_be_read_for_a_moment_keeps_its_key(tmp_path):
    workers = tmp_path / "workers"
    curve.keygen(str(tmp_path / "all"), "w1")
    workers.mkdir()
    text = (tmp_path / "all" / "w1.key").read_text()
    (workers / "w1.key").write_text(text)
    peers = PeerKeys(str(workers), None)
    [key] = peers.workers
    (workers / "w1.key").write_text("")  # caught while being rewritten
    assert len(peers.reload()) == 1
    assert peers.may_work(key)
    (workers / "w1.key").unlink()  # gone: the key goes
    assert peers.reload() == [] and not peers.may_work(key)
