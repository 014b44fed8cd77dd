"""
Tests for the lines both daemons log about each task (taskbroker.logs),
driven with a Clock, and for the JSON observers shipped for twistd's
--logger.
"""

import io
import json

from twisted.internet.task import Clock
from twisted.logger import Logger, capturedLogs, formatEvent

from taskbroker import logs
from taskbroker.logs import GATHER, MOST_PER_EVENT, TaskLog, cut, seconds
from taskbroker.testing import MemoryStore, result_of
from tests.unit.conftest import Peers
from tests.unit.test_broker import hello, send, started_broker
from tests.unit.test_progress import progress_worker


def texts(events, kind):
    return [formatEvent(e) for e in events if e.get("event") == kind]


def task_log(clock):
    return TaskLog(
        Logger(),
        clock,
        "dispatched",
        lambda t: f"task {t['id']} to {t['worker']}",
        lambda t: f"{t['id']} to {t['worker']}",
    )


def test_a_task_alone_is_one_line_of_its_own():
    clock = Clock()
    with capturedLogs() as events:
        log = task_log(clock)
        log.add(id=7, worker="w1")
        assert events == []
        clock.advance(GATHER)
    [event] = events
    assert formatEvent(event) == "task 7 to w1"
    assert event["tasks"] == [{"id": 7, "worker": "w1"}]
    assert event["event"] == "dispatched"


def test_tasks_close_together_share_a_line():
    clock = Clock()
    with capturedLogs() as events:
        log = task_log(clock)
        for n in range(2 * MOST_PER_EVENT + 1):
            log.add(id=n, worker="w")
        clock.advance(GATHER)
    assert [len(e["tasks"]) for e in events] == [
        MOST_PER_EVENT,
        MOST_PER_EVENT,
        1,
    ]
    assert formatEvent(events[0]).startswith(
        "tasks dispatched: 0 to w; 1 to w; 2 to w"
    )
    assert formatEvent(events[2]) == f"task {2 * MOST_PER_EVENT} to w"


def test_a_flush_logs_at_once():
    clock = Clock()
    with capturedLogs() as events:
        log = task_log(clock)
        log.add(id=1, worker="w")
        log.flush()
        assert len(events) == 1
        clock.advance(GATHER)
        log.flush()
    assert len(events) == 1 and clock.getDelayedCalls() == []


def test_errors_and_durations_as_lines_show_them():
    assert seconds(0.0123) == "0.012s" and seconds(None) == "?"
    assert cut(None) is None
    assert cut("ValueError: bad\n  input") == "ValueError: bad input"
    assert len(cut("x" * 1000)) == 200


def test_the_broker_logs_each_dispatch_and_end():
    clock = Clock()
    store = MemoryStore(clock)
    result_of(store.open())
    peers = Peers()
    broker = started_broker(store, clock, peers)
    with capturedLogs() as events:
        hello(broker)
        send(broker, b"w1/x", b"READY", {})
        clock.advance(2)
        send(
            broker,
            b"client",
            b"SUBMIT",
            {
                "req": "r",
                "tasks": [
                    {"handler": "echo", "priority": "high", "max_attempts": 1}
                ],
            },
        )
        clock.advance(1.5)
        send(
            broker,
            b"w1/x",
            b"RESULT",
            {
                "id": 1,
                "token": 1,
                "state": "failed",
                "error": "boom\n  at line 3",
            },
        )
        clock.advance(GATHER)
    assert texts(events, "dispatched") == [
        "task 1 dispatched to w1: echo, priority high, attempt 1 of 1, "
        "0.000s after it was created"
    ]
    assert texts(events, "ended") == [
        "task 1 failed: echo, priority high, worker w1, attempt 1, ran "
        "1.500s: boom at line 3"
    ]
    [ended] = [e for e in events if e.get("event") == "ended"]
    assert ended["tasks"] == [
        {
            "id": 1,
            "handler": "echo",
            "priority": "high",
            "worker": "w1",
            "attempt": 1,
            "outcome": "failed",
            "ran": 1.5,
            "error": "boom at line 3",
        }
    ]


def test_the_worker_logs_each_start_and_end():
    clock = Clock()
    with capturedLogs() as events:
        worker, handler, socket = progress_worker(clock, takes_progress=True)
        clock.advance(2.25)
        handler.tasks[4][1].callback("done")
        clock.advance(GATHER)
    assert texts(events, "started") == [
        "task 4 started: reporting, priority normal, attempt 1 of 3"
    ]
    assert texts(events, "ended") == [
        "task 4 succeeded: reporting, ran 2.250s"
    ]


def test_the_json_observers_write_one_event_a_line(tmp_path, monkeypatch):
    path = tmp_path / "broker.json"
    monkeypatch.setenv("JSON_LOG_FILE", str(path))
    observer = logs.json_file()
    event = {
        "log_format": "{text}",
        "text": "task 1 to w1",
        "tasks": [{"id": 1, "worker": "w1"}],
        "event": "dispatched",
        "log_time": 1.0,
        "log_namespace": "test",
    }
    observer(event)
    observer(dict(event, text="task 2 to w1"))
    lines = path.read_text().splitlines()
    assert [json.loads(line)["text"] for line in lines] == [
        "task 1 to w1",
        "task 2 to w1",
    ]
    assert json.loads(lines[0])["tasks"] == [{"id": 1, "worker": "w1"}]
    stdout = io.StringIO()
    monkeypatch.setattr("sys.stdout", stdout)
    logs.json_stdout()(event)
    assert json.loads(stdout.getvalue())["event"] == "dispatched"
