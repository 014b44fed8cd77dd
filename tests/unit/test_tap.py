"""
Tests for the twistd command lines: taskbroker._tap, the broker's and the
worker's tap modules, and the plugin file that makes twistd list them.
"""

import os
import subprocess
import sys

import pytest
from twisted.application.service import IService
from twisted.python import usage

from taskbroker.broker import tap as broker_tap
from taskbroker.config import (
    BROKER_SETTINGS,
    WORKER_SETTINGS,
    BrokerConfig,
    WorkerConfig,
)
from taskbroker.worker import tap as worker_tap

ROOT = os.path.dirname(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
)
TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")


def parse(module, argv):
    options = module.Options()
    options.parseOptions(argv)
    return options


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    # The developer's own TASKBROKER_*/TASKWORKER_* must not leak in.
    for name in list(os.environ):
        if name.startswith(("TASKBROKER_", "TASKWORKER_")):
            monkeypatch.delenv(name)


def test_broker_options_build_config():
    options = parse(
        broker_tap,
        [
            "--listen",
            "tcp://127.0.0.1:*",
            "--database=sqlite:///x.db",
            "--priorities",
            "a,b",
            "--max-attempts",
            "5",
            "--sqlite-synchronous",
            "full",
        ],
    )
    assert options.config == BrokerConfig(
        listen="tcp://127.0.0.1:*",
        database="sqlite:///x.db",
        priorities=("a", "b"),
        default_priority="b",
        max_attempts=5,
        sqlite_synchronous="full",
    )


def test_broker_options_defaults_and_environment(monkeypatch):
    assert parse(broker_tap, []).config == BrokerConfig()
    monkeypatch.setenv("TASKBROKER_HEARTBEAT", "2.5")
    monkeypatch.setenv("TASKBROKER_MAX_ATTEMPTS", "9")
    config = parse(broker_tap, ["--max-attempts", "4"]).config
    assert (config.heartbeat, config.max_attempts) == (2.5, 4)


