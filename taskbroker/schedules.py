# -*- test-case-name: tests.unit.test_schedules -*-
"""
When periodic tasks come due: cron expressions in a time zone's wall
time, fixed intervals in elapsed seconds, and the durations that
retention and purges take.  Pure: no clock, no I/O, so the CLI checks
what it sends with the same code the broker runs.
"""

import math
import re
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

#: A schedule's name: it becomes part of its tasks' unique keys
#: (``schedule:NAME:TICK``), so it is kept short and plain.
NAME = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,99}\Z")

#: The shortest interval of ``--every`` (seconds), and the longest: a
#: schedule is checked about once a second.
MIN_EVERY = 1.0
MAX_EVERY = 366 * 24 * 3600.0

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION = re.compile(r"\A([0-9]+(?:\.[0-9]+)?)([smhd]?)\Z")


def check_name(name: object) -> str:
    """
    :returns: ``name`` if it can name a schedule.
    :raises ValueError: with the rule it breaks.
    """
    if not isinstance(name, str) or not NAME.match(name):
        raise ValueError(
            "a schedule's name is 1 to 100 letters, digits, '.', '_' or "
            "'-', starting with a letter or digit"
        )
    return name


def parse_duration(
    text: str, allow_none: bool = False, least: float = 0.0
) -> float | None:
    """
    A duration as users write it: seconds, or a number with ``s``, ``m``,
    ``h`` or ``d``, such as ``90``, ``15m`` or ``7d``.

    :param allow_none: also accept ``none`` (kept for ever), returned as
        ``None``.
    :param least: the shortest duration accepted (seconds).
    :returns: seconds (``float``), or ``None`` for ``none``.
    :raises ValueError: with what was expected.
    """
    text = text.strip().lower()
    if allow_none and text == "none":
        return None
    match = _DURATION.match(text)
    if match is None:
        raise ValueError(
            "expected seconds or a number with s, m, h or d (such as 90, "
            "15m or 7d)" + (", or none" if allow_none else "")
        )
    seconds = float(match.group(1)) * _UNITS[match.group(2) or "s"]
    if not least <= seconds <= 100 * 366 * 86400:
        raise ValueError(
            f"must be at least {format_duration(least)} and at most 100 years"
        )
    return seconds


def format_duration(seconds: float | None) -> str:
    """
    ``seconds`` as :func:`parse_duration` reads it, in the largest unit
    that divides it (``604800`` -> ``"7d"``); ``None`` -> ``"none"``.
    """
    if seconds is None:
        return "none"
    if seconds == 0:
        return "0s"
    for unit in "dhm":
        if seconds >= _UNITS[unit] and seconds % _UNITS[unit] == 0:
            return f"{int(seconds // _UNITS[unit])}{unit}"
    return f"{seconds:g}s"


def zone(name: object) -> ZoneInfo:
    """
    :returns: the :class:`zoneinfo.ZoneInfo` that ``name`` names.
    :raises ValueError: if there is none of that name.
    """
    if not isinstance(name, str) or not name or len(name) > 100:
        raise ValueError(
            "a time zone is an IANA name such as Europe/Paris or UTC"
        )
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(
            f"unknown time zone {name!r} (an IANA name such "
            "as Europe/Paris or UTC)"
        ) from None


# -- cron ------------------------------------------------------------------

_MONTHS = "jan feb mar apr may jun jul aug sep oct nov dec".split()
_DAYS = "sun mon tue wed thu fri sat".split()
_ALIASES = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
# (name, lowest, highest, names for lowest and up)
_FIELDS = (
    ("minute", 0, 59, None),
    ("hour", 0, 23, None),
    ("day of month", 1, 31, None),
    ("month", 1, 12, _MONTHS),
    ("day of week", 0, 7, _DAYS),
)


class Cron:
    """
    A parsed cron expression, ``MIN HOUR DOM MON DOW``, with ``*``,
    ranges (``1-5``), steps (``*/15``, ``0-30/10``), lists (``1,15``),
    month and day names (``jan``, ``mon-fri``), Sunday as 0 or 7, and the
    aliases ``@hourly``, ``@daily``, ``@weekly``, ``@monthly`` and
    ``@yearly``.  As in cron, when both the day of the month and the day
    of the week are restricted, a day that matches either matches.

    :raises ValueError: naming the field that is wrong.
    """

    def __init__(self, expression: object) -> None:
        if not isinstance(expression, str) or len(expression) > 200:
            raise ValueError(
                "a cron expression is five fields: MIN HOUR DOM MON DOW"
            )
        self.expression = " ".join(expression.split())
        fields = _ALIASES.get(self.expression.lower(), self.expression).split()
        if len(fields) != 5:
            raise ValueError(
                f"cron expression {self.expression!r} has {len(fields)} "
                "fields, not five (MIN HOUR DOM MON DOW)"
            )
        (self.minutes, self.hours, self.days, self.months, weekdays) = [
            _parse_field(text, *spec) for text, spec in zip(fields, _FIELDS)
        ]
        self.weekdays = frozenset(day % 7 for day in weekdays)
        self._any_day = fields[2] == "*" or fields[2].startswith("*/")
        self._any_weekday = fields[4] == "*" or fields[4].startswith("*/")

    def __repr__(self) -> str:
        return f"Cron({self.expression!r})"

    def day_matches(self, day: date) -> bool:
        """
        Whether the date ``day`` is one on which the expression fires.
        """
        weekday = (day.weekday() + 1) % 7  # cron's Sunday is 0
        in_month = day.day in self.days
        in_week = weekday in self.weekdays
        if self._any_day or self._any_weekday:
            return in_month and in_week
        return in_month or in_week

    def next_wall_time(self, start: datetime) -> datetime:
        """
        The first wall time at or after ``start`` (a naive ``datetime``,
        whole minutes) that the expression names.

        :raises ValueError: if none comes within eight years (such as
            ``0 0 31 2 *``).
        """
        moment = start
        limit = start + timedelta(days=8 * 366)
        while moment < limit:
            if moment.month not in self.months:
                moment = _first_of_next_month(moment)
            elif not self.day_matches(moment):
                moment = datetime(
                    moment.year, moment.month, moment.day
                ) + timedelta(days=1)
            elif moment.hour not in self.hours:
                moment = moment.replace(minute=0) + timedelta(hours=1)
            elif moment.minute not in self.minutes:
                moment += timedelta(minutes=1)
            else:
                return moment
        raise ValueError(
            f"cron expression {self.expression!r} never comes due"
        )


