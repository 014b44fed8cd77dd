"""
Tests for taskbroker.worker.handlers (finding handler plugins) and the
built-in handlers in taskbroker.plugins.taskbroker_builtin_handlers.
"""

import itertools
import re
import sys
import textwrap
from contextlib import contextmanager

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs, formatEvent

import taskbroker.plugins
from taskbroker.plugins.taskbroker_builtin_handlers import (
    MAX_SLEEP,
    Echo,
    Sleep,
)
from taskbroker.testing import FakeTask
from taskbroker.worker.handlers import load_handlers
from taskbroker.worker.task import RunningTask

_counter = itertools.count()

HANDLER = """
from twisted.plugin import IPlugin
from zope.interface import implementer
from taskbroker.interfaces import ITaskHandler

@implementer(IPlugin, ITaskHandler)
class Handler:
    name = {name!r}
    blocking = False

    def run(self, task):
        return {result!r}

handler = Handler()
"""

NO_RUN = """
from twisted.plugin import IPlugin
from zope.interface import implementer
from taskbroker.interfaces import ITaskHandler

@implementer(IPlugin, ITaskHandler)
class Broken:
    name = {name!r}
    blocking = False

broken = Broken()
"""


@contextmanager
def restored_plugin_package():
    """
    Undo what load_handlers does to global state: folders appended to
    ``taskbroker.plugins.__path__`` and modules cached in ``sys.modules``.
    """
    saved_path = list(taskbroker.plugins.__path__)
    saved_modules = {
        name for name in sys.modules if name.startswith("taskbroker.plugins.")
    }
    try:
        yield
    finally:
        taskbroker.plugins.__path__[:] = saved_path
        for name in list(sys.modules):
            if (
                name.startswith("taskbroker.plugins.")
                and name not in saved_modules
            ):
                del sys.modules[name]


@pytest.fixture
def plugin_package():
    with restored_plugin_package():
        yield


def unique(stem):
    """
    A module or handler name no other test uses, so that nothing cached
    by one test is seen by another.
    """
    return f"{stem}_{next(_counter)}_{id(object()):x}"


def folder(tmp_path, name, files):
    path = tmp_path / name
    path.mkdir()
    for filename, text in files.items():
        (path / filename).write_text(textwrap.dedent(text))
    return path


def handler_module(name, result=None):
    return HANDLER.format(name=name, result=result or f"{name} ran")


def load(*folders):
    with capturedLogs() as events:
        handlers = load_handlers([str(f) for f in folders])
    return handlers, list(events)


def events_at(events, level):
    return [
        e
        for e in events
        if e.get("log_level") == level
        and e.get("log_namespace") == "taskbroker.worker.handlers"
    ]


def run(handler, payload=None, clock=None):
    body = {
        "id": 1,
        "handler": handler.name,
        "payload": payload,
        "priority": "normal",
        "attempt": 1,
        "max_attempts": 3,
    }
    return handler.run(RunningTask(body, clock or Clock()))


# -- loading -------------------------------------------------------------------


def test_builtins_are_loaded(plugin_package):
    handlers, events = load()
    assert {"echo", "sleep"} <= set(handlers)
    assert isinstance(handlers["echo"], Echo)
    assert isinstance(handlers["sleep"], Sleep)
    assert events_at(events, LogLevel.error) == []
    assert events_at(events, LogLevel.warn) == []


def test_handlers_from_a_folder(plugin_package, tmp_path):
    name = unique("greet")
    good = folder(
        tmp_path, "good", {f"{unique('mod')}.py": handler_module(name)}
    )
    handlers, events = load(good)
    assert run(handlers[name]) == f"{name} ran"
    assert {"echo", "sleep"} <= set(handlers)
    assert events_at(events, LogLevel.error) == []
    assert str(good) in taskbroker.plugins.__path__


def test_relative_folder_is_made_absolute(
    plugin_package, tmp_path, monkeypatch
):
    name = unique("rel")
    folder(tmp_path, "rel", {f"{unique('mod')}.py": handler_module(name)})
    monkeypatch.chdir(tmp_path)
    handlers, _ = load("rel")
    assert name in handlers
    assert str(tmp_path / "rel") in taskbroker.plugins.__path__
    assert "rel" not in taskbroker.plugins.__path__


