"""
Tests for taskbroker.failover: reading a failover list, where a worker
starts in it, moving along it, and the failing-store timer.
"""

import zlib

import pytest
from twisted.internet.task import Clock

from taskbroker.failover import (
    EndpointRing,
    StoreWatch,
    parse_endpoints,
    start_position,
)

A, B, C = (
    "tcp://127.0.0.1:5001",
    "tcp://127.0.0.1:5002",
    "tcp://127.0.0.1:5003",
)


def test_a_single_endpoint_is_a_list_of_one():
    assert parse_endpoints(A) == (A,)
    assert parse_endpoints([A]) == (A,)


def test_a_comma_separated_string_or_a_list():
    assert parse_endpoints(f"{A},{B}, {C}") == (A, B, C)
    assert parse_endpoints([C, A]) == (C, A)
    assert parse_endpoints((A, "ipc:///tmp/b.sock")) == (
        A,
        "ipc:///tmp/b.sock",
    )


@pytest.mark.parametrize(
    "value, words",
    [
        (f"{A},localhost:5", "endpoint 'localhost:5': expected a ZeroMQ"),
        (f"{A},tcp://127.0.0.1:*", "endpoint 'tcp://127.0.0.1:*': name the"),
        (f"{A},tcp://h:70000", "endpoint 'tcp://h:70000': the port"),
        (f"{A},{B},{A}", f"endpoint '{A}' is listed twice"),
        (f"{A},,{B}", "empty"),
        (f"{A},", "empty"),
        ([A, 5], "endpoint 5 is not a string"),
        ([], "at least one"),
        (5, "not int"),
        ("localhost:5", "expected a ZeroMQ endpoint"),
        ("", "expected a ZeroMQ endpoint"),
    ],
)
def test_bad_lists_are_refused_in_one_line_naming_the_culprit(value, words):
    with pytest.raises(ValueError) as info:
        parse_endpoints(value)
    assert words in str(info.value)
    assert "\n" not in str(info.value)


def test_a_single_bad_endpoint_reads_as_before():
    with pytest.raises(ValueError) as info:
        parse_endpoints("localhost:5555")
    assert str(info.value) == (
        "expected a ZeroMQ endpoint such as tcp://127.0.0.1:5555"
    )


def test_the_start_position_is_a_stable_hash_of_the_name():
    assert start_position("w1", 3) == zlib.crc32(b"w1") % 3
    assert start_position("w1", 1) == 0
    # Stable across calls (and processes: crc32 is not salted).
    assert {start_position("worker-7", 4) for _ in range(5)} == {
        start_position("worker-7", 4)
    }


def test_a_fleet_spreads_over_the_list():
    positions = [start_position(f"host-{i}", 3) for i in range(300)]
    counts = [positions.count(p) for p in range(3)]
    assert min(counts) > 60


def test_the_ring_moves_to_the_next_and_wraps_around():
    ring = EndpointRing((A, B, C), position=start_position("w", 3))
    first = ring.current
    seen = [first]
    for _ in range(3):
        previous, current = ring.advance()
        assert previous == seen[-1]
        seen.append(current)
    assert seen[-1] == first
    assert set(seen) == {A, B, C}
    order = (A, B, C)
    start = order.index(first)
    assert seen == [order[(start + i) % 3] for i in range(4)]


def test_a_ring_of_one_stays_put():
    ring = EndpointRing((A,), position=5)
    assert ring.advance() == (A, A)
    assert len(ring) == 1


def test_the_store_watch_moves_after_failing_without_a_break():
    clock = Clock()
    watch = StoreWatch(10.0)
    assert not watch.report(clock.seconds(), False)
    for _ in range(9):
        assert not watch.report(clock.seconds(), True)
        clock.advance(1)
    assert watch.failing_for(clock.seconds()) == 9
    clock.advance(0.5)
    assert not watch.report(clock.seconds(), True)
    clock.advance(0.5)
    assert watch.report(clock.seconds(), True)


def test_a_good_report_starts_the_count_again():
    clock = Clock()
    watch = StoreWatch(10.0)
    watch.report(clock.seconds(), True)
    clock.advance(9)
    watch.report(clock.seconds(), False)
    assert watch.failing_for(clock.seconds()) == 0.0
    clock.advance(1)
    assert not watch.report(clock.seconds(), True)
    clock.advance(9.9)
    assert not watch.report(clock.seconds(), True)
    watch.reset()
    clock.advance(5)
    assert not watch.report(clock.seconds(), True)
