# -*- test-case-name: tests.unit.test_config -*-
"""
Daemon configuration: validated, immutable values built from layers.

Precedence, highest first: the command line, then the environment
(``TASKBROKER_<OPTION>`` for the broker, ``TASKWORKER_<OPTION>`` for the
worker, the option's name in upper case with ``-`` as ``_``), then the
built-in default.  ``usage.Options`` cannot tell a default from a typed
value, so every option is declared with a ``None`` default there and the
layers are resolved here, in one place.  Tests build the config values
directly.
"""

import os
import re
import socket
from dataclasses import dataclass
from typing import Optional

from taskbroker.errors import ConfigError
from taskbroker.protocol.codec import MAX_NAME
from taskbroker.store import parse_database_url

_ENDPOINT = re.compile(r"^(tcp://[^\s]+:(\d+|\*)|ipc://\S+|inproc://\S+)$")


# -- coercers: text -> value, ValueError with a reason ----------------------


def endpoint(text):
    match = _ENDPOINT.match(text)
    if not match:
        raise ValueError(
            "expected a ZeroMQ endpoint such as tcp://127.0.0.1:5555")
    # libzmq takes a TCP port modulo 65536 (":70000" binds 4464).
    port = match.group(2)
    if port is not None and port != "*" and int(port) > 65535:
        raise ValueError("the port must be at most 65535")
    return text


def connect_endpoint(text):
    """
    An endpoint to connect to: a wildcard or port 0 names no peer.
    """
    endpoint(text)
    if text.startswith("tcp://") and text.rsplit(":", 1)[1] in ("*", "0"):
        raise ValueError("name the broker's port, e.g. tcp://127.0.0.1:5555")
    return text


def positive_number(text):
    try:
        value = float(text)
    except ValueError:
        raise ValueError("expected a number") from None
    if not (0 < value < float("inf")):
        raise ValueError("must be greater than 0")
    return value


def optional_positive_number(text):
    """
    A positive number, or ``none`` for no value.
    """
    if text.strip().lower() == "none":
        return None
    return positive_number(text)


def non_negative_number(text):
    try:
        value = float(text)
    except ValueError:
        raise ValueError("expected a number") from None
    if not (0 <= value < float("inf")):
        raise ValueError("must be 0 or more")
    return value


def positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise ValueError("expected a whole number") from None
    if value < 1:
        raise ValueError("must be at least 1")
    return value


def name(text):
    if not (0 < len(text) <= MAX_NAME) or not text.isprintable():
        raise ValueError(
            f"expected 1 to {MAX_NAME} printable characters")
    return text


def level_list(text):
    levels = tuple(part.strip() for part in text.split(","))
    if not levels or any(not level for level in levels):
        raise ValueError("expected comma-separated level names, e.g. high,normal,low")
    for level in levels:
        name(level)
    if len(set(levels)) != len(levels):
        raise ValueError("a level is named twice")
    return levels


def database_url(text):
    try:
        parse_database_url(text)
    except ConfigError as e:
        raise ValueError(str(e).split(": ", 1)[-1]) from None
    return text


def choice(*choices):
    def check(text):
        if text not in choices:
            raise ValueError("expected one of " + ", ".join(choices))
        return text

    return check


def directory_list(paths):
    result = []
    for path in paths:
        absolute = os.path.abspath(path)
        if not os.path.isdir(absolute):
            raise ValueError(f"{path!r} is not a directory")
        result.append(absolute)
    return tuple(result)


