"""
Tests for taskbroker.config: layering (command line > environment >
default) and the one-line errors of each setting.
"""

import os

import pytest

from taskbroker.config import (
    BROKER_SETTINGS,
    WORKER_SETTINGS,
    BrokerConfig,
    ClientConfig,
    WorkerConfig,
    broker_config,
    client_config,
    default_worker_name,
    endpoint,
    worker_config,
)
from taskbroker.errors import ConfigError


def broker(given=None, env=None):
    return broker_config(given or {}, env or {})


def worker(given=None, env=None):
    return worker_config(given or {}, env or {})


def client(given=None, env=None):
    return client_config(given or {}, env or {})


def config_error(build, given=None, env=None):
    with pytest.raises(ConfigError) as info:
        build(given, env)
    message = str(info.value)
    assert "\n" not in message
    return message


# -- defaults and layers -------------------------------------------------------


def test_broker_defaults():
    assert broker() == BrokerConfig(
        listen="tcp://127.0.0.1:5555",
        database="sqlite:///taskbroker.sqlite",
        priorities=("high", "normal", "low"),
        default_priority="normal",
        poll_interval=1.0,
        max_attempts=3,
        heartbeat=1.0,
        heartbeat_misses=3,
        sqlite_synchronous="normal",
    )


def test_worker_defaults():
    config = worker()
    assert config == WorkerConfig(
        broker="tcp://127.0.0.1:5555",
        priorities=None,
        concurrency=1,
        handlers_path=(),
        name=config.name,
        heartbeat=1.0,
        heartbeat_misses=3,
    )
    assert (
        config.name
        == default_worker_name()
        == (f"{os.uname().nodename}-{os.getpid()}")
    )


def test_settings_defaults_agree_with_the_dataclasses():
    # The Options help shows Setting.default; the dataclass default is what
    # tests building a config directly get.
    for settings, cls in (
        (BROKER_SETTINGS, BrokerConfig),
        (WORKER_SETTINGS, WorkerConfig),
    ):
        fields = cls.__dataclass_fields__
        assert {s.field for s in settings} == set(fields)
        for s in settings:
            if s.default is not None:
                assert fields[s.field].default == s.default, s.field


def test_config_is_immutable():
    config = broker()
    with pytest.raises(AttributeError):
        config.listen = "tcp://127.0.0.1:1"


def test_environment_layer():
    config = broker(
        env={
            "TASKBROKER_LISTEN": "tcp://127.0.0.1:6000",
            "TASKBROKER_PRIORITIES": "urgent, bulk",
            "TASKBROKER_POLL_INTERVAL": "0.25",
            "TASKBROKER_MAX_ATTEMPTS": "7",
            "TASKBROKER_HEARTBEAT_MISSES": "5",
            "TASKBROKER_SQLITE_SYNCHRONOUS": "full",
            # The other daemon's variables are ignored.
            "TASKWORKER_HEARTBEAT": "9",
        }
    )
    assert config.listen == "tcp://127.0.0.1:6000"
    assert config.priorities == ("urgent", "bulk")
    assert config.default_priority == "bulk"
    assert (config.poll_interval, config.max_attempts) == (0.25, 7)
    assert (config.heartbeat, config.heartbeat_misses) == (1.0, 5)
    assert config.sqlite_synchronous == "full"

    config = worker(
        env={
            "TASKWORKER_CONCURRENCY": "4",
            "TASKWORKER_NAME": "w-1",
            "TASKWORKER_PRIORITIES": "high",
            "TASKBROKER_HEARTBEAT": "9",
        }
    )
    assert (config.concurrency, config.name, config.priorities) == (
        4,
        "w-1",
        ("high",),
    )
    assert config.heartbeat == 1.0


def test_command_line_beats_environment():
    config = worker(
        {"concurrency": "2", "name": None},
        {"TASKWORKER_CONCURRENCY": "8", "TASKWORKER_NAME": "env"},
    )
    assert (config.concurrency, config.name) == (2, "env")
    config = broker(
        {"listen": "tcp://127.0.0.1:1"},
        {"TASKBROKER_LISTEN": "tcp://127.0.0.1:2"},
    )
    assert config.listen == "tcp://127.0.0.1:1"


def test_command_line_wins_even_when_environment_is_invalid():
    config = worker({"concurrency": "2"}, {"TASKWORKER_CONCURRENCY": "zero"})
    assert config.concurrency == 2


def test_real_environment_is_the_default(monkeypatch):
    monkeypatch.setenv("TASKWORKER_CONCURRENCY", "6")
    assert worker_config({}).concurrency == 6


# -- errors --------------------------------------------------------------------


