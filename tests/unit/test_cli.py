# -*- test-case-name: tests.unit.test_cli -*-
"""
Tests for :mod:`taskbroker.cli`: option parsing, exit codes, outputs and
one-line errors, against a scripted fake broker.
"""

import io
import json
import time

import pytest

from taskbroker import cli
from taskbroker.cli import commands
from taskbroker.testing.fakebroker import (
    error,
    lose_replies,
    make_task,
    reply,
    sequence,
    submitted,
)


class Result:
    def __init__(self, code, stdout, stderr):
        self.code = code
        self.stdout = stdout
        self.stderr = stderr

    def error_line(self):
        """
        The single stderr line, checked to be the only one.
        """
        lines = self.stderr.splitlines()
        assert len(lines) == 1, self.stderr
        assert lines[0].startswith("taskbroker: ")
        assert "Traceback" not in self.stderr
        return lines[0]


def run(*argv, stdin=""):
    stdout, stderr = io.StringIO(), io.StringIO()
    code = cli.main(
        list(argv), stdout=stdout, stderr=stderr, stdin=io.StringIO(stdin)
    )
    return Result(code, stdout.getvalue(), stderr.getvalue())


def at(broker, *argv, **kwargs):
    """
    Run the command against ``broker``.
    """
    return run("--broker", broker.endpoint, "--timeout", "2", *argv, **kwargs)


# Usage errors: exit 2, one line, nothing sent.


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["frobnicate"],
        ["--bogus", "stats"],
        ["stats", "--bogus"],
        ["--timeout", "0", "stats"],
        ["--timeout", "-1", "stats"],
        ["--timeout", "soon", "stats"],
        ["--timeout", "nan", "stats"],
        ["status"],
        ["status", "abc"],
        ["status", "0"],
        ["status", "1", "2"],
        ["cancel", "x"],
        ["list", "--limit", "0"],
        ["list", "--limit", "many"],
        ["list", "extra"],
        ["submit"],
        ["submit", "a", "b"],
        ["submit", "echo", "--payload", "{not json"],
        ["submit", "echo", "--payload", "NaN"],
        ["submit", "echo", "--payload", "@/nonexistent/payload.json"],
        ["submit", "echo", "--max-attempts", "two"],
        ["submit", "echo", "--max-attempts", "5000"],
        ["submit", "--from", "/nonexistent/tasks.jsonl"],
        ["submit", "--from", "-", "echo"],
        ["submit", "--from", "-", "--wait"],
        ["submit", "--from", "-", "--delay", "5"],
        ["submit", "--from", "-", "--unique-key", "k"],
        ["submit", "--from", "-", "--time-limit", "5"],
        ["submit", "echo", "--delay", "-1"],
        ["submit", "echo", "--delay", "soon"],
        ["submit", "echo", "--delay", "inf"],
        ["submit", "echo", "--delay", "nan"],
        ["submit", "echo", "--delay", "1e12"],
        ["submit", "echo", "--time-limit", "0"],
        ["submit", "echo", "--time-limit", "-3"],
        ["submit", "echo", "--unique-key", ""],
        ["submit", "echo", "--unique-key", "a\tb"],
        ["submit", "echo", "--unique-key", "k" * 201],
        ["retry"],
        ["retry", "x"],
        ["retry", "1", "2"],
        ["--broker", "not an endpoint", "stats"],
    ],
)
def test_usage_errors_exit_2(broker, argv):
    result = run("--broker", broker.endpoint, *argv)
    assert result.code == 2
    result.error_line()
    assert result.stdout == ""
    assert broker.requests == []


def test_help_goes_to_stdout():
    result = run("--help")
    assert result.code == 0
    assert "submit" in result.stdout and result.stderr == ""
    result = run("submit", "--help")
    assert result.code == 0 and "--payload" in result.stdout


def test_version():
    result = run("--version")
    assert result.code == 0 and result.stdout.startswith("taskbroker ")


def test_main_exits_with_the_code_without_argv(monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["taskbroker", "status", "abc"])
    with pytest.raises(SystemExit) as caught:
        cli.main()
    assert caught.value.code == 2
    assert capsys.readouterr().err.startswith("taskbroker: ")


# Exit 3: unreachable, no answer, unavailable.


def test_no_answer_exits_3(silent_endpoint):
    result = run(
        "--broker", silent_endpoint, "--timeout", "0.1", "submit", "echo"
    )
    assert result.code == 3
    line = result.error_line()
    # A SUBMIT is resent too, and its outcome is unknown.
    assert "no answer" in line and "3 attempts" in line
    assert "may or may not have taken effect" in line
    assert result.stdout == ""


def test_retry_unanswered_exits_3(silent_endpoint):
    result = run("--broker", silent_endpoint, "--timeout", "0.1", "retry", "4")
    assert result.code == 3
    line = result.error_line()
    assert "3 attempts" in line
    assert "the RETRY may or may not have taken effect" in line


def test_read_only_commands_retry_then_exit_3(silent_endpoint):
    result = run(
        "--broker", silent_endpoint, "status", "1", "--timeout", "0.1"
    )
    assert result.code == 3
    assert "3 attempts" in result.error_line()


def test_a_failover_list_submits_through_the_broker_that_answers(
    broker, silent_endpoint
):
    broker.handlers["SUBMIT"] = submitted(first_id=12)
    # Whichever broker the command starts with, the task is submitted.
    for endpoints in (
        (silent_endpoint, broker.endpoint),
        (broker.endpoint, silent_endpoint),
    ):
        result = run(
            "--broker",
            ",".join(endpoints),
            "--timeout",
            "0.2",
            "submit",
            "echo",
        )
        assert result.code == 0, result.stderr
        assert result.stderr == ""
    assert [body["tasks"][0]["handler"] for _, body in broker.requests] == [
        "echo",
        "echo",
    ]


def test_a_failover_list_of_silent_brokers_names_them(silent_endpoint):
    result = run(
        "--broker",
        f"{silent_endpoint},tcp://127.0.0.1:1",
        "--timeout",
        "0.1",
        "stats",
    )
    assert result.code == 3
    line = result.error_line()
    assert silent_endpoint in line and "tcp://127.0.0.1:1" in line


@pytest.mark.parametrize(
    "value, words",
    [
        ("tcp://127.0.0.1:1,localhost:2", "endpoint 'localhost:2'"),
        ("tcp://127.0.0.1:1,tcp://127.0.0.1:1", "listed twice"),
        ("tcp://127.0.0.1:1,,tcp://127.0.0.1:2", "empty"),
    ],
)
def test_a_bad_failover_list_is_a_usage_error(value, words, monkeypatch):
    result = run("--broker", value, "stats")
    assert result.code == 2
    assert words in result.error_line()
    monkeypatch.setenv("TASKBROKER_BROKER", value)
    result = run("stats")
    assert result.code == 2
    assert result.error_line().startswith("taskbroker: TASKBROKER_BROKER: ")


