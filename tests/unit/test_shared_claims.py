"""
Several brokers on one shared database (taskbroker.store.shared, the
in-memory stand-in for PostgreSQL): each claims only for its idle credits,
renews its claims, and takes over those of a broker that stopped renewing.
No task runs twice on live workers, and none waits in a broker's memory
while another broker has an idle worker for it.
"""

import json
from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from zope.interface.verify import verifyObject

from taskbroker.broker.core import Broker
from taskbroker.config import BrokerConfig
from taskbroker.interfaces import IClaimSource, ITaskStore
from taskbroker.protocol import codec
from taskbroker.store.memory import MemoryStore
from taskbroker.testing import SharedMemoryDatabase, result_of
from taskbroker.transport.zmq import Sender


class Fleet:
    """
    One shared database, brokers on it, and what they send.
    """

    def __init__(self, lease=10.0):
        self.clock = Clock()
        self.db = SharedMemoryDatabase(self.clock, lease=lease)
        result_of(self.db.store.open())
        self.sent = []
        self.brokers = {}

    def broker(self, name):
        def send(identity, frames):
            self.sent.append(
                (name, identity, frames[1], json.loads(frames[2]))
            )
            return True

        broker = Broker(
            BrokerConfig(), self.db.store, self.clock, send, instance_id=name
        )
        result_of(broker.load())
        self.brokers[name] = broker
        return broker

    def send(self, broker, identity, command, body):
        self.brokers[broker].handle(
            Sender(identity), codec.encode(command, body)
        )

    def worker(self, broker, name, slots=1):
        self.send(
            broker,
            name.encode(),
            b"HELLO",
            {
                "name": name,
                "slots": slots,
                "handlers": ["echo"],
                "heartbeat": 1.0,
            },
        )
        for _ in range(slots):
            self.send(broker, name.encode(), b"READY", {})

    def submit(self, broker, priority="normal", handler="echo"):
        self.send(
            broker,
            b"client",
            b"SUBMIT",
            {
                "req": "r",
                "tasks": [{"handler": handler, "priority": priority}],
            },
        )

    def tasks(self, worker=None):
        """
        Take the TASKs sent (to ``worker``): ``[(broker, worker, body)]``.
        """
        taken = [
            (b, w.decode(), body)
            for b, w, command, body in self.sent
            if command == b"TASK" and (worker is None or w == worker.encode())
        ]
        self.sent = [
            m
            for m in self.sent
            if not (
                m[2] == b"TASK" and (worker is None or m[1] == worker.encode())
            )
        ]
        return taken

    def finish(self, broker, worker, task, state="succeeded", ready=True):
        self.send(
            broker,
            worker.encode(),
            b"RESULT",
            {
                "id": task["id"],
                "token": task["token"],
                "state": state,
                "result": worker,
                "ready": ready,
            },
        )

    def settle(self):
        # Wake-ups arrive after the transaction that sent them.
        self.clock.advance(0)


def test_the_shared_store_provides_the_interfaces():
    fleet = Fleet()
    assert verifyObject(ITaskStore, fleet.db.store)
    assert verifyObject(IClaimSource, fleet.db.store.claims("b1"))


def test_a_task_waits_in_the_database_for_any_brokers_idle_worker():
    fleet = Fleet()
    fleet.broker("a")
    fleet.broker("b")
    fleet.worker("b", "w2")
    fleet.submit("a")  # a has no worker: it keeps nothing in memory
    assert len(fleet.brokers["a"].dispatcher) == 0
    fleet.settle()
    [(broker, worker, task)] = fleet.tasks()
    assert (broker, worker, task["id"], task["token"]) == ("b", "w2", 1, 1)


def test_an_idle_worker_claims_the_most_urgent_task_first():
    fleet = Fleet()
    fleet.broker("a")
    fleet.broker("b")
    for priority in ("low", "normal", "high", "low"):
        fleet.submit("a", priority)
    fleet.settle()
    fleet.worker("b", "w2")
    ran = []
    for _ in range(4):
        [(_, _, task)] = fleet.tasks("w2")
        ran.append(task["priority"])
        fleet.finish("b", "w2", task)
    assert ran == ["high", "normal", "low", "low"]


