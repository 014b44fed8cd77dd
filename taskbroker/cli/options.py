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
from taskbroker.protocol import codec
from taskbroker.schedules import parse_duration
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
            f"task id must be a positive integer, not {text!r}"
        )
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
        [
            "broker",
            None,
            None,
            "The broker's ZeroMQ endpoint, or a comma-separated failover list "
            "(overrides the global option).",
        ],
        [
            "timeout",
            None,
            None,
            "Seconds to wait for each answer (overrides the global option)",
        ],
        [
            "curve-server-key",
            None,
            None,
            "The broker's CURVE public key file (overrides the global "
            "option).",
        ],
        [
            "curve-secret-key",
            None,
            None,
            "This client's CURVE secret key file (overrides the global "
            "option).",
        ],
    ]

    #: How many positional arguments the command takes, for the messages.
    arguments: tuple[str, ...] = ()

    def parseOptions(self, options=None):
        # usage.Options stops at the first argument (getopt.getopt); let
        # options come after the arguments, as in GNU tools, by moving them
        # in front.  "--" still ends the options.
        try:
            opts, args = getopt.gnu_getopt(
                list(options or ()), self.shortOpt, self.longOpt
            )
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
        return self.shortOpt[index + 1 : index + 2] == ":"

    def parseArgs(self, *args):
        if len(args) != len(self.arguments):
            expected = " ".join(self.arguments) or "no arguments"
            raise usage.UsageError(
                f"{self.parent.subCommand}: expected {expected}, got "
                f"{len(args)} argument(s)"
            )
        for name, value in zip(self.arguments, args):
            self[name.lower()] = value


