# -*- test-case-name: tests.unit.test_cli -*-
"""
The ``taskbroker`` command: submit, inspect, cancel and retry tasks, and look
at workers, statistics and health, from a shell.

Each run sends a few requests and exits, so it uses the blocking client
(:class:`taskbroker.client.blocking.BlockingClient`) instead of running a
reactor under ``task.react``: the Lazy Pirate loop gives every command
resends for free (a resent ``submit`` is recognised by the broker and
creates nothing twice), there is no reactor start-up and shutdown to
get right, and a Ctrl-C interrupts a plain poll cleanly.

Exit codes: 0 success; 1 the task failed or was cancelled (``--wait``), or
an unexpected internal error; 2 a usage error or a request the broker
refused (e.g. ``not_cancellable``, ``not_retryable``); 3 the broker is
unreachable, did not answer within ``--timeout``, or is unavailable, or
(``health``) it is up but cannot write its database; 4 no such task.  Every error is one line on stderr that starts with
``taskbroker:``; so are warnings and notes.
"""

import os
import signal
import sys

from twisted.python import usage

from taskbroker import curve
from taskbroker.cli.commands import (
    _COMMANDS,
    _EXIT_FOR_CODE,
    EXIT_INTERNAL,
    EXIT_NOT_FOUND,
    EXIT_OK,
    EXIT_TASK_FAILED,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    _Output,
)
from taskbroker.cli.options import Options, _Help
from taskbroker.client.blocking import BlockingClient
from taskbroker.client.errors import (
    BrokerUnavailable,
    RequestFailed,
    TaskNotFound,
)
from taskbroker.errors import ConfigError

__all__ = [
    "main",
    "EXIT_OK",
    "EXIT_TASK_FAILED",
    "EXIT_INTERNAL",
    "EXIT_USAGE",
    "EXIT_UNAVAILABLE",
    "EXIT_NOT_FOUND",
]


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
    if options.subCommand == "keygen":
        return _keygen(options.subOptions, output)
    try:
        config = options.client_config(environ)
        # Read here first, so that a bad file is named by its option
        # (the client names its keyword argument).
        curve.load_peer_keys(
            config.curve_server_key, config.curve_secret_key, "client"
        )
        client = BlockingClient(
            config.broker,
            config.timeout,
            curve_server_key=config.curve_server_key,
            curve_secret_key=config.curve_secret_key,
        )
    except (ConfigError, ValueError) as e:
        output.error(str(e))
        return EXIT_USAGE
    with client:
        return _COMMANDS[options.subCommand](
            client, options.subOptions, output, stdin
        )


def _keygen(options, output):
    try:
        public, secret = curve.keygen(options["dir"], options["name"])
    except ConfigError as e:
        output.error(str(e))
        return EXIT_USAGE
    output.line(
        f"public key: {public} (give it to the peers that admit this key)"
    )
    output.line(f"secret key: {secret} (keep it; readable by you only)")
    return EXIT_OK


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
    except BrokenPipeError:
        # The reader went away (taskbroker list | head): quiet, as a tool
        # killed by SIGPIPE is, and nothing more is written to the pipe.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        code = 128 + signal.SIGPIPE
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