def test_a_credit_asks_the_store_again_only_after_a_wake_up():
    fleet = Fleet()
    b = fleet.broker("b")
    calls = []
    dispatch_for = b.claims.dispatch_for
    b.claims.dispatch_for = lambda *args: (
        calls.append(args),
        dispatch_for(*args),
    )[1]
    fleet.worker("b", "w1")
    fleet.worker("b", "w2")  # (w1's claim found the store empty)
    assert len(calls) == 1
    fleet.submit("b")  # dispatched as it is inserted
    fleet.settle()
    asked = len(calls)
    [(_, worker, task)] = fleet.tasks()
    fleet.finish("b", worker, task)
    assert len(calls) == asked  # nothing came since: the credit waits
    fleet.db.insert_external("echo")
    fleet.settle()  # the store's wake-up
    [_] = fleet.tasks()
    assert len(calls) == asked + 1


def held(calls, function):
    """
    ``function`` as the test lets it run: each call appends to ``calls``
    a ``Deferred`` and a function of no arguments that makes the call and
    fires that ``Deferred`` with what it returns.
    """

    def call(*args):
        later = defer.Deferred()

        def run():
            answer = result_of(function(*args))
            later.callback(answer)
            return answer

        calls.append(run)
        return later

    return call


def test_a_task_submitted_while_its_credit_claimed_is_dispatched_at_once():
    # The credit was away (its claim under way) when the task came, so the
    # task is inserted unclaimed; the claim, and the one it makes again
    # for the wake-up the submit counts, find nothing before the insert
    # commits.  The idle credit takes the task as soon as the insert
    # commits, not at the next wake-up (none comes: a broker's own writes
    # do not wake it) or poll.
    fleet = Fleet()
    b = fleet.broker("b")
    claims, inserts = [], []
    dispatch_for, submit = b.claims.dispatch_for, b.store.submit
    b.claims.dispatch_for = held(claims, dispatch_for)
    # Without the stand-in's wake-up, which would reach the broker that
    # wrote too: on PostgreSQL a broker does not hear its own.
    b.store.submit = held(
        inserts, lambda tasks: MemoryStore.submit(b.store, tasks)
    )
    fleet.worker("b", "w1")
    fleet.submit("b")
    [insert] = inserts
    while claims:
        assert claims.pop(0)() == [None]
    [submitted] = insert()
    assert submitted.row.state == "queued"
    b.claims.dispatch_for, b.store.submit = dispatch_for, submit
    while claims:
        claims.pop(0)()
    fleet.settle()
    [(_, worker, task)] = fleet.tasks()
    assert (worker, task["id"]) == ("w1", submitted.row.id)


def test_an_unclaimed_insert_asks_only_credits_that_can_run_it():
    fleet = Fleet()
    b = fleet.broker("b")
    calls = []
    dispatch_for = b.claims.dispatch_for
    b.claims.dispatch_for = lambda *args: (
        calls.append(args[0]),
        dispatch_for(*args),
    )[1]
    fleet.send(
        "b",
        b"reserved",
        b"HELLO",
        {
            "name": "reserved",
            "slots": 1,
            "priorities": ["high"],
            "handlers": ["echo"],
            "heartbeat": 1.0,
        },
    )
    fleet.send("b", b"reserved", b"READY", {})
    assert calls == [["high"]]  # found nothing: it waits for a wake-up
    for _ in range(3):
        fleet.submit("b", "low")
    assert calls == [["high"]]
    fleet.submit("b", "high")  # dispatched as it is inserted
    [(_, worker, task)] = fleet.tasks()
    assert (worker, task["priority"]) == ("reserved", "high")