class SubmitOptions(_CommandOptions):
    """
    The options of ``taskbroker submit``.
    """

    synopsis = "HANDLER [options] | --from FILE.jsonl [--json]"
    longdesc = (
        "Submit a task and print its id; or, with --from, one task per line "
        'of a JSON Lines file ("-" for stdin), each an object with '
        "handler, payload, priority, max_attempts, delay, unique_key and "
        "time_limit, printing one id per line.  A bad line stops everything "
        "before anything is submitted.  When a queued or running task "
        "already holds the unique key, its id is printed and a note says "
        "that nothing new was submitted."
    )
    optFlags = [
        [
            "wait",
            "w",
            "Wait for the task to end and print its result as JSON; exit 1 if "
            "it failed or was cancelled.",
        ],
        ["json", "j", "Print the task object(s) as JSON."],
    ]
    optParameters = [
        [
            "payload",
            "p",
            None,
            "The payload: JSON text, or @FILE to read it from FILE (@- for "
            "stdin). Default: null.",
        ],
        [
            "priority",
            None,
            None,
            "The priority level (default: the broker's default).",
        ],
        [
            "max-attempts",
            None,
            None,
            "How many attempts the task may use (default: the broker's).",
            _integer,
        ],
        [
            "delay",
            None,
            None,
            "Run the task no sooner than this many seconds from now",
            non_negative_number,
        ],
        [
            "unique-key",
            None,
            None,
            "A name: while a queued or running task holds it, submit nothing "
            "and print that task's id.",
        ],
        [
            "time-limit",
            None,
            None,
            "Seconds an attempt may run before the worker stops it (default: "
            "the broker's)",
            positive_number,
        ],
        ["from", "f", None, "Submit every task of a JSON Lines file."],
    ]

    def parseArgs(self, *args):
        if self["from"] is not None:
            if args:
                raise usage.UsageError(
                    "submit: --from takes no HANDLER argument"
                )
            self["handler"] = None
            return
        if len(args) != 1:
            raise usage.UsageError(
                f"submit: expected HANDLER (or --from FILE), got "
                f"{len(args)} argument(s)"
            )
        self["handler"] = args[0]

    def postOptions(self):
        if self["from"] is not None:
            mixed = [
                name
                for name in (
                    "payload",
                    "priority",
                    "max-attempts",
                    "delay",
                    "unique-key",
                    "time-limit",
                )
                if self[name] is not None
            ]
            if self["wait"]:
                mixed.append("wait")
            if mixed:
                raise usage.UsageError(
                    "submit: --from cannot be combined with "
                    + ", ".join("--" + name for name in mixed)
                )


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
        "cancelled."
    )
    optFlags = [["json", "j", "Print each task object as JSON."]]
    # Here --timeout is the whole wait; the time to wait for each answer
    # is then given before the command (taskbroker --timeout S wait ...).
    optParameters = [
        [
            "timeout",
            None,
            None,
            "Seconds to wait in all (default: until every task has ended)",
            non_negative_number,
        ],
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

    synopsis = (
        "[--state STATE] [--handler NAME] [--priority LEVEL] "
        "[--order newest|oldest] [--limit N] [--before ID | "
        "--after ID] [--json]"
    )
    longdesc = (
        "List tasks, newest first (or oldest first with --order oldest).  "
        "To see the next page, give the last id shown as --before (newest "
        "first) or --after (oldest first)."
    )
    optFlags = [["json", "j", "Print a JSON array of task objects."]]
    optParameters = [
        [
            "state",
            "s",
            None,
            "Only tasks in this state (" + ", ".join(STATES) + ").",
        ],
        ["handler", None, None, "Only tasks for this handler."],
        ["priority", None, None, "Only tasks of this priority level."],
        [
            "order",
            None,
            "newest",
            "newest (highest ids first) or oldest.",
            _order,
        ],
        ["limit", "n", 100, "The most tasks to show.", positive_int],
        ["before", None, None, "Only tasks with a smaller id.", _task_id],
        ["after", None, None, "Only tasks with a greater id.", _task_id],
    ]


class _OneOrManyOptions(_CommandOptions):
    """
    A command that acts on one task (``ID``) or, with ``--state``, on every
    task in a state, after a confirmation.
    """

    #: The states --state takes, the first the default.
    many_states: tuple[str, ...] = ()
    arguments = ("ID",)

    def parseArgs(self, *args):
        if len(args) == 1:
            self["id"] = _task_id(args[0])
        elif len(args) == 0 and self["state"] is not None:
            self["id"] = None
        else:
            raise usage.UsageError(
                f"{self.parent.subCommand}: expected ID, or --state STATE "
                f"for many tasks, got {len(args)} argument(s)"
            )

    def postOptions(self):
        many = self["state"] is not None
        if many and self["id"] is not None:
            raise usage.UsageError(
                f"{self.parent.subCommand}: give ID or --state, not both"
            )
        if many and self["state"] not in self.many_states:
            raise usage.UsageError(
                f"{self.parent.subCommand}: --state must be "
                + " or ".join(self.many_states)
            )
        if not many and (self["handler"] or self["yes"]):
            raise usage.UsageError(
                f"{self.parent.subCommand}: --handler and --yes go with "
                "--state"
            )


class CancelOptions(_OneOrManyOptions):
    """
    The options of ``taskbroker cancel``.
    """

    synopsis = "ID [--json] | --state queued|running [--handler NAME] [--yes]"
    longdesc = (
        "Cancel a queued or running task (the worker running it is told to "
        "stop it).  Cancelling a cancelled task succeeds; a task that "
        "succeeded or failed cannot be cancelled.  With --state, cancel "
        "every queued (or running) task, of --handler if given, after "
        "saying how many and asking on a terminal; elsewhere --yes is "
        "needed."
    )
    many_states = ("queued", "running")
    optFlags = [
        ["json", "j", "Print the cancelled task object as JSON."],
        ["yes", "y", "With --state: do not ask."],
    ]
    optParameters = [
        [
            "state",
            "s",
            None,
            "Cancel every task in this state (queued or running).",
        ],
        ["handler", None, None, "With --state: only tasks for this handler."],
    ]


class RetryOptions(_OneOrManyOptions):
    """
    The options of ``taskbroker retry``.
    """

    synopsis = (
        "ID [--json] | --state failed|cancelled [--handler NAME] [--yes]"
    )
    longdesc = (
        "Queue a failed or cancelled task again, with all its attempts.  "
        "A task already queued or running is left as it is.  With --state, "
        "queue every failed (or cancelled) task again, of --handler if "
        "given, after saying how many and asking on a terminal; elsewhere "
        "--yes is needed."
    )
    many_states = ("failed", "cancelled")
    optFlags = [
        ["json", "j", "Print the queued task object as JSON."],
        ["yes", "y", "With --state: do not ask."],
    ]
    optParameters = [
        [
            "state",
            "s",
            None,
            "Retry every task in this state (failed or cancelled).",
        ],
        ["handler", None, None, "With --state: only tasks for this handler."],
    ]


def _duration(text):
    try:
        return parse_duration(text)
    except ValueError as e:
        raise usage.UsageError(f"--older-than: {e} (got {text!r})") from None


class PurgeOptions(_CommandOptions):
    """
    The options of ``taskbroker purge``.
    """

    synopsis = (
        "--older-than DURATION [--state succeeded|failed|cancelled] "
        "[--handler NAME]"
    )
    longdesc = (
        "Delete the finished tasks that finished longer ago than "
        "DURATION (seconds, or a number with s, m, h or d, such as 30d), "
        "100 per transaction a tenth of a second apart (dispatch goes on "
        "between), and print how many.  Queued and "
        "running tasks are never deleted.  (The broker's --keep-finished "
        "does this by itself.)"
    )
    optParameters = [
        [
            "older-than",
            None,
            None,
            "How long ago they finished, at least.",
            _duration,
        ],
        [
            "state",
            "s",
            None,
            "Only tasks in this state (succeeded, failed or cancelled).",
        ],
        ["handler", None, None, "Only tasks for this handler."],
    ]

    def postOptions(self):
        if self["older-than"] is None:
            raise usage.UsageError("purge: --older-than DURATION is required")
        if self["state"] not in (None, "succeeded", "failed", "cancelled"):
            raise usage.UsageError(
                "purge: --state must be succeeded, failed or cancelled"
            )


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
        "reached."
    )


