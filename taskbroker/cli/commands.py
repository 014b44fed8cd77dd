# -*- test-case-name: tests.unit.test_cli -*-
"""
What each ``taskbroker`` command does with the broker's answers, and how
it prints them: results on stdout, one line per warning or error on
stderr.
"""

import json
import time
from datetime import datetime

from twisted.python import usage

from taskbroker.cli.bar import LOOK_EVERY, Bar, shown_on
from taskbroker.client import check_task_spec
from taskbroker.client.errors import ClientError, InvalidRequest, TaskNotFound
from taskbroker.errors import one_line
from taskbroker.protocol.objects import TASK_KEYS
from taskbroker.store import STATES

EXIT_OK = 0
EXIT_TASK_FAILED = 1
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3
EXIT_NOT_FOUND = 4
EXIT_NOT_FINISHED = 5

# When the tasks of one 'wait' end differently: the code of the worst,
# least worst first.  Knowing nothing (the broker could not be asked) is
# worse than a wrong id, which is worse than a task still running.
_EXIT_RANK = (
    EXIT_OK,
    EXIT_TASK_FAILED,
    EXIT_NOT_FINISHED,
    EXIT_NOT_FOUND,
    EXIT_UNAVAILABLE,
)

# ERROR codes that are not the user's mistake get their own exit codes;
# every other code (bad_request, unknown_priority, not_cancellable,
# too_large, ...) means the command asked for something the broker refuses.
_EXIT_FOR_CODE = {
    "not_found": EXIT_NOT_FOUND,
    "unavailable": EXIT_UNAVAILABLE,
    "busy": EXIT_UNAVAILABLE,
    "internal": EXIT_UNAVAILABLE,
}


class _Output:
    """
    Where a command writes: results to stdout, warnings and the one error
    line to stderr.
    """

    def __init__(self, stdout, stderr):
        self.stdout = stdout
        self.stderr = stderr

    def line(self, text=""):
        self.stdout.write(text + "\n")

    def json(self, value):
        self.line(json.dumps(value, ensure_ascii=False, separators=(",", ":")))

    def warn(self, text):
        self.stderr.write("taskbroker: warning: " + one_line(text) + "\n")

    def note(self, text):
        self.stderr.write("taskbroker: note: " + one_line(text) + "\n")

    def error(self, text):
        self.stderr.write("taskbroker: " + one_line(text) + "\n")


def _reject_constant(name):
    raise ValueError(f"{name} is not valid JSON")


def _parse_json(text, where):
    try:
        # Python's json accepts NaN and Infinity, which are not JSON and
        # which the encoder would refuse later with a worse message.
        return json.loads(text, parse_constant=_reject_constant)
    except ValueError as e:
        raise usage.UsageError(f"{where} is not valid JSON: {e}") from None
    except RecursionError:
        raise usage.UsageError(f"{where} is nested too deeply") from None


def _read_text(path, stdin):
    if path == "-":
        return stdin.read()
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        raise usage.UsageError(
            f"cannot read {path}: {e.strerror or e}"
        ) from None
    except UnicodeDecodeError:
        raise usage.UsageError(f"cannot read {path}: not UTF-8 text") from None


def _payload(options, stdin):
    value = options["payload"]
    if value is None:
        return None
    if value.startswith("@"):
        path = value[1:]
        return _parse_json(_read_text(path, stdin), f"--payload file {path}")
    return _parse_json(value, "--payload")


def _read_specs(path, stdin):
    """
    Read and check a JSON Lines file of tasks; any bad line is a usage
    error naming it, so nothing is submitted.
    """
    name = "stdin" if path == "-" else path
    specs = []
    for number, line in enumerate(_read_text(path, stdin).splitlines(), 1):
        if not line.strip():
            continue
        spec = _parse_json(line, f"{name} line {number}")
        try:
            check_task_spec(spec)
        except InvalidRequest as e:
            raise usage.UsageError(
                f"{name} line {number}: {e.message}"
            ) from None
        specs.append(spec)
    return specs


def _warn_unserved(output, result):
    unserved, suggestions = result[1], result.suggestions
    for handler in sorted(unserved):
        meant = suggestions.get(handler)
        output.warn(
            f"no connected worker has handler {handler!r}"
            + (f" (did you mean {meant!r}?)" if meant else "")
            + "; the task is queued until one connects"
        )


