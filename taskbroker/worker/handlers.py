# -*- test-case-name: tests.unit.test_handlers -*-
"""
Finding task handlers: ``twisted.plugin`` plugins providing
:class:`taskbroker.interfaces.ITaskHandler` in the ``taskbroker.plugins``
package and in every ``--handlers-path`` folder.

``getPlugins`` alone reports a module that fails to import as an anonymous
"Unhandled Error", and silently skips a module whose name another plugin
folder already uses.  This module says which file failed and which file is
hidden, and loads everything else.
"""

import os
import sys
import traceback

from twisted import plugin
from twisted.logger import Logger
from zope.interface.exceptions import Invalid
from zope.interface.verify import verifyObject

import taskbroker.plugins
from taskbroker.errors import describe
from taskbroker.interfaces import ITaskHandler

log = Logger()


class _Captured:
    """
    Stands in for ``twisted.python.log`` inside ``twisted.plugin`` while we
    load plugins, so that import errors reach us instead of the log.
    """

    def __init__(self):
        self.errors = []

    def err(self, _stuff=None, _why=None, **kw):
        self.errors.append(sys.exc_info())

    def msg(self, *message, **kw):
        # "Unable to write to plugin cache": harmless, plugins still load.
        log.debug(
            "twisted.plugin: {message}", message=" ".join(map(str, message))
        )


def add_handler_paths(paths):
    """
    Add folders to the plugin package's search path (as absolute paths:
    relative ones upset ``twisted.python.modules``).
    """
    for path in paths:
        path = os.path.abspath(path)
        if path not in taskbroker.plugins.__path__:
            taskbroker.plugins.__path__.append(path)


def _module_files():
    """
    ``{module name: [files]}`` over the plugin package's folders, in search
    order: the first file of each name is the one Python imports.
    """
    found = {}
    for folder in taskbroker.plugins.__path__:
        try:
            names = sorted(os.listdir(folder))
        except OSError:
            continue
        for filename in names:
            stem, ext = os.path.splitext(filename)
            if ext == ".py" and stem != "__init__" and stem.isidentifier():
                found.setdefault(stem, []).append(
                    os.path.join(folder, filename)
                )
    return found


def _failed_file(exc_info, folders):
    """
    The plugin file an import error came from, read off its traceback.
    """
    error = exc_info[1]
    filename = getattr(error, "filename", None)
    if isinstance(error, SyntaxError) and filename:
        return filename
    for frame, _ in reversed(list(traceback.walk_tb(exc_info[2]))):
        path = frame.f_code.co_filename
        if os.path.dirname(os.path.abspath(path)) in folders:
            return path
    return "a handler module"


def _warn_classes_without_instances():
    """
    A handler module that defines a handler class but makes no object of
    it has no handler: twisted.plugin finds objects, not classes.  Say
    so, naming the class, rather than leave its tasks waiting.
    """
    prefix = taskbroker.plugins.__name__ + "."
    for name, module in list(sys.modules.items()):
        if not name.startswith(prefix) or module is None:
            continue
        values = list(vars(module).values())
        for value in values:
            if (
                isinstance(value, type)
                and value.__module__ == name
                and ITaskHandler.implementedBy(value)
                and not any(isinstance(other, value) for other in values)
            ):
                log.warn(
                    "handler module {path} defines the handler class "
                    "{cls} but no object of it, so it loads no handler "
                    "from it: add '{instance} = {cls}()' at module level, "
                    "or write the handler as a function under "
                    "@taskbroker.handler(...)",
                    path=getattr(module, "__file__", name),
                    cls=value.__name__,
                    instance=value.__name__.lower(),
                )


def origin(handler):
    """
    Where a loaded handler comes from: its module's file (the package's
    built-in ones are named so).
    """
    module_name = (
        getattr(getattr(handler, "function", None), "__module__", None)
        or type(handler).__module__
    )
    module = sys.modules.get(module_name)
    path = getattr(module, "__file__", None) or module_name
    builtin = os.path.dirname(os.path.abspath(taskbroker.plugins.__file__))
    if os.path.dirname(os.path.abspath(path)) == builtin:
        return f"{os.path.basename(path)} (built in)"
    return path


def load_handlers(paths=()):
    """
    Load every handler the plugin package and ``paths`` provide.

    A module that fails to import, a hidden module, an object that does
    not provide the interface and a name defined twice are each logged by
    name; everything else loads.

    :param paths: folders of handler modules.
    :returns: ``{name: handler}``.
    """
    add_handler_paths(paths)
    folders = {os.path.abspath(p) for p in taskbroker.plugins.__path__}
    for files in _module_files().values():
        for hidden in files[1:]:
            log.warn(
                "handler module {hidden} is ignored: its name is already "
                "used by {used}; rename it",
                hidden=hidden,
                used=files[0],
            )

    captured = _Captured()
    real_log = plugin.log
    plugin.log = captured
    try:
        candidates = list(plugin.getPlugins(ITaskHandler, taskbroker.plugins))
    finally:
        plugin.log = real_log
    for exc_info in captured.errors:
        log.error(
            "could not load handler module {path}: {error}",
            path=_failed_file(exc_info, folders),
            error=describe(exc_info[1]),
        )
    _warn_classes_without_instances()

    handlers = {}
    for candidate in candidates:
        where = (
            getattr(candidate, "__module__", None)
            or type(candidate).__module__
        )
        try:
            verifyObject(ITaskHandler, candidate)
            if not isinstance(candidate.name, str) or not candidate.name:
                raise Invalid("its name is not a non-empty string")
        except Invalid as e:
            log.error(
                "handler {handler!r} from {module} is invalid: {error}",
                handler=candidate,
                module=where,
                error=str(e).strip(),
            )
            continue
        if candidate.name in handlers:
            log.warn(
                "handler name {name!r} is defined twice (in {first} and "
                "{second}); using the one in {first}",
                name=candidate.name,
                first=handlers[candidate.name][1],
                second=where,
            )
            continue
        handlers[candidate.name] = (candidate, where)
    return {name: handler for name, (handler, _) in handlers.items()}
