"""
Tests for taskbroker.broker.outcomes (the retry policy, waiting for a task
to end) and for how the broker answers when its own code fails: an
``internal`` error, logged with its traceback, never a request left
unanswered nor a bug reported as database trouble.
"""

import random

import pytest
from twisted.internet import defer
from twisted.logger import LogLevel, capturedLogs

from taskbroker.broker.outcomes import BrokerStopping, RetryPolicy
from taskbroker.config import BrokerConfig
from taskbroker.errors import StoreError
from taskbroker.store import TaskRow
from taskbroker.testing import result_of

from .test_broker import hello, send, started_broker, submit


@pytest.fixture
def broker(store, clock, peers):
    return started_broker(store, clock, peers)


def test_backoff_doubles_with_equal_jitter_up_to_the_maximum():
    policy = RetryPolicy(
        BrokerConfig(retry_delay=2.0, retry_max_delay=10.0), random.Random(1)
    )
    for attempt, full in ((1, 2.0), (2, 4.0), (3, 8.0), (4, 10.0), (9, 10.0)):
        delays = [policy.backoff(attempt) for _ in range(50)]
        assert all(full / 2 <= d <= full for d in delays)
        assert max(delays) - min(delays) > 0


def test_max_attempts_falls_back_to_the_broker_default():
    policy = RetryPolicy(BrokerConfig(max_attempts=3), random.Random())
    base = TaskRow(
        1,
        "echo",
        "null",
        None,
        "queued",
        0,
        None,
        None,
        0.0,
        None,
        None,
        None,
        None,
    )
    assert policy.max_attempts(base) == 3
    assert policy.max_attempts(base._replace(max_attempts=7)) == 7


def test_when_final_fires_with_the_final_row(broker):
    d = broker.outcomes.when_final(5)
    other = broker.outcomes.when_final(6)
    broker.outcomes.notify(5, "row")
    assert result_of(d) == "row"
    assert not other.called


def test_a_cancelled_wait_is_forgotten(broker):
    d = broker.outcomes.when_final(5)
    d.cancel()
    with pytest.raises(defer.CancelledError):
        result_of(d)
    broker.outcomes.notify(5, "row")  # no waiter left to fire twice


def test_stopping_fails_every_wait(broker):
    d = broker.outcomes.when_final(5)
    broker.stop()
    with pytest.raises(BrokerStopping):
        result_of(d)


def _error(peers_, identity=b"client"):
    [(_, command, body)] = peers_.take(identity)
    assert command == b"ERROR"
    return body


def test_a_bug_in_a_request_is_an_internal_error_with_a_traceback(
    broker, peers, store
):
    def broken(task_id):
        raise TypeError("a bug")

    store.get = broken
    with capturedLogs() as events:
        send(broker, b"client", b"GET", {"req": "g", "id": 1})
    body = _error(peers)
    assert body["code"] == "internal" and body["req"] == "g"
    [failure] = [e for e in events if e["log_level"] == LogLevel.critical]
    assert failure["log_failure"].check(TypeError)
    assert broker.counters["internal_errors"] == 1
    assert broker.counters["store_errors"] == 0


def test_a_bug_in_a_callback_is_an_internal_error(broker, peers, store):
    store.get = lambda task_id: defer.succeed(object())  # not a row
    with capturedLogs() as events:
        send(broker, b"client", b"GET", {"req": "g", "id": 1})
    assert _error(peers)["code"] == "internal"
    assert any(e.get("log_failure") is not None for e in events)
    assert broker.counters["internal_errors"] == 1


def test_a_database_error_is_unavailable_without_a_traceback(
    broker, peers, store
):
    store.get = lambda task_id: defer.fail(StoreError("disk I/O error"))
    with capturedLogs() as events:
        send(broker, b"client", b"GET", {"req": "g", "id": 1})
    assert _error(peers)["code"] == "unavailable"
    assert not any(e.get("log_failure") is not None for e in events)
    assert broker.counters["store_errors"] == 1
    assert broker.counters["internal_errors"] == 0


def test_a_failed_submit_is_answered_and_gives_its_claims_back(
    broker, peers, store
):
    hello(broker)
    send(broker, b"w1/x", b"READY", {})
    store.submit = lambda tasks: defer.fail(RuntimeError("a bug"))
    with capturedLogs():
        submit(broker, {"handler": "echo"})
    assert _error(peers)["code"] == "internal"
    assert broker.dispatcher.worker(b"w1/x").credits == 1


def test_a_bug_in_a_worker_command_is_logged_and_the_broker_goes_on(
    broker, peers, store
):
    hello(broker)
    peers.take()

    def broken(identity, session, body):
        raise KeyError("a bug")

    broker.router._worker_handlers[b"READY"] = broken
    with capturedLogs() as events:
        send(broker, b"w1/x", b"READY", {})
    assert peers.take(b"w1/x") == []  # nothing is answered to a worker
    assert any(e.get("log_failure") is not None for e in events)
    assert broker.counters["internal_errors"] == 1
    send(broker, b"client", b"GET", {"req": "g", "id": 99})
    assert _error(peers)["code"] == "not_found"