def _task_ended_badly(output, task):
    """
    :returns: the exit code for a final task, after saying why on stderr
        if it did not succeed.
    """
    if task.get("state") == "succeeded":
        return EXIT_OK
    verb = "was cancelled" if task.get("state") == "cancelled" else "failed"
    reason = task.get("error")
    output.error(
        f"task {task.get('id')} {verb}" + (f": {reason}" if reason else "")
    )
    return EXIT_TASK_FAILED


def _print_new_task(output, task, as_json):
    if as_json:
        output.json(task)
    else:
        output.line(str(task["id"]))


def _note_existing(output, tasks, specs, existing):
    """
    Say which tasks were not submitted because a queued or running task
    held their unique key: those the broker reports as existing, and the
    repeats of a task this command created for an earlier line with the
    same key.  A task without a key can only be reported as existing
    because the broker recognised a resent ``SUBMIT`` of this very
    command: it is this command's own task, and worth no note.
    """
    seen = set()
    for task, spec in zip(tasks, specs):
        key = task.get("unique_key") or spec.get("unique_key")
        if key is not None and (task["id"] in existing or task["id"] in seen):
            output.note(
                f"task {task['id']} with unique key {key!r} already "
                "exists; not submitted again"
            )
        seen.add(task["id"])


def _submit(client, options, output, stdin):
    if options["from"] is not None:
        specs = _read_specs(options["from"], stdin)
        if not specs:
            return EXIT_OK
        try:
            result = client.submit_many(specs)
        except ClientError as e:
            # Say what was committed before the failure, so that it can be
            # told apart from what was not.
            for task in e.submitted or ():
                _print_new_task(output, task, options["json"])
            raise
        tasks = result[0]
        for task in tasks:
            _print_new_task(output, task, options["json"])
        _note_existing(output, tasks, specs, result.existing)
        _warn_unserved(output, result)
        return EXIT_OK
    spec = {"unique_key": options["unique-key"]}
    result = client.submit(
        options["handler"],
        _payload(options, stdin),
        priority=options["priority"],
        max_attempts=options["max-attempts"],
        delay=options["delay"],
        unique_key=options["unique-key"],
        time_limit=options["time-limit"],
    )
    task = result[0]
    _note_existing(output, [task], [spec], result.existing)
    _warn_unserved(output, result)
    if not options["wait"]:
        _print_new_task(output, task, options["json"])
        return EXIT_OK
    bar = Bar(output.stderr, 1) if shown_on(output.stderr) else None
    try:
        task = _wait_for(client, task["id"], None, bar)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(
            f"task {task['id']} goes on; see 'taskbroker status {task['id']}'"
        ) from None
    finally:
        if bar is not None:
            bar.close()
    if options["json"]:
        output.json(task)
    elif task.get("state") == "succeeded":
        output.json(task.get("result"))
    return _task_ended_badly(output, task)


def _wait(client, options, output, stdin):
    ids = options["ids"]
    deadline = (
        None if options["wait"] is None else time.monotonic() + options["wait"]
    )
    bar = Bar(output.stderr, len(ids)) if shown_on(output.stderr) else None
    worst = EXIT_OK
    try:
        for done, task_id in enumerate(ids):
            remaining = (
                None
                if deadline is None
                else max(0.0, deadline - time.monotonic())
            )
            try:
                # One task's bar shows its progress; several's, how many
                # have ended.
                task = _wait_for(
                    client, task_id, remaining, bar if len(ids) == 1 else None
                )
            except TaskNotFound as e:
                task, missing = None, e.message
            if bar is not None:
                bar.clear()
            if task is None:
                output.error(missing)
                code = EXIT_NOT_FOUND
            else:
                code = _waited(output, task, options["json"])
            worst = max(worst, code, key=_EXIT_RANK.index)
            if bar is not None and len(ids) > 1:
                bar.ended(done + 1)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(
            "the tasks go on; see 'taskbroker status ID'"
        ) from None
    finally:
        if bar is not None:
            bar.close()
    return worst


