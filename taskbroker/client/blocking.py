# -*- test-case-name: tests.unit.test_client -*-
"""
A blocking client for scripts and the ``taskbroker`` command: plain pyzmq,
no reactor.

It follows the ZeroMQ guide's "Lazy Pirate" client: send, poll with a
timeout, and on timeout close the socket (linger 0), open a new one and
send the same request again, a few times, before giving up.  A new socket
matters: the old one may still hold the unsent request, or receive the late
answer, and either would be confused with the answer to the resend.  The
resend is the same message, with the same ``req``.  Every request is
resent but ``SCHEDULE_REMOVE`` and a ``SCHEDULE_ADD`` without ``replace``:
a ``SUBMIT`` carries a ``request_id`` that the broker remembers, so a copy
of one it already carried out is answered with the tasks it created the
first time; cancelling a cancelled task succeeds, and a ``RETRY`` of a
task already queued again answers it as it is.  A copy of an add or a
removal that the broker already carried out would be refused (``exists``,
``not_found``), so those are sent once.

A request the broker refuses as ``busy`` (too much work in progress) was
not carried out, so it is sent again after a pause that doubles from 50 ms
to 2 s, with jitter, for as long as its resends after timeouts could have
taken; then :class:`~taskbroker.client.errors.RequestFailed` (code
``busy``) is raised.

One request is outstanding at a time, so a reply whose ``req`` is not the
current one is stale (a duplicate, or from before a timeout) and is
discarded.  A client is not thread-safe: use one per thread.

Given a failover list of brokers (brokers sharing one database), the
client starts at a random one and stays with it while it answers; each
resend after a timeout goes to the next broker of the list, on a new
socket, still the same message (the same ``req`` and, for a ``SUBMIT``,
the same ``request_id``, which the shared database recognises), so every
broker is tried before the client gives up.  A ``WAIT`` that moves to
another broker goes on waiting there.
"""

import math
import random
import time
from uuid import uuid4

import zmq
from zmq.utils.monitor import recv_monitor_message

from taskbroker.client import (
    CURVE_NO_ANSWER,
    HousekeepingMethods,
    Submission,
    cancel_call,
    encode_request,
    get_call,
    list_call,
    load_keys,
    read_reply,
    retry_call,
    run_call,
    stats_call,
    submit_call,
    wait_call,
    workers_call,
)
from taskbroker.client.errors import BrokerUnavailable, RequestFailed
from taskbroker.failover import EndpointRing, parse_endpoints
from taskbroker.protocol import codec
from taskbroker.transport.options import client_options, curve_client_options

__all__ = ["BlockingClient"]

#: The first and the longest pause before a request the broker refused
#: as ``busy`` is sent again (seconds).
#: Seconds after which a broker whose every connection attempt was refused
#: (nothing listens at its address) is given up, without waiting for the
#: whole timeout.
REFUSED_AFTER = 1.0

# What _receive returns when nothing listens at the endpoint.
_REFUSED = object()

BUSY_FIRST_PAUSE = 0.05
BUSY_LONGEST_PAUSE = 2.0


class _Backoff:
    """
    Pauses that double, with jitter, until a deadline.
    """

    def __init__(self, deadline):
        self._deadline = deadline
        self._pause = BUSY_FIRST_PAUSE

    def wait(self, now):
        """
        Sleep before the next try; ``False`` (without sleeping) if it
        would end past the deadline.
        """
        pause = self._pause * random.uniform(0.5, 1.0)
        if now + pause > self._deadline:
            return False
        time.sleep(pause)
        self._pause = min(self._pause * 2, BUSY_LONGEST_PAUSE)
        return True


