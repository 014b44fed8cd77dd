# -*- test-case-name: tests.unit.test_services -*-
"""
Start and stop in order: the scaffolding both daemons are built from.

Twisted's ``MultiService`` starts its children without waiting for them
and stops them all at once, and Buildbot's ``AsyncMultiService`` waits but
still starts them together.  A daemon needs more: its socket must not bind
before its store has opened, and at the end its intake must close before
its store drains and closes.  :class:`ServiceTree` starts each child after
the previous one's start has fired and stops them one at a time in
reverse; if a child fails to start, it stops those already started and
reports one line.  A running tree that must not go on (its database was
lost) stops the same way through :meth:`ServiceTree.fail`.
"""

from twisted.application.service import MultiService, Service
from twisted.internet import defer
from twisted.logger import Logger

from taskbroker.errors import TaskbrokerError, one_line

#: Errors a child's start may fail with for reasons outside the program
#: (a locked database, a port in use): reported in one line, without a
#: traceback.  Anything else is a bug and is logged with its traceback too.
EXPECTED_START_ERRORS = (TaskbrokerError, OSError)


class StepService(Service):
    """
    A leaf made of two callables, for a step of a daemon's start and stop
    that needs no class of its own.  Each may return a ``Deferred``; each
    runs at most once per start.

    :param name: the service's name (for logs and ``getServiceNamed``).
    :param start: ``start()``, or ``None``.
    :param stop: ``stop()``, or ``None``.
    """

    def __init__(self, name, start=None, stop=None):
        self.setName(name)
        self._start = start
        self._stop = stop

    def __repr__(self):
        return f"<StepService {self.name}>"

    def startService(self):
        if self.running:
            return defer.succeed(None)
        Service.startService(self)
        if self._start is None:
            return defer.succeed(None)
        return defer.maybeDeferred(self._start)

    def stopService(self):
        if not self.running:
            return defer.succeed(None)
        Service.stopService(self)
        if self._stop is None:
            return defer.succeed(None)
        return defer.maybeDeferred(self._stop)


class ServiceTree(MultiService):
    """
    A parent that starts its children one after another, in the order they
    were added, and stops them one after another in reverse.

    :param on_started: called once every child has started.
    :param on_fatal: called with a one-line message when a child fails to
        start, after those started before it have been stopped, or after
        :meth:`fail` has stopped them all; the daemon's tap exits
        non-zero.  Without it the failure is only logged.
    """

    log = Logger()

    def __init__(self, on_started=None, on_fatal=None):
        MultiService.__init__(self)
        self.on_started = on_started
        self.on_fatal = on_fatal
        self._started = []
        self._starting = None
        self._stopping = None

    def startService(self):
        """
        :returns: a ``Deferred`` that fires when every child has started,
            or when a failed start has been undone (twistd ignores it;
            tests wait on it).
        """
        if self.running:
            return self._starting
        # Service.startService, not MultiService's: the children are
        # started below, one by one.
        Service.startService(self)
        self._stopping = None
        self._starting = self._start()
        return self._starting

    @defer.inlineCallbacks
    def _start(self):
        for child in list(self):
            if not self.running:
                return  # stopped while starting: stopService undoes it
            try:
                yield child.startService()
            except Exception as e:
                yield self._start_failed(child, e)
                return
            self._started.append(child)
        if self.on_started is not None:
            self.on_started()

    @defer.inlineCallbacks
    def _start_failed(self, child, error):
        message = one_line(error)
        if not isinstance(error, EXPECTED_START_ERRORS):
            self.log.failure("{child} failed to start", child=child.name)
        self.log.critical(
            "{name} cannot start: {message}", name=self.name, message=message
        )
        # The failed child may have half-started; it must tolerate a stop.
        self._started.append(child)
        stopping = not self.running  # a stop was asked for meanwhile
        yield self._stop_started()
        Service.stopService(self)
        if self.on_fatal is not None and not stopping:
            self.on_fatal(message)

    def fail(self, message):
        """
        Stop for good while running, because going on would break a
        promise: log one critical line, stop every child as
        :meth:`stopService` does, then call ``on_fatal``.  Does nothing
        once a stop has begun.

        :param str message: what happened, on one line.
        :returns: a ``Deferred`` that fires once stopped and reported.
        """
        if not self.running:
            return defer.succeed(None)
        self.log.critical(
            "{name} stopping: {message}",
            name=self.name,
            message=one_line(message),
        )
        d = self.stopService()
        if self.on_fatal is not None:
            d.addCallback(lambda _: self.on_fatal(one_line(message)))
        return d

    def stopService(self):
        """
        :returns: a ``Deferred`` that fires when every started child has
            stopped.  Safe to call twice.
        """
        if self._stopping is None:
            Service.stopService(self)
            self._stopping = self._stop()
        return self._stopping

    @defer.inlineCallbacks
    def _stop(self):
        if self._starting is not None and not self._starting.called:
            # Let the child starting now finish, then undo it with the
            # others.
            try:
                yield self._starting
            except Exception:
                self.log.failure(
                    "{name} failed while starting", name=self.name
                )
        yield self._stop_started()
        self.log.info("{name} stopped", name=self.name)

    @defer.inlineCallbacks
    def _stop_started(self):
        while self._started:
            child = self._started.pop()
            try:
                yield child.stopService()
            except Exception:
                self.log.failure("{child} failed to stop", child=child.name)
