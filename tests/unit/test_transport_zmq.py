"""
Tests for taskbroker.transport.zmq with real ZeroMQ sockets under the real
reactor (pytest-twisted): txZMQ reaches for the global reactor, so a fake
one cannot drive it.

Every test's sockets belong to the ``zmq_service`` fixture, which shuts
the ZeroMQ context down and checks that no reader or read continuation is
left in the reactor.
"""

import itertools
import re

import pytest
import pytest_twisted
import zmq
from twisted.internet import defer, task
from twisted.logger import capturedLogs
from zmq.utils.monitor import recv_monitor_message

from taskbroker.transport import zmq as transport
from taskbroker.transport.options import dealer_options
from taskbroker.transport.zmq import (
    READ_BATCH,
    DealerSocket,
    RouterSocket,
    Sender,
    ZmqFactoryService,
)

LOOPBACK = "tcp://127.0.0.1:*"
_inproc = itertools.count()


def reactor():
    from twisted.internet import reactor

    return reactor


def transport_leftovers():
    """
    Readers and scheduled reads of this module's connections still in the
    reactor.
    """
    r = reactor()
    readers = [
        x for x in r.getReaders() if isinstance(x, transport._Connection)
    ]
    calls = [
        c
        for c in r.getDelayedCalls()
        if isinstance(getattr(c.func, "__self__", None), transport._Connection)
    ]
    return readers + calls


@pytest.fixture
def zmq_service():
    service = ZmqFactoryService(reactor())
    service.startService()
    yield service
    service.stopService()
    assert transport_leftovers() == []


@pytest.fixture
def factory(zmq_service):
    return zmq_service.get_factory()


class Collector:
    """
    An ``on_message`` callback that records its calls and can be waited on.

    :param fail: a predicate; a call for which it is true raises.
    """

    def __init__(self, fail=None):
        self.calls = []
        self._fail = fail
        self._waiting = []

    def __call__(self, *args):
        if self._fail is not None and self._fail(*args):
            raise RuntimeError("handler failed")
        self.calls.append(args)
        for item in list(self._waiting):
            count, d = item
            if len(self.calls) >= count:
                self._waiting.remove(item)
                d.callback(self.calls)

    def wait_for(self, count, timeout=10):
        """
        :returns: a ``Deferred`` firing with the calls once there are
            ``count`` of them (failing after ``timeout`` seconds, so that a
            lost message fails the test instead of hanging it).
        """
        if len(self.calls) >= count:
            return defer.succeed(self.calls)
        d = defer.Deferred()
        self._waiting.append((count, d))
        return d.addTimeout(timeout, reactor())


def router(factory, on_message, endpoint=LOOPBACK, max_message_size=-1):
    return RouterSocket(factory, endpoint, on_message, max_message_size)


def test_router_reports_its_endpoint(factory):
    r = router(factory, Collector())
    try:
        match = re.fullmatch(r"tcp://127\.0\.0\.1:(\d+)", r.endpoint)
        assert match and int(match.group(1)) > 0
    finally:
        r.close()


@pytest_twisted.inlineCallbacks
def test_dealer_and_router_exchange_messages(factory):
    at_router, at_dealer = Collector(), Collector()
    r = router(factory, at_router)
    dealer = DealerSocket(factory, r.endpoint, at_dealer, identity=b"w1/abc")
    try:
        assert dealer.send([b"TB1", b"HELLO", b"{}"]) is True
        [(sender, frames)] = yield at_router.wait_for(1)
        assert sender == Sender(b"w1/abc", key=None)
        assert (sender.identity, frames) == (
            b"w1/abc",
            [b"TB1", b"HELLO", b"{}"],
        )

        assert r.send(b"w1/abc", [b"TB1", b"WELCOME", b"{}"]) is True
        [(frames,)] = yield at_dealer.wait_for(1)
        assert frames == [b"TB1", b"WELCOME", b"{}"]
    finally:
        dealer.close()
        r.close()


def test_send_to_unknown_identity_fails(factory):
    r = router(factory, Collector())
    try:
        assert r.send(b"nobody", [b"TB1", b"ACK", b"{}"]) is False
    finally:
        r.close()


def test_send_after_close_fails(factory):
    r = router(factory, Collector())
    dealer = DealerSocket(factory, r.endpoint, Collector())
    r.close()
    dealer.close()
    assert r.send(b"x", [b"y"]) is False
    assert dealer.send([b"y"]) is False
    # Closing twice is harmless.
    r.close()
    dealer.close()


