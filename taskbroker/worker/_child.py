# -*- test-case-name: tests.unit.test_children -*-
"""
The handler process: runs blocking handlers, one task at a time, for a
:class:`taskbroker.worker.children.ChildPool` in the worker.

Started as ``python -P -m taskbroker.worker._child PARENT_PID [FOLDER...]``
with the protocol on its standard input and output.  It loads the handlers
of the ``FOLDER``s (as the worker does), then loops: read a task, run its
handler, answer.  Plain blocking Python: no reactor runs here.

Frames are a 4-byte big-endian length and that many bytes of UTF-8 JSON,
both ways.  The parent sends task bodies (``id``, ``handler``, ``payload``,
``priority``, ``attempt``, ``max_attempts``).  The child sends::

    {"event": "started", "id": ID}            before calling the handler
    {"event": "progress", "id": ID, "fraction": F, "message": M}
                                              the handler's progress, at
                                              most two a second
    {"event": "finished", "id": ID, "state": "succeeded" | "failed",
     "result": ..., "error": ..., "traceback": ..., "permanent": BOOL}
    {"event": "log", "level": NAME, "namespace": NS, "text": TEXT}

The child never outlives the worker: the kernel kills it when the worker
dies (``PR_SET_PDEATHSIG``, Linux), and it exits by itself when the
protocol input ends (every system).  It leads its own process group, which
the worker kills to stop a task, so that programs a handler started stop
too (unless they leave the group; and a worker that is itself killed
leaves such programs running).
"""

import faulthandler
import os
import queue
import signal
import struct
import sys
import threading
import time
import traceback

from twisted.logger import eventAsText, globalLogBeginner

from taskbroker.errors import PermanentFailure, describe
from taskbroker.protocol.codec import dumps, encode_value, loads
from taskbroker.worker.progress import Throttle, thread_timer
from taskbroker.worker.task import RunningTask

_LENGTH = struct.Struct(">I")
_PR_SET_PDEATHSIG = 1


def frame(message):
    """
    :param message: a JSON value.
    :returns: ``bytes``: the message as one frame.
    :raises ValueError, TypeError: if ``message`` is not JSON.
    """
    data = dumps(message).encode("utf-8")
    return _LENGTH.pack(len(data)) + data


class WallClock:
    """
    ``task.clock`` in a handler process: no reactor runs there (a
    blocking handler waits by blocking), so this offers only
    ``seconds()``, the wall-clock time as ``time.time()`` gives it.
    """

    def seconds(self):
        return time.time()


def _sendable(text):
    # Error text can hold unpaired surrogates (from surrogateescape),
    # which UTF-8, and so the protocol, cannot carry.
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def run_task(handlers, body, clock, report=None):
    """
    Run one task with its handler.

    :param handlers: ``{name: ITaskHandler}``.
    :param body: the task body from the parent.
    :param report: where the task's progress reports go (see
        :class:`~taskbroker.worker.task.RunningTask`).
    :returns: ``bytes``: the ``finished`` frame.
    """
    answer = {
        "event": "finished",
        "id": body["id"],
        "state": "failed",
        "result": None,
        "error": None,
        "traceback": None,
        "permanent": False,
    }
    handler = handlers.get(body["handler"])
    if handler is None:
        answer["error"] = _sendable(
            f"no handler {body['handler']!r} in the handler process"
        )
        return frame(answer)
    try:
        value = handler.run(RunningTask(body, clock, report))
    # BaseException too: a handler's sys.exit() or stray KeyboardInterrupt
    # fails its attempt, not the process that the next task needs.
    except BaseException as e:
        answer["error"] = _sendable(describe(e))
        answer["traceback"] = _sendable("".join(traceback.format_exception(e)))
        answer["permanent"] = isinstance(e, PermanentFailure)
        return frame(answer)
    try:
        encode_value(value, "result")
    except ValueError as e:
        answer["error"] = _sendable(str(e))
        return frame(answer)
    answer.update(state="succeeded", result=value)
    return frame(answer)


