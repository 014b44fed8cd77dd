"""
Tests for taskbroker.schedules: cron expressions, ticks in a time zone's
wall time across changes of clocks, intervals, and durations.
"""

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import strategies as st

from taskbroker.schedules import (
    Cron,
    check_name,
    format_duration,
    next_tick,
    parse_duration,
    tick_label,
    unique_key,
)

NEW_YORK = "America/New_York"


def at(text, zone=NEW_YORK):
    return (
        datetime.fromisoformat(text).replace(tzinfo=ZoneInfo(zone)).timestamp()
    )


def wall(unix_time, zone=NEW_YORK):
    return datetime.fromtimestamp(unix_time, ZoneInfo(zone)).isoformat()


def ticks(start, cron, count, zone=NEW_YORK):
    found, t = [], start
    for _ in range(count):
        t = next_tick(t, cron=cron, timezone_name=zone)
        found.append(wall(t, zone))
    return found


@pytest.mark.parametrize(
    "expression, minutes, hours, days, months, weekdays",
    [
        (
            "* * * * *",
            range(60),
            range(24),
            range(1, 32),
            range(1, 13),
            range(7),
        ),
        (
            "*/15 9-17 1,15 jan-mar mon-fri",
            [0, 15, 30, 45],
            range(9, 18),
            [1, 15],
            [1, 2, 3],
            [1, 2, 3, 4, 5],
        ),
        (
            "0-30/10 0 * * 7",
            [0, 10, 20, 30],
            [0],
            range(1, 32),
            range(1, 13),
            [0],
        ),
        (
            "5/20 * * DEC Sun,sat",
            [5, 25, 45],
            range(24),
            range(1, 32),
            [12],
            [0, 6],
        ),
        ("@daily", [0], [0], range(1, 32), range(1, 13), range(7)),
        ("@hourly", [0], range(24), range(1, 32), range(1, 13), range(7)),
    ],
)
def test_fields(expression, minutes, hours, days, months, weekdays):
    cron = Cron(expression)
    assert (
        cron.minutes,
        cron.hours,
        cron.days,
        cron.months,
        cron.weekdays,
    ) == tuple(
        frozenset(values)
        for values in (minutes, hours, days, months, weekdays)
    )


@pytest.mark.parametrize(
    "expression, message",
    [
        ("* * * *", "has 4 fields, not five"),
        ("60 * * * *", "cron minute: '60' is not a number from 0 to 59"),
        ("* 24 * * *", "cron hour: '24' is not a number from 0 to 23"),
        ("* * 0 * *", "cron day of month: '0' is not a number from 1 to 31"),
        (
            "* * * foo *",
            "cron month: 'foo' is not a number from 1 to 12 or a name",
        ),
        ("* * * * 8", "cron day of week: '8' is not a number from 0 to 7"),
        ("*/0 * * * *", "cron minute: bad step '0'"),
        ("30-10 * * * *", "cron minute: range '30-10' runs backwards"),
        ("", "has 0 fields"),
    ],
)
def test_bad_expressions(expression, message):
    with pytest.raises(ValueError, match=message):
        Cron(expression)


def test_day_of_month_or_day_of_week():
    # Both restricted: either matches (cron's rule).
    assert ticks(at("2026-12-01T00:00"), "0 12 13 * fri", 3) == [
        "2026-12-04T12:00:00-05:00",
        "2026-12-11T12:00:00-05:00",
        "2026-12-13T12:00:00-05:00",
    ]
    # One restricted: that one alone.
    assert ticks(at("2026-12-01T00:00"), "0 12 * * fri", 2) == [
        "2026-12-04T12:00:00-05:00",
        "2026-12-11T12:00:00-05:00",
    ]


def test_a_skipped_wall_time_comes_due_when_the_gap_ends():
    # 2026-03-08: New York's clocks jump from 02:00 to 03:00.
    assert ticks(at("2026-03-07T12:00"), "30 2 * * *", 3) == [
        "2026-03-08T03:00:00-04:00",
        "2026-03-09T02:30:00-04:00",
        "2026-03-10T02:30:00-04:00",
    ]
    # Several wall times in the gap come due once, at its end.
    assert ticks(at("2026-03-08T01:50"), "*/20 * * * *", 3) == [
        "2026-03-08T03:00:00-04:00",
        "2026-03-08T03:20:00-04:00",
        "2026-03-08T03:40:00-04:00",
    ]