def test_worker_options_build_config(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    options = parse(
        worker_tap,
        [
            "--broker",
            "tcp://127.0.0.1:6000",
            "--concurrency",
            "3",
            "--name",
            "w1",
            "--priorities",
            "high",
            "--handlers-path",
            str(tmp_path / "a"),
            "--handlers-path",
            str(tmp_path / "b"),
        ],
    )
    assert options.config == WorkerConfig(
        broker="tcp://127.0.0.1:6000",
        concurrency=3,
        name="w1",
        priorities=("high",),
        handlers_path=(str(tmp_path / "a"), str(tmp_path / "b")),
    )


def test_worker_handlers_path_from_environment(tmp_path, monkeypatch):
    (tmp_path / "a").mkdir()
    monkeypatch.setenv("TASKWORKER_HANDLERS_PATH", str(tmp_path / "a"))
    assert parse(worker_tap, []).config.handlers_path == (str(tmp_path / "a"),)


@pytest.mark.parametrize(
    "module, argv, option",
    [
        (worker_tap, ["--concurrency", "zero"], "--concurrency"),
        (
            worker_tap,
            ["--handlers-path", "/nonexistent/dir"],
            "--handlers-path",
        ),
        (
            broker_tap,
            ["--database", "postgresql://db/tasks?bogus=1"],
            "--database",
        ),
        (broker_tap, ["--default-priority", "urgent"], "--default-priority"),
        (broker_tap, ["--listen", "localhost"], "--listen"),
    ],
)
def test_invalid_value_exits_2_with_one_line(module, argv, option, capsys):
    with pytest.raises(SystemExit) as info:
        parse(module, argv)
    assert info.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert option in lines[0]
    assert "Options:" not in err and "Traceback" not in err


def test_invalid_environment_value_names_the_variable(monkeypatch, capsys):
    monkeypatch.setenv("TASKWORKER_CONCURRENCY", "-1")
    with pytest.raises(SystemExit):
        parse(worker_tap, [])
    assert capsys.readouterr().err == (
        "twistd taskworker: TASKWORKER_CONCURRENCY: must be at least 1 "
        "(got '-1')\n"
    )


def test_unknown_option_is_a_usage_error():
    with pytest.raises(usage.UsageError):
        parse(broker_tap, ["--no-such-option"])


@pytest.mark.parametrize(
    "module, settings",
    [(broker_tap, BROKER_SETTINGS), (worker_tap, WORKER_SETTINGS)],
)
def test_help_mentions_every_option_and_its_default(module, settings):
    text = " ".join(str(module.Options()).split())
    for setting in settings:
        helptext = " ".join(setting.help.split())
        if setting.flag:
            # Off unless given: no value, no default shown.
            assert f"--{setting.option} " in text
            assert helptext in text
            continue
        assert f"--{setting.option}=" in text
        default = setting.default
        if isinstance(default, tuple):
            default = ",".join(default) or "none"
        if default is None:
            # Computed defaults are described in the help itself.
            assert "(default: " in helptext, setting.option
            assert helptext in text
        else:
            assert f"{helptext} [default: {default}]" in text, setting.option


def test_a_flag_is_off_unless_given_or_set_in_the_environment(monkeypatch):
    assert parse(broker_tap, []).config.create_database is False
    assert parse(broker_tap, ["--create-database"]).config.create_database
    monkeypatch.setenv("TASKBROKER_CREATE_DATABASE", "yes")
    assert parse(broker_tap, []).config.create_database is True
    monkeypatch.setenv("TASKBROKER_CREATE_DATABASE", "0")
    assert parse(broker_tap, []).config.create_database is False


def test_a_flag_set_to_nonsense_in_the_environment_is_refused(
    monkeypatch, capsys
):
    monkeypatch.setenv("TASKBROKER_CREATE_DATABASE", "maybe")
    with pytest.raises(SystemExit):
        parse(broker_tap, [])
    assert capsys.readouterr().err == (
        "twistd taskbroker: TASKBROKER_CREATE_DATABASE: expected yes or no "
        "(also 1, true, on; 0, false, off) (got 'maybe')\n"
    )


def test_help_mentions_the_environment():
    assert "TASKBROKER_" in str(broker_tap.Options())
    assert "TASKWORKER_" in str(worker_tap.Options())


def test_broker_make_service_does_not_start(tmp_path):
    database = tmp_path / "tasks.sqlite"
    options = parse(
        broker_tap,
        [
            "--listen",
            "tcp://127.0.0.1:*",
            "--database",
            f"sqlite:///{database}",
        ],
    )
    service = broker_tap.makeService(options)
    assert IService.providedBy(service)
    assert service.config is options.config
    assert not service.running
    assert service.socket is None
    # Nothing was opened: no database file, no listening socket.
    assert not database.exists()
    assert not os.path.exists(
        os.path.join(os.path.dirname(database), "tasks.sqlite-wal")
    )


def test_plugin_file_imports_only_service_maker():
    # twistd imports it before choosing a reactor (STYLE.md §2.5).
    code = (
        "import sys\n"
        "import twisted.plugins.taskbroker_plugin as p\n"
        "assert 'twisted.internet.reactor' not in sys.modules, 'reactor'\n"
        "assert not any(m.startswith(('txzmq', 'zmq', 'taskbroker')) "
        "for m in sys.modules), 'imports'\n"
        "print(p.taskbroker.tapname, p.taskworker.tapname)\n"
    )
    result = run([sys.executable, "-c", code])
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["taskbroker", "taskworker"]


def run(argv):
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("TASKBROKER_", "TASKWORKER_"))
    }
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=60, cwd=ROOT, env=env
    )