def test_broker_unavailable_error_exits_3(broker):
    broker.handlers["STATS"] = lambda body: error("unavailable", "db locked")
    result = at(broker, "stats")
    assert result.code == 3
    assert "db locked" in result.error_line()


def test_a_broker_that_stays_busy_exits_3(broker):
    broker.handlers["STATS"] = lambda body: error("busy", "too many requests")
    result = at(broker, "stats", "--timeout", "0.2")
    assert result.code == 3
    assert "too many requests" in result.error_line()


def test_endpoint_from_environment(broker, monkeypatch):
    monkeypatch.setenv("TASKBROKER_BROKER", broker.endpoint)
    broker.handlers["STATS"] = lambda body: reply(stats={"workers": 0})
    result = run("stats", "--json")
    assert result.code == 0
    assert json.loads(result.stdout) == {"workers": 0}


# Exit 4 and the broker's refusals.


@pytest.mark.parametrize(
    "command", [["status", "7"], ["cancel", "7"], ["retry", "7"]]
)
def test_not_found_exits_4(broker, command):
    broker.handlers["GET"] = broker.handlers["CANCEL"] = broker.handlers[
        "RETRY"
    ] = lambda body: error("not_found", f"no task {body['id']}")
    result = at(broker, *command)
    assert result.code == 4
    assert result.error_line() == "taskbroker: no task 7"


@pytest.mark.parametrize(
    "code", ["bad_request", "unknown_priority", "not_cancellable"]
)
def test_refusals_exit_2(broker, code):
    broker.handlers["SUBMIT"] = lambda body: error(
        code, "refused\nfor a reason"
    )
    result = at(broker, "submit", "echo", "--priority", "urgent")
    assert result.code == 2
    assert result.error_line() == f"taskbroker: refused for a reason ({code})"


def test_internal_error_is_one_line(broker, monkeypatch):
    class Exploding:
        def __init__(self, *args, **kwargs):
            raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(cli, "BlockingClient", Exploding)
    result = at(broker, "stats")
    assert result.code == 1
    assert (
        result.error_line()
        == "taskbroker: internal error: RuntimeError: boom second line"
    )


# submit.


def test_submit_prints_the_id(broker):
    broker.handlers["SUBMIT"] = submitted(first_id=42)
    result = at(
        broker,
        "submit",
        "echo",
        "--payload",
        '{"n": 1}',
        "--priority",
        "high",
        "--max-attempts",
        "2",
    )
    assert (result.code, result.stdout, result.stderr) == (0, "42\n", "")
    [(_, body)] = broker.requests
    assert body["tasks"] == [
        {
            "handler": "echo",
            "payload": {"n": 1},
            "priority": "high",
            "max_attempts": 2,
            "delay": None,
            "unique_key": None,
            "time_limit": None,
        }
    ]
    assert len(body["request_id"]) == 32


def test_submit_delay_unique_key_and_time_limit(broker):
    broker.handlers["SUBMIT"] = submitted(first_id=3)
    result = at(
        broker,
        "submit",
        "echo",
        "--delay",
        "0",
        "--unique-key",
        "report-2026-11",
        "--time-limit",
        "90.5",
        "--json",
    )
    assert result.code == 0 and result.stderr == ""
    assert json.loads(result.stdout)["unique_key"] == "report-2026-11"
    [(_, body)] = broker.requests
    [task] = body["tasks"]
    assert (task["delay"], task["unique_key"], task["time_limit"]) == (
        0,
        "report-2026-11",
        90.5,
    )
    result = at(broker, "submit", "echo", "--delay", "3600")
    assert result.code == 0 and result.stdout == "4\n"
    assert broker.requests[1][1]["tasks"][0]["delay"] == 3600


def test_submit_existing_unique_key_prints_its_id_and_a_note(broker):
    live = {"nightly": make_task(5, unique_key="nightly", state="running")}
    broker.handlers["SUBMIT"] = submitted(first_id=10, live_keys=live)
    result = at(broker, "submit", "echo", "--unique-key", "nightly")
    assert result.code == 0
    assert result.stdout == "5\n"
    assert result.stderr == (
        "taskbroker: note: task 5 with unique key 'nightly' already exists; "
        "not submitted again\n"
    )
    # A key no live task holds: a new task, no note.
    result = at(broker, "submit", "echo", "--unique-key", "weekly")
    assert (result.code, result.stdout, result.stderr) == (0, "10\n", "")


def test_submit_wait_on_an_existing_task_waits_for_it(broker):
    live = {"k": make_task(5, unique_key="k", state="running")}
    broker.handlers["SUBMIT"] = submitted(first_id=10, live_keys=live)
    broker.handlers["WAIT"] = lambda body: reply(
        task=make_task(body["id"], state="succeeded", result="done")
    )
    result = at(broker, "submit", "echo", "--unique-key", "k", "--wait")
    assert result.code == 0
    assert json.loads(result.stdout) == "done"
    assert "note: task 5 with unique key 'k'" in result.stderr
    assert broker.requests[1][1]["id"] == 5


def test_submit_resent_after_a_lost_reply_creates_one_task(broker):
    broker.handlers["SUBMIT"] = lose_replies(submitted(first_id=7))
    result = run(
        "--broker", broker.endpoint, "--timeout", "0.3", "submit", "echo"
    )
    # The broker answers the copy as 'existing', but it is this command's
    # own task: no note.
    assert (result.code, result.stdout, result.stderr) == (0, "7\n", "")
    [(_, first), (_, second)] = broker.requests
    assert first == second


def test_submit_options_may_come_first(broker):
    broker.handlers["SUBMIT"] = submitted()
    result = at(broker, "submit", "--payload", "[1]", "echo")
    assert result.code == 0
    assert broker.requests[0][1]["tasks"][0]["payload"] == [1]


def test_submit_payload_from_file(broker, tmp_path):
    path = tmp_path / "payload.json"
    path.write_text('{"big": ["payload", 1]}', encoding="utf-8")
    broker.handlers["SUBMIT"] = submitted()
    result = at(broker, "submit", "echo", "--payload", f"@{path}", "--json")
    assert result.code == 0
    task = json.loads(result.stdout)
    assert task["payload"] == {"big": ["payload", 1]}
    assert broker.requests[0][1]["tasks"][0]["payload"] == {
        "big": ["payload", 1]
    }


def test_submit_payload_from_stdin(broker):
    broker.handlers["SUBMIT"] = submitted()
    result = at(broker, "submit", "echo", "--payload", "@-", stdin='"hi"')
    assert result.code == 0
    assert broker.requests[0][1]["tasks"][0]["payload"] == "hi"