class Channel:
    """
    The protocol pipes.  A reader thread queues the parent's tasks and
    ends the process when the input ends, even while a handler runs.

    :param read_fd: the protocol input.
    :param write_fd: the protocol output.
    """

    def __init__(self, read_fd, write_fd):
        self._input = open(read_fd, "rb")
        self._output = open(write_fd, "wb")
        # Log events may come from a handler's threads while the main
        # thread answers: one frame at a time.
        self._lock = threading.Lock()
        self.tasks = queue.Queue()

    def start_reader(self):
        threading.Thread(
            target=self._read, name="taskbroker-child-input", daemon=True
        ).start()

    def _read(self):
        try:
            while True:
                header = self._input.read(_LENGTH.size)
                if len(header) < _LENGTH.size:
                    break
                (length,) = _LENGTH.unpack(header)
                data = self._input.read(length)
                if len(data) < length:
                    break
                self.tasks.put(loads(data.decode("utf-8")))
        except BaseException:
            traceback.print_exc()
            os._exit(2)
        # The worker closed the pipe or died: stop now, whatever runs.
        os._exit(0)

    def send(self, data):
        """
        :param data: ``bytes``, one or more whole frames.
        """
        with self._lock:
            self._output.write(data)
            self._output.flush()

    def progress_sender(self, task_id):
        """
        :returns: a function that sends one progress report of the task.
        """

        def send(fraction, message):
            try:
                self.send(
                    frame(
                        {
                            "event": "progress",
                            "id": task_id,
                            "fraction": fraction,
                            "message": message,
                        }
                    )
                )
            except OSError:
                pass  # the worker is gone; the reader ends this process

        return send

    def log_observer(self, event):
        """
        A ``twisted.logger`` observer that sends events to the worker.
        """
        text = eventAsText(event, includeTimestamp=False, includeSystem=False)
        try:
            self.send(
                frame(
                    {
                        "event": "log",
                        "level": event["log_level"].name,
                        "namespace": event.get("log_namespace"),
                        "text": _sendable(text),
                    }
                )
            )
        except OSError:
            pass  # the worker is gone; the reader ends this process


def _ignore(signum, frame):
    pass


def die_with_parent(parent_pid):
    """
    Ask Linux to SIGKILL this process when its parent dies, and exit if it
    already has.  The signal comes when the *thread* that forked us ends;
    Twisted forks in the reactor thread, which lives as long as the worker.
    """
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            print(
                "prctl(PR_SET_PDEATHSIG) failed: errno",
                ctypes.get_errno(),
                file=sys.stderr,
            )
    # The parent may have died before prctl: we were then adopted.
    if os.getppid() != parent_pid:
        os._exit(1)


def take_protocol_fds():
    """
    Move the protocol off fds 0 and 1, so that a handler's ``print()`` or
    ``input()`` (or a program it starts) cannot corrupt or steal it: fd 1
    then goes to stderr and fd 0 reads ``/dev/null``.

    :returns: ``(read_fd, write_fd)``, not inherited by programs a handler
        starts (a copy there would keep the pipes open after we die).
    """
    read_fd, write_fd = os.dup(0), os.dup(1)
    os.dup2(2, 1)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    sys.stdout.reconfigure(line_buffering=True)
    return read_fd, write_fd


def main(argv=None):
    """
    Run a handler process.

    :param argv: ``[parent pid, handler folder...]``; by default
        ``sys.argv[1:]``.
    """
    argv = sys.argv[1:] if argv is None else argv
    parent_pid, paths = int(argv[0]), argv[1:]
    # Our own process group, which the worker kills to stop a task: so
    # the programs a handler starts die with it.  (And a Ctrl-C meant for
    # the worker's terminal group no longer reaches us: the worker
    # decides when its handler processes end.)
    os.setpgrp()
    # A service manager stopping the worker signals its whole control
    # group: the worker, not SIGTERM, decides when a running task stops
    # (after its grace period).  A handler that does nothing, rather than
    # SIG_IGN, because programs a handler starts must get the default
    # back when they exec (an ignored signal would stay ignored).
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _ignore)
    die_with_parent(parent_pid)
    channel = Channel(*take_protocol_fds())
    channel.start_reader()
    # A crash (segfault) leaves a Python traceback in the worker's log.
    faulthandler.enable()
    globalLogBeginner.beginLoggingTo(
        [channel.log_observer], redirectStandardIO=False
    )

    # Imported late: handler modules may print or log while loading.
    from taskbroker.worker.handlers import load_handlers

    handlers = load_handlers(paths)
    clock = WallClock()
    while True:
        body = channel.tasks.get()
        channel.send(frame({"event": "started", "id": body["id"]}))
        progress = Throttle(
            channel.progress_sender(body["id"]), time.monotonic, thread_timer
        )
        try:
            answer = run_task(handlers, body, clock, progress)
        finally:
            progress.finish()
        channel.send(answer)


if __name__ == "__main__":
    main()
