"""
Tests for taskbroker.broker.service: the broker daemon's tree of services.
Binding a real socket is left to the integration tests; these check the
order and the failure paths with a MemoryStore and a Clock.
"""

from twisted.internet.task import Clock
from twisted.logger import capturedLogs

from taskbroker.broker.service import BrokerService, _guarded
from taskbroker.config import BrokerConfig
from taskbroker.testing import MemoryStore, result_of


def test_the_socket_binds_after_the_store_and_closes_before_it():
    clock = Clock()
    service = BrokerService(BrokerConfig(), MemoryStore(clock), clock)
    assert [child.name for child in service] == [
        "store", "core", "zmq", "socket", "intake", "poller", "sweeper",
        "recounter"]


def test_a_store_that_cannot_open_stops_the_start_with_one_line():
    clock = Clock()
    store = MemoryStore(clock)
    result_of(store.open())  # a second open fails
    fatal = []
    service = BrokerService(BrokerConfig(), store, clock,
                            on_fatal=fatal.append)
    result_of(service.startService())
    assert fatal == ["memory store is already open"]
    assert service.socket is None and not service.running
    assert not service.getServiceNamed("zmq").running


def test_a_bug_in_a_timer_tick_is_logged_and_the_timer_goes_on():
    calls = []

    def tick():
        calls.append(1)
        raise ValueError("a bug")

    guarded = _guarded(tick, "sweeper")
    with capturedLogs() as events:
        assert guarded() is None
        assert guarded() is None
    assert len(calls) == 2
    assert [e["name"] for e in events if e.get("log_failure")] == [
        "sweeper", "sweeper"]


def test_the_descriptor_limit_is_logged_and_a_low_one_warned(monkeypatch):
    import resource

    from taskbroker.broker import service

    for soft, level in ((1024, "warn"), (65536, "info")):
        monkeypatch.setattr(resource, "getrlimit",
                            lambda which, soft=soft: (soft, soft))
        with capturedLogs() as events:
            service._log_descriptor_limit()
        [event] = events
        assert event["limit"] == soft and event["log_level"].name == level