@pytest_twisted.inlineCallbacks
def test_failing_handler_is_counted_and_socket_keeps_reading(factory):
    at_router = Collector(fail=lambda identity, frames: frames == [b"bad"])
    r = router(factory, at_router)
    dealer = DealerSocket(factory, r.endpoint, Collector(), identity=b"d")
    try:
        with capturedLogs() as events:
            dealer.send([b"bad"])
            dealer.send([b"good", b"1"])
            dealer.send([b"good", b"2"])
            calls = yield at_router.wait_for(2)
        assert calls == [
            (Sender(b"d"), [b"good", b"1"]),
            (Sender(b"d"), [b"good", b"2"]),
        ]
        assert r.handler_errors == 1
        assert dealer.handler_errors == 0
        failures = [e for e in events if "log_failure" in e]
        assert len(failures) == 1
        assert failures[0]["log_failure"].check(RuntimeError)
    finally:
        dealer.close()
        r.close()


@pytest_twisted.inlineCallbacks
def test_flood_is_read_in_batches_and_timers_still_run(factory):
    # inproc: every message is queued at the router before it reads any,
    # so an unbounded read would drain them all in one reactor turn.
    total = 8 * READ_BATCH
    endpoint = f"inproc://flood-{next(_inproc)}"
    timer_saw = []

    def on_message(sender, frames):
        if not at_router.calls:
            reactor().callLater(
                0, lambda: timer_saw.append(len(at_router.calls))
            )

    at_router = Collector()
    r = router(factory, lambda *a: (on_message(*a), at_router(*a)), endpoint)
    dealer = DealerSocket(factory, endpoint, Collector(), identity=b"flood")
    try:
        for i in range(total):
            assert dealer.send([b"%d" % i])
        calls = yield at_router.wait_for(total)
        assert [frames for _, frames in calls] == [
            [b"%d" % i] for i in range(total)
        ]
        # The timer, scheduled on the first message, ran before the last.
        assert len(timer_saw) == 1
        assert 0 < timer_saw[0] < total
    finally:
        dealer.close()
        r.close()


@pytest_twisted.inlineCallbacks
def test_a_batch_of_sends_looks_for_input_once(factory, monkeypatch):
    at_router, at_dealer = Collector(), Collector()
    r = router(factory, at_router)
    dealer = DealerSocket(factory, r.endpoint, at_dealer, identity=b"w1/abc")
    try:
        dealer.send([b"TB1", b"HELLO", b"{}"])
        yield at_router.wait_for(1)
        # Out of the read that delivered it: sends there never look.
        yield task.deferLater(reactor(), 0, lambda: None)
        looks = []
        look = r._connection._look_for_input
        monkeypatch.setattr(
            r._connection, "_look_for_input", lambda: (looks.append(1), look())
        )
        r.send(b"w1/abc", [b"alone"])
        assert len(looks) == 1
        with r.batch():
            for i in range(100):
                assert r.send(b"w1/abc", [b"%d" % i]) is True
            assert r.send(b"nobody", [b"x"]) is False
        assert len(looks) == 2
        calls = yield at_dealer.wait_for(101)
        assert [frames for (frames,) in calls] == [[b"alone"]] + [
            [b"%d" % i] for i in range(100)
        ]
        # Input that arrives afterwards is read as ever.
        dealer.send([b"after"])
        calls = yield at_router.wait_for(2)
        assert calls[-1] == (Sender(b"w1/abc"), [b"after"])
    finally:
        dealer.close()
        r.close()


@pytest_twisted.inlineCallbacks
def test_oversized_message_is_dropped_but_new_peers_work(factory):
    at_router = Collector()
    r = router(factory, at_router, max_message_size=1000)
    # Watch the router's connections: libzmq drops the sender of an
    # oversized message, and we wait for that instead of for a while.
    monitor = r._connection.socket.get_monitor_socket(zmq.EVENT_DISCONNECTED)
    big = DealerSocket(factory, r.endpoint, Collector(), identity=b"big")
    small = None
    try:
        assert big.send([b"x" * 2000])
        # libzmq's I/O thread does this work; blocking here is fine.
        assert monitor.poll(10_000), "the oversized sender was not dropped"
        assert recv_monitor_message(monitor)["event"] == zmq.EVENT_DISCONNECTED

        small = DealerSocket(
            factory, r.endpoint, Collector(), identity=b"small"
        )
        assert small.send([b"y" * 1000])
        calls = yield at_router.wait_for(1)
        assert calls == [(Sender(b"small"), [b"y" * 1000])]
    finally:
        r._connection.socket.disable_monitor()
        monitor.close(linger=0)
        big.close()
        if small is not None:
            small.close()
        r.close()