# -- layering ---------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    """
    One option: its name on the command line, how to check it, its
    default, and its help text.
    """

    option: str
    coerce: object
    default: object
    help: str
    short: Optional[str] = None
    repeatable: bool = False

    @property
    def field(self):
        return self.option.replace("-", "_")


def resolve(settings, prefix, given, environ):
    """
    Resolve each setting from the layers.

    :param settings: a sequence of :class:`Setting`.
    :param prefix: the environment variables' prefix, e.g. ``TASKBROKER_``.
    :param given: ``{field: text or None}`` from the command line; a
        repeatable option's value is a list (empty when not given).
    :param environ: the environment mapping.
    :returns: ``{field: value}``.
    :raises ConfigError: naming the option or variable and the reason.
    """
    values = {}
    for setting in settings:
        variable = prefix + setting.field.upper()
        raw = given.get(setting.field)
        source = f"--{setting.option}"
        if raw is None or (setting.repeatable and not raw):
            raw = environ.get(variable)
            source = variable
            if raw is not None and setting.repeatable:
                raw = [part for part in raw.split(os.pathsep) if part]
        if raw is None:
            values[setting.field] = setting.default
            continue
        try:
            values[setting.field] = setting.coerce(raw)
        except ValueError as e:
            shown = raw if not isinstance(raw, list) else os.pathsep.join(raw)
            raise ConfigError(f"{source}: {e} (got {shown!r})") from None
    return values


# -- the broker -------------------------------------------------------------

BROKER_SETTINGS = (
    Setting("listen", endpoint, "tcp://127.0.0.1:5555",
            "ZeroMQ endpoint to bind for workers and clients. Anyone who can "
            "reach it can submit and run tasks: keep it on loopback or a "
            "trusted network."),
    Setting("database", database_url, "sqlite:///taskbroker.sqlite",
            "Database URL: sqlite:///relative.db or sqlite:////abs/path.db."),
    Setting("priorities", level_list, ("high", "normal", "low"),
            "Priority levels, comma-separated, most urgent first."),
    Setting("default-priority", name, None,
            "Level of a task that names none (default: normal if it is a "
            "level, else the least urgent)."),
    Setting("poll-interval", positive_number, 1.0,
            "Seconds between looks for tasks inserted by other programs."),
    Setting("max-attempts", positive_int, 3,
            "Attempts a task may use unless it says otherwise."),
    Setting("retry-delay", positive_number, 1.0,
            "Seconds before a failed task's first retry; each later retry "
            "waits twice as long, with random jitter."),
    Setting("retry-max-delay", positive_number, 300.0,
            "The longest wait before a retry (seconds)."),
    Setting("time-limit", optional_positive_number, None,
            "Seconds an attempt may run unless the task or its handler says "
            "otherwise (default: no limit)."),
    Setting("heartbeat", positive_number, 1.0,
            "Seconds between heartbeats to each worker."),
    Setting("heartbeat-misses", positive_int, 3,
            "A worker is lost after this many of its heartbeat intervals "
            "pass in silence."),
    Setting("sqlite-synchronous", choice("normal", "full"), "normal",
            "SQLite durability: normal survives any process crash; full "
            "also survives power loss, at a cost per commit."),
)


@dataclass(frozen=True)
class BrokerConfig:
    """
    Everything a broker needs to start.
    """

    listen: str = "tcp://127.0.0.1:5555"
    database: str = "sqlite:///taskbroker.sqlite"
    priorities: tuple = ("high", "normal", "low")
    default_priority: str = "normal"
    poll_interval: float = 1.0
    max_attempts: int = 3
    retry_delay: float = 1.0
    retry_max_delay: float = 300.0
    time_limit: Optional[float] = None
    heartbeat: float = 1.0
    heartbeat_misses: int = 3
    sqlite_synchronous: str = "normal"

    def __post_init__(self):
        if self.default_priority not in self.priorities:
            raise ConfigError(
                f"--default-priority: {self.default_priority!r} is not one of "
                "the levels " + ",".join(self.priorities))


def broker_config(given, environ=None):
    """
    Build a :class:`BrokerConfig` from command-line values and the
    environment.

    :raises ConfigError: with a one-line reason.
    """
    values = resolve(BROKER_SETTINGS, "TASKBROKER_",
                     given, os.environ if environ is None else environ)
    levels = values["priorities"]
    if values["default_priority"] is None:
        values["default_priority"] = "normal" if "normal" in levels else levels[-1]
    elif values["default_priority"] not in levels:
        # Checked here as well as in BrokerConfig, to name where it came from.
        source = ("--default-priority"
                  if given.get("default_priority") is not None
                  else "TASKBROKER_DEFAULT_PRIORITY")
        raise ConfigError(
            f"{source}: {values['default_priority']!r} is not one of the "
            "levels " + ",".join(levels))
    return BrokerConfig(**values)


# -- the worker -------------------------------------------------------------


def default_worker_name():
    return f"{socket.gethostname()}-{os.getpid()}"


WORKER_SETTINGS = (
    Setting("broker", connect_endpoint, "tcp://127.0.0.1:5555",
            "ZeroMQ endpoint of the broker."),
    Setting("priorities", level_list, None,
            "Levels to serve, comma-separated (default: all the broker has). "
            "A worker serving only the most urgent level is capacity "
            "reserved for it."),
    Setting("concurrency", positive_int, 1,
            "How many tasks to run at once (slots)."),
    Setting("handlers-path", directory_list, (),
            "A folder of handler modules; repeatable (environment: "
            "folders separated by ':').", repeatable=True),
    Setting("name", name, None,
            "Worker name, unique among live workers (default: HOSTNAME-PID)."),
    Setting("heartbeat", positive_number, 1.0,
            "Seconds between heartbeats to the broker."),
    Setting("heartbeat-misses", positive_int, 3,
            "The broker is presumed lost after this many of its heartbeat "
            "intervals pass in silence."),
    Setting("grace", non_negative_number, 30.0,
            "At shutdown, seconds to let running tasks finish before they "
            "are stopped and handed back to the broker."),
)


@dataclass(frozen=True)
class WorkerConfig:
    """
    Everything a worker needs to start.
    """

    broker: str = "tcp://127.0.0.1:5555"
    priorities: Optional[tuple] = None
    concurrency: int = 1
    handlers_path: tuple = ()
    name: str = "worker"
    heartbeat: float = 1.0
    heartbeat_misses: int = 3
    grace: float = 30.0


def worker_config(given, environ=None):
    """
    Build a :class:`WorkerConfig` from command-line values and the
    environment.

    :raises ConfigError: with a one-line reason.
    """
    values = resolve(WORKER_SETTINGS, "TASKWORKER_",
                     given, os.environ if environ is None else environ)
    if values["name"] is None:
        values["name"] = default_worker_name()
    return WorkerConfig(**values)