@pytest.mark.parametrize(
    "build, field, value, reason",
    [
        (worker, "concurrency", "zero", "whole number"),
        (worker, "concurrency", "0", "at least 1"),
        (worker, "concurrency", "1.5", "whole number"),
        (worker, "heartbeat", "soon", "number"),
        (worker, "heartbeat", "0", "greater than 0"),
        (worker, "heartbeat", "-1", "greater than 0"),
        (worker, "heartbeat", "nan", "greater than 0"),
        (worker, "heartbeat", "inf", "greater than 0"),
        (worker, "heartbeat_misses", "0", "at least 1"),
        (worker, "broker", "localhost:5555", "endpoint"),
        (worker, "name", "", "printable"),
        (worker, "name", "a\tb", "printable"),
        (worker, "name", "x" * 201, "printable"),
        (worker, "priorities", "high,,low", "level names"),
        (worker, "priorities", "", "level names"),
        (broker, "priorities", "a,b,a", "twice"),
        (broker, "priorities", "a,b\x00", "printable"),
        (broker, "listen", "tcp://127.0.0.1", "endpoint"),
        (broker, "max_attempts", "-3", "at least 1"),
        (broker, "poll_interval", "fast", "number"),
        (broker, "sqlite_synchronous", "off", "normal, full"),
    ],
)
def test_each_coercer_error_names_option_or_variable_and_value(
    build, field, value, reason
):
    option = "--" + field.replace("_", "-")
    prefix = "TASKWORKER_" if build is worker else "TASKBROKER_"
    variable = prefix + field.upper()

    message = config_error(build, {field: value})
    assert message.startswith(option + ": ")
    assert reason in message
    assert repr(value) in message

    message = config_error(build, None, {variable: value})
    assert message.startswith(variable + ": ")
    assert reason in message
    assert repr(value) in message


def test_error_example():
    assert config_error(worker, {"concurrency": "zero"}) == (
        "--concurrency: expected a whole number (got 'zero')"
    )


# -- default priority ----------------------------------------------------------


@pytest.mark.parametrize(
    "levels, expected",
    [
        ("high,normal,low", "normal"),
        ("normal,bulk", "normal"),
        ("urgent,later,bulk", "bulk"),
        ("only", "only"),
    ],
)
def test_default_priority_is_normal_else_least_urgent(levels, expected):
    assert broker({"priorities": levels}).default_priority == expected


def test_explicit_default_priority():
    config = broker({"priorities": "a,b,c", "default_priority": "a"})
    assert config.default_priority == "a"
    config = broker(env={"TASKBROKER_DEFAULT_PRIORITY": "high"})
    assert config.default_priority == "high"


def test_explicit_default_priority_must_be_a_level():
    message = config_error(broker, {"default_priority": "urgent"})
    assert message.startswith("--default-priority: 'urgent'")
    assert "high,normal,low" in message
    message = config_error(
        broker,
        {"priorities": "a,b"},
        {"TASKBROKER_DEFAULT_PRIORITY": "normal"},
    )
    assert message.startswith("TASKBROKER_DEFAULT_PRIORITY: 'normal'")
    assert "a,b" in message


def test_broker_config_checks_default_priority_itself():
    with pytest.raises(ConfigError):
        BrokerConfig(priorities=("a",), default_priority="normal")


# -- handlers path --------------------------------------------------------------


def test_handlers_path_is_repeatable_and_made_absolute(tmp_path, monkeypatch):
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    monkeypatch.chdir(tmp_path)
    config = worker({"handlers_path": ["one", str(tmp_path / "two")]})
    assert config.handlers_path == (
        str(tmp_path / "one"),
        str(tmp_path / "two"),
    )


def test_handlers_path_from_environment(tmp_path, monkeypatch):
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    monkeypatch.chdir(tmp_path)
    value = os.pathsep.join(["one", "", str(tmp_path / "two")])
    config = worker({"handlers_path": []}, {"TASKWORKER_HANDLERS_PATH": value})
    assert config.handlers_path == (
        str(tmp_path / "one"),
        str(tmp_path / "two"),
    )


def test_handlers_path_command_line_beats_environment(tmp_path):
    (tmp_path / "cli").mkdir()
    config = worker(
        {"handlers_path": [str(tmp_path / "cli")]},
        {"TASKWORKER_HANDLERS_PATH": "/nonexistent"},
    )
    assert config.handlers_path == (str(tmp_path / "cli"),)


def test_handlers_path_must_be_a_directory(tmp_path):
    afile = tmp_path / "handlers.py"
    afile.write_text("")
    message = config_error(
        worker, {"handlers_path": [str(tmp_path), str(afile)]}
    )
    assert message.startswith("--handlers-path: ")
    assert "not a directory" in message and str(afile) in message
    missing = str(tmp_path / "missing")
    message = config_error(worker, None, {"TASKWORKER_HANDLERS_PATH": missing})
    assert message.startswith("TASKWORKER_HANDLERS_PATH: ")
    assert missing in message