def test_submit_suggests_the_handler_meant(broker):
    def answer(body):
        command, fields = submitted(unserved=["ecoh"])(body)
        return command, dict(fields, suggestions={"ecoh": "echo"})

    broker.handlers["SUBMIT"] = answer
    result = at(broker, "submit", "ecoh")
    assert result.code == 0
    assert result.stderr == (
        "taskbroker: warning: no connected worker has handler 'ecoh' (did "
        "you mean 'echo'?); the task is queued until one connects\n"
    )


def test_submit_warns_about_unserved_handlers(broker):
    broker.handlers["SUBMIT"] = submitted(unserved=["echo"])
    result = at(broker, "submit", "echo")
    assert result.code == 0 and result.stdout == "1\n"
    assert result.stderr == (
        "taskbroker: warning: no connected worker has handler 'echo'; "
        "the task is queued until one connects\n"
    )


def test_submit_wait_loops_until_final(broker):
    broker.handlers["SUBMIT"] = submitted(first_id=5)
    broker.handlers["WAIT"] = sequence(
        reply(task=make_task(5, state="queued")),
        reply(task=make_task(5, state="running")),
        reply(task=make_task(5, state="succeeded", result={"ok": True})),
    )
    result = at(broker, "submit", "echo", "--wait")
    assert result.code == 0
    assert json.loads(result.stdout) == {"ok": True}
    assert broker.commands() == ["SUBMIT", "WAIT", "WAIT", "WAIT"]
    assert all(body["id"] == 5 for _, body in broker.requests[1:])


def test_submit_wait_json_prints_the_final_task(broker):
    broker.handlers["SUBMIT"] = submitted(first_id=5)
    broker.handlers["WAIT"] = lambda body: reply(
        task=make_task(5, state="succeeded", result=3)
    )
    result = at(broker, "submit", "echo", "--wait", "--json")
    assert result.code == 0
    assert json.loads(result.stdout)["state"] == "succeeded"


@pytest.mark.parametrize(
    "state, text",
    [
        ("failed", "taskbroker: task 5 failed: ValueError: bad input"),
        (
            "cancelled",
            "taskbroker: task 5 was cancelled: ValueError: bad input",
        ),
    ],
)
def test_submit_wait_exits_1_when_the_task_did_not_succeed(
    broker, state, text
):
    broker.handlers["SUBMIT"] = submitted(first_id=5)
    broker.handlers["WAIT"] = lambda body: reply(
        task=make_task(
            5, state=state, error="ValueError: bad input\n  (details)"
        )
    )
    result = at(broker, "submit", "echo", "--wait")
    assert result.code == 1
    assert result.error_line() == text + " (details)"
    assert result.stdout == ""


def test_submit_from_jsonl(broker, tmp_path):
    path = tmp_path / "tasks.jsonl"
    path.write_text(
        '{"handler": "echo", "payload": 1}\n'
        "\n"
        '{"handler": "resize", "priority": "low", "max_attempts": 2}\n',
        encoding="utf-8",
    )
    broker.handlers["SUBMIT"] = submitted(first_id=10, unserved=["resize"])
    result = at(broker, "submit", "--from", str(path))
    assert result.code == 0
    assert result.stdout == "10\n11\n"
    assert "'resize'" in result.stderr
    [(_, body)] = broker.requests
    assert [t["handler"] for t in body["tasks"]] == ["echo", "resize"]
    assert body["tasks"][1]["max_attempts"] == 2


def test_submit_from_jsonl_new_keys_and_notes(broker):
    live = {"k1": make_task(4, unique_key="k1")}
    broker.handlers["SUBMIT"] = submitted(first_id=10, live_keys=live)
    lines = "".join(
        json.dumps(spec) + "\n"
        for spec in [
            {"handler": "echo", "delay": 5, "time_limit": 1},
            {"handler": "echo", "unique_key": "k1"},
            {"handler": "echo", "unique_key": "k2"},
            {"handler": "echo", "unique_key": "k2"},
        ]
    )
    result = at(broker, "submit", "--from", "-", stdin=lines)
    assert result.code == 0
    assert result.stdout == "10\n4\n11\n11\n"
    assert result.stderr.splitlines() == [
        "taskbroker: note: task 4 with unique key 'k1' already exists; not "
        "submitted again",
        "taskbroker: note: task 11 with unique key 'k2' already exists; not "
        "submitted again",
    ]
    [(_, body)] = broker.requests
    assert body["tasks"][0]["delay"] == 5
    assert body["tasks"][0]["time_limit"] == 1


def test_submit_from_stdin_json(broker):
    broker.handlers["SUBMIT"] = submitted()
    lines = "".join(
        json.dumps({"handler": "echo", "payload": n}) + "\n" for n in range(3)
    )
    result = at(broker, "submit", "--from", "-", "--json", stdin=lines)
    assert result.code == 0
    tasks = [json.loads(line) for line in result.stdout.splitlines()]
    assert [t["payload"] for t in tasks] == [0, 1, 2]


@pytest.mark.parametrize(
    "line, reason",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "object"),
        ('{"payload": 1}', "handler"),
        ('{"handler": "echo", "max_attempts": "3"}', "max_attempts"),
        ('{"handler": "echo", "priorty": "high"}', "priorty"),
        ('{"handler": "echo", "delay": -1}', "delay"),
        ('{"handler": "echo", "time_limit": 0}', "time_limit"),
        ('{"handler": "echo", "unique_key": ""}', "unique_key"),
    ],
)
def test_submit_from_bad_line_submits_nothing(broker, tmp_path, line, reason):
    path = tmp_path / "tasks.jsonl"
    path.write_text('{"handler": "echo"}\n' + line + "\n", encoding="utf-8")
    broker.handlers["SUBMIT"] = submitted()
    result = at(broker, "submit", "--from", str(path))
    assert result.code == 2
    message = result.error_line()
    assert f"{path} line 2" in message and reason in message
    assert broker.requests == []


def test_submit_from_empty_input_does_nothing(broker):
    result = at(broker, "submit", "--from", "-", stdin="\n")
    assert (result.code, result.stdout, result.stderr) == (0, "", "")
    assert broker.requests == []


# status, list, cancel, workers, stats.


def test_status_human_and_json(broker):
    task = make_task(
        3, state="running", worker="w1", payload={"a": None}, attempts=1
    )
    broker.handlers["GET"] = lambda body: reply(task=task)
    result = at(broker, "status", "3")
    assert result.code == 0
    lines = result.stdout.splitlines()
    assert lines[0] == "id: 3"
    assert "state: running" in lines and "worker: w1" in lines
    assert 'payload: {"a": null}' in lines
    assert "started_at: -" in lines
    assert "unique_key: -" in lines and "time_limit: -" in lines
    # Shown only when set.
    assert not any(line.startswith(("run_at", "traceback")) for line in lines)
    result = at(broker, "status", "3", "--json")
    assert json.loads(result.stdout) == task


