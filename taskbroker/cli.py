# -*- test-case-name: tests.unit.test_cli -*-
"""
The ``taskbroker`` command: submit, inspect, cancel and retry tasks, and look
at workers and statistics, from a shell.

Each run sends a few requests and exits, so it uses the blocking client
(:class:`taskbroker.client.blocking.BlockingClient`) instead of running a
reactor under ``task.react``: the Lazy Pirate loop gives every command
resends for free (a resent ``submit`` is recognised by the broker and
creates nothing twice), there is no reactor start-up and shutdown to
get right, and a Ctrl-C interrupts a plain poll cleanly.

Exit codes: 0 success; 1 the task failed or was cancelled (``--wait``), or
an unexpected internal error; 2 a usage error or a request the broker
refused (e.g. ``not_cancellable``, ``not_retryable``); 3 the broker is
unreachable, did not answer within ``--timeout``, or is unavailable; 4 no
such task.  Every error is one line on stderr that starts with
``taskbroker:``; so are warnings and notes.
"""

import getopt
import json
import os
import sys
from datetime import datetime

from twisted.python import usage

import taskbroker
from taskbroker.client import check_task_spec
from taskbroker.client.blocking import BlockingClient
from taskbroker.client.errors import (
    BrokerUnavailable,
    ClientError,
    InvalidRequest,
    RequestFailed,
    TaskNotFound,
)
from taskbroker.config import (
    CLIENT_SETTINGS,
    client_config,
    non_negative_number,
    positive_int,
    positive_number,
)
from taskbroker.errors import ConfigError, one_line
from taskbroker.protocol.objects import TASK_KEYS

__all__ = ["main"]


EXIT_OK = 0
EXIT_TASK_FAILED = 1
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3
EXIT_NOT_FOUND = 4

# ERROR codes that are not the user's mistake get their own exit codes;
# every other code (bad_request, unknown_priority, not_cancellable,
# too_large, ...) means the command asked for something the broker refuses.
_EXIT_FOR_CODE = {
    "not_found": EXIT_NOT_FOUND,
    "unavailable": EXIT_UNAVAILABLE,
    "internal": EXIT_UNAVAILABLE,
}

_STATES = ("queued", "running", "succeeded", "failed", "cancelled")


class _Help(Exception):
    """
    ``--help`` or ``--version`` was given: print the text and exit 0.
    """

    def __init__(self, text):
        Exception.__init__(self, text)
        self.text = text


def _integer(text):
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{text!r} is not an integer") from None


def _task_id(text):
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise usage.UsageError(
            f"task id must be a positive integer, not {text!r}")
    return value


class _Options(usage.Options):
    """
    ``usage.Options`` that reports help instead of printing it to
    ``sys.stdout`` and exiting, so that ``main`` can write to the streams
    it was given.
    """

    def opt_help(self):
        """
        Display this help and exit.
        """
        raise _Help(str(self))

    def opt_version(self):
        """
        Display the version and exit.
        """
        raise _Help(f"taskbroker {taskbroker.__version__}")


class _CommandOptions(_Options):
    """
    A subcommand's options.  Options may follow its arguments
    (``submit echo --payload 1``), and ``--broker``/``--timeout`` are
    accepted here too, where users tend to put them.
    """

    optParameters = [
        ["broker", None, None,
         "The broker's ZeroMQ endpoint (overrides the global option)."],
        ["timeout", None, None,
         "Seconds to wait for each answer (overrides the global option)"],
    ]

    #: How many positional arguments the command takes, for the messages.
    arguments = ()

    def parseOptions(self, options=None):
        # usage.Options stops at the first argument (getopt.getopt); let
        # options come after the arguments, as in GNU tools, by moving them
        # in front.  "--" still ends the options.
        try:
            opts, args = getopt.gnu_getopt(
                list(options or ()), self.shortOpt, self.longOpt)
        except getopt.error as e:
            raise usage.UsageError(str(e)) from None
        reordered = []
        for opt, value in opts:
            reordered.append(opt)
            if self._takes_value(opt):
                reordered.append(value)
        usage.Options.parseOptions(self, reordered + ["--"] + args)

    def _takes_value(self, opt):
        if opt.startswith("--"):
            return opt[2:] + "=" in self.longOpt
        index = self.shortOpt.find(opt[1])
        return self.shortOpt[index + 1:index + 2] == ":"

    def parseArgs(self, *args):
        if len(args) != len(self.arguments):
            expected = " ".join(self.arguments) or "no arguments"
            raise usage.UsageError(
                f"{self.parent.subCommand}: expected {expected}, got "
                f"{len(args)} argument(s)")
        for name, value in zip(self.arguments, args):
            self[name.lower()] = value