# -- database URL -------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "sqlite:///tasks.sqlite",
        "sqlite:///data/tasks.db",
        "sqlite:////var/lib/taskbroker/tasks.db",
        "postgresql://localhost/tasks",
        "postgres://u@db.example:6432/tasks",
        "postgresql:///tasks?host=/var/run/postgresql",
        "postgresql://u@h/tasks?sslmode=verify-full&connect_timeout=3",
    ],
)
def test_database_urls_are_accepted(url):
    assert broker({"database": url}).database == url


def test_a_password_is_never_shown():
    from taskbroker.store import describe_database

    shown = describe_database("postgresql://u:s3cret@h:5433/tasks")
    assert shown == "postgresql://u@h:5433/tasks"
    with pytest.raises(ConfigError) as raised:
        broker({"database": "postgresql://u:s3cret@h/tasks?bogus=1"})
    assert "s3cret" not in str(raised.value)


@pytest.mark.parametrize(
    "url, reason",
    [
        (
            "postgresql://localhost/tasks?nosuchoption=1",
            "invalid PostgreSQL URI",
        ),
        ("sqlite:///:memory:", "in-memory"),
        ("sqlite:///", "names no file"),
        ("sqlite://tasks.db", "unsupported"),
        ("mysql://localhost/tasks", "unsupported"),
        ("tasks.sqlite", "unsupported"),
    ],
)
def test_other_database_urls_are_rejected(url, reason):
    message = config_error(broker, {"database": url})
    assert message.startswith("--database: ")
    # The reason is not stuttered ("--database: --database: ...").
    assert message.count("--database") == 1
    assert reason in message
    message = config_error(broker, None, {"TASKBROKER_DATABASE": url})
    assert message.startswith("TASKBROKER_DATABASE: ")
    assert "--database" not in message


# -- endpoints ----------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "tcp://127.0.0.1:5555",
        "tcp://127.0.0.1:*",
        "tcp://*:5555",
        "tcp://localhost:1",
        "tcp://[::1]:5555",
        "tcp://127.0.0.1:65535",
        "ipc:///tmp/taskbroker.sock",
        "inproc://broker",
    ],
)
def test_valid_endpoints(text):
    assert endpoint(text) == text


@pytest.mark.parametrize(
    "text",
    [
        "",
        "127.0.0.1:5555",
        "tcp://127.0.0.1",
        "tcp://127.0.0.1:",
        "tcp://:5555",
        "tcp://127.0.0.1:port",
        "tcp://a b:5555",
        "udp://127.0.0.1:5555",
        "ipc://",
        " tcp://127.0.0.1:5555",
        # libzmq would take it modulo 65536 and bind port 4464.
        "tcp://127.0.0.1:70000",
    ],
)
def test_invalid_endpoints(text):
    with pytest.raises(ValueError):
        endpoint(text)
    message = config_error(broker, {"listen": text})
    assert message.startswith("--listen: ")


# -- failover lists ----------------------------------------------------------


def test_a_broker_list_for_the_worker_and_its_failover_time():
    config = worker({"broker": "tcp://127.0.0.1:1, tcp://127.0.0.1:2"})
    assert config.broker == ("tcp://127.0.0.1:1", "tcp://127.0.0.1:2")
    assert config.failover_after == 10.0
    config = worker(
        env={
            "TASKWORKER_BROKER": "tcp://127.0.0.1:3",
            "TASKWORKER_FAILOVER_AFTER": "2.5",
        }
    )
    assert (config.broker, config.failover_after) == (
        ("tcp://127.0.0.1:3",),
        2.5,
    )


def test_a_config_built_directly_takes_a_string_or_a_list():
    assert WorkerConfig(
        broker="tcp://127.0.0.1:1,tcp://127.0.0.1:2"
    ).broker == ("tcp://127.0.0.1:1", "tcp://127.0.0.1:2")
    assert ClientConfig(broker=["tcp://127.0.0.1:1"]).broker == (
        "tcp://127.0.0.1:1",
    )
    with pytest.raises(ConfigError) as info:
        WorkerConfig(broker="tcp://127.0.0.1:1,nowhere")
    assert str(info.value) == (
        "broker: endpoint 'nowhere': expected a ZeroMQ endpoint such as "
        "tcp://127.0.0.1:5555"
    )


