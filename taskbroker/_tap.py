# -*- test-case-name: tests.unit.test_tap -*-
"""
What the broker's and the worker's ``tap`` modules share: a
``usage.Options`` base derived from a daemon's settings, and exiting a
daemon with one line and a non-zero status.
"""

import atexit
import os
import sys

from twisted.python import usage

import taskbroker
from taskbroker.config import (
    KNOWN_VARIABLES,
    RESERVED_PREFIXES,
    check_environment,
)
from taskbroker.errors import ConfigError


class DaemonOptions(usage.Options):
    """
    The command line of a daemon, derived from its settings.

    A subclass names its ``settings`` (a sequence of
    :class:`taskbroker.config.Setting`), the ``build_config(given,
    environ)`` function that layers them, its environment ``prefix`` and
    its ``command`` name; the option table follows from them.  Every
    option defaults to ``None`` (a flag, to 0) so that
    :func:`taskbroker.config.resolve` can tell what the user typed; the
    real default is shown in the help.
    ``postOptions`` checks the environment for misspelt variables, builds
    the config value (``self.config``) and reads the CURVE keys it names
    (``self.curve``, from ``load_curve(config)``), so that a bad key file
    stops the daemon before it starts; if anything is invalid it prints
    one line and exits with status 2 (twistd would otherwise print the
    whole usage text before the reason).
    """

    settings = ()
    prefix: str | None = None
    command: str | None = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.optParameters = []
        cls.optFlags = []
        for setting in cls.settings:
            if setting.repeatable:
                setattr(
                    cls,
                    "opt_" + setting.field,
                    _repeatable(setting.field, _help(setting)),
                )
            elif setting.flag:
                cls.optFlags.append(
                    [setting.option, setting.short, _help(setting)]
                )
            else:
                cls.optParameters.append(
                    [setting.option, setting.short, None, _help(setting)]
                )

    def __init__(self):
        usage.Options.__init__(self)
        for setting in self.settings:
            if setting.repeatable:
                self[setting.field] = []

    def opt_version(self):
        """
        Print taskbroker's version and exit (before anything starts).
        """
        print(f"taskbroker {taskbroker.__version__}")
        sys.exit(0)

    @staticmethod
    def build_config(given, environ):
        raise NotImplementedError

    @staticmethod
    def load_curve(config):
        """
        :returns: the daemon's CURVE keys, as its config names them, or
            ``None`` without CURVE.
        :raises ConfigError: with one line, for a key that cannot be used.
        """
        return None

    def postOptions(self):
        given = {s.field: self._given(s) for s in self.settings}
        try:
            for warning in check_environment(
                self.prefix,
                KNOWN_VARIABLES[self.prefix],
                RESERVED_PREFIXES[self.prefix],
                os.environ,
            ):
                sys.stderr.write(
                    f"twistd {self.command}: warning: {warning}\n"
                )
            self.config = self.build_config(given, os.environ)
            self.curve = self.load_curve(self.config)
        except ConfigError as e:
            sys.stderr.write(f"twistd {self.command}: {e}\n")
            raise SystemExit(2) from None

    def _given(self, setting):
        if setting.repeatable:
            return self[setting.field]
        if setting.flag:
            # usage.Options counts a flag 0 or 1; absent, the environment
            # may still set it.
            return "yes" if self[setting.option] else None
        return self[setting.option]


def _help(setting):
    if setting.flag:
        return setting.help
    default = setting.default
    if isinstance(default, tuple):
        default = ",".join(default) or "none"
    return setting.help + ("" if default is None else f" [default: {default}]")


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
