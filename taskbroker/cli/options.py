# -*- test-case-name: tests.unit.test_cli -*-
"""
The ``taskbroker`` command line's options: the global ones, and one
``usage.Options`` per command.
"""

import getopt
from typing import Any

from twisted.python import usage

import taskbroker
from taskbroker.config import (
    CLIENT_SETTINGS,
    client_config,
    non_negative_number,
    positive_int,
    positive_number,
)
from taskbroker.store import STATES


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
    (``submit echo --payload 1``), and the global options (``--broker``,
    ``--timeout``, the CURVE keys) are accepted here too, where users tend
    to put them.
    """

    # [long, short, default, help, coerce]: usage.Options' own layout.
    optParameters: list[list[Any]] = [
        ["broker", None, None,
         "The broker's ZeroMQ endpoint, or a comma-separated failover list "
         "(overrides the global option)."],
        ["timeout", None, None,
         "Seconds to wait for each answer (overrides the global option)"],
        ["curve-server-key", None, None,
         "The broker's CURVE public key file (overrides the global "
         "option)."],
        ["curve-secret-key", None, None,
         "This client's CURVE secret key file (overrides the global "
         "option)."],
    ]

    #: How many positional arguments the command takes, for the messages.
    arguments: tuple[str, ...] = ()

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


class WaitOptions(_CommandOptions):
    """
    The options of ``taskbroker wait``.
    """

    synopsis = "ID... [--timeout SECONDS] [--json]"
    longdesc = (
        "Wait for tasks that exist to end, and print each one's result as "
        "JSON, one line per task in the order given (with --json, each "
        "task object).  Exit 0 if every task succeeded; otherwise with the "
        "code of the worst outcome: 3 the broker could not be reached, 4 "
        "no such task, 5 not finished within --timeout, 1 failed or "
        "cancelled.")
    optFlags = [["json", "j", "Print each task object as JSON."]]
    # Here --timeout is the whole wait; the time to wait for each answer
    # is then given before the command (taskbroker --timeout S wait ...).
    optParameters = [
        ["timeout", None, None,
         "Seconds to wait in all (default: until every task has ended).",
         non_negative_number],
    ]

    def parseArgs(self, *ids):
        if not ids:
            raise usage.UsageError("wait: expected at least one task ID")
        self["ids"] = [_task_id(task_id) for task_id in ids]

    def postOptions(self):
        self["wait"] = self["timeout"]
        self["timeout"] = None


def _order(text):
    if text not in ("newest", "oldest"):
        raise ValueError(f"must be newest or oldest, not {text!r}")
    return text


class ListOptions(_CommandOptions):
    """
    The options of ``taskbroker list``.
    """

    synopsis = ("[--state STATE] [--handler NAME] [--priority LEVEL] "
                "[--order newest|oldest] [--limit N] [--before ID | "
                "--after ID] [--json]")
    longdesc = (
        "List tasks, newest first (or oldest first with --order oldest).  "
        "To see the next page, give the last id shown as --before (newest "
        "first) or --after (oldest first).")
    optFlags = [["json", "j", "Print a JSON array of task objects."]]
    optParameters = [
        ["state", "s", None,
         "Only tasks in this state (" + ", ".join(STATES) + ")."],
        ["handler", None, None, "Only tasks for this handler."],
        ["priority", None, None, "Only tasks of this priority level."],
        ["order", None, "newest",
         "newest (highest ids first) or oldest.", _order],
        ["limit", "n", 100, "The most tasks to show.", positive_int],
        ["before", None, None, "Only tasks with a smaller id.", _task_id],
        ["after", None, None, "Only tasks with a greater id.", _task_id],
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


class HealthOptions(_CommandOptions):
    """
    The options of ``taskbroker health``.
    """

    synopsis = ""
    longdesc = (
        "Say whether the broker accepts work: print 'accepting work' and "
        "exit 0 when it can write its database; exit 3 with one line "
        "saying why when it is up but cannot write, or when it cannot be "
        "reached.")


class KeygenOptions(_CommandOptions):
    """
    The options of ``taskbroker keygen``.
    """

    synopsis = "DIR --name NAME"
    longdesc = (
        "Make a CURVE key pair in DIR (made if missing): NAME.key, the "
        "public key, to give to the peers that must admit it, and "
        "NAME.key_secret, readable by its owner only, to keep.  An "
        "existing key is never overwritten.  Needs no broker.")
    arguments = ("DIR",)
    optParameters = [["name", "n", None,
                      "The key's name: letters, digits, '.', '_' or '-'."]]

    def postOptions(self):
        if not self["name"]:
            raise usage.UsageError("keygen: --name NAME is required")


def _shown(default):
    return ",".join(default) if isinstance(default, tuple) else default


def _global_help(setting):
    # A setting without a default describes it in its help.
    default = ("" if setting.default is None
               else f"; default: {_shown(setting.default)}")
    return (f"{setting.help} (environment: "
            f"{setting.variable('TASKBROKER_')}{default})")


class Options(_Options):
    """
    The ``taskbroker`` command line.
    """

    synopsis = ("Usage: taskbroker [--broker ENDPOINT[,ENDPOINT...]] "
                "[--timeout SECONDS] "
                "[--curve-server-key FILE --curve-secret-key FILE] "
                "COMMAND [options]")
    longdesc = (
        "Talk to a taskbroker broker.  Exit codes: 0 ok; 1 the task failed "
        "or was cancelled (submit --wait, wait), or an internal error; 2 "
        "usage error or request refused; 3 broker unreachable, not "
        "answering or unavailable, or (health) up but unable to write; 4 "
        "no such task; 5 (wait) not finished within --timeout.")
    # Checked and layered with the environment by client_config; the
    # defaults are shown in the help.
    optParameters = [
        [s.option, s.short, None, _global_help(s)] for s in CLIENT_SETTINGS]
    subCommands = [
        ["submit", None, SubmitOptions, "Submit a task, or many with --from."],
        ["status", None, StatusOptions, "Show a task."],
        ["wait", None, WaitOptions, "Wait for tasks to end."],
        ["list", None, ListOptions, "List tasks."],
        ["cancel", None, CancelOptions, "Cancel a queued or running task."],
        ["retry", None, RetryOptions, "Queue a failed or cancelled task again."],
        ["workers", None, WorkersOptions, "List the connected workers."],
        ["stats", None, StatsOptions, "Show the broker's statistics."],
        ["health", None, HealthOptions,
         "Say whether the broker accepts work (exit 0) or cannot write "
         "(exit 3)."],
        ["keygen", None, KeygenOptions,
         "Make a CURVE key pair (for a broker, a worker or a client)."],
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
