"""
Tests for taskbroker.broker.status: task counts kept from the broker's own
changes, corrected by recounts, and the STATS reply built from them.
"""

from hypothesis import given, settings
from hypothesis import strategies as st

from taskbroker.broker.status import DELAYED, TaskCounts
from taskbroker.protocol import codec
from taskbroker.testing import result_of
from taskbroker.transport.zmq import Sender

from .test_window import Peers, open_store, start_broker, worker


def fresh_counts(broker):
    counts = TaskCounts(broker.config.default_priority)
    counts.seed(result_of(broker.store.counts(broker.clock.seconds())), 0.0)
    return counts.summary()


def test_a_summary_separates_due_and_delayed_tasks():
    counts = TaskCounts("normal")
    counts.seed(
        {
            ("queued", None, "echo", False): 2,
            ("queued", "high", "echo", True): 1,
            ("succeeded", "low", "other", False): 4,
        },
        now=10.0,
    )
    assert counts.counted_at == 10.0
    assert counts.summary() == (
        {"queued": {"normal": 2, "high": 1}, "succeeded": {"low": 4}},
        {"echo": 2},
        1,
    )
    counts.move("high", "echo", DELAYED, None)
    assert counts.summary()[1:] == ({"echo": 3}, 0)
    counts.move(None, "echo", "queued", "running", n=3)
    assert counts.summary()[0]["running"] == {"normal": 3}
    # Never below zero, whatever a recount already saw.
    counts.move(None, "echo", "queued", "failed", n=5)
    assert counts.summary()[0]["queued"] == {"high": 1}


def test_stats_answers_from_memory_after_its_first_count():
    clock, store = open_store()
    peers = Peers()
    broker = start_broker(store, clock, peers)
    reads = []
    counts = store.counts
    store.counts = lambda now: (reads.append(now), counts(now))[1]
    for req in ("a", "b", "c"):
        broker.handle(Sender(b"client"), codec.encode(b"STATS", {"req": req}))
    assert len(reads) == 1
    clock.advance(7)
    broker.handle(Sender(b"client"), codec.encode(b"STATS", {"req": "d"}))
    stats = peers.sent[-1][2]["stats"]
    assert stats["counts_age"] == 7.0 and len(reads) == 1


def test_stats_say_whether_the_broker_accepts_work():
    clock, store = open_store()
    peers = Peers()
    broker = start_broker(store, clock, peers)

    def stats():
        broker.handle(Sender(b"client"), codec.encode(b"STATS", {"req": "r"}))
        return peers.sent[-1][2]["stats"]

    assert (stats()["accepting_work"], stats()["write_error"]) == (True, None)
    store.write_error = "database x: transaction failed: disk I/O error"
    assert (stats()["accepting_work"], stats()["write_error"]) == (
        False,
        "database x: transaction failed: disk I/O error",
    )


ACTIONS = st.tuples(
    st.sampled_from(
        [
            "submit",
            "later",
            "sql",
            "bad-sql",
            "run",
            "fail",
            "cancel-queued",
            "cancel-running",
            "retry",
            "tick",
            "lose",
        ]
    ),
    st.sampled_from(["high", "normal", "low"]),
    st.sampled_from(["echo", "other"]),
)


@settings(max_examples=80, deadline=None)
@given(st.lists(ACTIONS, max_size=40))
def test_counts_kept_by_the_broker_match_a_recount(steps):
    """
    Whatever the broker does to tasks, the counts it keeps from its own
    changes are those a recount of the table finds.
    """
    clock, store = open_store()
    store.insert_external("echo", "1", priority="low")
    peers = Peers()
    broker = start_broker(store, clock, peers, max_attempts=2)
    result_of(broker.status.recount())
    identity = worker(broker)
    running = []

    def run(state):
        broker.handle(Sender(identity), codec.encode(b"READY", {}))
        running.extend(peers.tasks())
        if running and state is not None:
            task = running.pop(0)
            broker.handle(
                Sender(identity),
                codec.encode(
                    b"RESULT",
                    {
                        "id": task["id"],
                        "token": task["token"],
                        "state": state,
                        "result": None,
                        "error": "boom",
                    },
                ),
            )

    for n, (action, priority, handler) in enumerate(steps):
        client = Sender(b"client")
        if action in ("submit", "later"):
            broker.handle(
                client,
                codec.encode(
                    b"SUBMIT",
                    {
                        "req": str(n),
                        "tasks": [
                            {
                                "handler": handler,
                                "payload": n,
                                "priority": priority,
                                "delay": 2.0 if action == "later" else None,
                            }
                        ],
                    },
                ),
            )
        elif action in ("sql", "bad-sql"):
            store.insert_external(
                handler,
                "{" if action == "bad-sql" else str(n),
                priority=priority,
            )
            result_of(broker.poll())
        elif action == "run":
            run("succeeded")
        elif action == "fail":
            run("failed")
        elif action == "cancel-queued":
            queued = result_of(store.list("queued", None, 0, 1))
            if queued:
                broker.handle(
                    client,
                    codec.encode(
                        b"CANCEL", {"req": str(n), "id": queued[0].id}
                    ),
                )
        elif action == "cancel-running":
            run(None)
            if running:
                task = running.pop(0)
                broker.handle(
                    client,
                    codec.encode(b"CANCEL", {"req": str(n), "id": task["id"]}),
                )
        elif action == "retry":
            ended = result_of(store.list("failed", None, 0, 1)) or result_of(
                store.list("cancelled", None, 0, 1)
            )
            if ended:
                broker.handle(
                    client,
                    codec.encode(b"RETRY", {"req": str(n), "id": ended[0].id}),
                )
        elif action == "tick":
            clock.advance(1.5)
        else:
            # The worker falls silent: its tasks are requeued, and it
            # announces itself again.
            clock.advance(10)
            broker.sweep()
            running.clear()
            peers.tasks()
            identity = worker(broker)
        assert broker.status.tasks.summary() == fresh_counts(broker), (
            n,
            action,
        )
