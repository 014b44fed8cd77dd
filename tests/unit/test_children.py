"""
Tests for taskbroker.worker.children (blocking handlers in handler
processes) and its child, taskbroker.worker._child.

These start real handler processes under the real reactor
(pytest-twisted): killing, crashing and parent death are what they are
about.  They wait for events (a log event, a Deferred, a process's end),
never for time, except where no event exists: a process dying after the
kernel kills it for its parent's death.  Every pool is stopped in the
fixture's cleanup, which checks that each handler process it started is
gone.
"""

import os
import signal
import sys
import time
import uuid

import pytest
import pytest_twisted
from twisted.internet import defer, protocol, threads
from twisted.logger import Logger, LogLevel

from taskbroker.errors import PermanentFailure
from taskbroker.interfaces import ITask
from taskbroker.worker._child import WallClock
from taskbroker.worker.children import ChildPool, Outcome
from taskbroker.worker.task import RunningTask
from tests import processes

#: Seconds any one wait may take before the test fails instead of hanging.
PATIENCE = 10

HANDLERS = """
import ctypes
import os
import subprocess
import time

from twisted.logger import Logger
from twisted.plugin import IPlugin
from zope.interface import implementer

from taskbroker import PermanentFailure
from taskbroker.interfaces import ITaskHandler


def fields(task):
    return {"id": task.id, "handler": task.handler, "payload": task.payload,
            "priority": task.priority, "attempt": task.attempt,
            "max_attempts": task.max_attempts, "time": task.clock.seconds(),
            "pid": os.getpid()}


def fail(task):
    raise ValueError("bad input " + repr(task.payload))


def permanent(task):
    raise PermanentFailure("never again")


def not_json(task):
    return {1, 2}


def too_deep(task):
    value = 0
    for _ in range(500):
        value = [value]
    return value


def nap(task):
    time.sleep(task.payload)


def exit3(task):
    os._exit(3)


def segfault(task):
    ctypes.string_at(0)


def talk(task):
    print("hello from", task.id)
    Logger().error("trouble with {id}", id=task.id)


def hold(task):
    # Says it started, then blocks until its payload's file exists.
    print("started", task.id)
    while not os.path.exists(task.payload):
        time.sleep(0.01)
    return os.getpid()


def spawn(task):
    program = subprocess.Popen(["sleep", "60"])
    print("grandchild", program.pid)
    program.wait()


@implementer(IPlugin, ITaskHandler)
class Blocking:
    blocking = True

    def __init__(self, name):
        self.name = name

    def run(self, task):
        return globals()[self.name](task)


handlers = [Blocking(name) for name in (
    "fields", "fail", "permanent", "not_json", "too_deep", "nap", "exit3",
    "segfault", "talk", "hold", "spawn")]
for handler in handlers:
    globals()["handler_" + handler.name] = handler
"""

PARENT = """
import sys

from twisted.internet import reactor
from twisted.logger import globalLogBeginner

from taskbroker.worker.children import ChildPool


def show(event):
    # The handler printed "started 1": tell the test its pid.
    if event.get("line") == "started 1":
        print(event["pid"], flush=True)


globalLogBeginner.beginLoggingTo([show], redirectStandardIO=False)
pool = ChildPool(reactor, [sys.argv[1]], 1)
reactor.callWhenRunning(pool.run, {
    "id": 1, "handler": "hold", "payload": sys.argv[2], "priority": "normal",
    "attempt": 1, "max_attempts": 1})
reactor.run()
"""


@pytest.fixture
def reactor():
    from twisted.internet import reactor

    return reactor


@pytest.fixture(scope="module")
def handler_folder(tmp_path_factory):
    """
    A folder with a handler module of a name no other test uses.
    """
    folder = tmp_path_factory.mktemp("handlers")
    module = folder / f"tb_children_test_{uuid.uuid4().hex[:8]}.py"
    module.write_text(HANDLERS)
    return str(folder)


class Recorder:
    """
    A log observer that keeps events and can be waited on.
    """

    def __init__(self):
        self.events = []
        self._waiting = []

    def __call__(self, event):
        self.events.append(event)
        for waiting in list(self._waiting):
            predicate, d = waiting
            if predicate(event):
                self._waiting.remove(waiting)
                d.callback(event)

    def wait_for(self, predicate):
        """
        :returns: a ``Deferred`` firing with the first event, past or
            future, for which ``predicate`` is true.
        """
        for event in self.events:
            if predicate(event):
                return defer.succeed(event)
        d = defer.Deferred()
        self._waiting.append((predicate, d))
        return d

    def line(self, text):
        return self.wait_for(lambda e: e.get("line") == text)

    def started_pids(self):
        return [
            e["pid"]
            for e in self.events
            if e["log_format"] == "started handler process {pid}"
        ]