def _wait_for(client, task_id, timeout, bar):
    """
    Wait for a task to end, or ``timeout`` seconds (``None``: for ever);
    with a ``bar``, look at it every :data:`LOOK_EVERY` seconds to show
    how far it has got.

    :returns: the task object, final unless the time ran out.
    """
    if bar is None:
        return client.wait(task_id, timeout)
    deadline = None if timeout is None else time.monotonic() + timeout
    look = 0.0  # the first look answers at once
    while True:
        left = (
            None if deadline is None else max(0.0, deadline - time.monotonic())
        )
        task = client.wait(task_id, look if left is None else min(look, left))
        if (
            task.get("state") not in _LIVE
            or left == 0.0
            or (left is not None and left <= look)
        ):
            return task
        bar.task(task)
        look = LOOK_EVERY


_LIVE = ("queued", "running")


def _waited(output, task, as_json):
    """
    Show a task that was waited for.

    :returns: its exit code.
    """
    if as_json:
        output.json(task)
    if task.get("state") in ("queued", "running"):
        output.error(f"task {task.get('id')} is still {task['state']}")
        return EXIT_NOT_FINISHED
    if not as_json and task.get("state") == "succeeded":
        output.json(task.get("result"))
    return _task_ended_badly(output, task)


def _text(value):
    if value is None:
        return "-"
    if isinstance(value, list):
        return ",".join(map(str, value)) or "-"
    return str(value)


def _time(value):
    """
    A protocol time for a table: UTC to the second, without the noise.
    """
    if not isinstance(value, str):
        return _text(value)
    try:
        return datetime.fromisoformat(value).strftime("%Y-%m-%d %H:%M:%S")
    except ValueError:
        return value


def _table(output, headers, rows):
    widths = [
        max(len(cell) for cell in column) for column in zip(headers, *rows)
    ]
    for row in [headers, *rows]:
        output.line(
            "  ".join(
                cell.ljust(width) for cell, width in zip(row, widths)
            ).rstrip()
        )


def _status(client, options, output, stdin):
    task = client.get(options["id"])
    if options["json"]:
        output.json(task)
        return EXIT_OK
    keys = [key for key in TASK_KEYS if key in task]
    keys += [key for key in task if key not in TASK_KEYS]
    for key in keys:
        value = task[key]
        if key == "traceback" or (
            key in ("run_at", "submitter", "progress") and value is None
        ):
            continue
        if key in ("payload", "result"):
            # JSON values: show them as JSON, so that "null" and the string
            # "null" stay apart.
            value = json.dumps(value, ensure_ascii=False)
        elif key == "progress":
            value = _progress_text(value, long=True)
        output.line(f"{key}: {one_line(_text(value))}")
    traceback = task.get("traceback")
    if traceback:
        # Last, and as it is, line by line: the one field worth reading
        # whole.
        output.line("traceback:")
        for line in str(traceback).rstrip().splitlines():
            output.line("    " + line.rstrip())
    return EXIT_OK


def _progress_text(progress, long=False):
    """
    A task's ``progress`` object as a person reads it: ``"42%"``, and with
    ``long`` its message and time (``""`` for none).
    """
    if not isinstance(progress, dict):
        return ""
    fraction = progress.get("fraction")
    text = (
        f"{fraction:.0%}"
        if isinstance(fraction, (int, float))
        and not isinstance(fraction, bool)
        else _text(fraction)
    )
    if long:
        if progress.get("message"):
            text += f" {_text(progress['message'])}"
        if progress.get("at"):
            text += f" (at {_time(progress['at'])})"
    return text


def _list(client, options, output, stdin):
    tasks = client.list(
        options["state"],
        options["handler"],
        options["limit"],
        priority=options["priority"],
        order=options["order"],
        after=options["after"] or 0,
        before=options["before"],
    )
    if options["json"]:
        output.json(tasks)
        return EXIT_OK
    _table(
        output,
        [
            "ID",
            "HANDLER",
            "PRIORITY",
            "STATE",
            "PROGRESS",
            "ATTEMPTS",
            "WORKER",
            "CREATED",
        ],
        [
            [
                _text(task.get("id")),
                _text(task.get("handler")),
                _text(task.get("priority")),
                _text(task.get("state")),
                _progress_text(task.get("progress")),
                f"{_text(task.get('attempts'))}/{_text(task.get('max_attempts'))}",
                _text(task.get("worker")),
                _time(task.get("created_at")),
            ]
            for task in tasks
        ],
    )
    return EXIT_OK


