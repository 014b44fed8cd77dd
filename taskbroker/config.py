# -*- test-case-name: tests.unit.test_config -*-
"""
Daemon configuration: validated, immutable values built from layers.

Precedence, highest first: the command line, then the environment
(``TASKBROKER_<OPTION>`` for the broker, ``TASKWORKER_<OPTION>`` for the
worker, the option's name in upper case with ``-`` as ``_``, unless the
setting names its own variable), then the built-in default.
``usage.Options`` cannot tell a default from a typed value, so every
option is declared with a ``None`` default there and the layers are
resolved here, in one place.  Tests build the config values directly.
"""

import os
import re
import socket
from dataclasses import dataclass, field, fields

from taskbroker.errors import ConfigError, one_line
from taskbroker.failover import endpoint, parse_endpoints
from taskbroker.protocol.codec import MAX_NAME
from taskbroker.schedules import parse_duration
from taskbroker.store import parse_database_url
from taskbroker.wording import edit_distance

# -- coercers: text -> value, ValueError with a reason ----------------------


def endpoint_list(text):
    """
    A failover list: comma-separated endpoints to connect to, each checked
    as :func:`taskbroker.failover.connect_endpoint` does, none twice.
    """
    return parse_endpoints(text)


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


def kept_duration(text):
    """
    How long to keep something: a duration (seconds, or a number with s,
    m, h or d), or ``none`` for ever, read as infinity.
    """
    # A minute at least: a task that just finished must still be there
    # for the WAIT or the status read that comes for it.
    seconds = parse_duration(text, allow_none=True, least=60.0)
    return float("inf") if seconds is None else seconds


def positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise ValueError("expected a whole number") from None
    if value < 1:
        raise ValueError("must be at least 1")
    return value


# What usage.Options shows after an option's help (an attribute of the
# function, which type checkers do not expect).
positive_number.coerceDoc = "A number greater than 0."  # type: ignore[attr-defined]
non_negative_number.coerceDoc = "A number, 0 or more."  # type: ignore[attr-defined]
positive_int.coerceDoc = "A whole number, 1 or more."  # type: ignore[attr-defined]
endpoint_list.coerceDoc = "Comma-separated ZeroMQ endpoints, none twice."  # type: ignore[attr-defined]


def name(text):
    if not (0 < len(text) <= MAX_NAME) or not text.isprintable():
        raise ValueError(f"expected 1 to {MAX_NAME} printable characters")
    return text


def level_list(text):
    levels = tuple(part.strip() for part in text.split(","))
    if not levels or any(not level for level in levels):
        raise ValueError(
            "expected comma-separated level names, e.g. high,normal,low"
        )
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


def boolean(text):
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("expected yes or no (also 1, true, on; 0, false, off)")


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


#: Where the broker's HTTP status site listens unless told otherwise.
DEFAULT_HTTP = "tcp:8642:interface=127.0.0.1"


def http_endpoint(text):
    """
    A Twisted server endpoint description, or ``none`` for no site.
    """
    if text.strip().lower() == "none":
        return None
    from twisted.internet.endpoints import serverFromString

    try:
        # Parsed only: nothing listens until the endpoint's listen().
        serverFromString(None, text)
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError(
            f"not a server endpoint description ({one_line(e)}); e.g. "
            f"{DEFAULT_HTTP}"
        ) from None
    return text


def file_path(text):
    if not text:
        raise ValueError("expected a file name")
    return os.path.abspath(text)


def directory(text):
    return directory_list([text])[0]