def test_broken_modules_are_reported_by_path_and_the_rest_load(
    plugin_package, tmp_path
):
    name = unique("good")
    raising, syntax = unique("raising"), unique("syntax")
    path = folder(
        tmp_path,
        "mixed",
        {
            f"{unique('good')}.py": handler_module(name),
            f"{raising}.py": 'raise RuntimeError("boom")\n',
            f"{syntax}.py": "def broken(:\n",
        },
    )
    handlers, events = load(path)
    assert name in handlers and "echo" in handlers
    errors = events_at(events, LogLevel.error)
    by_path = {e["path"]: e for e in errors}
    assert set(by_path) == {
        str(path / f"{raising}.py"),
        str(path / f"{syntax}.py"),
    }
    assert (
        "RuntimeError: boom" in by_path[str(path / f"{raising}.py")]["error"]
    )
    assert "SyntaxError" in by_path[str(path / f"{syntax}.py")]["error"]
    for event in errors:
        assert "\n" not in event["error"]


def test_broken_module_is_reported_again_on_the_next_load(
    plugin_package, tmp_path
):
    # The dropin.cache written by the first load must not hide it.
    raising = unique("raising")
    path = folder(tmp_path, "again", {f"{raising}.py": "1 / 0\n"})
    load(path)
    _, events = load(path)
    assert [e["path"] for e in events_at(events, LogLevel.error)] == [
        str(path / f"{raising}.py")
    ]


def test_duplicate_handler_name_warns_and_keeps_the_first(
    plugin_package, tmp_path
):
    name = unique("twice")
    first_module, second_module = unique("first"), unique("second")
    first = folder(
        tmp_path,
        "first",
        {f"{first_module}.py": handler_module(name, "from first")},
    )
    second = folder(
        tmp_path,
        "second",
        {f"{second_module}.py": handler_module(name, "from second")},
    )
    handlers, events = load(first, second)
    assert run(handlers[name]) == "from first"
    [warning] = events_at(events, LogLevel.warn)
    assert warning["name"] == name
    assert warning["first"] == f"taskbroker.plugins.{first_module}"
    assert warning["second"] == f"taskbroker.plugins.{second_module}"


def test_handler_named_like_a_builtin_warns(plugin_package, tmp_path):
    module = unique("myecho")
    path = folder(tmp_path, "echoes", {f"{module}.py": handler_module("echo")})
    handlers, events = load(path)
    # The package's own folder comes first.
    assert isinstance(handlers["echo"], Echo)
    [warning] = events_at(events, LogLevel.warn)
    assert warning["name"] == "echo"
    assert warning["second"] == f"taskbroker.plugins.{module}"


def test_module_hidden_by_another_folder_warns(plugin_package, tmp_path):
    module = unique("shared")
    name_a, name_b = unique("a"), unique("b")
    a = folder(tmp_path, "a", {f"{module}.py": handler_module(name_a)})
    b = folder(tmp_path, "b", {f"{module}.py": handler_module(name_b)})
    handlers, events = load(a, b)
    assert name_a in handlers and name_b not in handlers
    [warning] = events_at(events, LogLevel.warn)
    assert warning["hidden"] == str(b / f"{module}.py")
    assert warning["used"] == str(a / f"{module}.py")


def test_module_hiding_the_builtin_module_is_reported(
    plugin_package, tmp_path
):
    path = folder(
        tmp_path,
        "clash",
        {"taskbroker_builtin_handlers.py": handler_module(unique("x"))},
    )
    handlers, events = load(path)
    assert "echo" in handlers
    [warning] = events_at(events, LogLevel.warn)
    assert warning["hidden"] == str(path / "taskbroker_builtin_handlers.py")


def test_handler_without_run_is_skipped(plugin_package, tmp_path):
    broken, good = unique("norun"), unique("good")
    module = unique("mod")
    path = folder(
        tmp_path,
        "norun",
        {
            f"{module}.py": NO_RUN.format(name=broken),
            f"{unique('ok')}.py": handler_module(good),
        },
    )
    handlers, events = load(path)
    assert broken not in handlers and good in handlers
    [error] = events_at(events, LogLevel.error)
    assert error["module"] == f"taskbroker.plugins.{module}"
    assert "run" in error["error"]


def test_handler_with_empty_name_is_skipped(plugin_package, tmp_path):
    path = folder(
        tmp_path, "noname", {f"{unique('mod')}.py": handler_module("")}
    )
    handlers, events = load(path)
    assert "" not in handlers
    [error] = events_at(events, LogLevel.error)
    assert "name" in error["error"]