def test_claims_of_a_broker_that_stopped_renewing_go_to_the_others():
    fleet = Fleet(lease=10.0)
    fleet.broker("a")
    b = fleet.broker("b")
    fleet.worker("a", "w1")
    fleet.submit("a")
    [(_, _, first)] = fleet.tasks("w1")
    fleet.worker("b", "w2")
    # Broker a falls silent (it stops renewing); b renews and, once a's
    # lease has lapsed and a's workers had their time to bring their
    # attempts elsewhere, takes its running task back.
    fleet.clock.advance(5)
    result_of(b.keep_claims())
    assert fleet.tasks() == []
    fleet.clock.advance(6)
    result_of(b.keep_claims())
    fleet.settle()
    assert fleet.tasks() == []
    fleet.clock.advance(b._reclaim_window())
    with capturedLogs() as events:
        result_of(b.keep_claims())
    assert any(e.get("count") == 1 for e in events)
    fleet.settle()
    [(broker, worker, second)] = fleet.tasks()
    assert (broker, worker, second["id"]) == ("b", "w2", first["id"])
    assert second["token"] == first["token"] + 1
    # The late result of a's worker is acknowledged but refused.
    fleet.finish("a", "w1", first)
    assert result_of(fleet.db.store.get(first["id"])).state == "running"
    fleet.finish("b", "w2", second)
    row = result_of(fleet.db.store.get(first["id"]))
    assert (row.state, row.result) == ("succeeded", '"w2"')


def test_a_worker_brings_its_attempt_from_a_lapsed_broker():
    fleet = Fleet(lease=10.0)
    a = fleet.broker("a")
    b = fleet.broker("b")
    fleet.worker("a", "w1")
    fleet.submit("a")
    [(_, _, first)] = fleet.tasks("w1")
    # w1 lost a and moved to b with its attempt.  While a still holds its
    # lease (it may come back), b neither takes the attempt nor stops it.
    hello = {
        "name": "w1",
        "slots": 1,
        "handlers": ["echo"],
        "heartbeat": 1.0,
        "running": [{"id": first["id"], "token": first["token"]}],
    }
    fleet.send("b", b"w1", b"HELLO", hello)
    fleet.settle()
    assert [c for _, _, c, _ in fleet.sent if c == b"CANCEL"] == []
    assert first["id"] not in b.attempts
    # Once a's lease lapsed, b adopts it: the attempt goes on, nobody
    # takes it back, and its result counts.
    with capturedLogs() as events:
        for _ in range(11):
            fleet.clock.advance(1)
    assert any("adopted task" in e["log_format"] for e in events)
    assert first["id"] in b.attempts
    fleet.clock.advance(b._reclaim_window() + 1)
    result_of(b.keep_claims())
    fleet.settle()
    assert fleet.tasks() == []
    fleet.finish("b", "w1", first)
    row = result_of(fleet.db.store.get(first["id"]))
    assert (row.state, row.result) == ("succeeded", '"w1"')
    assert a.attempts.get(first["id"]) is not None  # a never came back


def test_a_worker_is_told_to_stop_an_attempt_that_is_not_current():
    fleet = Fleet(lease=10.0)
    fleet.broker("a")
    fleet.broker("b")
    fleet.worker("a", "w1")
    fleet.submit("a")
    [(_, _, first)] = fleet.tasks("w1")
    fleet.send(
        "b",
        b"w1",
        b"HELLO",
        {
            "name": "w1",
            "slots": 1,
            "handlers": ["echo"],
            "heartbeat": 1.0,
            "running": [{"id": first["id"], "token": first["token"] + 5}],
        },
    )
    fleet.settle()
    [cancel] = [body for _, _, c, body in fleet.sent if c == b"CANCEL"]
    assert cancel["id"] == first["id"]


def test_claims_held_without_knowing_are_let_go():
    fleet = Fleet(lease=10.0)
    a = fleet.broker("a")
    fleet.broker("b")
    fleet.submit("b")  # no worker: back to the store
    fleet.settle()
    [row] = result_of(fleet.db.store.list(None, None, 0, 10))
    # A claim whose commit succeeded but whose answer was lost: the store
    # says a holds it; a does not know.
    fleet.db.claimed[row.id] = "a"
    result_of(a.keep_claims())  # first look: a suspect
    assert fleet.db.claimed.get(row.id) == "a"
    fleet.clock.advance(10)
    with capturedLogs() as events:
        result_of(a.keep_claims())
    assert any("let go of" in e["log_format"] for e in events)
    assert row.id not in fleet.db.claimed