class SubmitOptions(_CommandOptions):
    """
    The options of ``taskbroker submit``.
    """

    synopsis = "HANDLER [options] | --from FILE.jsonl [--json]"
    longdesc = (
        "Submit a task and print its id; or, with --from, one task per line "
        "of a JSON Lines file (\"-\" for stdin), each an object with "
        "handler, payload, priority, max_attempts, delay, unique_key and "
        "time_limit, printing one id per line.  A bad line stops everything "
        "before anything is submitted.  When a queued or running task "
        "already holds the unique key, its id is printed and a note says "
        "that nothing new was submitted.")
    optFlags = [
        ["wait", "w",
         "Wait for the task to end and print its result as JSON; exit 1 if "
         "it failed or was cancelled."],
        ["json", "j", "Print the task object(s) as JSON."],
    ]
    optParameters = [
        ["payload", "p", None,
         "The payload: JSON text, or @FILE to read it from FILE (@- for "
         "stdin). Default: null."],
        ["priority", None, None,
         "The priority level (default: the broker's default)."],
        ["max-attempts", None, None,
         "How many attempts the task may use (default: the broker's).",
         _integer],
        ["delay", None, None,
         "Run the task no sooner than this many seconds from now",
         non_negative_number],
        ["unique-key", None, None,
         "A name: while a queued or running task holds it, submit nothing "
         "and print that task's id."],
        ["time-limit", None, None,
         "Seconds an attempt may run before the worker stops it (default: "
         "the broker's)", positive_number],
        ["from", "f", None, "Submit every task of a JSON Lines file."],
    ]

    def parseArgs(self, *args):
        if self["from"] is not None:
            if args:
                raise usage.UsageError(
                    "submit: --from takes no HANDLER argument")
            self["handler"] = None
            return
        if len(args) != 1:
            raise usage.UsageError(
                f"submit: expected HANDLER (or --from FILE), got "
                f"{len(args)} argument(s)")
        self["handler"] = args[0]

    def postOptions(self):
        if self["from"] is not None:
            mixed = [name for name in ("payload", "priority", "max-attempts",
                                       "delay", "unique-key", "time-limit")
                     if self[name] is not None]
            if self["wait"]:
                mixed.append("wait")
            if mixed:
                raise usage.UsageError(
                    "submit: --from cannot be combined with "
                    + ", ".join("--" + name for name in mixed))


class StatusOptions(_CommandOptions):
    """
    The options of ``taskbroker status``.
    """

    synopsis = "ID [--json]"
    longdesc = "Show a task."
    arguments = ("ID",)
    optFlags = [["json", "j", "Print the task object as JSON."]]

    def postOptions(self):
        self["id"] = _task_id(self["id"])


class ListOptions(_CommandOptions):
    """
    The options of ``taskbroker list``.
    """

    synopsis = "[--state STATE] [--handler NAME] [--limit N] [--json]"
    longdesc = "List tasks by id."
    optFlags = [["json", "j", "Print a JSON array of task objects."]]
    optParameters = [
        ["state", "s", None,
         "Only tasks in this state (" + ", ".join(_STATES) + ")."],
        ["handler", None, None, "Only tasks for this handler."],
        ["limit", "n", 100, "The most tasks to show.", positive_int],
    ]