class BlockingClient(HousekeepingMethods):
    """
    A synchronous connection to a broker.

    Usable as a context manager, which closes it.

    :ivar endpoints: the ``tuple`` of the brokers' endpoints.
    :ivar endpoint: the endpoint in use: the broker that answered last, or
        the next one to try.
    :ivar timeout: seconds to wait for each answer.
    :ivar retries: how many times a request is resent after a timeout (so
        it is sent ``1 + retries`` times in all, and at least once to each
        broker of a failover list).
    """

    def __init__(
        self,
        endpoint,
        timeout=5.0,
        retries=2,
        context=None,
        clock=time.monotonic,
        start=None,
        curve_server_key=None,
        curve_secret_key=None,
    ):
        """
        :param endpoint: ``str``, e.g. ``"tcp://127.0.0.1:5555"``; or a
            failover list of brokers sharing one database, as a
            comma-separated ``str`` or a ``list`` of ``str``.
        :param timeout: seconds (> 0) to wait for each answer; a ``WAIT``
            gets its own hold time on top.
        :param retries: ``int`` ≥ 0: resends of a request.
        :param context: a ``zmq.Context`` to use; by default the client
            makes its own and terminates it on :meth:`close`.
        :param clock: a callable returning monotonic seconds, for deadlines.
        :param start: the index in the list of the first broker to try;
            ``None`` for a random one, so that clients spread over the
            list.
        :param curve_server_key: with ``curve_secret_key``, CURVE: the
            path of the broker's public key file (``NAME.key``, from
            ``taskbroker keygen``).  Requests are encrypted, and go only
            to a broker that holds its secret key (every broker of a
            failover list holds the same one).  ``None`` (the default)
            for plain links.
        :param curve_secret_key: the path of this client's own key pair,
            the ``NAME.key_secret`` file, readable by its owner only; the
            broker must have ``NAME.key`` among its authorized clients.
            Both files are read here.
        :raises ValueError: ``timeout``, ``retries`` or ``endpoint`` is
            invalid.
        :raises taskbroker.client.errors.InvalidKeys: (a ``ValueError``
            and a :class:`~taskbroker.errors.ConfigError`) one key file
            without the other, or one that cannot be used.
        """
        if not (
            isinstance(timeout, (int, float))
            and math.isfinite(timeout)
            and timeout > 0
        ):
            raise ValueError(
                f"timeout must be a positive number, not {timeout!r}"
            )
        if type(retries) is not int or retries < 0:
            raise ValueError(
                f"retries must be an integer >= 0, not {retries!r}"
            )
        endpoints = parse_endpoints(endpoint)
        self._curve = load_keys(curve_server_key, curve_secret_key)
        self._ring = EndpointRing(
            endpoints,
            random.randrange(len(endpoints)) if start is None else start,
        )
        self.timeout = float(timeout)
        self.retries = retries
        self._clock = clock
        self._own_context = context is None
        self._context = zmq.Context() if context is None else context
        self._socket = None
        self._monitor = None
        self._closed = False
        try:
            # Connect now so that a malformed endpoint is reported here,
            # not as a timeout at the first request.
            self._open()
        except BaseException:
            self.close()
            raise

    @property
    def endpoints(self):
        return self._ring.endpoints

    @property
    def endpoint(self):
        return self._ring.current

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def _open(self):
        socket = self._context.socket(zmq.DEALER)
        options = client_options()
        if self._curve is not None:
            options += curve_client_options(*self._curve)
        for option, value in options:
            socket.setsockopt(option, value)
        # libzmq's socket monitor tells a refused connection (nothing
        # listens) from a broker that is slow to answer.
        self._monitor = socket.get_monitor_socket(
            zmq.EVENT_CONNECTED | zmq.EVENT_CONNECT_RETRIED
        )
        self._opened_at = self._clock()
        self._connected = self._retried = False
        self._socket = socket
        try:
            socket.connect(self.endpoint)
        except zmq.ZMQError as e:
            self._discard_socket()
            raise ValueError(
                f"invalid broker endpoint {self.endpoint!r}: {e}"
            ) from None

    def _discard_socket(self):
        if self._socket is not None:
            if self._monitor is not None:
                self._socket.disable_monitor()
                self._monitor.close(0)
            self._socket.close(0)
            self._socket = self._monitor = None

    def _refused(self):
        """
        Read the monitor's events: whether every attempt to connect to the
        endpoint was refused, for long enough to be sure.
        """
        while True:
            try:
                event = recv_monitor_message(self._monitor, zmq.NOBLOCK)
            except zmq.Again:
                break
            if event["event"] == zmq.EVENT_CONNECTED:
                self._connected = True
            elif event["event"] == zmq.EVENT_CONNECT_RETRIED:
                self._retried = True
        return (
            self._retried
            and not self._connected
            and self._clock() - self._opened_at >= REFUSED_AFTER
        )

    def close(self):
        """
        Close the socket, and the ZeroMQ context if the client made it.
        Safe to call twice.
        """
        self._closed = True
        self._discard_socket()
        if self._own_context and self._context is not None:
            self._context.term()
        self._context = None

    def _send(self, request):
        """
        Send one request and return the body of its ``REPLY``.

        :param request: a :class:`taskbroker.client.Request`.
        :raises BrokerUnavailable: no answer in time, after all attempts.
        :raises taskbroker.client.RequestFailed: the broker answered
            ``ERROR``.
        """
        if self._closed:
            raise RuntimeError("the client is closed")
        req = uuid4().hex
        frames = encode_request(req, request)
        attempts = (
            max(1 + self.retries, len(self._ring)) if request.idempotent else 1
        )
        tried, refused = [], []
        answer_time = self.timeout + request.extra_time
        ignored = []
        busy = _Backoff(self._clock() + self.timeout * attempts)
        sent = 0
        while sent < attempts:
            if self._socket is None:
                self._open()
            if self.endpoint not in tried:
                tried.append(self.endpoint)
            try:
                self._socket.send_multipart(frames, zmq.NOBLOCK)
            except zmq.Again:
                # The queue is full: as good as no answer.
                pass
            else:
                try:
                    body = self._receive(req, answer_time, ignored)
                except RequestFailed as e:
                    # Refused before anything was done: safe to send
                    # again, even a RETRY, after a pause.
                    if e.code != "busy" or not busy.wait(self._clock()):
                        raise
                    continue
                if body is _REFUSED:
                    refused.append(self.endpoint)
                    if set(refused) >= set(self._ring.endpoints):
                        self._discard_socket()
                        self._ring.advance()
                        raise BrokerUnavailable(
                            "nothing listens at "
                            + ", ".join(refused)
                            + " (connection refused); is the broker "
                            "running?"
                        )
                elif body is not None:
                    return body
            sent += 1
            self._discard_socket()
            # The next try goes to the next broker of a failover list.
            self._ring.advance()
        command = request.command.decode("ascii")
        reason = (
            f"no answer from {', '.join(tried)} within "
            f"{answer_time:g} s to {command}"
        )
        if attempts > 1:
            reason += f" ({attempts} attempts)"
        if self._curve is not None:
            reason += CURVE_NO_ANSWER
        if ignored:
            reason += (
                f"; ignored {len(ignored)} invalid message(s), the "
                f"last: {ignored[-1]}"
            )
        if request.writes:
            reason += f"; the {command} may or may not have taken effect"
        raise BrokerUnavailable(reason)

    def _receive(self, req, answer_time, ignored):
        """
        Wait for the answer to ``req``.

        :returns: the ``REPLY`` body, ``None`` on timeout, or
            :data:`_REFUSED` when nothing listens at the endpoint.
        """
        deadline = self._clock() + answer_time
        poller = zmq.Poller()
        poller.register(self._socket, zmq.POLLIN)
        poller.register(self._monitor, zmq.POLLIN)
        while True:
            if self._refused():
                return _REFUSED
            remaining = deadline - self._clock()
            if remaining <= 0:
                return None
            if not self._connected:
                # Look again when a refusal would count.
                remaining = min(
                    remaining,
                    max(0.01, self._opened_at + REFUSED_AFTER - self._clock()),
                )
            ready = dict(poller.poll(math.ceil(remaining * 1000)))
            if self._socket not in ready:
                continue
            frames = self._socket.recv_multipart(zmq.NOBLOCK)
            try:
                reply = read_reply(frames)
            except codec.ProtocolError as e:
                ignored.append(e.message)
                continue
            if reply.req != req:
                # An ERROR without req concerns a request the broker could
                # not read; with one request outstanding on this socket,
                # it is this one.
                if not (reply.req is None and reply.error is not None):
                    continue
            if reply.error is not None:
                raise reply.error
            return reply.body

    def _run(self, call):
        return run_call(call, self._send)

    def submit(
        self,
        handler,
        payload=None,
        priority=None,
        max_attempts=None,
        delay=None,
        unique_key=None,
        time_limit=None,
    ):
        """
        Submit one task.  The request is resent after a timeout; the broker
        recognises the copy and creates the task once.

        :param handler: ``str``, the handler's name.
        :param payload: any JSON value (at most 1 MiB encoded).
        :param priority: a level name, or ``None`` for the broker's default.
        :param max_attempts: ``int`` from 1 to 1000, or ``None`` for the
            broker's default.
        :param delay: seconds (≥ 0): the task runs no sooner than that long
            after it is accepted; ``None`` for as soon as possible.
        :param unique_key: a name, or ``None``: while a queued or running
            task holds the key, the broker answers with that task instead
            of creating another.
        :param time_limit: seconds (> 0) an attempt may run before the
            worker stops it, or ``None`` for the broker's default.
        :returns: a :class:`taskbroker.client.Submission` ``(task,
            unserved)``: the task object and the ``list`` of handler names
            no connected worker has (empty, or ``[handler]``); its
            ``existing`` is ``{task["id"]}`` if the task already existed
            (see :class:`~taskbroker.client.Submission`), else empty.
        :raises InvalidRequest: an argument is invalid; nothing was sent.
        :raises BrokerUnavailable: no answer (the task may exist).
        :raises RequestFailed: the broker refused it, e.g. code
            ``unknown_priority``.
        """
        result = self._run(
            submit_call(
                [
                    {
                        "handler": handler,
                        "payload": payload,
                        "priority": priority,
                        "max_attempts": max_attempts,
                        "delay": delay,
                        "unique_key": unique_key,
                        "time_limit": time_limit,
                    }
                ]
            )
        )
        tasks, unserved = result
        return Submission(
            tasks[0], unserved, result.existing, result.suggestions
        )

    def submit_many(self, specs):
        """
        Submit tasks in as few ``SUBMIT`` requests as the limits allow (at
        most 1000 tasks and about 2 MiB each).  Every spec is checked before
        anything is sent.  Each request is resent after a timeout; the
        broker recognises the copy and creates its tasks once.

        :param specs: an iterable of ``dict`` s with ``handler`` and
            optionally ``payload``, ``priority``, ``max_attempts``,
            ``delay``, ``unique_key``, ``time_limit`` (see :meth:`submit`).
        :returns: a :class:`taskbroker.client.Submission` ``(tasks,
            unserved)``: the ``list`` of task objects in the order of
            ``specs``, and the ``set`` of handler names no connected worker
            has; its ``existing`` holds the ids of the tasks that already
            existed.
        :raises InvalidRequest: a spec is invalid; nothing was sent.
        :raises ClientError: a request failed; the exception's
            ``submitted`` lists the tasks committed before.
        """
        result = self._run(submit_call(specs))
        tasks, unserved = result
        return Submission(
            tasks, set(unserved), result.existing, result.suggestions
        )

    def get(self, task_id):
        """
        :param task_id: ``int``.
        :returns: the task object.
        :raises TaskNotFound: no such task.
        :raises BrokerUnavailable: no answer.
        """
        return self._run(get_call(task_id))

    def wait(self, task_id, timeout=None):
        """
        Wait until a task is final.

        :param task_id: ``int``.
        :param timeout: seconds to wait in all, or ``None`` for ever.
        :returns: the final task object or, when ``timeout`` passes first,
            the task as it is then.
        :raises TaskNotFound: no such task.
        :raises BrokerUnavailable: a ``WAIT`` got no answer within its hold
            time plus the client's timeout.
        """
        return self._run(wait_call(task_id, timeout, self._clock))

    def list(
        self,
        state=None,
        handler=None,
        limit=100,
        priority=None,
        order="oldest",
        after=0,
        before=None,
    ):
        """
        :param state: a state to filter on, or ``None``.
        :param handler: a handler name to filter on, or ``None``.
        :param limit: the most tasks to return, or ``None`` for all.
        :param priority: a level name to filter on, or ``None``.
        :param order: ``"oldest"`` (lowest ids first) or ``"newest"``.
        :param after: only tasks with a greater id (``0``: from the first).
        :param before: only tasks with a smaller id, or ``None``.
        :returns: a ``list`` of task objects in that order.
        """
        return self._run(
            list_call(state, handler, limit, priority, order, after, before)
        )

    def cancel(self, task_id):
        """
        Cancel a queued or running task (the worker running it is told to
        stop).  Cancelling a cancelled task succeeds, so the request is
        resent after a timeout.

        :param task_id: ``int``.
        :returns: the task object, now cancelled.
        :raises TaskNotFound: no such task.
        :raises RequestFailed: code ``not_cancellable``: it succeeded or
            failed.
        :raises BrokerUnavailable: no answer (it may have been cancelled).
        """
        return self._run(cancel_call(task_id))

    def retry(self, task_id):
        """
        Queue a failed or cancelled task again, with all its attempts (see
        :func:`taskbroker.client.retry_call`).  Resent after a timeout.

        :param task_id: ``int``.
        :returns: the task object, queued or running.
        :raises TaskNotFound: no such task.
        :raises RequestFailed: code ``not_retryable``: it succeeded, or
            another live task holds its unique key.
        :raises BrokerUnavailable: no answer (it may have been queued).
        """
        return self._run(retry_call(task_id))

    def workers(self):
        """
        :returns: a ``list`` of worker ``dict`` s.
        :raises BrokerUnavailable: no answer.
        """
        return self._run(workers_call())

    def stats(self):
        """
        :returns: the broker's statistics ``dict``.
        :raises BrokerUnavailable: no answer.
        """
        return self._run(stats_call())