def test_twistd_lists_both_daemons():
    result = run([TWISTD, "--help"])
    assert result.returncode == 0, result.stderr
    commands = [
        line.split()[0]
        for line in result.stdout.splitlines()
        if line.startswith("    ") and line.split()
    ]
    assert "taskbroker" in commands and "taskworker" in commands
    assert "Traceback" not in result.stderr


def test_twistd_taskbroker_help():
    result = run([TWISTD, "taskbroker", "--help"])
    assert result.returncode == 0, result.stderr
    assert "--database=" in result.stdout
    assert "[default: tcp://127.0.0.1:5555]" in " ".join(result.stdout.split())


def test_twistd_invalid_value_prints_one_line():
    result = run(
        [TWISTD, "-n", "--pidfile=", "taskworker", "--concurrency", "zero"]
    )
    assert result.returncode != 0
    output = (result.stdout + result.stderr).strip()
    assert "Traceback" not in output
    assert len(output.splitlines()) == 1, output
    assert "--concurrency" in output


# -- the environment: typos stop a daemon, other strangers are noted ----------


@pytest.mark.parametrize(
    "module, variable, known",
    [
        (broker_tap, "TASKBROKER_DATBASE", "TASKBROKER_DATABASE"),
        (broker_tap, "TASKBROKER_HEARTBEATS", "TASKBROKER_HEARTBEAT"),
        (broker_tap, "TASKBROKER_POLL_INTERVALL", "TASKBROKER_POLL_INTERVAL"),
        (worker_tap, "TASKWORKER_CONCURENCY", "TASKWORKER_CONCURRENCY"),
        (worker_tap, "TASKWORKER_NAMES", "TASKWORKER_NAME"),
        (
            worker_tap,
            "TASKWORKER_CURVE_SERVER_KY",
            "TASKWORKER_CURVE_SERVER_KEY",
        ),
        (
            broker_tap,
            "TASKBROKER_CLIENT_CURVE_SECRT_KEY",
            "TASKBROKER_CLIENT_CURVE_SECRET_KEY",
        ),
        (
            broker_tap,
            "TASKBROKER_CURVE_SECRET_KY",
            "TASKBROKER_CURVE_SECRET_KEY",
        ),
    ],
)
def test_a_misspelt_variable_stops_the_daemon(
    monkeypatch, capsys, module, variable, known
):
    monkeypatch.setenv(variable, "1")
    with pytest.raises(SystemExit) as caught:
        parse(module, [])
    assert caught.value.code == 2
    command = "taskbroker" if module is broker_tap else "taskworker"
    assert capsys.readouterr().err == (
        f"twistd {command}: {variable}: unknown variable; did you mean "
        f"{known}?\n"
    )


def test_an_unknown_variable_is_a_warning(monkeypatch, capsys):
    monkeypatch.setenv("TASKBROKER_SOMETHING_ELSE_ENTIRELY", "1")
    options = parse(broker_tap, [])
    assert options.config == BrokerConfig()
    assert capsys.readouterr().err == (
        "twistd taskbroker: warning: TASKBROKER_SOMETHING_ELSE_ENTIRELY: "
        "unknown variable, ignored\n"
    )


def test_the_command_lines_and_the_tests_variables_are_known(
    monkeypatch, capsys
):
    for variable in (
        "TASKBROKER_BROKER",
        "TASKBROKER_TIMEOUT",
        "TASKBROKER_CLIENT_CURVE_SERVER_KEY",
        "TASKBROKER_CLIENT_CURVE_SECRET_KEY",
        "TASKBROKER_TEST_POSTGRES",
        # The other daemon's variables are its own business.
        "TASKWORKER_CONCURRENCY",
    ):
        monkeypatch.setenv(variable, "1")
    # The broker reads none of them.
    assert parse(broker_tap, []).config == BrokerConfig()
    assert capsys.readouterr().err == ""