class CancelOptions(_CommandOptions):
    """
    The options of ``taskbroker cancel``.
    """

    synopsis = "ID [--json]"
    longdesc = (
        "Cancel a queued or running task (the worker running it is told to "
        "stop it).  Cancelling a cancelled task succeeds; a task that "
        "succeeded or failed cannot be cancelled.")
    arguments = ("ID",)
    optFlags = [["json", "j", "Print the cancelled task object as JSON."]]

    def postOptions(self):
        self["id"] = _task_id(self["id"])


class RetryOptions(_CommandOptions):
    """
    The options of ``taskbroker retry``.
    """

    synopsis = "ID [--json]"
    longdesc = (
        "Queue a failed or cancelled task again, with all its attempts.  "
        "A task already queued or running is left as it is.")
    arguments = ("ID",)
    optFlags = [["json", "j", "Print the queued task object as JSON."]]

    def postOptions(self):
        self["id"] = _task_id(self["id"])


class WorkersOptions(_CommandOptions):
    """
    The options of ``taskbroker workers``.
    """

    synopsis = "[--json]"
    longdesc = "List the connected workers."
    optFlags = [["json", "j", "Print a JSON array of workers."]]


class StatsOptions(_CommandOptions):
    """
    The options of ``taskbroker stats``.
    """

    synopsis = "[--json]"
    longdesc = "Show the broker's statistics."
    optFlags = [["json", "j", "Print the statistics as JSON."]]


class Options(_Options):
    """
    The ``taskbroker`` command line.
    """

    synopsis = ("Usage: taskbroker [--broker ENDPOINT] [--timeout SECONDS] "
                "COMMAND [options]")
    longdesc = (
        "Talk to a taskbroker broker.  Exit codes: 0 ok; 1 the task failed "
        "or was cancelled (submit --wait), or an internal error; 2 usage "
        "error or request refused; 3 broker unreachable, not answering or "
        "unavailable; 4 no such task.")
    # Checked and layered with the environment by client_config; the
    # defaults are shown in the help.
    optParameters = [
        [s.option, s.short, None,
         f"{s.help} (environment: {s.variable('TASKBROKER_')}; default: "
         f"{s.default})"] for s in CLIENT_SETTINGS]
    subCommands = [
        ["submit", None, SubmitOptions, "Submit a task, or many with --from."],
        ["status", None, StatusOptions, "Show a task."],
        ["list", None, ListOptions, "List tasks."],
        ["cancel", None, CancelOptions, "Cancel a queued or running task."],
        ["retry", None, RetryOptions, "Queue a failed or cancelled task again."],
        ["workers", None, WorkersOptions, "List the connected workers."],
        ["stats", None, StatsOptions, "Show the broker's statistics."],
    ]

    def postOptions(self):
        if self.subCommand is None:
            raise usage.UsageError(
                "no command given (one of "
                + ", ".join(name for name, _, _, _ in self.subCommands) + ")")

    def client_config(self, environ):
        """
        :returns: the :class:`taskbroker.config.ClientConfig`: from the
            command (a subcommand's option first), else the environment,
            else the defaults.
        :raises ConfigError: for an invalid value.
        """
        given = {s.field: self.subOptions[s.option] or self[s.option]
                 for s in CLIENT_SETTINGS}
        return client_config(given, environ)


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
            f"cannot read {path}: {e.strerror or e}") from None
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
                f"{name} line {number}: {e.message}") from None
        specs.append(spec)
    return specs


def _warn_unserved(output, unserved):
    for handler in sorted(unserved):
        output.warn(
            f"no connected worker has handler {handler!r}; the task is "
            "queued until one connects")


