# -*- test-case-name: tests.unit.test_client -*-
"""
A scripted stand-in for the broker's client side: for testing a program
that talks to a broker (through the clients or the protocol) against
answers of your choosing, including lost replies and errors.

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
        "id": task_id,
        "handler": "echo",
        "payload": None,
        "priority": "normal",
        "state": "queued",
        "attempts": 0,
        "max_attempts": 3,
        "worker": None,
        "created_at": "2026-11-28T04:11:03.123456+00:00",
        "started_at": None,
        "finished_at": None,
        "result": None,
        "error": None,
        "traceback": None,
        "run_at": None,
        "unique_key": None,
        "time_limit": None,
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


def submitted(unserved=(), first_id=1, live_keys=None):
    """
    A ``SUBMIT`` handler that accepts every task, numbering them from
    ``first_id``, and reports ``unserved`` (a list, or a callable from the
    task list to one).

    Like the broker, it answers a ``request_id`` it has seen with the tasks
    it created for it (only those), all listed in ``existing``, and a task
    whose ``unique_key`` a live task holds with that task, listed in
    ``existing``.  Every task it creates stays live.

    :param live_keys: a ``dict`` of unique key -> task object, the live
        tasks there are to begin with; it is updated.
    """
    ids = itertools.count(first_id)
    by_request = {}
    live = {} if live_keys is None else live_keys

    def handler(body):
        request_id = body.get("request_id")
        if request_id is not None and request_id in by_request:
            tasks = by_request[request_id]
            existing = [task["id"] for task in tasks]
        else:
            tasks, existing = [], []
            for spec in body["tasks"]:
                key = spec.get("unique_key")
                if key is not None and key in live:
                    tasks.append(live[key])
                    existing.append(live[key]["id"])
                    continue
                task = make_task(
                    next(ids),
                    handler=spec["handler"],
                    payload=spec.get("payload"),
                    priority=spec.get("priority") or "normal",
                    max_attempts=spec.get("max_attempts") or 3,
                    run_at=(
                        None
                        if not spec.get("delay")
                        else "2026-11-28T05:00:00.000000+00:00"
                    ),
                    unique_key=key,
                    time_limit=spec.get("time_limit"),
                )
                if key is not None:
                    live[key] = task
                tasks.append(task)
            # As the broker does: only the tasks created carry the
            # request_id, and a request that created none is not known.
            created = [task for task in tasks if task["id"] not in existing]
            if request_id is not None and created:
                by_request[request_id] = created
        names = unserved(tasks) if callable(unserved) else list(unserved)
        return reply(tasks=tasks, existing=existing, unserved=names)

    return handler


def lose_replies(handler, count=1):
    """
    A handler that carries out every request with ``handler`` but does not
    answer the first ``count`` of them: a reply lost on the way, which
    makes a client resend.
    """
    remaining = [count]

    def lossy(body):
        answers = handler(body)
        if remaining[0] > 0:
            remaining[0] -= 1
            return None
        return answers

    return lossy


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
            target=self._serve, name="fakebroker", daemon=True
        )
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
                lambda: len(self.requests) >= count, timeout
            )

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
            answers and isinstance(answers[0], bytes)
        ):
            answers = [answers]
        for answer in answers:
            if isinstance(answer, tuple):
                name, fields = answer
                fields = {"req": body.get("req"), **fields}
                answer = codec.encode(name.encode("ascii"), fields)
            self._router.send_multipart([identity, *answer])
