"""
Tests for taskbroker.broker.service: the broker daemon's tree of services.
Binding a real socket is left to the integration tests; these check the
order and the failure paths with a MemoryStore and a Clock.
"""

from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent

from taskbroker.broker.service import BrokerService, _guarded
from taskbroker.config import BrokerConfig
from taskbroker.testing import MemoryStore, result_of


def test_the_socket_binds_after_the_store_and_closes_before_it():
    clock = Clock()
    service = BrokerService(BrokerConfig(), MemoryStore(clock), clock)
    assert [child.name for child in service] == [
        "store",
        "core",
        "zmq",
        "socket",
        "http",
        "intake",
        "poller",
        "sweeper",
        "recounter",
        "scheduler",
        "retention",
    ]


def test_a_store_that_cannot_open_stops_the_start_with_one_line():
    clock = Clock()
    store = MemoryStore(clock)
    result_of(store.open())  # a second open fails
    fatal = []
    service = BrokerService(
        BrokerConfig(), store, clock, on_fatal=fatal.append
    )
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
        "sweeper",
        "sweeper",
    ]


def test_the_descriptor_limit_is_raised_logged_and_a_low_one_warned(
    monkeypatch,
):
    import resource

    from taskbroker.broker import service

    set_to = []
    monkeypatch.setattr(
        resource, "setrlimit", lambda which, limits: set_to.append(limits)
    )
    for (soft, hard), level, limit in (
        ((1024, 1024), "warn", 1024),
        ((65536, 65536), "info", 65536),
        ((1024, 524288), "info", 524288),
        ((1024, resource.RLIM_INFINITY), "info", 1_048_576),
    ):
        monkeypatch.setattr(
            resource, "getrlimit", lambda which, limits=(soft, hard): limits
        )
        with capturedLogs() as events:
            service._raise_descriptor_limit()
        [event] = events
        assert event["limit"] == limit and event["log_level"].name == level
    assert set_to == [(524288, 524288), (1_048_576, resource.RLIM_INFINITY)]


class CountingStore(MemoryStore):
    checks = 0

    def check(self):
        self.checks += 1
        return MemoryStore.check(self)


def test_the_database_is_checked_once_listening_unless_told_not_to():
    for setting, checks in (("quick", 1), ("none", 0)):
        clock = Clock()
        store = CountingStore(clock)
        result_of(store.open())
        service = BrokerService(
            BrokerConfig(check_database=setting), store, clock
        )
        service._check_database()
        assert store.checks == checks


def test_a_broker_whose_zap_handler_cannot_bind_never_listens(
    tmp_path, monkeypatch
):
    # Where no ZAP handler answers, libzmq lets every CURVE key in: the
    # broker must not listen without its own.
    import zmq

    from taskbroker import curve
    from taskbroker.broker import keys
    from taskbroker.broker import service as service_module

    def taken(*args):
        raise zmq.ZMQError(zmq.EADDRINUSE)

    monkeypatch.setattr(service_module, "ZapHandler", taken)
    clock = Clock()
    curve.keygen(str(tmp_path), "broker")
    config = BrokerConfig(
        curve_secret_key=str(tmp_path / "broker.key_secret"),
        authorized_clients=str(tmp_path),
    )
    fatal = []
    service = BrokerService(
        config,
        MemoryStore(clock),
        clock,
        on_fatal=fatal.append,
        curve=keys.load(config),
    )
    result_of(service.startService())
    assert fatal == [
        "cannot serve CURVE authentication (ZAP handler at "
        "inproc://zeromq.zap.01): Address already in use; without it any "
        "key would get in"
    ]
    assert service.socket is None and not service.running


def test_a_broker_beyond_loopback_without_curve_warns():
    from types import SimpleNamespace

    clock = Clock()
    warnings = {}
    for endpoint in ("tcp://0.0.0.0:5555", "tcp://127.0.0.1:5555"):
        service = BrokerService(
            BrokerConfig(check_database="none"), MemoryStore(clock), clock
        )
        service.socket = SimpleNamespace(endpoint=endpoint)
        with capturedLogs() as events:
            service._ready()
        warnings[endpoint] = [
            e for e in events if "WITHOUT CURVE" in e.get("log_format", "")
        ]
    assert len(warnings["tcp://0.0.0.0:5555"]) == 1
    assert warnings["tcp://127.0.0.1:5555"] == []


def test_a_status_site_that_cannot_listen_on_the_default_only_warns():
    # (A Clock cannot listen: as a port another broker holds.)
    clock = Clock()
    service = BrokerService(BrokerConfig(), MemoryStore(clock), clock)
    with capturedLogs() as events:
        assert result_of(service._listen_http()) is None
    assert service.http_port is None
    assert any(
        "no status site: cannot listen on "
        "tcp:8642:interface=127.0.0.1" in formatEvent(e)
        for e in events
    )
    # Any other endpoint the broker was told to serve stops it.
    service = BrokerService(
        BrokerConfig(http="tcp:8643"), MemoryStore(clock), clock
    )
    failures = []
    service._listen_http().addErrback(failures.append)
    [failure] = failures
    assert "cannot serve --http tcp:8643: " in str(failure.value)