def _task_ended_badly(output, task):
    """
    :returns: the exit code for a final task, after saying why on stderr
        if it did not succeed.
    """
    if task.get("state") == "succeeded":
        return EXIT_OK
    verb = "was cancelled" if task.get("state") == "cancelled" else "failed"
    reason = task.get("error")
    output.error(f"task {task.get('id')} {verb}"
                 + (f": {reason}" if reason else ""))
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
            output.note(f"task {task['id']} with unique key {key!r} already "
                        "exists; not submitted again")
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
        tasks, unserved = result
        for task in tasks:
            _print_new_task(output, task, options["json"])
        _note_existing(output, tasks, specs, result.existing)
        _warn_unserved(output, unserved)
        return EXIT_OK
    spec = {"unique_key": options["unique-key"]}
    result = client.submit(
        options["handler"], _payload(options, stdin),
        priority=options["priority"], max_attempts=options["max-attempts"],
        delay=options["delay"], unique_key=options["unique-key"],
        time_limit=options["time-limit"])
    task, unserved = result
    _note_existing(output, [task], [spec], result.existing)
    _warn_unserved(output, unserved)
    if not options["wait"]:
        _print_new_task(output, task, options["json"])
        return EXIT_OK
    try:
        task = client.wait(task["id"])
    except KeyboardInterrupt:
        raise KeyboardInterrupt(
            f"task {task['id']} goes on; see 'taskbroker status "
            f"{task['id']}'") from None
    if options["json"]:
        output.json(task)
    elif task.get("state") == "succeeded":
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
    widths = [max(len(cell) for cell in column)
              for column in zip(headers, *rows)]
    for row in [headers, *rows]:
        output.line("  ".join(
            cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


def _status(client, options, output, stdin):
    task = client.get(options["id"])
    if options["json"]:
        output.json(task)
        return EXIT_OK
    keys = [key for key in TASK_KEYS if key in task]
    keys += [key for key in task if key not in TASK_KEYS]
    for key in keys:
        value = task[key]
        if key == "traceback" or (key == "run_at" and value is None):
            continue
        if key in ("payload", "result"):
            # JSON values: show them as JSON, so that "null" and the string
            # "null" stay apart.
            value = json.dumps(value, ensure_ascii=False)
        output.line(f"{key}: {one_line(_text(value))}")
    traceback = task.get("traceback")
    if traceback:
        # Last, and as it is, line by line: the one field worth reading
        # whole.
        output.line("traceback:")
        for line in str(traceback).rstrip().splitlines():
            output.line("    " + line.rstrip())
    return EXIT_OK


def _list(client, options, output, stdin):
    tasks = client.list(options["state"], options["handler"], options["limit"])
    tasks = sorted(tasks, key=lambda task: task.get("id", 0))
    if options["json"]:
        output.json(tasks)
        return EXIT_OK
    _table(output, ["ID", "HANDLER", "PRIORITY", "STATE", "ATTEMPTS",
                    "WORKER", "CREATED"], [
        [_text(task.get("id")), _text(task.get("handler")),
         _text(task.get("priority")), _text(task.get("state")),
         f"{_text(task.get('attempts'))}/{_text(task.get('max_attempts'))}",
         _text(task.get("worker")), _time(task.get("created_at"))]
        for task in tasks])
    return EXIT_OK


def _cancel(client, options, output, stdin):
    task = client.cancel(options["id"])
    if options["json"]:
        output.json(task)
    else:
        output.line(f"cancelled task {task['id']}")
    return EXIT_OK


def _retry(client, options, output, stdin):
    task = client.retry(options["id"])
    if options["json"]:
        output.json(task)
    else:
        # A task that was queued or running already is answered as it is.
        output.line(f"queued task {task['id']} again"
                    if task["state"] == "queued" and task["attempts"] == 0
                    else f"task {task['id']} is already {task['state']}")
    return EXIT_OK


def _workers(client, options, output, stdin):
    workers = client.workers()
    if options["json"]:
        output.json(workers)
        return EXIT_OK
    _table(output, ["NAME", "PRIORITIES", "HANDLERS", "SLOTS", "BUSY",
                    "CONNECTED", "LAST SEEN"], [
        [_text(worker.get("name")),
         # null priorities: the worker serves every level.
         "*" if worker.get("priorities") is None
         else _text(worker.get("priorities")),
         _text(worker.get("handlers")), _text(worker.get("slots")),
         _text(worker.get("busy")), _time(worker.get("connected_since")),
         _time(worker.get("last_seen"))]
        for worker in workers])
    return EXIT_OK


def _stats(client, options, output, stdin):
    stats = client.stats()
    if options["json"]:
        output.json(stats)
        return EXIT_OK
    output.line(f"workers: {_text(stats.get('workers'))}, slots: "
                f"{_text(stats.get('slots'))}, free slots: "
                f"{_text(stats.get('free_slots'))}")
    counts = stats.get("tasks") or {}
    levels = list(stats.get("priorities") or [])
    for by_level in counts.values():
        levels += [level for level in by_level if level not in levels]
    states = [state for state in _STATES if state in counts]
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
        output.line("unserved handlers (queued, no connected worker): "
                    + ", ".join(unserved))
    age = stats.get("counts_age")
    if isinstance(age, (int, float)):
        output.line(f"(tasks recounted {age:.0f} s ago; changes made by "
                    "SQL show at the next recount)")
    return EXIT_OK


_COMMANDS = {
    "submit": _submit,
    "status": _status,
    "list": _list,
    "cancel": _cancel,
    "retry": _retry,
    "workers": _workers,
    "stats": _stats,
}


def _run(argv, output, stdin, environ):
    options = Options()
    try:
        options.parseOptions(argv)
    except _Help as help:
        output.line(help.text.rstrip("\n"))
        return EXIT_OK
    except usage.UsageError as e:
        output.error(f"{e} (see 'taskbroker --help')")
        return EXIT_USAGE
    try:
        config = options.client_config(environ)
        client = BlockingClient(config.broker, config.timeout)
    except (ConfigError, ValueError) as e:
        output.error(str(e))
        return EXIT_USAGE
    with client:
        return _COMMANDS[options.subCommand](
            client, options.subOptions, output, stdin)


def main(argv=None, stdout=None, stderr=None, stdin=None):
    """
    Run the ``taskbroker`` command.

    :param argv: the arguments after the program name; ``None`` for
        ``sys.argv[1:]``, and then ``main`` exits the process with the code
        (the console-script entry point calls ``main()``).
    :param stdout: the text stream for results (default ``sys.stdout``).
    :param stderr: the text stream for warnings and errors (default
        ``sys.stderr``).
    :param stdin: the text stream that ``-`` and ``@-`` read (default
        ``sys.stdin``).
    :returns: the exit code, ``int`` (when ``argv`` is given).
    """
    exit_with_code = argv is None
    if argv is None:
        argv = sys.argv[1:]
    output = _Output(stdout or sys.stdout, stderr or sys.stderr)
    stdin = stdin or sys.stdin
    try:
        code = _run(list(argv), output, stdin, os.environ)
    except usage.UsageError as e:
        output.error(str(e))
        code = EXIT_USAGE
    except BrokerUnavailable as e:
        output.error(str(e))
        code = EXIT_UNAVAILABLE
    except TaskNotFound as e:
        output.error(e.message)
        code = EXIT_NOT_FOUND
    except RequestFailed as e:
        output.error(str(e))
        code = _EXIT_FOR_CODE.get(e.code, EXIT_USAGE)
    except KeyboardInterrupt as e:
        output.error(f"interrupted; {e}" if str(e) else "interrupted")
        code = 130
    except Exception as e:
        # Never a traceback: a user can act on one line, and can report it.
        output.error(f"internal error: {type(e).__name__}: {e}")
        code = EXIT_INTERNAL
    if exit_with_code:
        sys.exit(code)
    return code


if __name__ == "__main__":
    main()