def test_no_daemon_option_clashes_with_the_command_lines_variables():
    from taskbroker.config import (
        CLIENT_SETTINGS,
        KNOWN_VARIABLES,
        RESERVED_PREFIXES,
    )

    broker = {s.variable("TASKBROKER_") for s in BROKER_SETTINGS}
    client = {s.variable("TASKBROKER_") for s in CLIENT_SETTINGS}
    assert broker.isdisjoint(client)
    assert KNOWN_VARIABLES["TASKBROKER_"] == broker | client
    for variable in broker | client:
        assert not variable.startswith(RESERVED_PREFIXES["TASKBROKER_"])
    worker = {s.variable("TASKWORKER_") for s in WORKER_SETTINGS}
    assert KNOWN_VARIABLES["TASKWORKER_"] == worker


# -- the worker's CURVE keys: read before it starts -------------------------


def test_the_worker_reads_its_curve_keys(curve_keys):
    from taskbroker import curve

    assert parse(worker_tap, []).curve is None
    options = parse(
        worker_tap,
        [
            "--curve-server-key",
            curve_keys("broker.key"),
            "--curve-secret-key",
            curve_keys("w1.key_secret"),
        ],
    )
    assert options.curve == (
        curve.load_public(curve_keys("broker.key"), "t"),
        *curve.load_secret(curve_keys("w1.key_secret"), "t"),
    )


def test_the_worker_reads_its_curve_keys_from_the_environment(
    curve_keys, monkeypatch
):
    monkeypatch.setenv("TASKWORKER_CURVE_SERVER_KEY", curve_keys("broker.key"))
    monkeypatch.setenv(
        "TASKWORKER_CURVE_SECRET_KEY", curve_keys("w1.key_secret")
    )
    assert parse(worker_tap, []).curve is not None


@pytest.mark.parametrize(
    "server, secret, expected",
    [
        (
            "broker.key",
            None,
            "--curve-server-key without --curve-secret-key: ",
        ),
        (
            "broker.key",
            "w1.key",
            "--curve-secret-key: {w1.key}: no secret key",
        ),
        (
            "nothing.key",
            "w1.key_secret",
            "--curve-server-key: {nothing.key}: No such file or directory",
        ),
    ],
)
def test_unusable_curve_keys_stop_the_worker_in_one_line(
    curve_keys, capsys, server, secret, expected
):
    argv = ["--curve-server-key", curve_keys(server)]
    if secret is not None:
        argv += ["--curve-secret-key", curve_keys(secret)]
    with pytest.raises(SystemExit) as caught:
        parse(worker_tap, argv)
    assert caught.value.code == 2
    out, err = capsys.readouterr()
    for name in ("w1.key", "nothing.key"):
        expected = expected.replace("{" + name + "}", curve_keys(name))
    assert out == "" and err.startswith("twistd taskworker: " + expected)
    assert len(err.splitlines()) == 1 and "Traceback" not in err


def test_options_are_declared_once_on_the_config_fields():
    from dataclasses import fields

    from taskbroker.config import WorkerConfig

    for settings, cls in (
        (BROKER_SETTINGS, BrokerConfig),
        (WORKER_SETTINGS, WorkerConfig),
    ):
        assert [s.field for s in settings] == [f.name for f in fields(cls)]
    # A default computed from the others is the same built or parsed.
    assert WorkerConfig().name == parse(worker_tap, []).config.name
    assert BrokerConfig(priorities=("a", "b")).default_priority == "b"


def test_sighup_makes_the_broker_read_its_key_folders(monkeypatch, tmp_path):
    import signal

    from twisted.internet import reactor

    called = []
    monkeypatch.setattr(
        reactor, "callFromThread", lambda f, *args: called.append(f)
    )
    before = signal.getsignal(signal.SIGHUP)
    try:
        service = broker_tap.makeService(
            parse(broker_tap, ["--database", f"sqlite:///{tmp_path}/t.sqlite"])
        )
        signal.getsignal(signal.SIGHUP)(signal.SIGHUP, None)
    finally:
        signal.signal(signal.SIGHUP, before)
    assert called == [service.reload_keys]