def gone(pid):
    """
    Whether a process has ended: it no longer exists, or is a zombie that
    nobody reaps (PID 1 in a container may not).
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


async def wait_gone(reactor, pid):
    """
    Wait until ``pid`` is :func:`gone`, or :data:`PATIENCE` seconds, on its
    pidfd (in a thread, so the reactor keeps running).
    """
    return await threads.deferToThread(processes.wait_gone, pid, PATIENCE)


@pytest.fixture
def recorder():
    return Recorder()


@pytest_twisted.async_yield_fixture
async def make_pool(reactor, handler_folder, recorder):
    pools = []

    def make(size=1, paths=None, **kwargs):
        pool = ChildPool(
            reactor,
            paths or [handler_folder],
            size,
            log=Logger(observer=recorder),
            **kwargs,
        )
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        await within(reactor, pool.stop())
        assert pool.pids == []
    for pid in recorder.started_pids():
        assert gone(pid)


def within(reactor, d, seconds=PATIENCE):
    return d.addTimeout(seconds, reactor)


def body(task_id, handler, payload=None):
    return {
        "id": task_id,
        "handler": handler,
        "payload": payload,
        "priority": "high",
        "attempt": 2,
        "max_attempts": 3,
    }


# -- the handler process's parts, in this process ------------------------------


def test_child_task_provides_itask():
    from zope.interface.verify import verifyObject

    verifyObject(ITask, RunningTask(body(1, "h"), WallClock()))


def test_permanent_failure_is_public():
    import taskbroker

    assert taskbroker.PermanentFailure is PermanentFailure


# -- results ----------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_result_comes_back(reactor, make_pool):
    pool = make_pool()
    before = time.time()
    outcome = await within(reactor, pool.run(body(7, "fields", {"n": [1]})))
    assert outcome.state == "succeeded", outcome
    result = outcome.result
    assert {k: result[k] for k in body(7, "fields")} == body(
        7, "fields", {"n": [1]}
    )
    assert before <= result["time"] <= time.time()
    assert result["pid"] != os.getpid()
    assert (outcome.error, outcome.traceback, outcome.permanent) == (
        None,
        None,
        False,
    )


@pytest_twisted.ensureDeferred
async def test_process_is_reused(reactor, make_pool):
    pool = make_pool(size=2)
    first = await within(reactor, pool.run(body(1, "fields")))
    second = await within(reactor, pool.run(body(2, "fields")))
    assert first.result["pid"] == second.result["pid"]
    assert pool.pids == [first.result["pid"]]


@pytest_twisted.ensureDeferred
async def test_handler_raises(reactor, make_pool, handler_folder):
    pool = make_pool()
    outcome = await within(reactor, pool.run(body(1, "fail", "x")))
    assert (
        outcome.state,
        outcome.result,
        outcome.error,
        outcome.permanent,
    ) == ("failed", None, "ValueError: bad input 'x'", False)
    assert "tb_children_test_" in outcome.traceback
    assert outcome.traceback.rstrip().endswith("ValueError: bad input 'x'")


@pytest_twisted.ensureDeferred
async def test_permanent_failure(reactor, make_pool):
    outcome = await within(reactor, make_pool().run(body(1, "permanent")))
    assert (outcome.state, outcome.error, outcome.permanent) == (
        "failed",
        "PermanentFailure: never again",
        True,
    )


@pytest_twisted.ensureDeferred
async def test_result_not_json(reactor, make_pool):
    pool = make_pool()
    outcome = await within(reactor, pool.run(body(1, "not_json")))
    assert outcome.state == "failed"
    assert outcome.error.startswith("result is not JSON-serialisable: ")
    assert (
        await within(reactor, pool.run(body(2, "fields")))
    ).state == "succeeded"


@pytest_twisted.ensureDeferred
async def test_result_nested_too_deeply(reactor, make_pool):
    # Refused in the handler process, with the limit every peer applies,
    # not left to the parent's decoder.
    outcome = await within(reactor, make_pool().run(body(1, "too_deep")))
    assert (outcome.state, outcome.error) == (
        "failed",
        "result is nested deeper than 64 levels",
    )


@pytest_twisted.ensureDeferred
async def test_missing_handler(reactor, make_pool):
    outcome = await within(reactor, make_pool().run(body(1, "nope")))
    assert outcome == Outcome(
        "failed", None, "no handler 'nope' in the handler process"
    )


@pytest_twisted.ensureDeferred
async def test_process_cannot_start(reactor, make_pool, recorder):
    pool = make_pool(python="/nonexistent/python")
    outcome = await within(reactor, pool.run(body(1, "fields")))
    assert outcome.state == "failed"
    assert outcome.error.startswith("could not start a handler process: ")
    assert [e["log_level"] for e in recorder.events] == [LogLevel.critical]


@pytest_twisted.ensureDeferred
async def test_broken_handler_module(
    reactor, make_pool, recorder, tmp_path, handler_folder
):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / f"tb_children_broken_{uuid.uuid4().hex[:8]}.py").write_text(
        "raise ImportError('no such thing')\n"
    )
    pool = make_pool(paths=[handler_folder, str(broken)])
    outcome = await within(reactor, pool.run(body(1, "fields")))
    assert outcome.state == "succeeded"
    event = await within(
        reactor,
        recorder.wait_for(
            lambda e: "could not load handler module" in e.get("text", "")
        ),
    )
    assert event["log_level"] == LogLevel.error
    assert event["pid"] == outcome.result["pid"]
    assert "ImportError: no such thing" in event["text"]


@pytest_twisted.ensureDeferred
async def test_output_is_logged(reactor, make_pool, recorder):
    pool = make_pool()
    outcome = await within(reactor, pool.run(body(5, "talk")))
    pid = pool.pids[0]
    printed = await within(reactor, recorder.line("hello from 5"))
    assert (printed["log_level"], printed["pid"]) == (LogLevel.warn, pid)
    logged = await within(
        reactor, recorder.wait_for(lambda e: e.get("text") == "trouble with 5")
    )
    assert (logged["log_level"], logged["pid"]) == (LogLevel.error, pid)
    assert outcome.state == "succeeded"


# -- stopping a task ---------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_time_limit(reactor, make_pool):
    pool = make_pool()
    before = (await within(reactor, pool.run(body(1, "fields")))).result["pid"]
    started = time.monotonic()
    outcome = await within(
        reactor, pool.run(body(2, "nap", 30), time_limit=0.5)
    )
    assert outcome == Outcome("failed", None, "time limit of 0.5 s exceeded")
    assert time.monotonic() - started < 5
    after = await within(reactor, pool.run(body(3, "fields"), time_limit=5))
    assert after.state == "succeeded"
    assert after.result["pid"] != before
    assert gone(before)


@pytest_twisted.ensureDeferred
async def test_cancel_running(reactor, make_pool, recorder, tmp_path):
    pool = make_pool()
    d = pool.run(body(1, "hold", str(tmp_path / "never")))
    await within(reactor, recorder.line("started 1"))
    pid = pool.pids[0]
    assert pool.cancel(1) is True
    outcome = await within(reactor, d)
    assert outcome.state == "cancelled"
    assert pool.cancel(1) is False
    after = await within(reactor, pool.run(body(2, "fields")))
    assert after.result["pid"] != pid


@pytest_twisted.ensureDeferred
async def test_cancelling_the_deferred_cancels_the_task(
    reactor, make_pool, recorder, tmp_path
):
    pool = make_pool()
    d = pool.run(body(1, "hold", str(tmp_path / "never")))
    await within(reactor, recorder.line("started 1"))
    d.cancel()
    assert (await within(reactor, d)).state == "cancelled"


@pytest_twisted.ensureDeferred
async def test_cancel_stops_programs_the_handler_started(
    reactor, make_pool, recorder
):
    pool = make_pool()
    d = pool.run(body(1, "spawn"))
    event = await within(
        reactor,
        recorder.wait_for(
            lambda e: e.get("line", "").startswith("grandchild ")
        ),
    )
    program = int(event["line"].split()[1])
    try:
        pool.cancel(1)
        assert (await within(reactor, d)).state == "cancelled"
        assert await wait_gone(reactor, program)
    finally:
        if not gone(program):
            os.kill(program, 9)


@pytest.mark.parametrize(
    "handler, how",
    [
        ("exit3", "exit status 3"),
        ("segfault", "signal 11"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_handler_kills_its_process(reactor, make_pool, handler, how):
    pool = make_pool()
    outcome = await within(reactor, pool.run(body(1, handler)))
    assert outcome == Outcome("failed", None, f"handler process died ({how})")
    assert (
        await within(reactor, pool.run(body(2, "fields")))
    ).state == "succeeded"


@pytest_twisted.ensureDeferred
async def test_end_of_input_ends_a_busy_process(
    reactor, make_pool, recorder, tmp_path
):
    pool = make_pool()
    d = pool.run(body(1, "hold", str(tmp_path / "never")))
    await within(reactor, recorder.line("started 1"))
    # What a dying worker's pipe does, without the parent-death signal.
    [process] = pool._busy
    process.transport.closeStdin()
    outcome = await within(reactor, d)
    assert outcome.error == "handler process died (exit status 0)"


# -- slots and stopping -------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_size_limits_processes(reactor, make_pool, recorder, tmp_path):
    pool = make_pool(size=2)
    go = {i: tmp_path / f"go{i}" for i in (1, 2, 3)}
    d1, d2, d3 = (pool.run(body(i, "hold", str(go[i]))) for i in (1, 2, 3))
    d_cancelled = pool.run(body(4, "hold", str(go[3])))
    await within(reactor, recorder.line("started 1"))
    await within(reactor, recorder.line("started 2"))
    pids = pool.pids
    assert len(pids) == 2
    assert not d3.called
    d_cancelled.cancel()  # waiting: no process to kill
    assert d_cancelled.result.state == "cancelled"

    go[1].touch()
    first = await within(reactor, d1)
    # d1 fired as task 3 was handed over, so task 3 cannot have started.
    assert not [e for e in recorder.events if e.get("line") == "started 3"]
    started3 = await within(reactor, recorder.line("started 3"))
    # Task 3 waited for a slot and took the process task 1 left.
    assert started3["pid"] == first.result
    go[2].touch()
    go[3].touch()
    assert (await within(reactor, d2)).result in pids
    assert (await within(reactor, d3)).result == first.result
    assert pool.pids == pids
    assert len(recorder.started_pids()) == 2


@pytest_twisted.ensureDeferred
async def test_stop(reactor, make_pool, recorder, tmp_path):
    pool = make_pool(size=2)
    running = [
        pool.run(body(i, "hold", str(tmp_path / "never"))) for i in (1, 2)
    ]
    waiting = pool.run(body(3, "fields"))
    await within(reactor, recorder.line("started 1"))
    await within(reactor, recorder.line("started 2"))
    pids = pool.pids
    await within(reactor, pool.stop())
    assert all(gone(pid) for pid in pids)
    for d in [*running, waiting]:
        assert d.result == Outcome(
            "cancelled", None, "the handler processes were stopped"
        )
    assert pool.pids == []
    later = await pool.run(body(4, "fields"))
    assert later == Outcome(
        "failed", None, "the handler processes are stopping"
    )
    await within(reactor, pool.stop())


# -- parent death -----------------------------------------------------------


class _Parent(protocol.ProcessProtocol):
    """
    A Python process running a pool; ``first_line`` fires with the first
    line it prints, ``ended`` when it is gone.
    """

    def __init__(self):
        self.first_line = defer.Deferred()
        self.ended = defer.Deferred()
        self._out = b""
        self.errors = b""

    def outReceived(self, data):
        self._out += data
        if b"\n" in self._out and not self.first_line.called:
            self.first_line.callback(self._out.split(b"\n")[0].decode())

    def errReceived(self, data):
        self.errors += data

    def processEnded(self, reason):
        self.ended.callback(None)


@pytest_twisted.ensureDeferred
async def test_handler_process_dies_with_its_parent(
    reactor, handler_folder, tmp_path
):
    go = tmp_path / "go"
    parent = _Parent()
    reactor.spawnProcess(
        parent,
        sys.executable,
        [sys.executable, "-c", PARENT, handler_folder, str(go)],
        env=os.environ,
    )
    child = None
    try:
        child = int(await within(reactor, parent.first_line))
        assert not gone(child)
        parent.transport.signalProcess("KILL")
        await within(reactor, parent.ended)
        assert await wait_gone(reactor, child), parent.errors.decode()
    finally:
        # Were the child still there, this would end it (see "hold").
        go.touch()
        if not parent.ended.called:
            parent.transport.signalProcess("KILL")
            await parent.ended


@pytest_twisted.ensureDeferred
async def test_sigterm_does_not_stop_a_running_task(
    reactor, make_pool, recorder, tmp_path
):
    # A service manager signals the worker's whole control group; the
    # worker, not SIGTERM, decides when a task stops.
    pool = make_pool()
    release = tmp_path / "release"
    d = pool.run(body(1, "hold", str(release)))
    await within(reactor, recorder.line("started 1"))
    os.kill(pool.pids[0], signal.SIGTERM)
    os.kill(pool.pids[0], signal.SIGINT)
    release.write_text("")
    outcome = await within(reactor, d)
    assert outcome.state == "succeeded"