def test_a_broker_whose_claims_lapsed_starts_over():
    fleet = Fleet(lease=10.0)
    a = fleet.broker("a")
    fleet.broker("b")
    fleet.worker("a", "w1")
    fleet.clock.advance(11)
    with capturedLogs() as events:
        result_of(a.keep_claims())
    assert any("claims lapsed" in e["log_format"] for e in events)
    # It goes on with a new lease.
    fleet.submit("b")
    fleet.settle()
    [(broker, worker, _)] = fleet.tasks()
    assert (broker, worker) == ("a", "w1")


def test_rows_inserted_by_sql_are_checked_when_claimed():
    fleet = Fleet()
    fleet.broker("a")
    bad = fleet.db.insert_external("echo", "{oops").id
    good = fleet.db.insert_external("echo", "1").id
    fleet.worker("a", "w1")
    fleet.settle()
    assert "not valid JSON" in result_of(fleet.db.store.get(bad)).error
    [(_, _, task)] = fleet.tasks("w1")
    assert task["id"] == good


def test_a_stopping_broker_gives_its_queued_claims_back():
    fleet = Fleet()
    a = fleet.broker("a")
    fleet.broker("b")
    claims = a.claims
    fleet.db.store.insert_external("echo")
    # Claimed before any broker has a worker for it (as a queued task
    # coming back to a broker is).
    [claimed] = result_of(
        claims.claim_for(["normal", None], ["echo"], 1, fleet.clock.seconds())
    )
    fleet.worker("b", "w2")
    assert fleet.tasks() == []  # a holds its claim
    result_of(claims.stop())
    fleet.settle()
    [(broker, _, _)] = fleet.tasks()
    assert broker == "b"


STEPS = st.lists(
    st.tuples(
        st.sampled_from(
            [
                "submit",
                "sql",
                "ready",
                "finish",
                "fail",
                "lapse",
                "renew",
                "tick",
            ]
        ),
        st.sampled_from(["a", "b"]),
        st.sampled_from(["high", "normal", "low"]),
    ),
    max_size=50,
)


@settings(max_examples=80, deadline=None)
@given(STEPS)
def test_no_task_runs_twice_on_live_workers_and_every_task_ends(steps):
    """
    Whatever two brokers on one database do, with both now and then silent
    past their lease, no dispatch (a task and its token) is ever sent
    twice, and in the end every task ended.
    """
    fleet = Fleet(lease=10.0)
    for name in ("a", "b"):
        fleet.broker(name)
    workers = {"a": "w1", "b": "w2"}
    for name, worker in workers.items():
        fleet.worker(name, worker, slots=2)
    running = {}  # task id -> (broker, worker, body)
    sent = Counter()

    def given_out():
        for broker, worker_name, body in fleet.tasks():
            sent[(body["id"], body["token"])] += 1
            assert sent[(body["id"], body["token"])] == 1, body
            # A task given out again is no longer running where it was.
            running[body["id"]] = (broker, worker_name, body)

    for n, (action, name, priority) in enumerate(steps):
        worker = workers[name]
        if action == "submit":
            fleet.submit(name, priority)
        elif action == "sql":
            fleet.db.insert_external("echo", str(n), priority=priority)
        elif action in ("finish", "fail"):
            mine = [t for t, (b, _, _) in running.items() if b == name]
            if mine:
                _, _, body = running.pop(mine[0])
                fleet.finish(
                    name,
                    worker,
                    body,
                    "succeeded" if action == "finish" else "failed",
                )
        elif action == "lapse":
            fleet.clock.advance(11)  # everyone misses a renewal
        elif action == "renew":
            result_of(fleet.brokers[name].keep_claims())
        else:
            fleet.clock.advance(1)
        fleet.settle()
        given_out()
    # Drain: both brokers renew and reclaim, workers finish what they hold.
    for _ in range(200):
        # What the brokers' timers do every second.
        for name in ("a", "b"):
            result_of(fleet.brokers[name].keep_claims())
            result_of(fleet.brokers[name].poll())
        fleet.clock.advance(1)
        fleet.settle()
        given_out()
        if not running:
            pending = result_of(fleet.db.store.list("queued", None, 0, 1))
            if not pending:
                break
            continue
        task_id, (broker, worker_name, body) = running.popitem()
        fleet.finish(broker, worker_name, body)
    for state in ("queued", "running"):
        assert result_of(fleet.db.store.list(state, None, 0, 10)) == [], state