class KeygenOptions(_CommandOptions):
    """
    The options of ``taskbroker keygen``.
    """

    synopsis = "DIR --name NAME"
    longdesc = (
        "Make a CURVE key pair in DIR (made if missing): NAME.key, the "
        "public key, to give to the peers that must admit it, and "
        "NAME.key_secret, readable by its owner only, to keep.  An "
        "existing key is never overwritten.  Needs no broker."
    )
    arguments = ("DIR",)
    optParameters = [
        [
            "name",
            "n",
            None,
            "The key's name: letters, digits, '.', '_' or '-'.",
        ]
    ]

    def postOptions(self):
        if not self["name"]:
            raise usage.UsageError("keygen: --name NAME is required")


def _every(text):
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 1 <= value <= codec.MAX_SECONDS:
        raise usage.UsageError(
            f"--every: seconds from 1 to {codec.MAX_SECONDS:.0f}, not {text!r}"
        )
    return value


class ScheduleAddOptions(_CommandOptions):
    """
    The options of ``taskbroker schedule add``.
    """

    synopsis = (
        'NAME (--every SECONDS | --cron "MIN HOUR DOM MON DOW") '
        "HANDLER [--payload JSON] [--priority LEVEL] "
        "[--timezone TZ] [--skip-if-running] [--replace]"
    )
    longdesc = (
        "Add a periodic task: HANDLER is submitted every SECONDS, or at the "
        "times of a cron expression in the wall time of --timezone (UTC "
        "by default).  Each tick is enqueued once however many brokers "
        "share the database; a tick missed while no broker ran is "
        "enqueued once when one starts.  NAME is letters, digits, '.', "
        "'_' and '-'."
    )
    arguments = ("NAME", "HANDLER")
    optFlags = [
        [
            "skip-if-running",
            None,
            "Enqueue nothing at a tick while the previous task is still "
            "queued or running.",
        ],
        ["replace", None, "Replace a schedule of the same name."],
        ["json", "j", "Print the schedule as JSON."],
    ]
    optParameters = [
        ["every", None, None, "Seconds between ticks (1 or more).", _every],
        [
            "cron",
            None,
            None,
            "A cron expression: MIN HOUR DOM MON DOW (such as '0 3 * * *' "
            "or '*/15 9-17 * * mon-fri'), or @hourly, @daily, @weekly, "
            "@monthly, @yearly.",
        ],
        [
            "timezone",
            None,
            None,
            "With --cron: the IANA time zone of its times (default UTC).",
        ],
        [
            "payload",
            "p",
            None,
            "The tasks' payload: JSON, @FILE, or @- for stdin (default null).",
        ],
        ["priority", None, None, "The tasks' priority level."],
        [
            "max-attempts",
            None,
            None,
            "Attempts each task may use",
            positive_int,
        ],
        [
            "time-limit",
            None,
            None,
            "Seconds an attempt may run",
            positive_number,
        ],
    ]

    def postOptions(self):
        if (self["every"] is None) == (self["cron"] is None):
            raise usage.UsageError(
                "schedule add: give --every SECONDS or --cron EXPRESSION"
            )
        if self["timezone"] is not None and self["cron"] is None:
            raise usage.UsageError(
                "schedule add: --timezone goes with --cron (--every counts "
                "elapsed seconds)"
            )


class ScheduleListOptions(_CommandOptions):
    synopsis = "[--json]"
    longdesc = "List the schedules."
    optFlags = [["json", "j", "Print a JSON array of schedules."]]