def _cancel(client, options, output, stdin):
    if options["state"] is not None:
        return _many(
            client.cancel_many, "cancel", "cancelled", options, output, stdin
        )
    task = client.cancel(options["id"])
    if options["json"]:
        output.json(task)
    else:
        output.line(f"cancelled task {task['id']}")
    return EXIT_OK


def _retry(client, options, output, stdin):
    if options["state"] is not None:
        return _many(
            client.retry_many, "retry", "queued again", options, output, stdin
        )
    task = client.retry(options["id"])
    if options["json"]:
        output.json(task)
    else:
        # A task that was queued or running already is answered as it is.
        output.line(
            f"queued task {task['id']} again"
            if task["state"] == "queued" and task["attempts"] == 0
            else f"task {task['id']} is already {task['state']}"
        )
    return EXIT_OK


def _many(act, verb, done, options, output, stdin):
    """
    ``cancel`` or ``retry`` with ``--state``: count, confirm (on a
    terminal, or by --yes), then act.
    """
    state, handler = options["state"], options["handler"]
    which = f"{state} tasks" + (f" of handler {handler}" if handler else "")
    count = act(state, handler, count_only=True)
    if count == 0:
        output.line(f"no {which}")
        return EXIT_OK
    if not options["yes"]:
        question = f"{verb} {count} {which}? [y/N] "
        if not _confirmed(question, output, stdin):
            output.error(
                f"nothing done ({verb} needs a yes)"
                if _interactive(stdin)
                else f"{verb} {count} {which}: not on a terminal to "
                "ask; give --yes to go ahead"
            )
            return EXIT_USAGE
    acted, refused = act(state, handler)
    if options["json"]:
        output.json({"done": acted, "refused": refused})
        return EXIT_OK
    output.line(f"{done} {acted} {which}")
    if refused:
        output.note(f"{refused} could not be (they changed state meanwhile)")
    return EXIT_OK


def _interactive(stdin):
    isatty = getattr(stdin, "isatty", None)
    return bool(isatty and isatty())


def _confirmed(question, output, stdin):
    """
    Ask on the terminal; no terminal, no yes.
    """
    if not _interactive(stdin):
        return False
    output.stderr.write("taskbroker: " + question)
    output.stderr.flush()
    return stdin.readline().strip().lower() in ("y", "yes")


def _purge(client, options, output, stdin):
    deleted = client.purge(
        options["older-than"], options["state"], options["handler"]
    )
    output.line(f"deleted {deleted} tasks")
    return EXIT_OK


def _schedule(client, options, output, stdin):
    command, sub = options.subCommand, options.subOptions
    if command == "add":
        schedule = client.add_schedule(
            sub["name"],
            sub["handler"],
            every=sub["every"],
            cron=sub["cron"],
            payload=_payload(sub, stdin),
            priority=sub["priority"],
            timezone=sub["timezone"],
            skip_if_running=sub["skip-if-running"],
            max_attempts=sub["max-attempts"],
            time_limit=sub["time-limit"],
            replace=sub["replace"],
        )
        if sub["json"]:
            output.json(schedule)
        else:
            output.line(
                f"schedule {schedule['name']} added: next at "
                f"{_time(schedule.get('next_tick'))} UTC"
            )
    elif command == "list":
        schedules = client.schedules()
        if sub["json"]:
            output.json(schedules)
            return EXIT_OK
        _table(
            output,
            ["NAME", "HANDLER", "WHEN", "NEXT (UTC)", "LAST TASK", "STATE"],
            [
                [
                    _text(s.get("name")),
                    _text(s.get("handler")),
                    _when(s),
                    _time(s.get("next_tick")),
                    _text(s.get("last_task_id")),
                    "paused" if s.get("paused") else "active",
                ]
                for s in schedules
            ],
        )
    elif command == "remove":
        client.remove_schedule(sub["name"])
        output.line(f"schedule {sub['name']} removed")
    else:
        paused = command == "pause"
        schedule = (
            client.pause_schedule if paused else client.resume_schedule
        )(sub["name"])
        output.line(
            f"schedule {schedule['name']} paused"
            if paused
            else f"schedule {schedule['name']} resumed: next at "
            f"{_time(schedule.get('next_tick'))} UTC"
        )
    return EXIT_OK


