"""
Tests for taskbroker.services: children started one after another, stopped
one after another in reverse, and a failed start undone.
"""

from twisted.application.service import Service
from twisted.internet import defer
from twisted.logger import capturedLogs

from taskbroker.errors import StoreError
from taskbroker.services import ServiceTree, StepService
from taskbroker.testing import result_of


class Recorder:
    """
    Children whose starts and stops are recorded and finish when told.
    """

    def __init__(self):
        self.events = []
        self.pending = {}

    def child(self, name, fail=None):
        def step(what):
            def run():
                self.events.append((what, name))
                if fail is not None and what == "start":
                    raise fail
                d = self.pending[(what, name)] = defer.Deferred()
                return d

            return run

        return StepService(name, step("start"), step("stop"))

    def finish(self, what, name):
        self.pending.pop((what, name)).callback(None)


def tree_of(recorder, *names, **kwargs):
    tree = ServiceTree(**kwargs)
    tree.setName("daemon")
    for name in names:
        recorder.child(name).setServiceParent(tree)
    return tree


def test_each_child_starts_after_the_previous_one_has_started():
    r = Recorder()
    started = []
    tree = tree_of(
        r, "store", "socket", "timer", on_started=lambda: started.append(True)
    )
    d = tree.startService()
    assert r.events == [("start", "store")]
    r.finish("start", "store")
    assert r.events[-1] == ("start", "socket")
    r.finish("start", "socket")
    assert not started
    r.finish("start", "timer")
    assert started == [True] and result_of(d) is None


def test_children_stop_one_at_a_time_in_reverse():
    r = Recorder()
    tree = tree_of(r, "store", "socket", "timer")
    tree.startService()
    for name in ("store", "socket", "timer"):
        r.finish("start", name)
    r.events.clear()
    d = tree.stopService()
    assert r.events == [("stop", "timer")]
    r.finish("stop", "timer")
    assert r.events[-1] == ("stop", "socket")
    r.finish("stop", "socket")
    assert not d.called
    r.finish("stop", "store")
    assert result_of(d) is None
    assert tree.stopService() is d  # safe to call twice


def test_a_failed_start_stops_what_started_and_reports_one_line():
    r = Recorder()
    fatal = []
    tree = ServiceTree(on_fatal=fatal.append)
    tree.setName("daemon")
    r.child("store").setServiceParent(tree)
    r.child("socket", fail=StoreError("port\nin use")).setServiceParent(tree)
    r.child("timer").setServiceParent(tree)
    with capturedLogs() as events:
        d = tree.startService()
        r.finish("start", "store")
        # The failed child is stopped too (it may have half-started), then
        # the ones before it, in reverse.
        assert r.events[-1] == ("stop", "socket")
        r.finish("stop", "socket")
        assert r.events[-1] == ("stop", "store")
        assert not fatal
        r.finish("stop", "store")
    assert fatal == ["port in use"]
    assert ("start", "timer") not in r.events
    assert result_of(d) is None and not tree.running
    [line] = [e for e in events if "cannot start" in e["log_format"]]
    assert line["message"] == "port in use" and line["name"] == "daemon"
    # An expected error (the store's) is one line, no traceback.
    assert not any(e.get("log_failure") is not None for e in events)


def test_an_unexpected_start_error_is_logged_with_its_traceback():
    r = Recorder()
    tree = ServiceTree()
    r.child("broken", fail=ZeroDivisionError("a bug")).setServiceParent(tree)
    with capturedLogs() as events:
        tree.startService()
        r.finish("stop", "broken")
    assert any(
        e.get("log_failure") is not None
        and e["log_failure"].check(ZeroDivisionError)
        for e in events
    )


def test_a_stop_during_the_start_waits_for_it_and_undoes_it():
    r = Recorder()
    tree = tree_of(r, "store", "socket")
    tree.startService()
    d = tree.stopService()
    # The store is still opening: the socket never starts, the store is
    # closed once it has opened.
    r.finish("start", "store")
    assert r.events == [("start", "store"), ("stop", "store")]
    r.finish("stop", "store")
    assert result_of(d) is None


def test_children_that_return_nothing_are_fine():
    tree = ServiceTree()
    plain = Service()
    plain.setName("plain")
    plain.setServiceParent(tree)
    result_of(tree.startService())
    assert plain.running
    result_of(tree.stopService())
    assert not plain.running


def test_a_running_tree_that_fails_stops_in_reverse_and_reports_one_line():
    r = Recorder()
    fatal = []
    tree = tree_of(r, "store", "socket", on_fatal=fatal.append)
    tree.startService()
    for name in ("store", "socket"):
        r.finish("start", name)
    with capturedLogs() as events:
        d = tree.fail("database gone\nfor good")
        assert tree.fail("again") is not d and not tree.running
        r.finish("stop", "socket")
        assert not fatal
        r.finish("stop", "store")
    assert fatal == ["database gone for good"]
    assert result_of(d) is None
    [line] = [e for e in events if e["log_level"].name == "critical"]
    assert line["log_format"] == "{name} stopping: {message}"
    assert (line["name"], line["message"]) == (
        "daemon",
        "database gone for good",
    )
    # A stop asked for later (twistd's, at exit) is the same stop.
    assert tree.stopService().called