def test_a_lapsed_broker_keeps_what_nobody_took_and_stops_what_was_taken():
    fleet = Fleet(lease=10.0)
    a, b = fleet.broker("a"), fleet.broker("b")
    fleet.worker("a", "w1", slots=2)
    fleet.submit("a")
    fleet.submit("a")
    [(_, _, kept), (_, _, taken)] = fleet.tasks("w1")
    # a misses its renewals; b renews, then takes over one task (as if
    # it had reclaimed between a's finishing one and the other).
    fleet.clock.advance(11)
    result_of(b.claims.renew(fleet.clock.seconds()))
    fleet.db.claimed[taken["id"]] = "b"
    result_of(
        fleet.db.store.requeue(taken["id"], taken["token"], consumed=False)
    )
    fleet.sent.clear()
    result_of(a.keep_claims())
    # Its worker is told to stop the task taken over, and only that one.
    cancels = [
        body for _, _, command, body in fleet.sent if command == b"CANCEL"
    ]
    assert cancels == [{"id": taken["id"], "token": taken["token"]}]
    assert fleet.db.claimed[kept["id"]] == "a"
    # If a now dies, b takes back what a kept, once a's lease lapses and
    # its workers had their time.
    fleet.worker("b", "w2")
    ids = set()
    for _ in range(10):
        fleet.clock.advance(4)
        result_of(b.keep_claims())
        fleet.settle()
        for _, _, task in fleet.tasks("w2"):
            ids.add(task["id"])
            fleet.finish("b", "w2", task)
    assert kept["id"] in ids


def test_retry_of_a_task_this_broker_still_holds_runs_it():
    fleet = Fleet()
    a = fleet.broker("a")
    fleet.broker("b")
    fleet.send(
        "a",
        b"client",
        b"SUBMIT",
        {"req": "r", "tasks": [{"handler": "echo", "delay": 100}]},
    )
    fleet.settle()
    assert 1 in a.backlog.delayed
    # Another broker cancels it, then a retries it.
    fleet.send("b", b"client", b"CANCEL", {"req": "c", "id": 1})
    fleet.send("a", b"client", b"RETRY", {"req": "t", "id": 1})
    fleet.settle()
    fleet.worker("b", "w2")
    fleet.settle()
    [(broker, _, task)] = fleet.tasks()
    assert (broker, task["id"]) == ("b", 1)


def test_a_retry_stops_an_attempt_that_still_runs_here():
    fleet = Fleet()
    fleet.broker("a")
    fleet.broker("b")
    fleet.worker("a", "w1")
    fleet.submit("a")
    [(_, _, first)] = fleet.tasks("w1")
    # Cancelled through b (a's worker is not told), then retried on a.
    fleet.send("b", b"client", b"CANCEL", {"req": "c", "id": first["id"]})
    fleet.sent.clear()
    fleet.send("a", b"client", b"RETRY", {"req": "t", "id": first["id"]})
    fleet.settle()
    cancels = [
        body
        for _, w, command, body in fleet.sent
        if command == b"CANCEL" and w == b"w1"
    ]
    assert cancels == [{"id": first["id"], "token": first["token"]}]
    # Its slot is free again (the worker asks for work once it stopped
    # the task), and the task runs once more, on a new token.
    fleet.send("a", b"w1", b"READY", {})
    fleet.settle()
    [(_, _, second)] = fleet.tasks("w1")
    assert (second["id"], second["token"]) == (first["id"], first["token"] + 1)


def test_claiming_does_not_spin_on_a_task_with_a_stale_attempt():
    fleet = Fleet()
    a = fleet.broker("a")
    fleet.broker("b")
    fleet.worker("a", "w1", slots=2)
    fleet.submit("a")
    [(_, _, first)] = fleet.tasks("w1")
    calls = []
    claim_for = a.claims.claim_for
    a.claims.claim_for = lambda *args: (calls.append(args), claim_for(*args))[
        1
    ]
    # The store puts it back behind a's back (as a reclaim would).
    del fleet.db.claimed[first["id"]]
    result_of(
        fleet.db.store.requeue(first["id"], first["token"], consumed=False)
    )
    for _ in range(5):
        fleet.settle()
    assert len(calls) <= 3
    [(_, _, again)] = fleet.tasks("w1")
    assert again["token"] == first["token"] + 1