def test_status_shows_the_handlers_progress(broker):
    task = make_task(
        3,
        state="running",
        progress={
            "fraction": 0.25,
            "message": "resizing 3 of 12",
            "at": "2026-11-28T04:12:00.000000+00:00",
        },
    )
    broker.handlers["GET"] = lambda body: reply(task=task)
    lines = at(broker, "status", "3").stdout.splitlines()
    assert "progress: 25% resizing 3 of 12 (at 2026-11-28 04:12:00)" in lines
    task["progress"] = None
    lines = at(broker, "status", "3").stdout.splitlines()
    assert not any(line.startswith("progress") for line in lines)


def test_status_shows_run_at_and_the_traceback_last(broker):
    traceback = (
        "Traceback (most recent call last):\n"
        '  File "handlers.py", line 3, in resize\n'
        '    raise ValueError("bad input")\n'
        "ValueError: bad input\n"
    )
    task = make_task(
        3,
        state="failed",
        error="ValueError: bad input",
        traceback=traceback,
        unique_key="k",
        time_limit=30,
        run_at="2026-11-28T05:00:00.000000+00:00",
        extra="from a newer broker",
    )
    broker.handlers["GET"] = lambda body: reply(task=task)
    result = at(broker, "status", "3")
    assert result.code == 0 and result.stderr == ""
    lines = result.stdout.splitlines()
    assert "run_at: 2026-11-28T05:00:00.000000+00:00" in lines
    assert "unique_key: k" in lines and "time_limit: 30" in lines
    assert "error: ValueError: bad input" in lines
    assert lines[-5:] == [
        "traceback:",
        "    Traceback (most recent call last):",
        '      File "handlers.py", line 3, in resize',
        '        raise ValueError("bad input")',
        "    ValueError: bad input",
    ]
    assert lines.index("extra: from a newer broker") < lines.index(
        "traceback:"
    )


def test_list_json_is_an_array_newest_first(broker):
    broker.handlers["LIST"] = lambda body: reply(
        tasks=[make_task(2), make_task(1)], next=None, order="newest"
    )
    result = at(
        broker, "list", "--state", "queued", "--handler", "echo", "--json"
    )
    assert result.code == 0
    assert [t["id"] for t in json.loads(result.stdout)] == [2, 1]
    [(_, body)] = broker.requests
    assert (body["state"], body["handler"], body["limit"], body["order"]) == (
        "queued",
        "echo",
        100,
        "newest",
    )


def test_list_pages_with_the_cursor_of_its_order(broker):
    pages = {
        None: ([make_task(9), make_task(8)], 8),
        8: ([make_task(5)], None),
    }

    def newest(body):
        tasks, following = pages[body["before"]]
        return reply(tasks=tasks, next=following, order=body["order"])

    broker.handlers["LIST"] = newest
    result = at(broker, "list", "--priority", "high", "--json")
    assert [t["id"] for t in json.loads(result.stdout)] == [9, 8, 5]
    assert [body["priority"] for _, body in broker.requests] == ["high"] * 2
    # Oldest first from a given id: 'after' moves on.
    broker.requests.clear()
    broker.handlers["LIST"] = lambda body: reply(
        tasks=[make_task(body["after"] + 1)],
        next=None if body["after"] else body["after"] + 1,
        order="oldest",
    )
    result = at(broker, "list", "--order", "oldest", "--json")
    assert [t["id"] for t in json.loads(result.stdout)] == [1, 2]
    assert [body["after"] for _, body in broker.requests] == [0, 1]


def test_list_newest_first_needs_a_broker_that_can(broker):
    # A broker older than 'order' ignores it and lists oldest first.
    broker.handlers["LIST"] = lambda body: reply(
        tasks=[make_task(1)], next=None
    )
    result = at(broker, "list")
    assert result.code == 2
    assert "cannot list newest first" in result.error_line()
    broker.handlers["LIST"] = lambda body: reply(
        tasks=[make_task(1)], next=None
    )
    assert at(broker, "list", "--order", "oldest").code == 0


def test_list_refuses_a_bad_order_or_cursor(broker):
    for argv in (["list", "--order", "random"], ["list", "--before", "x"]):
        assert at(broker, *argv).code == 2, argv
    assert broker.requests == []


def test_list_human_table(broker):
    broker.handlers["LIST"] = lambda body: reply(
        tasks=[
            make_task(1, worker="w1"),
            make_task(
                12,
                handler="resize",
                state="running",
                progress={
                    "fraction": 0.425,
                    "message": "page 17 of 40",
                    "at": "2026-11-28T04:12:00.000000+00:00",
                },
            ),
        ],
        next=None,
        order="newest",
    )
    result = at(broker, "list", "--limit", "5")
    assert result.code == 0
    header, first, second = result.stdout.splitlines()
    assert header.split() == [
        "ID",
        "HANDLER",
        "PRIORITY",
        "STATE",
        "PROGRESS",
        "ATTEMPTS",
        "WORKER",
        "CREATED",
    ]
    assert first.split() == [
        "1",
        "echo",
        "normal",
        "queued",
        "0/3",
        "w1",
        "2026-11-28",
        "04:11:03",
    ]
    assert second.split()[:5] == ["12", "resize", "normal", "running", "42%"]
    assert broker.requests[0][1]["limit"] == 5


def test_list_bad_state_is_refused_locally(broker):
    result = at(broker, "list", "--state", "sleeping")
    assert result.code == 2
    assert "state" in result.error_line()
    assert broker.requests == []


def test_cancel(broker):
    broker.handlers["CANCEL"] = lambda body: reply(
        task=make_task(body["id"], state="cancelled")
    )
    result = at(broker, "cancel", "8")
    assert (result.code, result.stdout) == (0, "cancelled task 8\n")
    assert broker.commands() == ["CANCEL"]


def test_cancel_is_resent_after_a_lost_reply(broker):
    broker.handlers["CANCEL"] = lose_replies(
        lambda body: reply(task=make_task(body["id"], state="cancelled"))
    )
    result = run(
        "--broker",
        broker.endpoint,
        "--timeout",
        "0.3",
        "cancel",
        "8",
        "--json",
    )
    assert result.code == 0
    assert json.loads(result.stdout)["state"] == "cancelled"
    assert broker.commands() == ["CANCEL", "CANCEL"]


def test_cancel_finished_task_exits_2(broker):
    broker.handlers["CANCEL"] = lambda body: error(
        "not_cancellable",
        "task 8 is succeeded; only queued and running tasks can be cancelled",
    )
    result = at(broker, "cancel", "8")
    assert result.code == 2
    assert result.error_line() == (
        "taskbroker: task 8 is succeeded; only queued and running tasks can "
        "be cancelled (not_cancellable)"
    )