class _ScheduleNameOptions(_CommandOptions):
    synopsis = "NAME"
    arguments = ("NAME",)


class ScheduleRemoveOptions(_ScheduleNameOptions):
    longdesc = "Remove a schedule (the tasks it enqueued stay)."


class SchedulePauseOptions(_ScheduleNameOptions):
    longdesc = "Pause a schedule: its ticks enqueue nothing until resumed."


class ScheduleResumeOptions(_ScheduleNameOptions):
    longdesc = (
        "Resume a paused schedule from its next tick (the ticks missed "
        "while it was paused are not enqueued)."
    )


class ScheduleOptions(_Options):
    """
    The options of ``taskbroker schedule``.
    """

    synopsis = "add|list|remove|pause|resume ..."
    longdesc = (
        "Periodic tasks, kept in the database so every broker sees them "
        "(with CURVE client checks, for admin keys only)."
    )
    subCommands = [
        ["add", None, ScheduleAddOptions, "Add a periodic task."],
        ["list", None, ScheduleListOptions, "List the schedules."],
        ["remove", None, ScheduleRemoveOptions, "Remove a schedule."],
        ["pause", None, SchedulePauseOptions, "Pause a schedule."],
        ["resume", None, ScheduleResumeOptions, "Resume a schedule."],
    ]

    def postOptions(self):
        if self.subCommand is None:
            raise usage.UsageError(
                "schedule: give add, list, remove, pause or resume"
            )


def _shown(default):
    return ",".join(default) if isinstance(default, tuple) else default


def _global_help(setting):
    # A setting without a default describes it in its help.
    default = (
        ""
        if setting.default is None
        else f"; default: {_shown(setting.default)}"
    )
    return (
        f"{setting.help} (environment: "
        f"{setting.variable('TASKBROKER_')}{default})"
    )


class Options(_Options):
    """
    The ``taskbroker`` command line.
    """

    synopsis = (
        "Usage: taskbroker [--broker ENDPOINT[,ENDPOINT...]] "
        "[--timeout SECONDS] "
        "[--curve-server-key FILE --curve-secret-key FILE] "
        "COMMAND [options]"
    )
    longdesc = (
        "Talk to a taskbroker broker.  Exit codes: 0 ok; 1 the task failed "
        "or was cancelled (submit --wait, wait), or an internal error; 2 "
        "usage error or request refused; 3 broker unreachable, not "
        "answering or unavailable, or (health) up but unable to write; 4 "
        "no such task; 5 (wait) not finished within --timeout."
    )
    # Checked and layered with the environment by client_config; the
    # defaults are shown in the help.
    optParameters = [
        [s.option, s.short, None, _global_help(s)] for s in CLIENT_SETTINGS
    ]
    subCommands = [
        ["submit", None, SubmitOptions, "Submit a task, or many with --from."],
        ["status", None, StatusOptions, "Show a task."],
        ["wait", None, WaitOptions, "Wait for tasks to end."],
        ["list", None, ListOptions, "List tasks."],
        ["cancel", None, CancelOptions, "Cancel a queued or running task."],
        [
            "retry",
            None,
            RetryOptions,
            "Queue a failed or cancelled task again.",
        ],
        ["purge", None, PurgeOptions, "Delete old finished tasks."],
        [
            "schedule",
            None,
            ScheduleOptions,
            "Add, list, pause, resume or remove periodic tasks.",
        ],
        ["workers", None, WorkersOptions, "List the connected workers."],
        ["stats", None, StatsOptions, "Show the broker's statistics."],
        [
            "health",
            None,
            HealthOptions,
            "Say whether the broker accepts work (exit 0) or cannot write "
            "(exit 3).",
        ],
        [
            "keygen",
            None,
            KeygenOptions,
            "Make a CURVE key pair (for a broker, a worker or a client).",
        ],
    ]

    def postOptions(self):
        if self.subCommand is None:
            raise usage.UsageError(
                "no command given (one of "
                + ", ".join(name for name, _, _, _ in self.subCommands)
                + ")"
            )

    def client_config(self, environ):
        """
        :returns: the :class:`taskbroker.config.ClientConfig`: from the
            command (a subcommand's option first), else the environment,
            else the defaults.
        :raises ConfigError: for an invalid value.
        """
        command = self.subOptions
        while getattr(command, "subOptions", None) is not None:
            command = command.subOptions  # schedule add: add's options
        given = {
            s.field: command.get(s.option) or self[s.option]
            for s in CLIENT_SETTINGS
        }
        return client_config(given, environ)