def test_a_repeated_wall_time_comes_due_once():
    # 2026-11-01: New York's clocks go back from 02:00 to 01:00.
    assert ticks(at("2026-10-31T12:00"), "30 1 * * *", 2) == [
        "2026-11-01T01:30:00-04:00",
        "2026-11-02T01:30:00-05:00",
    ]
    assert ticks(at("2026-11-01T00:50"), "*/20 * * * *", 5) == [
        "2026-11-01T01:00:00-04:00",
        "2026-11-01T01:20:00-04:00",
        "2026-11-01T01:40:00-04:00",
        "2026-11-01T02:00:00-05:00",
        "2026-11-01T02:20:00-05:00",
    ]


def test_utc_by_default():
    start = datetime(2026, 12, 31, 23, 59, 30, tzinfo=UTC)
    assert (
        tick_label(next_tick(start.timestamp(), cron="@yearly"))
        == "2027-01-01T00:00:00.000000+00:00"
    )


def test_a_cron_expression_that_never_comes_due():
    with pytest.raises(ValueError, match="never comes due"):
        next_tick(0.0, cron="0 0 30 2 *")


def test_an_unknown_zone():
    with pytest.raises(ValueError, match="unknown time zone 'Nowhere/X'"):
        next_tick(0.0, cron="@daily", timezone_name="Nowhere/X")


def test_every_counts_elapsed_seconds():
    assert next_tick(1000.0, every=60) == 1060.0
    # A new schedule starts on a whole second.
    assert next_tick(1000.25, every=60) == 1061.0
    # Due at 1060 and handled late, at 1305: the ticks passed meanwhile are
    # not made up, and the next keeps the rhythm.
    assert next_tick(1305.0, every=60, previous=1060.0) == 1360.0
    assert next_tick(1060.0, every=60, previous=1060.0) == 1120.0


@given(
    st.floats(0, 2e9),
    st.sampled_from(
        ["* * * * *", "*/7 3 * * *", "0 0 29 2 *", "15 2 * 3,11 sun"]
    ),
    st.sampled_from([NEW_YORK, "Europe/Paris", "Australia/Lord_Howe", "UTC"]),
)
def test_the_next_tick_is_later_and_matches(start, expression, zone):
    tick = next_tick(start, cron=expression, timezone_name=zone)
    assert tick > start
    shown = datetime.fromtimestamp(tick, ZoneInfo(zone))
    cron = Cron(expression)
    # The wall time it shows is one the expression names, unless it is
    # the end of a gap that swallowed one.
    if shown.minute in cron.minutes and shown.hour in cron.hours:
        assert shown.month in cron.months and cron.day_matches(shown)


@pytest.mark.parametrize(
    "text, seconds",
    [
        ("90", 90.0),
        ("1.5", 1.5),
        ("15m", 900.0),
        ("2h", 7200.0),
        ("7d", 604800.0),
        (" 30S ", 30.0),
    ],
)
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    "text", ["", "-1", "7w", "d", "1e3", "none", "101000d"]
)
def test_bad_durations(text):
    with pytest.raises(ValueError):
        parse_duration(text)


def test_the_shortest_duration():
    assert parse_duration("0") == 0.0
    assert parse_duration("1m", least=60.0) == 60.0
    with pytest.raises(
        ValueError, match="must be at least 1m and at most 100 years"
    ):
        parse_duration("59", least=60.0)


def test_none_is_for_ever_where_allowed():
    assert parse_duration("None", allow_none=True) is None


@pytest.mark.parametrize(
    "seconds, text",
    [
        (604800.0, "7d"),
        (7200.0, "2h"),
        (900.0, "15m"),
        (90.0, "90s"),
        (1.5, "1.5s"),
        (0.0, "0s"),
        (None, "none"),
    ],
)
def test_durations_shown(seconds, text):
    assert format_duration(seconds) == text


def test_names():
    assert check_name("nightly.report-2_b") == "nightly.report-2_b"
    for bad in ("", "-x", "a b", "a:b", "x" * 101, None):
        with pytest.raises(ValueError):
            check_name(bad)


def test_unique_key_names_the_tick():
    assert (
        unique_key("nightly", 1796432400.0)
        == "schedule:nightly:2026-12-05T01:00:00.000000+00:00"
    )