# -- settings ----------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    """
    One option: its name on the command line, how to check it, its
    default, and its help text.  Declared once, on the config dataclass's
    field (:func:`setting`); the option tables, the environment variables
    and the help are derived from it (:func:`settings_of`).
    """

    option: str
    coerce: object
    default: object
    help: str
    short: str | None = None
    repeatable: bool = False
    flag: bool = False
    own_variable: str | None = None

    @property
    def field(self):
        return self.option.replace("-", "_")

    def variable(self, prefix):
        """
        The environment variable that sets it, e.g. ``TASKBROKER_LISTEN``:
        its own name if it has one (:func:`setting`'s ``variable``), else
        the prefix and its field's name.
        """
        if self.own_variable is not None:
            if not self.own_variable.startswith(prefix):
                raise ValueError(
                    f"{self.own_variable} does not start with {prefix}"
                )
            return self.own_variable
        return prefix + self.field.upper()


def setting(
    default,
    coerce,
    help,
    short=None,
    repeatable=False,
    flag=False,
    variable=None,
):
    """
    Declare a config dataclass field as a setting.

    :param default: the built-in default; ``None`` for one computed from
        the others (say so in ``help``, with "(default: ...)").
    :param coerce: ``coerce(text) -> value``, raising ``ValueError`` with
        a reason (for a repeatable setting, it takes the list of texts).
    :param flag: an option that takes no value (``--create-database``);
        giving it means ``yes`` to ``coerce``, and its variable takes yes
        or no.
    :param variable: the whole name of its environment variable, for a
        setting whose derived name another program reads: the command
        line's ``--curve-secret-key`` must not read the broker's
        ``TASKBROKER_CURVE_SECRET_KEY``.  It starts with the config's
        prefix, so that misspellings of it are still caught
        (:func:`check_environment`).
    """
    return field(
        default=default,
        metadata={
            "setting": (coerce, help, short, repeatable, flag, variable)
        },
    )


def settings_of(cls):
    """
    :returns: the :class:`Setting` of each field of the config dataclass
        ``cls``, in order.
    """
    result = []
    for f in fields(cls):
        coerce, help, short, repeatable, flag, variable = f.metadata["setting"]
        result.append(
            Setting(
                f.name.replace("_", "-"),
                coerce,
                f.default,
                help,
                short,
                repeatable,
                flag,
                variable,
            )
        )
    return tuple(result)


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
        variable = setting.variable(prefix)
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
            # A URI's password never reaches a log or a terminal.
            shown = _PASSWORD.sub(r"\1***@", shown)
            raise ConfigError(f"{source}: {e} (got {shown!r})") from None
    return values


_PASSWORD = re.compile(r"(://[^:/@]*:)[^@/]*@")


# -- the environment ---------------------------------------------------------


def _environment(environ):
    return os.environ if environ is None else environ


def check_environment(prefix, known, reserved, environ):
    """
    Look for misspelt variables among those with ``prefix``: a variable
    nobody reads is a setting silently not applied.

    :param known: the variable names that something reads.
    :param reserved: prefixes of names read elsewhere (``TASKBROKER_TEST_``).
    :returns: a ``list`` of one-line warnings, for unknown names that look
        like no known one.
    :raises ConfigError: for an unknown name within a small edit distance
        of a known one (a typo such as ``TASKBROKER_DATBASE``), naming both.
    """
    warnings = []
    for name in sorted(environ):
        if (
            not name.startswith(prefix)
            or name in known
            or name.startswith(tuple(reserved))
        ):
            continue
        close = [
            k
            for k in sorted(known)
            if edit_distance(name[len(prefix) :], k[len(prefix) :]) <= 2
        ]
        if close:
            raise ConfigError(
                f"{name}: unknown variable; did you mean {close[0]}?"
            )
        warnings.append(f"{name}: unknown variable, ignored")
    return warnings


#: The address both daemons and the clients use unless told otherwise.
DEFAULT_ENDPOINT = "tcp://127.0.0.1:5555"


# -- the broker -------------------------------------------------------------


@dataclass(frozen=True)
class BrokerConfig:
    """
    Everything a broker needs to start.  Each field is a setting of
    ``twistd taskbroker`` (``--poll-interval`` for ``poll_interval``) and
    of the environment (``TASKBROKER_POLL_INTERVAL``).
    """

    listen: str = setting(
        DEFAULT_ENDPOINT,
        endpoint,
        "ZeroMQ endpoint to bind for workers and clients. Anyone who can "
        "reach it can submit and run tasks: keep it on loopback or a "
        "trusted network.",
    )
    curve_secret_key: str | None = setting(
        None,
        file_path,
        "The broker's CURVE secret key file (from 'taskbroker keygen'): "
        "links are encrypted, and only keys of --authorized-workers and "
        "--authorized-clients get in (default: no CURVE, plain links; see "
        "docs/security.rst).",
    )
    authorized_workers: str | None = setting(
        None,
        directory,
        "With --curve-secret-key: a folder of public key files (NAME.key) "
        "of the workers that may register (default: none).",
    )
    authorized_clients: str | None = setting(
        None,
        directory,
        "With --curve-secret-key: a folder of public key files (NAME.key) "
        "of the clients that may submit tasks, and read, cancel and retry "
        "the tasks they submitted (default: none).",
    )
    admin_clients: str | None = setting(
        None,
        directory,
        "With --curve-secret-key: a folder of public key files of the "
        "clients that may do so with every task, and list the workers "
        "(default: none).",
    )
    allow_any_key: bool = setting(
        False,
        boolean,
        "With --curve-secret-key and no authorized folders: encrypt, but "
        "let any key in, as worker and as client.",
        flag=True,
    )
    require_curve: bool = setting(
        False,
        boolean,
        "Refuse to start without --curve-secret-key (without it, a broker "
        "listening beyond loopback only warns).",
        flag=True,
    )
    http: str | None = setting(
        DEFAULT_HTTP,
        http_endpoint,
        "Where the HTTP status site listens: a Twisted server endpoint "
        "description, or none. If the default port is taken (another "
        "broker on this host), the broker only warns.",
    )
    http_token_file: str | None = setting(
        None,
        file_path,
        "A file whose first line is the status site's token (default: a "
        "new random one at each start, shown in the URL the broker logs).",
    )
    database: str = setting(
        "sqlite:///taskbroker.sqlite",
        database_url,
        "Database URL: sqlite:///relative.db, sqlite:////abs/path.db, or "
        "a PostgreSQL URI (postgresql://user@host/dbname; leave the "
        "password to ~/.pgpass or PGPASSWORD), which several brokers may "
        "share.",
    )
    priorities: tuple = setting(
        ("high", "normal", "low"),
        level_list,
        "Priority levels, comma-separated, most urgent first.",
    )
    default_priority: str | None = setting(
        None,
        name,
        "Level of a task that names none (default: normal if it is a "
        "level, else the least urgent).",
    )
    poll_interval: float = setting(
        1.0,
        positive_number,
        "Seconds between looks for tasks inserted by other programs.",
    )
    max_attempts: int = setting(
        3, positive_int, "Attempts a task may use unless it says otherwise."
    )
    retry_delay: float = setting(
        1.0,
        positive_number,
        "Seconds before a failed task's first retry; each later retry "
        "waits twice as long, with random jitter.",
    )
    retry_max_delay: float = setting(
        300.0, positive_number, "The longest wait before a retry (seconds)."
    )
    time_limit: float | None = setting(
        None,
        optional_positive_number,
        "Seconds an attempt may run unless the task or its handler says "
        "otherwise (default: no limit).",
    )
    heartbeat: float = setting(
        1.0, positive_number, "Seconds between heartbeats to each worker."
    )
    heartbeat_misses: int = setting(
        3,
        positive_int,
        "A worker is lost after this many of its heartbeat intervals pass "
        "in silence.",
    )
    max_worker_heartbeat: float = setting(
        10.0,
        positive_number,
        "The longest heartbeat interval a worker may announce (seconds; the "
        "shortest is 0.1): a silent connection releases its worker's name "
        "and tasks within this interval times the misses allowed.",
    )
    sqlite_synchronous: str = setting(
        "normal",
        choice("normal", "full"),
        "SQLite durability: normal survives any process crash; full also "
        "survives power loss, at a cost per commit.",
    )
    lease: float = setting(
        5.0,
        positive_number,
        "On a shared (PostgreSQL) database: seconds a broker's claims last "
        "unless renewed; it renews them every second. When a broker's "
        "lease runs out the others take its queued tasks at once, and its "
        "running ones after its workers' allowance.",
    )
    create_database: bool = setting(
        False,
        boolean,
        "Create the database even though its lock file shows that one was "
        "there (it was deleted or moved): without this the broker refuses "
        "to start on an empty database in its place. A new folder needs "
        "no flag.",
        flag=True,
    )
    check_database: str = setting(
        "quick",
        choice("quick", "none"),
        "Once listening, check the database for damage in the background "
        "(PRAGMA quick_check) and stop if it is damaged; none to skip.",
    )
    keep_finished: float | None = setting(
        None,
        kept_duration,
        "How long finished tasks are kept: seconds or a number with s, m, "
        "h or d (such as 7d), or none for ever; older ones are deleted in "
        "small batches (default: the database's, 7d for a database created "
        "by this version and none for one it upgraded).",
    )

    def __post_init__(self):
        levels = self.priorities
        folders = (
            self.authorized_workers
            or self.authorized_clients
            or self.admin_clients
        )
        if self.curve_secret_key is None:
            if self.require_curve:
                raise ConfigError(
                    "--require-curve: give --curve-secret-key (and the "
                    "authorized keys; see docs/security.rst)"
                )
            if folders or self.allow_any_key:
                raise ConfigError(
                    "--authorized-workers, --authorized-clients, "
                    "--admin-clients and --allow-any-key need "
                    "--curve-secret-key"
                )
        elif not folders and not self.allow_any_key:
            raise ConfigError(
                "--curve-secret-key: give --authorized-workers and "
                "--authorized-clients (folders of public keys), or "
                "--allow-any-key to encrypt without checking keys"
            )
        elif folders and self.allow_any_key:
            raise ConfigError(
                "--allow-any-key lets every key in: drop it, or drop "
                "--authorized-workers, --authorized-clients and "
                "--admin-clients"
            )
        if self.lease < 1.5:
            raise ConfigError(
                f"--lease: {self.lease:g} s is too short to renew every "
                "second (at least 1.5)"
            )
        if self.default_priority is None:
            object.__setattr__(
                self,
                "default_priority",
                "normal" if "normal" in levels else levels[-1],
            )
        elif self.default_priority not in levels:
            raise ConfigError(
                f"--default-priority: {self.default_priority!r} is not one of "
                "the levels " + ",".join(levels)
            )


BROKER_SETTINGS = settings_of(BrokerConfig)


def broker_config(given, environ=None):
    """
    Build a :class:`BrokerConfig` from command-line values and the
    environment.

    :raises ConfigError: with a one-line reason.
    """
    values = resolve(
        BROKER_SETTINGS, "TASKBROKER_", given, _environment(environ)
    )
    default_priority = values["default_priority"]
    if (
        default_priority is not None
        and default_priority not in values["priorities"]
    ):
        # Checked here as well as in BrokerConfig, to name where it came from.
        source = (
            "--default-priority"
            if given.get("default_priority") is not None
            else "TASKBROKER_DEFAULT_PRIORITY"
        )
        raise ConfigError(
            f"{source}: {default_priority!r} is not one of the levels "
            + ",".join(values["priorities"])
        )
    return BrokerConfig(**values)


# -- the worker -------------------------------------------------------------


def _normalise_broker(config):
    """
    Make a config's ``broker`` a ``tuple`` of endpoints, for values built
    directly (``WorkerConfig(broker="tcp://...")``).

    :raises ConfigError: naming the bad endpoint.
    """
    try:
        object.__setattr__(config, "broker", parse_endpoints(config.broker))
    except ValueError as e:
        raise ConfigError(f"broker: {e}") from None


def check_curve_pair(server, secret, server_name, secret_name, peer):
    """
    CURVE needs both the broker's public key and the peer's own key pair:
    one of them alone is a mistake, not a choice.

    :param server: the broker's public key file, or ``None``.
    :param secret: the peer's secret key file, or ``None``.
    :param server_name: how the user named the first
        (``--curve-server-key``), for the message; likewise
        ``secret_name``.
    :param peer: ``"worker"`` or ``"client"``, for the message.
    :raises ConfigError: if one is given without the other.
    """
    if (server is None) == (secret is None):
        return
    given, missing = (
        (server_name, secret_name)
        if secret is None
        else (secret_name, server_name)
    )
    raise ConfigError(
        f"{given} without {missing}: give both (the broker's public key "
        f"file and this {peer}'s NAME.key_secret file) or neither"
    )


def default_worker_name():
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclass(frozen=True)
class WorkerConfig:
    """
    Everything a worker needs to start.  Each field is a setting of
    ``twistd taskworker`` and of the environment (``TASKWORKER_...``).
    """

    broker: tuple = setting(
        (DEFAULT_ENDPOINT,),
        endpoint_list,
        "ZeroMQ endpoint of the broker, or a failover list of brokers "
        "sharing one database, comma-separated: the worker uses one at a "
        "time, starting where its name points, and moves to the next when "
        "it loses its broker.",
    )
    curve_server_key: str | None = setting(
        None,
        file_path,
        "With --curve-secret-key: the broker's CURVE public key file "
        "(NAME.key, from 'taskbroker keygen'). Links are encrypted, and "
        "the worker talks only to a broker that holds its secret key; "
        "every broker of a failover list must hold the same one (default: "
        "no CURVE, plain links).",
    )
    curve_secret_key: str | None = setting(
        None,
        file_path,
        "With --curve-server-key: this worker's own key pair, the "
        "NAME.key_secret file from 'taskbroker keygen', readable by its "
        "owner only; the broker must have NAME.key in its "
        "--authorized-workers (default: none).",
    )
    priorities: tuple | None = setting(
        None,
        level_list,
        "Levels to serve, comma-separated (default: all the broker has). "
        "A worker serving only the most urgent level is capacity reserved "
        "for it.",
    )
    concurrency: int = setting(
        1, positive_int, "How many tasks to run at once (slots)."
    )
    handlers_path: tuple = setting(
        (),
        directory_list,
        "A folder of handler modules; repeatable (environment: folders "
        "separated by ':').",
        repeatable=True,
    )
    name: str | None = setting(
        None,
        name,
        "Worker name, unique among live workers (default: HOSTNAME-PID).",
    )
    heartbeat: float = setting(
        1.0, positive_number, "Seconds between heartbeats to the broker."
    )
    heartbeat_misses: int = setting(
        3,
        positive_int,
        "The broker is presumed lost after this many of its heartbeat "
        "intervals pass in silence.",
    )
    grace: float = setting(
        30.0,
        non_negative_number,
        "At shutdown, seconds to let running tasks finish before they are "
        "stopped and handed back to the broker.",
    )
    failover_after: float = setting(
        10.0,
        positive_number,
        "With several brokers in --broker: seconds the broker may report "
        "that it cannot use its database before the worker moves to the "
        "next one.",
    )

    def __post_init__(self):
        if self.name is None:
            object.__setattr__(self, "name", default_worker_name())
        _normalise_broker(self)
        check_curve_pair(
            self.curve_server_key,
            self.curve_secret_key,
            "--curve-server-key",
            "--curve-secret-key",
            "worker",
        )


WORKER_SETTINGS = settings_of(WorkerConfig)


def worker_config(given, environ=None):
    """
    Build a :class:`WorkerConfig` from command-line values and the
    environment.

    :raises ConfigError: with a one-line reason.
    """
    return WorkerConfig(
        **resolve(WORKER_SETTINGS, "TASKWORKER_", given, _environment(environ))
    )


# -- the command line ------------------------------------------------------------


@dataclass(frozen=True)
class ClientConfig:
    """
    Where the ``taskbroker`` command finds its broker, how long it waits,
    and its CURVE keys (``--broker``, ``--timeout``, ``--curve-server-key``,
    ``--curve-secret-key``; ``TASKBROKER_BROKER``, ``TASKBROKER_TIMEOUT``,
    ``TASKBROKER_CLIENT_CURVE_SERVER_KEY``,
    ``TASKBROKER_CLIENT_CURVE_SECRET_KEY``).

    The keys' variables have names of their own: the derived
    ``TASKBROKER_CURVE_SECRET_KEY`` is the broker's secret key, and a
    command that read it would pose as the broker.
    """

    broker: tuple = setting(
        (DEFAULT_ENDPOINT,),
        endpoint_list,
        "The broker's ZeroMQ endpoint, or a failover list of brokers, "
        "comma-separated: a request that gets no answer goes to the next.",
        short="b",
    )
    timeout: float = setting(
        5.0,
        positive_number,
        "Seconds to wait for each answer; every command tries three times "
        "(and each broker of a list at least once).",
        short="t",
    )
    curve_server_key: str | None = setting(
        None,
        file_path,
        "With --curve-secret-key: the broker's CURVE public key file "
        "(NAME.key, from 'taskbroker keygen'); requests are encrypted and "
        "go only to a broker that holds its secret key (default: no "
        "CURVE).",
        variable="TASKBROKER_CLIENT_CURVE_SERVER_KEY",
    )
    curve_secret_key: str | None = setting(
        None,
        file_path,
        "With --curve-server-key: this client's own key pair, the "
        "NAME.key_secret file from 'taskbroker keygen', readable by its "
        "owner only; the broker must have NAME.key in its "
        "--authorized-clients (default: none).",
        variable="TASKBROKER_CLIENT_CURVE_SECRET_KEY",
    )

    def __post_init__(self):
        _normalise_broker(self)
        check_curve_pair(
            self.curve_server_key,
            self.curve_secret_key,
            "--curve-server-key",
            "--curve-secret-key",
            "client",
        )


CLIENT_SETTINGS = settings_of(ClientConfig)


def client_config(given, environ=None):
    """
    Build a :class:`ClientConfig` from command-line values and the
    environment.

    :raises ConfigError: with a one-line reason.
    """
    return ClientConfig(
        **resolve(CLIENT_SETTINGS, "TASKBROKER_", given, _environment(environ))
    )


#: Every variable something of ours reads, by prefix (the broker's and
#: the command line's share one), and the prefixes of those read
#: elsewhere (the tests).
KNOWN_VARIABLES = {
    "TASKBROKER_": frozenset(
        s.variable("TASKBROKER_") for s in BROKER_SETTINGS + CLIENT_SETTINGS
    ),
    "TASKWORKER_": frozenset(
        s.variable("TASKWORKER_") for s in WORKER_SETTINGS
    ),
}
RESERVED_PREFIXES = {
    "TASKBROKER_": ("TASKBROKER_TEST_",),
    "TASKWORKER_": (),
}