def test_retry(broker):
    broker.handlers["RETRY"] = lambda body: reply(
        task=make_task(body["id"], state="queued")
    )
    result = at(broker, "retry", "6")
    assert (result.code, result.stdout, result.stderr) == (
        0,
        "queued task 6 again\n",
        "",
    )
    result = at(broker, "retry", "6", "--json")
    assert json.loads(result.stdout)["state"] == "queued"
    assert broker.commands() == ["RETRY", "RETRY"]
    assert broker.requests[0][1]["id"] == 6


def test_retry_not_retryable_exits_2(broker):
    broker.handlers["RETRY"] = lambda body: error(
        "not_retryable",
        "task 6 is running; only failed and cancelled tasks can be retried",
    )
    result = at(broker, "retry", "6")
    assert result.code == 2
    assert result.error_line() == (
        "taskbroker: task 6 is running; only failed and cancelled tasks can "
        "be retried (not_retryable)"
    )
    assert result.stdout == ""


def test_retry_left_failed_by_a_taken_unique_key_exits_2(broker):
    broker.handlers["RETRY"] = lambda body: reply(
        task=make_task(body["id"], state="failed", unique_key="k")
    )
    result = at(broker, "retry", "6")
    assert result.code == 2
    line = result.error_line()
    assert "not_retryable" in line and "'k'" in line


WORKER = {
    "name": "build-7",
    "priorities": ["high", "normal"],
    "handlers": ["echo", "resize"],
    "slots": 4,
    "busy": 1,
    "connected_since": "2026-11-28T04:00:00.000000+00:00",
    "last_seen": "2026-11-28T04:11:00.000000+00:00",
}


def test_workers_json_and_table(broker):
    broker.handlers["WORKERS"] = lambda body: reply(
        workers=[WORKER, {**WORKER, "name": "any", "priorities": None}]
    )
    result = at(broker, "workers", "--json")
    assert json.loads(result.stdout)[0] == WORKER
    result = at(broker, "workers")
    assert result.code == 0
    header, first, second = result.stdout.splitlines()
    assert header.split()[:3] == ["NAME", "PRIORITIES", "HANDLERS"]
    assert first.split()[:5] == [
        "build-7",
        "high,normal",
        "echo,resize",
        "4",
        "1",
    ]
    assert second.split()[1] == "*"
    assert "KEY" not in header  # no CURVE


def test_workers_table_shows_the_start_of_each_key(broker):
    key = "rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7"
    broker.handlers["WORKERS"] = lambda body: reply(
        workers=[{**WORKER, "key": key}]
    )
    header, row = at(broker, "workers").stdout.splitlines()
    assert header.split()[-1] == "KEY"
    assert row.split()[-1] == key[:12]


STATS = {
    "priorities": ["high", "normal"],
    "tasks": {"queued": {"high": 2, "normal": 3}, "failed": {"normal": 1}},
    "waiting": {"echo": 4, "resize": 1},
    "unserved": ["resize"],
    "workers": 2,
    "slots": 8,
    "free_slots": 3,
}


def test_stats_json_and_summary(broker):
    broker.handlers["STATS"] = lambda body: reply(stats=STATS)
    result = at(broker, "stats", "--json")
    assert json.loads(result.stdout) == STATS
    result = at(broker, "stats")
    assert result.code == 0
    lines = result.stdout.splitlines()
    assert lines[0] == "workers: 2, slots: 8, free slots: 3"
    assert ["queued", "2", "3", "5"] in [line.split() for line in lines]
    assert ["failed", "0", "1", "1"] in [line.split() for line in lines]
    assert "  echo: 4" in lines
    assert lines[-1].endswith(": resize")
    broker.handlers["STATS"] = lambda body: reply(
        stats=dict(STATS, counts_age=42.4)
    )
    lines = at(broker, "stats").stdout.splitlines()
    assert lines[-1].startswith("(tasks recounted 42 s ago;")


def test_stats_say_first_whether_the_broker_accepts_work(broker):
    broker.handlers["STATS"] = lambda body: reply(
        stats=dict(
            STATS,
            accepting_work=False,
            write_error="database x: disk I/O error",
        )
    )
    lines = at(broker, "stats").stdout.splitlines()
    assert lines[0] == (
        "NOT accepting work, cannot write: database x: disk I/O error"
    )
    broker.handlers["STATS"] = lambda body: reply(
        stats=dict(STATS, accepting_work=True, write_error=None)
    )
    assert at(broker, "stats").stdout.splitlines()[0] == "accepting work"


def test_health_exits_0_when_the_broker_accepts_work(broker):
    broker.handlers["STATS"] = lambda body: reply(
        stats=dict(STATS, accepting_work=True, write_error=None)
    )
    result = at(broker, "health")
    assert (result.code, result.stdout, result.stderr) == (
        0,
        "accepting work\n",
        "",
    )


def test_health_exits_3_with_one_line_when_the_broker_cannot_write(broker):
    broker.handlers["STATS"] = lambda body: reply(
        stats=dict(
            STATS,
            accepting_work=False,
            write_error="database /srv/tasks.sqlite: transaction failed: "
            "database is locked",
        )
    )
    result = at(broker, "health")
    assert result.code == 3 and result.stdout == ""
    assert result.error_line() == (
        "taskbroker: up but cannot write: database /srv/tasks.sqlite: "
        "transaction failed: database is locked"
    )


def test_health_of_a_broker_that_does_not_say_is_not_ok(broker):
    broker.handlers["STATS"] = lambda body: reply(stats=STATS)
    result = at(broker, "health")
    assert result.code == 1
    assert "does not say whether it accepts work" in result.error_line()


def test_health_of_an_unreachable_broker_exits_3(silent_endpoint):
    result = run("--broker", silent_endpoint, "--timeout", "0.05", "health")
    assert result.code == 3
    assert result.error_line().startswith("taskbroker: no answer from")


def test_global_options_after_the_command(broker):
    broker.handlers["STATS"] = lambda body: reply(stats=STATS)
    result = run(
        "stats", "--json", "--broker", broker.endpoint, "--timeout", "1"
    )
    assert result.code == 0


def test_retry_of_a_running_task_says_so(broker):
    broker.handlers["RETRY"] = lambda body: reply(
        task=make_task(body["id"], state="running", attempts=1)
    )
    result = run("--broker", broker.endpoint, "retry", "7")
    assert result.code == 0
    assert result.stdout.strip() == "task 7 is already running"


def test_the_environment_gives_the_broker_and_the_timeout(
    broker, silent_endpoint, monkeypatch
):
    broker.handlers["STATS"] = lambda body: reply(stats=STATS)
    monkeypatch.setenv("TASKBROKER_BROKER", broker.endpoint)
    assert run("stats", "--json").code == 0
    # A timeout from the environment: a silent broker answers nothing.
    monkeypatch.setenv("TASKBROKER_BROKER", silent_endpoint)
    monkeypatch.setenv("TASKBROKER_TIMEOUT", "0.05")
    assert run("stats").code == 3
    monkeypatch.setenv("TASKBROKER_TIMEOUT", "soon")
    result = run("stats")
    assert result.code == 2
    assert result.error_line() == (
        "taskbroker: TASKBROKER_TIMEOUT: expected a number (got 'soon')"
    )