def _first_of_next_month(moment: datetime) -> datetime:
    if moment.month == 12:
        return datetime(moment.year + 1, 1, 1)
    return datetime(moment.year, moment.month + 1, 1)


def _parse_field(
    text: str, what: str, low: int, high: int, names: list[str] | None
) -> frozenset[int]:
    values: set[int] = set()
    for part in text.lower().split(","):
        values.update(_parse_part(part, what, low, high, names))
    return frozenset(values)


def _parse_part(
    part: str, what: str, low: int, high: int, names: list[str] | None
) -> range:
    base, _, step_text = part.partition("/")
    step = 1
    if step_text:
        if not step_text.isdigit() or int(step_text) < 1:
            raise ValueError(f"cron {what}: bad step {step_text!r}")
        step = int(step_text)
    if base == "*":
        first, last = low, high
    else:
        first_text, dash, last_text = base.partition("-")
        first = _value(first_text, what, low, high, names)
        last = (
            _value(last_text, what, low, high, names)
            if dash
            else (high if step_text else first)
        )
        if last < first:
            raise ValueError(f"cron {what}: range {base!r} runs backwards")
    return range(first, last + 1, step)


def _value(
    text: str, what: str, low: int, high: int, names: list[str] | None
) -> int:
    if names is not None and text in names:
        return names.index(text) + (low if what == "month" else 0)
    if not text.isdigit() or not low <= int(text) <= high:
        raise ValueError(
            f"cron {what}: {text!r} is not a number from "
            f"{low} to {high}" + (" or a name" if names else "")
        )
    return int(text)


# -- ticks -----------------------------------------------------------------


def next_tick(
    after: float,
    every: float | None = None,
    cron: "str | Cron | None" = None,
    timezone_name: str = "UTC",
    previous: float | None = None,
) -> float:
    """
    A schedule's next tick after the Unix time ``after``: the first time
    later than it at which its next task is due.

    ``every`` counts elapsed seconds from ``previous`` (the tick before,
    or ``after`` for a new schedule), skipping the ticks that passed:
    a broker that was down enqueues a missed tick once, not once per
    tick missed.  ``cron`` runs in the wall time of ``timezone_name``: a
    wall time that a change of clocks repeats comes due once (the first
    time), and one it skips comes due when the gap ends.

    :returns: a Unix time (``float``).
    :raises ValueError: for a schedule that has neither or both, or a
        cron expression that never comes due.
    """
    if (every is None) == (cron is None):
        raise ValueError("a schedule has --every or --cron, and not both")
    if every is not None:
        if previous is None:
            # A new schedule starts on a whole second, so its ticks read
            # well.
            return math.ceil(after) + every
        if previous > after:
            return float(previous)
        return previous + every * (math.floor((after - previous) / every) + 1)
    tz = zone(timezone_name)
    expression = cron if isinstance(cron, Cron) else Cron(cron)
    wall = datetime.fromtimestamp(after, tz).replace(
        tzinfo=None, second=0, microsecond=0
    ) + timedelta(minutes=1)
    # Each candidate is checked against the instant (not the wall time),
    # so a repeated hour's second pass and a gap's several wall times map
    # to instants already past and are passed over.
    for _ in range(10_000):
        wall = expression.next_wall_time(wall)
        instant = _instant(wall, tz)
        if instant > after:
            return instant
        wall += timedelta(minutes=1)
    raise ValueError(
        f"cron expression {expression.expression!r} never comes due"
    )


def _instant(wall: datetime, tz: ZoneInfo) -> float:
    """
    The Unix time at which clocks in ``tz`` first show ``wall``, or, for a
    wall time they skip, the end of the gap.
    """
    first = wall.replace(tzinfo=tz, fold=0)
    shown = datetime.fromtimestamp(first.timestamp(), tz).replace(tzinfo=None)
    if shown == wall:
        return first.timestamp()
    # Skipped: the clocks jumped over it somewhere between reading it with
    # the offset after the change and with the one before.
    low = wall.replace(tzinfo=tz, fold=1).timestamp()
    high = first.timestamp()
    low, high = min(low, high), max(low, high)
    after_gap = _offset(high, tz)
    while high - low > 1:
        middle = (low + high) // 2
        if _offset(middle, tz) == after_gap:
            high = middle
        else:
            low = middle
    return float(high)


def _offset(unix_time: float, tz: ZoneInfo) -> timedelta | None:
    return datetime.fromtimestamp(unix_time, tz).utcoffset()


def tick_label(unix_time: float) -> str:
    """
    A tick as its tasks' unique keys name it: ISO 8601 UTC with an
    explicit ``+00:00``, as task objects show times.
    """
    return datetime.fromtimestamp(unix_time, UTC).isoformat(
        timespec="microseconds"
    )


def unique_key(name: str, tick: float) -> str:
    """
    The ``unique_key`` of the task a schedule enqueues for a tick.
    """
    return f"schedule:{name}:{tick_label(tick)}"