def test_a_result_sent_while_its_attempt_is_adopted_counts():
    fleet = Fleet(lease=10.0)
    fleet.broker("a")
    b = fleet.broker("b")
    fleet.worker("a", "w1")
    fleet.submit("a")
    [(_, _, first)] = fleet.tasks("w1")
    fleet.send(
        "b",
        b"w1",
        b"HELLO",
        {
            "name": "w1",
            "slots": 1,
            "handlers": ["echo"],
            "heartbeat": 1.0,
            "running": [{"id": first["id"], "token": first["token"]}],
        },
    )
    # The attempt ends before a's lease lapses: its result waits.
    fleet.finish("b", "w1", first)
    assert [c for _, _, c, _ in fleet.sent if c == b"ACK"] == []
    for _ in range(11):
        fleet.clock.advance(1)
    [ack] = [body for _, _, c, body in fleet.sent if c == b"ACK"]
    assert ack["id"] == first["id"]
    row = result_of(fleet.db.store.get(first["id"]))
    assert (row.state, row.result) == ("succeeded", '"w1"')
    # The slot's request for work came with it, and counts too.
    fleet.submit("b")
    fleet.settle()
    assert [w for _, w, _ in fleet.tasks()] == ["w1"]
    assert first["id"] not in b.attempts


def test_a_wait_is_answered_when_another_broker_ends_the_task():
    fleet = Fleet()
    fleet.broker("a")
    fleet.broker("b")
    fleet.worker("a", "w1")
    fleet.submit("a")
    [(_, _, task)] = fleet.tasks("w1")
    fleet.send(
        "b", b"client", b"WAIT", {"req": "w", "id": task["id"], "timeout": 60}
    )
    fleet.settle()
    assert [
        body
        for broker, _, c, body in fleet.sent
        if c == b"REPLY" and broker == "b"
    ] == []
    fleet.finish("a", "w1", task)
    fleet.settle()
    [reply] = [
        body
        for broker, _, c, body in fleet.sent
        if c == b"REPLY" and broker == "b" and body.get("req") == "w"
    ]
    assert reply["task"]["state"] == "succeeded"


def test_tasks_no_broker_can_run_are_failed_by_the_sweeper():
    fleet = Fleet()
    a = fleet.broker("a")
    bad_level = fleet.db.insert_external("echo", "1", "urgent").id
    bad_name = fleet.db.insert_external("bad\x07name", "1").id
    good = fleet.db.insert_external("nobody-has-it", "1").id
    with capturedLogs() as events:
        result_of(a.poll())
        fleet.settle()
    assert (
        sum("failed {count} queued tasks" in e["log_format"] for e in events)
        == 2
    )
    rows = {
        i: result_of(fleet.db.store.get(i))
        for i in (bad_level, bad_name, good)
    }
    assert "unknown priority level 'urgent'" in rows[bad_level].error
    assert "invalid handler name" in rows[bad_name].error
    # A handler no connected worker has waits for one.
    assert rows[good].state == "queued"


def test_a_wait_hears_of_a_task_its_broker_gave_back_to_another():
    fleet = Fleet()
    a = fleet.broker("a")
    fleet.broker("b")
    fleet.worker("b", "w2")
    # Submitted to a, which has no worker: b's worker runs it.
    fleet.submit("a")
    fleet.settle()
    [(broker, _, task)] = fleet.tasks()
    assert broker == "b"
    fleet.send(
        "a", b"client", b"WAIT", {"req": "w", "id": task["id"], "timeout": 60}
    )
    fleet.finish("b", "w2", task)
    fleet.settle()
    [reply] = [
        body
        for name, _, c, body in fleet.sent
        if c == b"REPLY" and name == "a" and body.get("req") == "w"
    ]
    assert reply["task"]["state"] == "succeeded"
    assert not a.outcomes.is_waited(task["id"])