def test_fixture_restores_the_plugin_package(tmp_path):
    before = list(taskbroker.plugins.__path__)
    module = unique("restored")
    path = folder(
        tmp_path, "restore", {f"{module}.py": handler_module(module)}
    )
    with restored_plugin_package():
        assert module in load(path)[0]
        assert f"taskbroker.plugins.{module}" in sys.modules
    assert taskbroker.plugins.__path__ == before
    assert f"taskbroker.plugins.{module}" not in sys.modules


# -- built-in handlers --------------------------------------------------------


@pytest.mark.parametrize("payload", [None, 0, "text", [1, {"a": None}]])
def test_echo_returns_its_payload(payload):
    assert run(Echo(), payload) == payload


def test_sleep_waits_on_the_clock():
    clock = Clock()
    d = run(Sleep(), {"seconds": 2.5}, clock)
    assert isinstance(d, Deferred)
    results = []
    d.addCallback(results.append)
    clock.advance(2.4)
    assert results == []
    clock.advance(0.1)
    assert results == [2.5]


def test_sleep_zero():
    clock = Clock()
    results = []
    run(Sleep(), {"seconds": 0}, clock).addCallback(results.append)
    clock.advance(0)
    assert results == [0]


@pytest.mark.parametrize(
    "payload",
    [
        {"seconds": -1},
        "x",
        None,
        {},
        {"seconds": True},
        {"seconds": "1"},
        {"seconds": MAX_SLEEP + 1},
        [1],
    ],
)
def test_sleep_rejects_bad_payloads(payload):
    clock = Clock()
    with pytest.raises(ValueError, match="seconds"):
        run(Sleep(), payload, clock)
    assert clock.getDelayedCalls() == []


# -- the short way: @handler on a function ------------------------------------


DECORATED = '''
from twisted.internet import defer
from taskbroker import handler

@handler({name!r})
def greet(task):
    """Greets."""
    return defer.succeed("hello " + task.payload)

@handler({blocking_name!r}, blocking=True, time_limit=600)
def checksum(task):
    return sum(task.payload)
'''

CLASS_ONLY = """
from twisted.plugin import IPlugin
from zope.interface import implementer
from taskbroker.interfaces import ITaskHandler

@implementer(IPlugin, ITaskHandler)
class Forgotten:
    name = {name!r}
    blocking = False

    def run(self, task):
        return None
"""


def test_a_function_under_handler_is_a_handler(plugin_package, tmp_path):
    name, blocking_name = unique("greet"), unique("checksum")
    module = unique("decorated")
    path = folder(
        tmp_path,
        "decorated",
        {
            f"{module}.py": DECORATED.format(
                name=name, blocking_name=blocking_name
            )
        },
    )
    handlers, events = load(path)
    assert events_at(events, LogLevel.warn) == []
    greet, checksum = handlers[name], handlers[blocking_name]
    assert (greet.blocking, checksum.blocking) == (False, True)
    assert checksum.time_limit == 600
    assert not hasattr(greet, "time_limit")
    assert run(greet, "you").result == "hello you"
    assert run(checksum, [1, 2, 3]) == 6
    # Still callable as the function it was, and named after it.
    assert checksum(FakeTask(payload=[4])) == 4
    assert greet.__doc__ == "Greets." and name in repr(greet)


@pytest.mark.parametrize(
    "arguments, error",
    [
        (("",), "handler name '' must be a string of 1 to 200 characters"),
        (("a\nb",), "must not contain control characters"),
        (("ok", "yes"), "blocking must be True or False"),
        (("ok", False, 0), "time_limit must be a number of seconds"),
        (("ok", False, "600"), "time_limit must be a number of seconds"),
    ],
)
def test_a_handler_no_worker_could_use_is_refused_at_import(arguments, error):
    from taskbroker import handler

    with pytest.raises(ValueError, match=re.escape(error)):
        handler(*arguments)


def test_a_module_with_a_handler_class_and_no_object_is_named(
    plugin_package, tmp_path
):
    name = unique("forgotten")
    module = unique("classonly")
    path = folder(
        tmp_path, "classonly", {f"{module}.py": CLASS_ONLY.format(name=name)}
    )
    handlers, events = load(path)
    assert name not in handlers
    [warning] = [
        e
        for e in events_at(events, LogLevel.warn)
        if "Forgotten" in str(e.get("cls"))
    ]
    text = formatEvent(warning)
    assert (
        f"{module}.py defines the handler class Forgotten but no object "
        "of it" in text
    )
    assert "add 'forgotten = Forgotten()' at module level" in text