def _when(schedule):
    every = schedule.get("every")
    if isinstance(every, (int, float)):
        when = f"every {every:g}s"
    else:
        zone = schedule.get("timezone")
        when = _text(schedule.get("cron")) + (
            "" if zone in (None, "UTC") else f" ({zone})"
        )
    return when + (
        ", skip if running" if schedule.get("skip_if_running") else ""
    )


def _workers(client, options, output, stdin):
    workers = client.workers()
    if options["json"]:
        output.json(workers)
        return EXIT_OK
    # With CURVE, the start of each worker's key, enough to tell keys
    # apart (--json has them whole).
    keyed = any(worker.get("key") for worker in workers)
    _table(
        output,
        [
            "NAME",
            "PRIORITIES",
            "HANDLERS",
            "SLOTS",
            "BUSY",
            "CONNECTED",
            "LAST SEEN",
        ]
        + ["KEY"] * keyed,
        [
            [
                _text(worker.get("name")),
                # null priorities: the worker serves every level.
                "*"
                if worker.get("priorities") is None
                else _text(worker.get("priorities")),
                _text(worker.get("handlers")),
                _text(worker.get("slots")),
                _text(worker.get("busy")),
                _time(worker.get("connected_since")),
                _time(worker.get("last_seen")),
            ]
            + [_text(worker.get("key"))[:12]] * keyed
            for worker in workers
        ],
    )
    return EXIT_OK


def _health(client, options, output, stdin):
    stats = client.stats()
    accepting = stats.get("accepting_work")
    if accepting is True:
        output.line("accepting work")
        return EXIT_OK
    if accepting is False:
        output.error("up but cannot write: " + _text(stats.get("write_error")))
        return EXIT_UNAVAILABLE
    output.error(
        "the broker does not say whether it accepts work (is it "
        "an older version?)"
    )
    return EXIT_INTERNAL


def _stats(client, options, output, stdin):
    stats = client.stats()
    if options["json"]:
        output.json(stats)
        return EXIT_OK
    if stats.get("accepting_work") is True:
        output.line("accepting work")
    elif stats.get("accepting_work") is False:
        output.line(
            "NOT accepting work, cannot write: "
            + _text(stats.get("write_error"))
        )
    output.line(
        f"workers: {_text(stats.get('workers'))}, slots: "
        f"{_text(stats.get('slots'))}, free slots: "
        f"{_text(stats.get('free_slots'))}"
    )
    counts = stats.get("tasks") or {}
    levels = list(stats.get("priorities") or [])
    for by_level in counts.values():
        levels += [level for level in by_level if level not in levels]
    states = [state for state in STATES if state in counts]
    states += [state for state in counts if state not in states]
    if states:
        output.line("tasks:")
        rows = []
        for state in states:
            by_level = counts[state] or {}
            row = [by_level.get(level, 0) for level in levels]
            rows.append(["  " + state, *map(str, row), str(sum(row))])
        _table(output, ["  STATE", *map(str, levels), "TOTAL"], rows)
    else:
        output.line("tasks: none")
    waiting = stats.get("waiting") or {}
    if waiting:
        output.line("queued by handler:")
        for handler in sorted(waiting):
            output.line(f"  {handler}: {waiting[handler]}")
    unserved = stats.get("unserved") or []
    if unserved:
        output.line(
            "unserved handlers (queued, no connected worker): "
            + ", ".join(unserved)
        )
    age = stats.get("counts_age")
    if isinstance(age, (int, float)):
        output.line(
            f"(tasks recounted {age:.0f} s ago; changes made by "
            "SQL show at the next recount)"
        )
    return EXIT_OK


_COMMANDS = {
    "submit": _submit,
    "status": _status,
    "wait": _wait,
    "list": _list,
    "cancel": _cancel,
    "retry": _retry,
    "purge": _purge,
    "schedule": _schedule,
    "workers": _workers,
    "stats": _stats,
    "health": _health,
}
