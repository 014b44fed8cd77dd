"""
Tests for whose tasks a client key may see and change, on a broker that
checks keys (taskbroker.broker.requests): driven as tests/unit/test_broker
drives the broker, with each message's authenticated key.
"""

import pytest

from taskbroker.broker.keys import PeerKeys
from taskbroker.protocol import codec
from taskbroker.transport.zmq import Sender
from tests.unit.test_broker import started_broker

# Z85 public keys are 40 characters; the broker only compares them.
ALICE, BOB, ADMIN, WORKER = (name.encode() * 40 for name in "abdw")


@pytest.fixture
def keys():
    return peer_keys()


def peer_keys():
    """
    Keys as the broker loads them: a worker's, Alice's and Bob's client
    keys, and an admin's.
    """
    keys = PeerKeys(None, None, None)
    keys.workers = {WORKER: "w1"}
    keys.clients = {ALICE: "alice", BOB: "bob"}
    keys.admins = {ADMIN: "admin"}
    return keys


@pytest.fixture
def broker(store, clock, peers, keys):
    broker = started_broker(store, clock, peers)
    broker.peer_keys = keys
    return broker


def ask(broker, peers, key, command, body):
    """
    Send a client request under ``key``, and return its answer:
    ``(command, body)``.
    """
    identity = b"client-" + key[:1]
    body = {"req": "r", **body}
    broker.handle(Sender(identity, key), codec.encode(command, body))
    [(_, answer, reply)] = peers.take(identity)
    return answer, reply


def submit(broker, peers, key, **spec):
    answer, reply = ask(
        broker, peers, key, b"SUBMIT", {"tasks": [{"handler": "echo", **spec}]}
    )
    assert answer == b"REPLY", reply
    return reply


def not_found(answer):
    command, body = answer
    return command == b"ERROR" and body["code"] == "not_found"


def test_a_task_records_its_submitters_key(broker, peers, store):
    [task] = submit(broker, peers, ALICE)["tasks"]
    assert task["submitter"] == ALICE.decode()
    assert store.get(task["id"]).result.submitter == ALICE.decode()


def test_a_client_key_sees_and_changes_only_its_own_tasks(broker, peers):
    [mine] = submit(broker, peers, ALICE)["tasks"]
    [theirs] = submit(broker, peers, BOB)["tasks"]
    task_id = mine["id"]
    for command, body in (
        (b"GET", {"id": task_id}),
        (b"WAIT", {"id": task_id, "timeout": 0}),
        (b"WAIT", {"id": task_id, "timeout": 5}),
        (b"CANCEL", {"id": task_id}),
        (b"RETRY", {"id": task_id}),
    ):
        answer = ask(broker, peers, BOB, command, body)
        assert not_found(answer), (command, answer)
        # Answered as a task that does not exist: nothing tells them apart.
        assert answer[1]["message"] == f"no task with id {task_id}"
    _, listed = ask(broker, peers, BOB, b"LIST", {})
    assert [task["id"] for task in listed["tasks"]] == [theirs["id"]]
    # Still queued: Bob's CANCEL did nothing.
    command, got = ask(broker, peers, ALICE, b"GET", {"id": task_id})
    assert got["task"]["state"] == "queued"
    command, got = ask(broker, peers, ALICE, b"CANCEL", {"id": task_id})
    assert got["task"]["state"] == "cancelled"
    command, got = ask(broker, peers, ALICE, b"RETRY", {"id": task_id})
    assert got["task"]["state"] == "queued"
    _, listed = ask(broker, peers, ALICE, b"LIST", {})
    assert [task["id"] for task in listed["tasks"]] == [task_id]


def test_an_admin_key_sees_every_task_and_the_workers(broker, peers, store):
    alices = submit(broker, peers, ALICE)["tasks"][0]["id"]
    sqls = store.insert_external("echo").id
    _, listed = ask(broker, peers, ADMIN, b"LIST", {})
    assert [task["id"] for task in listed["tasks"]] == [alices, sqls]
    command, got = ask(broker, peers, ADMIN, b"CANCEL", {"id": alices})
    assert got["task"]["state"] == "cancelled"
    command, got = ask(broker, peers, ADMIN, b"WORKERS", {})
    assert command == b"REPLY" and got["workers"] == []


def test_tasks_without_a_submitter_are_the_admins(broker, peers, store):
    # Inserted by SQL, or submitted before CURVE was on.
    task_id = store.insert_external("echo").id
    assert not_found(ask(broker, peers, ALICE, b"GET", {"id": task_id}))
    assert ask(broker, peers, ALICE, b"LIST", {})[1]["tasks"] == []
    assert ask(broker, peers, ADMIN, b"GET", {"id": task_id})[0] == b"REPLY"
    # A program that inserts one for a client names its key.
    given = store.insert_external("echo", submitter=ALICE.decode()).id
    assert ask(broker, peers, ALICE, b"GET", {"id": given})[0] == b"REPLY"


def test_a_submit_meeting_another_keys_unique_key_learns_only_the_id(
    broker, peers
):
    [first] = submit(
        broker, peers, ALICE, unique_key="nightly", payload={"secret": 1}
    )["tasks"]
    reply = submit(broker, peers, BOB, unique_key="nightly")
    assert reply["tasks"] == [{"id": first["id"]}]
    assert reply["existing"] == [first["id"]]
    # The key's own task, and an admin's view, are whole.
    assert submit(broker, peers, ALICE, unique_key="nightly")["tasks"] == [
        first
    ]
    assert submit(broker, peers, ADMIN, unique_key="nightly")["tasks"] == [
        first
    ]


def test_the_workers_are_for_admins_and_the_counts_for_every_client(
    broker, peers
):
    command, body = ask(broker, peers, ALICE, b"WORKERS", {})
    assert (command, body["code"]) == (b"ERROR", "forbidden")
    command, body = ask(broker, peers, ALICE, b"STATS", {})
    assert command == b"REPLY" and "tasks" in body["stats"]


def test_a_wait_for_a_running_task_of_ones_own_is_held(broker, peers):
    broker.handle(
        Sender(b"w1/x", WORKER),
        codec.encode(
            b"HELLO",
            {"name": "w1", "slots": 1, "handlers": ["echo"], "heartbeat": 1.0},
        ),
    )
    broker.handle(Sender(b"w1/x", WORKER), codec.encode(b"READY", {}))
    task_id = submit(broker, peers, ALICE)["tasks"][0]["id"]
    assert task_id in broker.attempts
    assert not_found(
        ask(broker, peers, BOB, b"WAIT", {"id": task_id, "timeout": 5})
    )
    identity = b"client-a"
    broker.handle(
        Sender(identity, ALICE),
        codec.encode(b"WAIT", {"req": "w", "id": task_id, "timeout": 5}),
    )
    assert peers.take(identity) == []
    broker.handle(
        Sender(b"w1/x", WORKER),
        codec.encode(
            b"RESULT",
            {"id": task_id, "token": 1, "state": "succeeded", "result": 3},
        ),
    )
    [(_, command, reply)] = peers.take(identity)
    assert reply["task"]["result"] == 3


def test_without_client_checks_every_key_sees_every_task(broker, peers):
    # --allow-any-key: encrypted, but no key is checked; the submitter is
    # still recorded.
    broker.peer_keys = None
    [task] = submit(broker, peers, ALICE)["tasks"]
    assert task["submitter"] == ALICE.decode()
    command, got = ask(broker, peers, BOB, b"GET", {"id": task["id"]})
    assert got["task"] == task
    assert ask(broker, peers, BOB, b"WORKERS", {})[0] == b"REPLY"
