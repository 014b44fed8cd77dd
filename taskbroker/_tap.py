# -*- test-case-name: tests.unit.test_tap -*-
"""
What the broker's and the worker's ``tap`` modules share: building a
``usage.Options`` class from a table of settings, and exiting a daemon with
one line and a non-zero status.
"""

import atexit
import os
import sys

from twisted.python import usage

from taskbroker.errors import ConfigError


def options_class(settings, build_config, command, synopsis):
    """
    Make a ``usage.Options`` subclass for a daemon.

    Every option defaults to ``None`` so that :func:`taskbroker.config.resolve`
    can tell what the user typed; the real default is shown in the help.
    ``postOptions`` builds the config value (``self.config``) and, if a value
    is invalid, prints one line and exits with status 2: twistd would
    otherwise print the whole usage text before the reason.

    :param settings: a sequence of :class:`taskbroker.config.Setting`.
    :param build_config: ``build_config(given) -> config``, raising
        :class:`ConfigError`.
    :param command: the subcommand's name, for error messages.
    """
    parameters = []
    namespace = {"synopsis": synopsis, "optParameters": parameters}
    for setting in settings:
        default = setting.default
        if isinstance(default, tuple):
            default = ",".join(default) or "none"
        help = setting.help + ("" if default is None else f" [default: {default}]")
        if setting.repeatable:
            namespace["opt_" + setting.field] = _repeatable(setting.field, help)
        else:
            parameters.append([setting.option, setting.short, None, help])

    def __init__(self):
        usage.Options.__init__(self)
        for setting in settings:
            if setting.repeatable:
                self[setting.field] = []

    def postOptions(self):
        given = {s.field: self[s.option if not s.repeatable else s.field]
                 for s in settings}
        try:
            self.config = build_config(given)
        except ConfigError as e:
            sys.stderr.write(f"twistd {command}: {e}\n")
            raise SystemExit(2)

    namespace["__init__"] = __init__
    namespace["postOptions"] = postOptions
    return type("Options", (usage.Options,), namespace)


def _repeatable(field, help):
    def opt(self, value):
        self[field].append(value)

    opt.__doc__ = help
    return opt


def exit_with(reactor, code):
    """
    Stop the reactor and make the process exit with ``code``.

    twistd always exits 0 after its reactor stops; an ``atexit`` hook runs
    after twistd has cleaned up (pidfile, logs) and can still set the
    status.
    """
    def _exit():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)

    atexit.register(_exit)
    if reactor.running:
        reactor.stop()
    else:
        reactor.callWhenRunning(reactor.stop)
