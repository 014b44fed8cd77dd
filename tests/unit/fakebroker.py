# -*- test-case-name: tests.unit.test_client -*-
"""
A scripted stand-in for the broker's client side, for client and CLI tests
until the real broker exists.

:class:`FakeBroker` binds a pyzmq ROUTER to ``tcp://127.0.0.1:*`` and
serves it from a background thread.  Each request is recorded, then
answered by the handler registered for its command: a callable taking the
request body and returning ``None`` (no answer), one answer, or a list of
answers.  An answer is ``(command, fields)`` (``req`` is filled in from the
request unless ``fields`` has one) or a ``list`` of raw ``bytes`` frames.
A command without a handler is answered ``ERROR unknown_command``.

Tests wait on :meth:`FakeBroker.wait_for_requests` (a condition variable),
never on sleeps; the serving thread is woken for :meth:`FakeBroker.stop`
through an inproc socket, so it does not poll on a timer either.
"""

import itertools
import json
import threading

import zmq

from taskbroker.protocol import codec

_instances = itertools.count()


def make_task(task_id, **fields):
    """
    A complete task object, as the broker sends it.

    :param task_id: ``int``.
    :param fields: keys to override.
    """
    task = {
        "id": task_id, "handler": "echo", "payload": None,
        "priority": "normal", "state": "queued", "attempts": 0,
        "max_attempts": 3, "worker": None,
        "created_at": "2026-11-28T04:11:03.123456+00:00",
        "started_at": None, "finished_at": None, "result": None,
        "error": None,
    }
    task.update(fields)
    return task


def reply(**fields):
    """
    :returns: a ``REPLY`` answer with ``fields``.
    """
    return ("REPLY", fields)


def error(code, message="refused", **fields):
    """
    :returns: an ``ERROR`` answer.
    """
    return ("ERROR", {"code": code, "message": message, **fields})


def sequence(*answers):
    """
    A handler giving ``answers`` to successive requests, then repeating the
    last one.
    """
    remaining = list(answers)

    def handler(body):
        return remaining.pop(0) if len(remaining) > 1 else remaining[0]

    return handler


def submitted(unserved=(), first_id=1):
    """
    A ``SUBMIT`` handler that accepts every task, numbering them from
    ``first_id``, and reports ``unserved`` (a list, or a callable from the
    task list to one).
    """
    ids = itertools.count(first_id)

    def handler(body):
        tasks = [make_task(next(ids), handler=task["handler"],
                           payload=task.get("payload"),
                           priority=task.get("priority") or "normal")
                 for task in body["tasks"]]
        names = unserved(tasks) if callable(unserved) else list(unserved)
        return reply(tasks=tasks, unserved=names)

    return handler


class FakeBroker:
    """
    A ROUTER socket answering client requests with scripted replies.

    :ivar endpoint: the bound endpoint, with its port.
    :ivar handlers: ``dict`` of command ``str`` -> handler; may be changed
        by a test before it sends requests.
    :ivar requests: ``list`` of ``(command, body)`` received, in order.
    :ivar errors: exceptions raised by handlers (each was answered with
        ``ERROR internal``); a test should expect none.
    """

    def __init__(self, handlers=None):
        self.handlers = dict(handlers or {})
        self.requests = []
        self.errors = []
        self._condition = threading.Condition()
        self._context = zmq.Context()
        self._router = self._context.socket(zmq.ROUTER)
        self._router.setsockopt(zmq.LINGER, 0)
        self._router.bind("tcp://127.0.0.1:*")
        self.endpoint = self._router.getsockopt_string(zmq.LAST_ENDPOINT)
        address = f"inproc://fakebroker-{next(_instances)}"
        self._wake_receiver = self._context.socket(zmq.PAIR)
        self._wake_receiver.bind(address)
        self._wake_sender = self._context.socket(zmq.PAIR)
        self._wake_sender.connect(address)
        # The sockets are handed to the thread before it starts; starting
        # a thread is the memory barrier ZeroMQ asks for.
        self._thread = threading.Thread(
            target=self._serve, name="fakebroker", daemon=True)
        self._thread.start()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.stop()

    def stop(self):
        """
        Stop serving and close everything.  Safe to call twice.
        """
        if self._context is None:
            return
        self._wake_sender.send(b"stop")
        self._thread.join()
        self._wake_sender.close(0)
        self._context.term()
        self._context = None

    def commands(self):
        """
        :returns: the commands received so far, in order.
        """
        with self._condition:
            return [command for command, _ in self.requests]

    def wait_for_requests(self, count, timeout=5.0):
        """
        Block until ``count`` requests have arrived.

        :returns: ``True`` if they did within ``timeout`` seconds.
        """
        with self._condition:
            return self._condition.wait_for(
                lambda: len(self.requests) >= count, timeout)

    def _serve(self):
        poller = zmq.Poller()
        poller.register(self._router, zmq.POLLIN)
        poller.register(self._wake_receiver, zmq.POLLIN)
        try:
            while True:
                events = dict(poller.poll())
                if self._wake_receiver in events:
                    return
                identity, *frames = self._router.recv_multipart()
                self._handle(identity, frames)
        finally:
            self._router.close(0)
            self._wake_receiver.close(0)

    def _handle(self, identity, frames):
        try:
            command = frames[1].decode("ascii")
            body = json.loads(frames[2])
        except (IndexError, UnicodeDecodeError, ValueError):
            command, body = None, {"frames": frames}
        with self._condition:
            self.requests.append((command, body))
            self._condition.notify_all()
        handler = self.handlers.get(command)
        if handler is None:
            answers = error("unknown_command", f"unknown command {command!r}")
        else:
            try:
                answers = handler(body)
            except Exception as e:
                self.errors.append(e)
                answers = error("internal", repr(e))
        if answers is None:
            return
        if not isinstance(answers, list) or (
                answers and isinstance(answers[0], bytes)):
            answers = [answers]
        for answer in answers:
            if isinstance(answer, tuple):
                name, fields = answer
                fields = {"req": body.get("req"), **fields}
                answer = codec.encode(name.encode("ascii"), fields)
            self._router.send_multipart([identity, *answer])