def test_factory_service_stop_closes_sockets():
    service = ZmqFactoryService(reactor())
    service.startService()
    factory = service.get_factory()
    assert service.get_factory() is factory
    r = router(factory, Collector())
    dealer = DealerSocket(factory, r.endpoint, Collector())
    assert transport_leftovers() != []

    service.stopService()
    assert not service.running
    assert service.factory is None
    assert r._connection.socket is None and dealer._connection.socket is None
    assert transport_leftovers() == []
    assert r.send(b"x", [b"y"]) is False
    # Stopping twice, and closing sockets after the context, are harmless.
    service.stopService()
    r.close()
    dealer.close()


def test_factory_service_without_sockets_stops():
    service = ZmqFactoryService(reactor(), linger=1000)
    service.startService()
    assert service.get_factory().lingerPeriod == 1000
    service.stopService()
    assert service.factory is None


def test_immediate_dealer_refuses_sends_without_a_connection(factory):
    # An endpoint where nothing listens any more.
    r = router(factory, Collector())
    endpoint = r.endpoint
    r.close()
    queued = DealerSocket(factory, endpoint, Collector())
    refused = DealerSocket(
        factory, endpoint, Collector(), options=dealer_options(immediate=True)
    )
    try:
        assert queued.send([b"TB1", b"READY", b"{}"]) is True
        assert refused.send([b"TB1", b"READY", b"{}"]) is False
    finally:
        queued.close()
        refused.close()


def test_every_client_socket_takes_its_options_from_one_place(factory):
    from twisted.internet import reactor as global_reactor

    from taskbroker.client.api import BrokerClient
    from taskbroker.client.blocking import BlockingClient
    from taskbroker.transport.options import client_options

    expected = dict(client_options())
    blocking = BlockingClient("tcp://127.0.0.1:1")
    twisted_client = BrokerClient(
        global_reactor, "tcp://127.0.0.1:1", zmq_factory=factory
    )
    try:
        for socket in (
            blocking._socket,
            twisted_client._socket_for(
                twisted_client.endpoint
            )._connection.socket,
        ):
            for option, value in expected.items():
                assert socket.getsockopt(option) == value, option
    finally:
        blocking.close()
        twisted_client.close()


def test_every_client_socket_with_keys_speaks_curve(
    factory, zmq_service, curve_keys
):
    from twisted.internet import reactor as global_reactor

    from taskbroker import curve
    from taskbroker.client.api import BrokerClient
    from taskbroker.client.blocking import BlockingClient
    from taskbroker.config import WorkerConfig
    from taskbroker.worker.service import WorkerService

    server = curve_keys("broker.key")
    blocking = BlockingClient(
        "tcp://127.0.0.1:1",
        curve_server_key=server,
        curve_secret_key=curve_keys("c1.key_secret"),
    )
    twisted_client = BrokerClient(
        global_reactor,
        "tcp://127.0.0.1:1",
        zmq_factory=factory,
        curve_server_key=server,
        curve_secret_key=curve_keys("c1.key_secret"),
    )
    worker = WorkerService(
        WorkerConfig(),
        {},
        global_reactor,
        zmq=zmq_service,
        curve=curve.load_peer_keys(
            server, curve_keys("w1.key_secret"), "worker"
        ),
    )
    dealer = worker._connect_dealer("tcp://127.0.0.1:1", lambda frames: None)
    plain = BlockingClient("tcp://127.0.0.1:1")
    try:
        for socket in (
            blocking._socket,
            twisted_client._socket_for(
                twisted_client.endpoint
            )._connection.socket,
            dealer._connection.socket,
        ):
            # libzmq reads the keys back only into buffers of its sizes.
            assert socket.getsockopt(zmq.MECHANISM) == zmq.CURVE
            assert socket.getsockopt(zmq.CURVE_SERVER) == 0
        assert plain._socket.getsockopt(zmq.MECHANISM) == zmq.NULL
    finally:
        for closable in (blocking, twisted_client, dealer, plain):
            closable.close()


def test_a_connection_that_never_finishes_its_handshake_is_dropped_soon(
    factory,
):
    from taskbroker.transport.options import HANDSHAKE_IVL_MS

    r = router(factory, Collector())
    try:
        assert (
            r._connection.socket.getsockopt(zmq.HANDSHAKE_IVL)
            == (HANDSHAKE_IVL_MS)
            <= 10_000
        )
    finally:
        r.close()