# CURVE keys.


class _SpyClient:
    """
    Records the keyword arguments the command gives the client.
    """

    def __init__(self, monkeypatch):
        self.kwargs = []
        real = cli.BlockingClient

        def make(*args, **kwargs):
            self.kwargs.append(kwargs)
            return real(*args, **kwargs)

        monkeypatch.setattr(cli, "BlockingClient", make)


def test_curve_keys_reach_the_client_from_anywhere(
    silent_endpoint, curve_keys, monkeypatch
):
    spy = _SpyClient(monkeypatch)
    server, secret = curve_keys("broker.key"), curve_keys("c1.key_secret")
    keys = {"curve_server_key": server, "curve_secret_key": secret}
    options = ["--curve-server-key", server, "--curve-secret-key", secret]
    for argv in (options + ["stats"], ["stats"] + options):
        result = run("--broker", silent_endpoint, "--timeout", "0.05", *argv)
        assert result.code == 3
        # No answer: with CURVE, the reason may be a key.
        assert result.error_line().endswith(
            "; with CURVE, a wrong server key or a key the broker does not "
            "admit gets no answer either"
        )
    monkeypatch.setenv("TASKBROKER_CLIENT_CURVE_SERVER_KEY", server)
    monkeypatch.setenv("TASKBROKER_CLIENT_CURVE_SECRET_KEY", secret)
    assert (
        run("--broker", silent_endpoint, "--timeout", "0.05", "stats").code
        == 3
    )
    assert spy.kwargs == [keys] * 3


def test_the_command_never_reads_the_brokers_secret_key(
    broker, curve_keys, monkeypatch
):
    # TASKBROKER_CURVE_SECRET_KEY is the broker's: a command that read it
    # would pose as the broker.
    spy = _SpyClient(monkeypatch)
    monkeypatch.setenv(
        "TASKBROKER_CURVE_SECRET_KEY", curve_keys("broker.key_secret")
    )
    broker.handlers["STATS"] = lambda body: reply(stats=STATS)
    assert at(broker, "stats").code == 0
    assert spy.kwargs == [{"curve_server_key": None, "curve_secret_key": None}]


@pytest.mark.parametrize(
    "given, expected",
    [
        (
            {"--curve-server-key": "broker.key"},
            "--curve-server-key without --curve-secret-key: give both (the "
            "broker's public key file and this client's NAME.key_secret file) or "
            "neither",
        ),
        (
            {"TASKBROKER_CLIENT_CURVE_SECRET_KEY": "c1.key_secret"},
            "--curve-secret-key without --curve-server-key: give both (the "
            "broker's public key file and this client's NAME.key_secret file) or "
            "neither",
        ),
        (
            {
                "--curve-server-key": "broker.key",
                "--curve-secret-key": "c1.key",
            },
            "--curve-secret-key: {c1.key}: no secret key in it (a public .key "
            "file? the secret one ends in .key_secret)",
        ),
        (
            {
                "--curve-server-key": "nothing.key",
                "--curve-secret-key": "c1.key_secret",
            },
            "--curve-server-key: {nothing.key}: No such file or directory",
        ),
        (
            {
                "--curve-server-key": "broker.key_secret",
                "--curve-secret-key": "c1.key_secret",
            },
            "--curve-server-key: {broker.key_secret}: holds a secret key; give the "
            "broker's public .key file, and keep its secret on the broker",
        ),
    ],
)
def test_unusable_curve_keys_exit_2_in_one_line(
    broker, curve_keys, monkeypatch, given, expected
):
    argv = []
    for name, file in given.items():
        if name.startswith("--"):
            argv += [name, curve_keys(file)]
        else:
            monkeypatch.setenv(name, curve_keys(file))
    result = at(broker, *argv, "stats")
    assert result.code == 2
    for name in ("c1.key", "nothing.key", "broker.key_secret"):
        expected = expected.replace("{" + name + "}", curve_keys(name))
    assert result.error_line() == "taskbroker: " + expected
    assert broker.requests == []


def test_help_names_the_curve_variables():
    text = " ".join(run("--help").stdout.split())
    assert "(environment: TASKBROKER_CLIENT_CURVE_SERVER_KEY)" in text
    assert "(environment: TASKBROKER_CLIENT_CURVE_SECRET_KEY)" in text


def waits(outcomes):
    """
    A WAIT handler: each task id's final (or current) state from
    ``outcomes``; an id not in it does not exist.
    """

    def handle(body):
        state = outcomes.get(body["id"])
        if state is None:
            return error("not_found", f"no task with id {body['id']}")
        return reply(
            task=make_task(
                body["id"],
                state=state,
                error=None if state == "succeeded" else "boom",
                result=body["id"] * 10,
            )
        )

    return handle


def test_wait_for_tasks_that_exist(broker):
    broker.handlers["WAIT"] = waits({4: "succeeded", 9: "succeeded"})
    result = at(broker, "wait", "4", "9")
    assert (result.code, result.stdout, result.stderr) == (0, "40\n90\n", "")
    assert [body["id"] for _, body in broker.requests] == [4, 9]
    result = at(broker, "wait", "4", "--json")
    assert json.loads(result.stdout)["state"] == "succeeded"


@pytest.mark.parametrize(
    "outcomes, code",
    [
        ({1: "succeeded", 2: "failed"}, 1),
        ({1: "cancelled", 2: "succeeded"}, 1),
        ({1: "running", 2: "failed"}, 5),
        ({1: "failed", 2: "running"}, 5),
        ({1: "running"}, 4),  # task 2 does not exist
        ({2: "succeeded"}, 4),
    ],
)
def test_wait_exits_with_the_worst_outcome(broker, outcomes, code):
    broker.handlers["WAIT"] = waits(outcomes)
    result = at(broker, "wait", "1", "2", "--timeout", "0")
    assert result.code == code, result.stderr
    # Every task is waited for, whatever the first one did.
    assert [body["id"] for _, body in broker.requests] == [1, 2]


def test_wait_says_which_tasks_did_not_end(broker):
    broker.handlers["WAIT"] = waits({1: "running", 3: "failed"})
    result = at(broker, "wait", "1", "2", "3", "--timeout", "0")
    assert result.stderr.splitlines() == [
        "taskbroker: task 1 is still running",
        "taskbroker: no task with id 2",
        "taskbroker: task 3 failed: boom",
    ]
    # A zero timeout asks once and does not hold.
    assert all(body["timeout"] == 0 for _, body in broker.requests)


