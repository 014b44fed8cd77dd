"""
Tests for the broker's Prometheus metrics (taskbroker.broker.metrics),
read back with the Prometheus client's own parser.
"""

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.task import Clock

from taskbroker.broker.metrics import MOST_HANDLERS, OTHER
from taskbroker.testing import MemoryStore, result_of
from tests.unit.conftest import Peers
from tests.unit.test_broker import started_broker


def samples(broker):
    text = broker.metrics.render().decode("utf-8")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def a_broker():
    clock = Clock()
    store = MemoryStore(clock)
    result_of(store.open())
    return started_broker(store, clock, Peers())


def test_waits_and_runs_fall_in_their_buckets():
    broker = a_broker()
    for waited in (0.0005, 0.003, 7.0):
        broker.metrics.dispatched("high", "echo", waited)
    broker.metrics.ended("high", "echo", "succeeded", 0.2)
    got = samples(broker)

    def wait_bucket(le):
        return got[
            (
                "taskbroker_task_wait_seconds_bucket",
                (("handler", OTHER), ("le", le), ("priority", "high")),
            )
        ]

    # No worker serves echo here: its figures are under _other.
    assert [
        wait_bucket(le) for le in ("0.001", "0.005", "5.0", "10.0", "+Inf")
    ] == [1, 2, 2, 3, 3]
    assert (
        got[
            (
                "taskbroker_task_wait_seconds_sum",
                (("handler", OTHER), ("priority", "high")),
            )
        ]
        == 7.0035
    )
    assert (
        got[
            (
                "taskbroker_tasks_finished_total",
                (
                    ("handler", OTHER),
                    ("outcome", "succeeded"),
                    ("priority", "high"),
                ),
            )
        ]
        == 1
    )


def test_at_most_so_many_handler_names_are_kept():
    broker = a_broker()
    for n in range(MOST_HANDLERS + 50):
        broker.metrics.ended("normal", f"h{n}", "failed")
    assert len(broker.metrics._seen) == MOST_HANDLERS
    total = sum(
        value
        for (name, _), value in samples(broker).items()
        if name == "taskbroker_tasks_finished_total"
    )
    assert total == MOST_HANDLERS + 50
