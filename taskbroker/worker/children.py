# -*- test-case-name: tests.unit.test_children -*-
"""
Blocking handlers in child processes, so that they can be stopped.

A thread running a blocking handler cannot be interrupted: a handler that
never returns, overruns its time limit or is cancelled would hold its slot
for ever, and one that crashes (a segfault in an extension, ``os._exit``)
would take the worker down with it.  A :class:`ChildPool` runs each
blocking task in a handler process instead (see
:mod:`taskbroker.worker._child`), one per slot, started when first needed
and reused for task after task, so a short task costs a round trip through
a pipe, not a process start.  Killing the process stops the task; the next
task that needs the slot gets a new process.
"""

import os
import signal
import struct
import sys
from collections import deque
from dataclasses import dataclass, field

from twisted.internet import defer
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import InvalidLogLevelError, Logger, LogLevel

from taskbroker.protocol.codec import loads
from taskbroker.worker._child import frame
from taskbroker.worker.progress import checked

__all__ = ["ChildPool", "Outcome"]

_log = Logger()
_LENGTH = struct.Struct(">I")
#: Seconds a dead handler process's pipes may stay open (held by a program
#: the handler started) before we close our ends.
PIPE_GRACE = 1.0
#: The longest stderr line logged in one event (bytes).
MAX_LINE = 64 * 1024


@dataclass(frozen=True)
class Outcome:
    """
    How one task ended.

    :ivar state: ``"succeeded"``, ``"failed"`` or ``"cancelled"``.
    :ivar result: the handler's JSON result when succeeded, else ``None``.
    :ivar error: ``None`` when succeeded, else one line for a person.
    :ivar traceback: the handler's formatted traceback when it raised, else
        ``None``.
    :ivar permanent: ``True`` when the handler raised
        :class:`taskbroker.errors.PermanentFailure`: no retry is wanted.
    :ivar result_json: ``result`` as checked JSON text, when it was
        encoded already (so that the RESULT does not encode it again), or
        ``None``; not part of comparisons.
    """

    state: str
    result: object
    error: str | None
    traceback: str | None = None
    permanent: bool = False
    result_json: str | None = field(default=None, compare=False, repr=False)


class _Run:
    """
    A task given to the pool, waiting for a slot or running in ``child``.
    """

    __slots__ = (
        "id",
        "data",
        "time_limit",
        "deferred",
        "child",
        "timer",
        "on_progress",
    )

    def __init__(self, task_id, data, time_limit, deferred, on_progress):
        self.id = task_id
        self.data = data
        self.time_limit = time_limit
        self.deferred = deferred
        self.on_progress = on_progress
        self.child = None
        self.timer = None


def _how_it_ended(reason):
    """
    ``"signal 11"`` or ``"exit status 3"``, from a ``processExited`` reason.
    """
    error = reason.value
    if getattr(error, "signal", None) is not None:
        return f"signal {error.signal}"
    return f"exit status {error.exitCode}"


class _HandlerProcess(ProcessProtocol):
    """
    One handler process: turns its output into frames for the pool and its
    stderr into log events.

    :ivar run: the :class:`_Run` it is working on, or ``None`` when idle.
    :ivar done: ``True`` once it may take no more tasks (killed, or gone).
    """

    def __init__(self, pool):
        self.pool = pool
        self.pid = None
        self.run = None
        self.done = False
        self.ended = False
        self._frames = bytearray()
        self._broken = False
        self._stderr = b""
        self._waiting = []
        self._pipe_grace = None

    def connectionMade(self):
        # Kept: the transport forgets its pid once the process is reaped.
        self.pid = self.transport.pid

    def send(self, data):
        self.transport.write(data)

    def kill(self):
        """
        SIGKILL the process and the programs its handler started (its
        process group: see :func:`taskbroker.worker._child.main`).  A
        blocking handler cannot be interrupted politely: Python runs signal
        handlers only between bytecodes of the main thread, never during a
        long C call or a wait for a program.
        """
        self.done = True
        pid = self.transport.pid
        if pid is None:
            return  # reaped: its pid may belong to another process now
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            # It has not made its own group yet, so it started nothing.
            try:
                self.transport.signalProcess("KILL")
            except ProcessExitedAlready:
                pass

    def when_ended(self):
        """
        :returns: a ``Deferred`` firing with ``None`` once the process is
            reaped and its pipes closed.
        """
        if self.ended:
            return defer.succeed(None)
        d = defer.Deferred()
        self._waiting.append(d)
        return d

    def outReceived(self, data):
        if self._broken:
            return
        self._frames += data
        while len(self._frames) >= _LENGTH.size:
            (length,) = _LENGTH.unpack_from(self._frames)
            end = _LENGTH.size + length
            if len(self._frames) < end:
                return
            data = bytes(self._frames[_LENGTH.size : end])
            del self._frames[:end]
            try:
                message = loads(data.decode("utf-8"))
            except ValueError as e:  # UnicodeDecodeError included
                self._broken = True
                self.pool._garbled(self, f"bad frame: {e}")
                return
            self.pool._received(self, message)

    def errReceived(self, data):
        *lines, self._stderr = (self._stderr + data).split(b"\n")
        if len(self._stderr) > MAX_LINE:  # no end in sight: don't hoard it
            lines.append(self._stderr)
            self._stderr = b""
        for line in lines:
            self._log_line(line)

    def _log_line(self, line):
        # A handler should log through twisted.logger (those events come
        # as frames, with their levels); anything else on stdout or stderr
        # (print, stdlib logging, a crash dump) is unusual enough to warn.
        self.pool.log.warn(
            "handler process {pid} wrote: {line}",
            pid=self.pid,
            line=line.decode("utf-8", "replace").rstrip("\r"),
        )

    def processExited(self, reason):
        self.pool._exited(self, reason)
        # A program the handler started may hold the pipes open for ever.
        self._pipe_grace = self.pool._reactor.callLater(
            PIPE_GRACE, self.transport.loseConnection
        )

    def processEnded(self, reason):
        if self._pipe_grace is not None and self._pipe_grace.active():
            self._pipe_grace.cancel()
        if self._stderr:
            self._log_line(self._stderr)
            self._stderr = b""
        self.ended = True
        self.pool._ended(self)
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(None)