def test_wait_needs_a_task_id(broker):
    for argv in (["wait"], ["wait", "x"], ["wait", "1", "--timeout", "-1"]):
        result = at(broker, *argv)
        assert result.code == 2, argv
    assert broker.requests == []


def test_wait_timeout_is_the_whole_wait_not_each_answers(broker):
    # The answer timeout stays the global option's (2 s, set by at()).
    broker.handlers["WAIT"] = waits({1: "succeeded"})
    result = at(broker, "wait", "1", "--timeout", "30")
    assert result.code == 0
    [(_, body)] = broker.requests
    assert 0 < body["timeout"] <= 30


# The progress bar: on a terminal's stderr only.


class Terminal(io.StringIO):
    """
    A stream that is a terminal (standard input holds the user's
    answers).
    """

    def isatty(self):
        return True


def on_terminal(broker, *argv):
    stdout, stderr = io.StringIO(), Terminal()
    code = cli.main(
        ["--broker", broker.endpoint, "--timeout", "2", *argv],
        stdout=stdout,
        stderr=stderr,
        stdin=io.StringIO(),
    )
    return Result(code, stdout.getvalue(), stderr.getvalue())


def held(*answers):
    """
    A WAIT handler that, as the broker does, holds each WAIT for its
    timeout unless its answer is final.
    """
    answer = sequence(*answers)

    def handle(body):
        command, fields = answer(body)
        if fields["task"]["state"] not in ("succeeded", "failed"):
            time.sleep(body["timeout"])
        return command, fields

    return handle


def test_wait_on_a_terminal_shows_the_tasks_progress(broker, monkeypatch):
    monkeypatch.setattr(commands, "LOOK_EVERY", 0.05)
    broker.handlers["WAIT"] = held(
        reply(
            task=make_task(
                5,
                state="running",
                attempts=1,
                progress={
                    "fraction": 0.25,
                    "message": "step 1 of 4",
                    "at": None,
                },
            )
        ),
        reply(
            task=make_task(
                5,
                state="running",
                attempts=1,
                progress={"fraction": 0.5, "message": "half way", "at": None},
            )
        ),
        reply(task=make_task(5, state="succeeded", result="done")),
    )
    result = on_terminal(broker, "wait", "5")
    assert (result.code, result.stdout) == (0, '"done"\n')
    for shown in (
        "task 5",
        " 25%",
        "attempt 1 of 3: step 1 of 4",
        " 50%",
        "half way",
    ):
        assert shown in result.stderr, shown
    # A first look at once, then one a LOOK_EVERY.
    assert [body["timeout"] for _, body in broker.requests] == pytest.approx(
        [0, 0.05, 0.05], abs=0.01
    )


def test_a_task_waiting_for_its_retry_says_when(broker, monkeypatch):
    monkeypatch.setattr(commands, "LOOK_EVERY", 0.05)
    broker.handlers["WAIT"] = held(
        reply(
            task=make_task(
                5,
                state="queued",
                attempts=1,
                run_at="2999-01-01T00:00:00.000000+00:00",
            )
        ),
        reply(task=make_task(5, state="failed", error="boom")),
    )
    result = on_terminal(broker, "wait", "5")
    assert result.code == 1
    assert "attempt 2 of 3, retry in " in result.stderr
    assert "task 5 failed: boom" in result.stderr


def test_submit_wait_on_a_terminal_shows_the_bar_too(broker, monkeypatch):
    monkeypatch.setattr(commands, "LOOK_EVERY", 0.05)
    broker.handlers["SUBMIT"] = submitted(first_id=5)
    broker.handlers["WAIT"] = held(
        reply(
            task=make_task(
                5,
                state="running",
                attempts=1,
                progress={"fraction": 0.75, "message": None, "at": None},
            )
        ),
        reply(task=make_task(5, state="succeeded", result=1)),
    )
    result = on_terminal(broker, "submit", "echo", "--wait")
    assert (result.code, result.stdout) == (0, "1\n")
    assert " 75%" in result.stderr


def test_waiting_for_several_counts_those_ended(broker):
    broker.handlers["WAIT"] = waits({1: "succeeded", 2: "succeeded"})
    result = on_terminal(broker, "wait", "1", "2")
    assert result.stdout == "10\n20\n"
    assert "2/2 tasks" in result.stderr


def test_without_a_terminal_there_is_no_bar(broker):
    broker.handlers["WAIT"] = sequence(
        reply(task=make_task(5, state="running", attempts=1)),
        reply(task=make_task(5, state="succeeded", result=1)),
    )
    result = at(broker, "wait", "5")
    assert (result.code, result.stdout, result.stderr) == (0, "1\n", "")
    # Held as long as one WAIT may be, not looked at every second.
    assert broker.requests[0][1]["timeout"] == 30


# -- schedules, purge, and many tasks at once -------------------------------


def run_on_terminal(broker, *argv, answer):
    stdout, stderr = io.StringIO(), io.StringIO()
    code = cli.main(
        ["--broker", broker.endpoint, "--timeout", "2", *argv],
        stdout=stdout,
        stderr=stderr,
        stdin=Terminal(answer),
    )
    return Result(code, stdout.getvalue(), stderr.getvalue())


SCHEDULE = {
    "name": "nightly",
    "handler": "report",
    "every": None,
    "cron": "0 3 * * *",
    "timezone": "Europe/Paris",
    "skip_if_running": True,
    "paused": False,
    "next_tick": "2026-12-06T02:00:00.000000+00:00",
    "last_tick": None,
    "last_task_id": None,
}


def test_schedule_add(broker):
    broker.handlers["SCHEDULE_ADD"] = lambda body: reply(schedule=SCHEDULE)
    result = at(
        broker,
        "schedule",
        "add",
        "nightly",
        "--cron",
        "0 3 * * *",
        "report",
        "--timezone",
        "Europe/Paris",
        "--skip-if-running",
        "--payload",
        '{"full": true}',
        "--priority",
        "low",
    )
    assert (result.code, result.stdout, result.stderr) == (
        0,
        "schedule nightly added: next at 2026-12-06 02:00:00 UTC\n",
        "",
    )
    [(_, body)] = broker.requests
    assert {
        key: body[key]
        for key in (
            "name",
            "handler",
            "cron",
            "every",
            "timezone",
            "skip_if_running",
            "payload",
            "priority",
            "replace",
        )
    } == {
        "name": "nightly",
        "handler": "report",
        "cron": "0 3 * * *",
        "every": None,
        "timezone": "Europe/Paris",
        "skip_if_running": True,
        "payload": {"full": True},
        "priority": "low",
        "replace": False,
    }


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["nightly", "report"],
            "schedule add: give --every SECONDS or --cron EXPRESSION",
        ),
        (
            ["nightly", "report", "--every", "5", "--cron", "@daily"],
            "schedule add: give --every SECONDS or --cron EXPRESSION",
        ),
        (
            ["nightly", "report", "--every", "0.5"],
            "--every: seconds from 1 to 31622400, not '0.5'",
        ),
        (
            ["nightly", "report", "--every", "60", "--timezone", "UTC"],
            "schedule add: --timezone goes with --cron",
        ),
        (["nightly", "--every", "60"], "add: expected NAME HANDLER, got 1"),
        (["a b", "report", "--every", "60"], "a schedule's name is 1 to 100"),
        (
            ["n", "report", "--cron", "* * *"],
            "cron expression '* * *' has 3 fields, not five",
        ),
    ],
)
def test_schedule_add_checks_before_sending(broker, argv, message):
    result = at(broker, "schedule", "add", *argv)
    assert result.code == 2
    assert message in result.error_line()
    assert broker.commands() == []