@pytest.mark.parametrize(
    "build, prefix", [(worker, "TASKWORKER_"), (client, "TASKBROKER_")]
)
@pytest.mark.parametrize(
    "value, reason",
    [
        ("tcp://127.0.0.1:1,tcp://127.0.0.1", "endpoint 'tcp://127.0.0.1':"),
        ("tcp://127.0.0.1:1,tcp://127.0.0.1:1", "listed twice"),
        ("tcp://127.0.0.1:1,", "empty"),
    ],
)
def test_a_bad_broker_list_is_one_line_naming_the_endpoint(
    build, prefix, value, reason
):
    message = config_error(build, {"broker": value})
    assert message.startswith("--broker: ") and reason in message
    message = config_error(build, None, {prefix + "BROKER": value})
    assert message.startswith(prefix + "BROKER: ") and reason in message


def test_failover_after_must_be_positive():
    assert "greater than 0" in config_error(worker, {"failover_after": "0"})


# -- CURVE keys of the worker and the command line ---------------------------


@pytest.mark.parametrize(
    "build, peer", [(worker, "worker"), (client, "client")]
)
def test_curve_keys_come_both_or_neither(build, peer):
    assert (build().curve_server_key, build().curve_secret_key) == (None, None)
    assert config_error(build, {"curve_server_key": "/k/broker.key"}) == (
        "--curve-server-key without --curve-secret-key: give both (the "
        f"broker's public key file and this {peer}'s NAME.key_secret file) "
        "or neither"
    )
    assert config_error(
        build, {"curve_secret_key": "/k/me.key_secret"}
    ).startswith("--curve-secret-key without --curve-server-key: ")


def test_curve_key_paths_are_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for build in (worker, client):
        config = build(
            {
                "curve_server_key": "keys/broker.key",
                "curve_secret_key": "me.key_secret",
            }
        )
        assert (config.curve_server_key, config.curve_secret_key) == (
            str(tmp_path / "keys" / "broker.key"),
            str(tmp_path / "me.key_secret"),
        )
    assert config_error(worker, {"curve_server_key": ""}).startswith(
        "--curve-server-key: expected a file name"
    )


def test_curve_key_variables():
    keys = ("/k/broker.key", "/k/me.key_secret")
    config = worker(
        env={
            "TASKWORKER_CURVE_SERVER_KEY": keys[0],
            "TASKWORKER_CURVE_SECRET_KEY": keys[1],
        }
    )
    assert (config.curve_server_key, config.curve_secret_key) == keys
    config = client(
        env={
            "TASKBROKER_CLIENT_CURVE_SERVER_KEY": keys[0],
            "TASKBROKER_CLIENT_CURVE_SECRET_KEY": keys[1],
        }
    )
    assert (config.curve_server_key, config.curve_secret_key) == keys


def test_the_command_line_and_the_broker_never_read_each_others_keys():
    # TASKBROKER_CURVE_SECRET_KEY is the broker's secret: a command that
    # read it would pose as the broker.
    config = client(env={"TASKBROKER_CURVE_SECRET_KEY": "/k/b.key_secret"})
    assert (config.curve_server_key, config.curve_secret_key) == (None, None)
    config = broker(
        env={
            "TASKBROKER_CLIENT_CURVE_SECRET_KEY": "/k/c.key_secret",
            "TASKBROKER_CLIENT_CURVE_SERVER_KEY": "/k/b.key",
        }
    )
    assert config.curve_secret_key is None


def test_a_setting_may_name_its_own_variable():
    from taskbroker.config import CLIENT_SETTINGS

    assert {s.field: s.variable("TASKBROKER_") for s in CLIENT_SETTINGS} == {
        "broker": "TASKBROKER_BROKER",
        "timeout": "TASKBROKER_TIMEOUT",
        "curve_server_key": "TASKBROKER_CLIENT_CURVE_SERVER_KEY",
        "curve_secret_key": "TASKBROKER_CLIENT_CURVE_SECRET_KEY",
    }
    # Under its config's prefix, or not at all.
    [secret] = [s for s in CLIENT_SETTINGS if s.field == "curve_secret_key"]
    with pytest.raises(ValueError):
        secret.variable("TASKWORKER_")
    assert {s.variable("TASKWORKER_") for s in WORKER_SETTINGS} >= {
        "TASKWORKER_CURVE_SERVER_KEY",
        "TASKWORKER_CURVE_SECRET_KEY",
    }


def test_admin_clients_is_an_authorization_folder(tmp_path):
    secret = str(tmp_path / "broker.key_secret")
    with pytest.raises(
        ConfigError,
        match="--admin-clients and --allow-any-key need --curve-secret-key",
    ):
        BrokerConfig(admin_clients=str(tmp_path))
    with pytest.raises(ConfigError, match="--allow-any-key lets every key"):
        BrokerConfig(
            curve_secret_key=secret,
            admin_clients=str(tmp_path),
            allow_any_key=True,
        )
    # Admins alone: a broker its operators use, with no other clients.
    assert BrokerConfig(
        curve_secret_key=secret, admin_clients=str(tmp_path)
    ).admin_clients == str(tmp_path)