class ChildPool:
    """
    Runs blocking handlers in up to ``size`` handler processes, one task
    per process at a time.  Processes start when a task needs one, and
    each finds its handlers by name with
    :func:`taskbroker.worker.handlers.load_handlers` over
    ``handler_paths``; this process loads none.

    A handler there gets a task whose ``clock`` offers only ``seconds()``
    (wall-clock time): no reactor runs in a handler process.  What a
    handler logs through ``twisted.logger`` is logged here at its level,
    and each line it writes to stdout or stderr as a warning, with the
    process's ``pid``.

    Handler processes die with this one: Linux kills them when it dies
    (``PR_SET_PDEATHSIG``), and they exit when their input pipe closes.

    :param reactor: provides ``IReactorProcess`` and ``IReactorTime``.
    :param handler_paths: folders of handler modules, as given to the
        worker (made absolute here).
    :param size: the most handler processes, and so tasks, at a time;
        further tasks wait in order.
    :param python: the Python 3.11+ interpreter, with taskbroker
        importable, that runs the handler processes.
    :param log: a :class:`twisted.logger.Logger`; by default this module's.
    """

    def __init__(
        self, reactor, handler_paths, size, python=sys.executable, log=None
    ):
        if size < 1:
            raise ValueError("size must be at least 1")
        self._reactor = reactor
        self._paths = [os.path.abspath(p) for p in handler_paths]
        self.size = size
        self._python = python
        self.log = log if log is not None else _log
        # Invariant: _idle and _busy hold the processes that own a slot
        # (not done), so len(_idle) + len(_busy) <= size.
        self._idle = []
        self._busy = set()
        # Every process not yet ended, killed ones included.
        self._processes = set()
        self._runs = {}  # task id -> _Run, waiting or running
        self._waiting = deque()
        self._stopping = False

    @property
    def pids(self):
        """
        The process ids of the handler processes that hold a slot, idle or
        busy (for monitoring and tests).
        """
        return sorted(p.pid for p in [*self._idle, *self._busy])

    def run(self, task_body, time_limit=None, on_progress=None):
        """
        Run a task in a handler process, as soon as one is free.

        :param task_body: the task: a ``dict`` with ``id``, ``handler``,
            ``payload``, ``priority``, ``attempt`` and ``max_attempts``.
        :param time_limit: seconds the handler may run (from when it
            starts, not counting a wait for a slot or the start of its
            process), or ``None`` for no limit.
        :param on_progress: called with ``(fraction, message)`` for the
            handler's progress reports, or ``None``.
        :returns: a ``Deferred`` that never fails, firing with an
            :class:`Outcome`.  Cancelling it is :meth:`cancel`.
        :raises TypeError, ValueError: if ``task_body`` is not JSON.
        """
        task_id = task_body["id"]
        if self._stopping:
            return defer.succeed(
                Outcome("failed", None, "the handler processes are stopping")
            )
        if task_id in self._runs:
            return defer.succeed(
                Outcome(
                    "failed", None, f"task {task_id} is already running here"
                )
            )
        run = _Run(
            task_id,
            frame(task_body),
            time_limit,
            defer.Deferred(lambda d: self.cancel(task_id)),
            on_progress,
        )
        self._runs[task_id] = run
        self._waiting.append(run)
        self._dispatch()
        return run.deferred

    def cancel(self, task_id):
        """
        Stop a task: drop it if it waits, kill its handler process if it
        runs.  Its ``Deferred`` fires at once with a ``"cancelled"``
        outcome, and its slot is free at once: a task that needs it gets a
        new process while the killed one is still being reaped.

        :returns: ``True`` if the task was waiting or running here.
        """
        run = self._runs.get(task_id)
        if run is None:
            return False
        if run.child is None:
            self._waiting.remove(run)
        else:
            self._kill(run.child)
        self._finish(run, Outcome("cancelled", None, "cancelled"))
        return True

    def stop(self):
        """
        Kill every handler process; waiting and running tasks end
        ``"cancelled"``, and later ones fail at once.  Safe to call twice.

        :returns: a ``Deferred`` firing with ``None`` once every handler
            process is reaped.
        """
        if not self._stopping:
            self._stopping = True
            runs = list(self._runs.values())
            for process in list(self._processes):
                if not process.done:
                    self._kill(process)
            self._waiting.clear()
            for run in runs:
                self._finish(
                    run,
                    Outcome(
                        "cancelled", None, "the handler processes were stopped"
                    ),
                )
        d = defer.gatherResults([p.when_ended() for p in self._processes])
        return d.addCallback(lambda _: None)

    # -- inside ----------------------------------------------------------

    def _dispatch(self):
        while self._waiting and (self._idle or len(self._busy) < self.size):
            run = self._waiting.popleft()
            if self._idle:
                process = self._idle.pop()
            else:
                try:
                    process = self._spawn()
                except Exception as e:
                    self.log.failure("could not start a handler process")
                    self._finish(
                        run,
                        Outcome(
                            "failed",
                            None,
                            f"could not start a handler process: {e}",
                        ),
                    )
                    continue
            run.child, process.run = process, run
            self._busy.add(process)
            process.send(run.data)

    def _spawn(self):
        process = _HandlerProcess(self)
        # -P: no current folder on sys.path, where a stray json.py or
        # twisted/ could shadow what the handler process imports.
        self._reactor.spawnProcess(
            process,
            self._python,
            [
                self._python,
                "-P",
                "-m",
                "taskbroker.worker._child",
                str(os.getpid()),
                *self._paths,
            ],
            env=os.environ,
        )
        self._processes.add(process)
        self.log.debug("started handler process {pid}", pid=process.pid)
        return process

    def _release(self, process):
        """
        Take a process off its slot.
        """
        self._busy.discard(process)
        if process in self._idle:
            self._idle.remove(process)
        process.run = None

    def _kill(self, process):
        self._release(process)
        process.kill()

    def _finish(self, run, outcome):
        if run.timer is not None and run.timer.active():
            run.timer.cancel()
        del self._runs[run.id]
        run.child = None
        self._dispatch()
        run.deferred.callback(outcome)

    def _received(self, process, message):
        event = message.get("event") if isinstance(message, dict) else None
        if event == "log":  # even from a killed process: its last words
            try:
                level = LogLevel.levelWithName(message["level"])
            except InvalidLogLevelError:
                level = LogLevel.warn
            self.log.emit(
                level,
                "handler process {pid}: {text}",
                pid=process.pid,
                text=message["text"],
                child_namespace=message["namespace"],
            )
            return
        if process.done:
            return
        run = process.run
        if event == "progress" and (
            run is None or message.get("id") != run.id
        ):
            return  # sent as its task ended: too late to matter
        if run is None or message.get("id") != run.id:
            self._garbled(process, f"unexpected message {event!r}")
        elif event == "started":
            if run.time_limit is not None:
                run.timer = self._reactor.callLater(
                    run.time_limit, self._time_out, run
                )
        elif event == "progress":
            try:
                report = checked(message["fraction"], message.get("message"))
            except (KeyError, TypeError, ValueError) as e:
                self._garbled(process, f"bad progress report: {e}")
                return
            if run.on_progress is not None:
                run.on_progress(*report)
        elif event == "finished":
            self._busy.discard(process)
            process.run = None
            self._idle.append(process)
            self._finish(
                run,
                Outcome(
                    message["state"],
                    message["result"],
                    message["error"],
                    message["traceback"],
                    message["permanent"],
                ),
            )
        else:
            self._garbled(process, f"unexpected message {event!r}")

    def _time_out(self, run):
        run.timer = None
        self._kill(run.child)
        self._finish(
            run,
            Outcome(
                "failed", None, f"time limit of {run.time_limit:g} s exceeded"
            ),
        )

    def _garbled(self, process, reason):
        self.log.error(
            "handler process {pid} broke the protocol: {reason}",
            pid=process.pid,
            reason=reason,
        )
        run = process.run
        self._kill(process)
        if run is not None:
            self._finish(
                run,
                Outcome(
                    "failed", None, "the handler process broke the protocol"
                ),
            )

    def _exited(self, process, reason):
        if process.done:
            return  # killed on purpose
        how = _how_it_ended(reason)
        run = process.run
        process.done = True
        self._release(process)
        if run is not None:
            self._finish(
                run, Outcome("failed", None, f"handler process died ({how})")
            )
        else:
            self.log.warn(
                "idle handler process {pid} ended ({how})",
                pid=process.pid,
                how=how,
            )

    def _ended(self, process):
        self._processes.discard(process)