def test_schedule_list(broker):
    every = dict(
        SCHEDULE,
        name="often",
        every=30,
        cron=None,
        timezone="UTC",
        skip_if_running=False,
        paused=True,
        last_task_id=12,
    )
    broker.handlers["SCHEDULE_LIST"] = lambda body: reply(
        schedules=[SCHEDULE, every]
    )
    result = at(broker, "schedule", "list")
    assert result.stdout.splitlines() == [
        "NAME     HANDLER  WHEN                                       "
        "NEXT (UTC)           LAST TASK  STATE",
        "nightly  report   0 3 * * * (Europe/Paris), skip if running  "
        "2026-12-06 02:00:00  -          active",
        "often    report   every 30s                                  "
        "2026-12-06 02:00:00  12         paused",
    ]
    assert json.loads(at(broker, "schedule", "list", "--json").stdout) == [
        SCHEDULE,
        every,
    ]


def test_schedule_pause_resume_remove(broker):
    broker.handlers["SCHEDULE_PAUSE"] = lambda body: reply(
        schedule=dict(SCHEDULE, paused=True)
    )
    broker.handlers["SCHEDULE_RESUME"] = lambda body: reply(schedule=SCHEDULE)
    broker.handlers["SCHEDULE_REMOVE"] = sequence(
        reply(removed="nightly"),
        error("not_found", "no schedule named 'nightly'"),
    )
    assert (
        at(broker, "schedule", "pause", "nightly").stdout
        == "schedule nightly paused\n"
    )
    assert (
        at(broker, "schedule", "resume", "nightly").stdout
        == "schedule nightly resumed: next at 2026-12-06 02:00:00 UTC\n"
    )
    assert (
        at(broker, "schedule", "remove", "nightly").stdout
        == "schedule nightly removed\n"
    )
    result = at(broker, "schedule", "remove", "nightly")
    assert (result.code, result.error_line()) == (
        4,
        "taskbroker: no schedule named 'nightly'",
    )


def test_schedule_needs_a_command(broker):
    result = at(broker, "schedule")
    assert result.code == 2
    assert (
        "schedule: give add, list, remove, pause or resume"
        in result.error_line()
    )


def test_purge_asks_until_all_are_deleted(broker):
    broker.handlers["PURGE"] = sequence(
        reply(deleted=10000, more=True), reply(deleted=12, more=False)
    )
    result = at(broker, "purge", "--older-than", "30d", "--state", "failed")
    assert (result.code, result.stdout) == (0, "deleted 10012 tasks\n")
    bodies = [body for _, body in broker.requests]
    assert [(b["older_than"], b["state"], b["handler"]) for b in bodies] == [
        (30 * 86400.0, "failed", None)
    ] * 2


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "purge: --older-than DURATION is required"),
        (["--older-than", "7w"], "--older-than: expected seconds or a number"),
        (
            ["--older-than", "1d", "--state", "queued"],
            "purge: --state must be succeeded, failed or cancelled",
        ),
    ],
)
def test_purge_usage(broker, argv, message):
    result = at(broker, "purge", *argv)
    assert result.code == 2 and message in result.error_line()
    assert broker.commands() == []


def many(done_key, pages):
    """
    A bulk request's handler: a count, then ``pages`` of work.
    """
    answers = iter(pages)

    def handle(body):
        if body.get("count"):
            return reply(count=sum(page[0] for page in pages))
        acted, following = next(answers)
        return reply(**{done_key: acted}, refused=0, next=following)

    return handle


def test_bulk_cancel_needs_yes_without_a_terminal(broker):
    broker.handlers["CANCEL_MANY"] = many("cancelled", [(3, None)])
    result = at(broker, "cancel", "--state", "queued", "--handler", "echo")
    assert result.code == 2
    assert result.error_line() == (
        "taskbroker: cancel 3 queued tasks of handler echo: not on a "
        "terminal to ask; give --yes to go ahead"
    )
    assert broker.commands() == ["CANCEL_MANY"]  # the count alone
    result = at(
        broker, "cancel", "--state", "queued", "--handler", "echo", "--yes"
    )
    assert (result.code, result.stdout) == (
        0,
        "cancelled 3 queued tasks of handler echo\n",
    )


def test_bulk_cancel_asks_on_a_terminal(broker):
    broker.handlers["CANCEL_MANY"] = many(
        "cancelled", [(1000, 1000), (5, None)]
    )
    result = run_on_terminal(
        broker, "cancel", "--state", "queued", answer="n\n"
    )
    assert (result.code, result.stdout) == (2, "")
    assert result.stderr.startswith(
        "taskbroker: cancel 1005 queued tasks? [y/N] "
    )
    result = run_on_terminal(
        broker, "cancel", "--state", "queued", answer="y\n"
    )
    assert (result.code, result.stdout) == (0, "cancelled 1005 queued tasks\n")
    afters = [
        body.get("after")
        for command, body in broker.requests
        if not body.get("count")
    ]
    assert afters == [0, 1000]


def test_bulk_retry(broker):
    broker.handlers["RETRY_MANY"] = many("retried", [(2, None)])
    result = at(broker, "retry", "--state", "failed", "--yes")
    assert (result.code, result.stdout) == (0, "queued again 2 failed tasks\n")
    broker.handlers["RETRY_MANY"] = lambda body: reply(count=0)
    assert (
        at(broker, "retry", "--state", "failed").stdout == "no failed tasks\n"
    )


@pytest.mark.parametrize(
    "argv, message",
    [
        (["cancel", "1", "--state", "queued"], "cancel: give ID or --state"),
        (
            ["cancel", "--state", "failed"],
            "cancel: --state must be queued or running",
        ),
        (
            ["retry", "--state", "queued"],
            "retry: --state must be failed or cancelled",
        ),
        (
            ["cancel", "1", "--yes"],
            "cancel: --handler and --yes go with --state",
        ),
        (["cancel"], "cancel: expected ID, or --state STATE for many tasks"),
    ],
)
def test_bulk_usage(broker, argv, message):
    result = at(broker, *argv)
    assert result.code == 2 and message in result.error_line()
    assert broker.commands() == []
