# -*- test-case-name: tests.unit.test_client -*-
"""
The Twisted client of the broker: every method returns a Deferred.

Requests go out on one DEALER socket and may overlap; replies are matched
to their Deferreds by ``req``.  A request that gets no answer within the
timeout fails with :class:`~taskbroker.client.errors.BrokerUnavailable` and
is forgotten, so a late answer is discarded.

This client does not retry.  The blocking client's Lazy Pirate loop exists
because a script has nothing better to do while it waits; a Twisted program
has its own policy (a ``ClientService`` backoff, a user action, a retry on
the next timer tick) and its own idea of which of its requests are safe to
repeat, so a hidden loop here would only fight it.  Note that each call of
:meth:`BrokerClient.submit` is a new ``SUBMIT`` with a new ``request_id``:
calling it again after a timeout may create the task twice, unless it has
a ``unique_key``.

The one exception is a failover list of brokers that share one database:
a request that gets no answer from one broker within the timeout (or
cannot be queued to it) goes, unchanged, to the next broker of the list
that it has not tried, and fails only when every broker has had its
chance.  Unchanged means with the same ``req`` and, for a ``SUBMIT``, the
same ``request_id``, which the shared database recognises, so a resent
``SUBMIT`` creates its tasks once.  The client starts at a random broker
of the list and moves to the next when one does not answer; later
requests go where it moved.  Each broker gets its own socket, opened on
first use, so a late answer from a broker left behind still arrives, and
the first answer to a request wins.
"""

import random
from uuid import uuid4

from twisted.internet.defer import Deferred, ensureDeferred, fail, succeed
from twisted.logger import Logger

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
    stats_call,
    submit_call,
    wait_call,
    workers_call,
)
from taskbroker.client.errors import BrokerUnavailable
from taskbroker.failover import EndpointRing, parse_endpoints
from taskbroker.protocol import codec
from taskbroker.transport.options import client_options, curve_client_options
from taskbroker.transport.zmq import DealerSocket, ZmqFactoryService

__all__ = ["BrokerClient"]


class _Pending:
    """
    A request waiting for its answer: its ``Deferred``, the timer of its
    current try, its frames, and the brokers it was sent to, in order.
    """

    __slots__ = ("deferred", "timer", "request", "frames", "tried")

    def __init__(self, deferred, request, frames):
        self.deferred = deferred
        self.timer = None
        self.request = request
        self.frames = frames
        self.tried = []

    def stop_timer(self):
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None


class BrokerClient(HousekeepingMethods):
    """
    An asynchronous connection to a broker, or to one of a failover list
    of brokers.

    :ivar endpoints: the ``tuple`` of the brokers' endpoints.
    :ivar endpoint: the endpoint new requests go to.
    :ivar timeout: seconds to wait for each answer.
    """

    log = Logger()

    def __init__(
        self,
        reactor,
        endpoint,
        timeout=5.0,
        zmq_factory=None,
        start=None,
        curve_server_key=None,
        curve_secret_key=None,
    ):
        """
        :param reactor: provides ``IReactorTime`` (for timeouts and waits)
            and, when ``zmq_factory`` is ``None``, the reactor the ZeroMQ
            socket is driven by.
        :param endpoint: ``str``, e.g. ``"tcp://127.0.0.1:5555"``; or a
            failover list of brokers sharing one database, as a
            comma-separated ``str`` or a ``list`` of ``str``.
        :param timeout: seconds (> 0) to wait for each answer; a ``WAIT``
            gets its own hold time on top.
        :param zmq_factory: a ``txzmq.ZmqFactory`` shared with other
            sockets; by default the client owns one and shuts it down on
            :meth:`close`.
        :param start: the index in the list of the first broker to use;
            ``None`` for a random one.
        :param curve_server_key: with ``curve_secret_key``, CURVE: the
            path of the broker's public key file (``NAME.key``, from
            ``taskbroker keygen``).  Requests are encrypted, and go only
            to a broker that holds its secret key (every broker of a
            failover list holds the same one).  ``None`` (the default)
            for plain links.
        :param curve_secret_key: the path of this client's own key pair,
            the ``NAME.key_secret`` file, readable by its owner only; the
            broker must have ``NAME.key`` among its authorized clients.
            Both files are read here, before anything else is opened.
        :raises ValueError: ``timeout`` or ``endpoint`` is invalid.
        :raises taskbroker.client.errors.InvalidKeys: (a ``ValueError``
            and a :class:`~taskbroker.errors.ConfigError`) one key file
            without the other, or one that cannot be used.
        """
        if not timeout > 0:
            raise ValueError(
                f"timeout must be a positive number, not {timeout!r}"
            )
        endpoints = parse_endpoints(endpoint)
        self._curve = load_keys(curve_server_key, curve_secret_key)
        self._ring = EndpointRing(
            endpoints,
            random.randrange(len(endpoints)) if start is None else start,
        )
        self._reactor = reactor
        self.timeout = timeout
        #: req -> _Pending
        self._pending = {}
        #: endpoint -> DealerSocket, opened on first use
        self._sockets = {}
        self._closed = False
        self._factory_service = None
        if zmq_factory is None:
            self._factory_service = ZmqFactoryService(reactor)
            self._factory_service.startService()
            zmq_factory = self._factory_service.get_factory()
        self._zmq_factory = zmq_factory
        try:
            self._socket_for(self.endpoint)
        except BaseException:
            if self._factory_service is not None:
                self._factory_service.stopService()
            raise

    @property
    def endpoints(self):
        return self._ring.endpoints

    @property
    def endpoint(self):
        return self._ring.current

    def _socket_for(self, endpoint):
        socket = self._sockets.get(endpoint)
        if socket is None:
            options = client_options()
            if self._curve is not None:
                options += curve_client_options(*self._curve)
            socket = self._sockets[endpoint] = DealerSocket(
                self._zmq_factory,
                endpoint,
                lambda frames: self._message_received(frames, endpoint),
                options=options,
            )
        return socket

    def close(self):
        """
        Close the sockets (and the ZeroMQ factory if the client owns it).
        Outstanding requests fail with ``BrokerUnavailable``.  Safe to call
        twice.

        :returns: a ``Deferred`` that fires with ``None`` once closed.
        """
        if self._closed:
            return succeed(None)
        self._closed = True
        pending, self._pending = self._pending, {}
        for entry in pending.values():
            entry.stop_timer()
            entry.deferred.errback(
                BrokerUnavailable(
                    "the client was closed before the broker answered"
                )
            )
        for socket in self._sockets.values():
            socket.close()
        if self._factory_service is not None:
            self._factory_service.stopService()
        return succeed(None)

    def _send(self, request):
        """
        Send one request.

        :param request: a :class:`taskbroker.client.Request`.
        :returns: a ``Deferred`` firing with the ``REPLY`` body, or failing
            with ``RequestFailed``, ``BrokerUnavailable`` or
            ``InvalidRequest``.  Cancelling it forgets the request.
        """
        if self._closed:
            return fail(RuntimeError("the client is closed"))
        req = uuid4().hex
        try:
            frames = encode_request(req, request)
        except Exception:
            return fail()
        d = Deferred(lambda d: self._forget(req))
        self._pending[req] = _Pending(d, request, frames)
        self._transmit(req, self.endpoint)
        return d

    def _transmit(self, req, endpoint):
        """
        Send (or resend) a pending request to one broker, and time it.
        """
        entry = self._pending[req]
        entry.tried.append(endpoint)
        entry.timer = self._reactor.callLater(
            self.timeout + entry.request.extra_time, self._timed_out, req
        )
        if not self._socket_for(endpoint).send(entry.frames):
            self._no_answer(req, "its queue is full")

    def _forget(self, req):
        entry = self._pending.pop(req, None)
        if entry is not None:
            entry.stop_timer()

    def _timed_out(self, req):
        entry = self._pending.get(req)
        if entry is None:
            return
        entry.timer = None
        self._no_answer(
            req,
            f"no answer within {self.timeout + entry.request.extra_time:g} s",
        )

    def _no_answer(self, req, why):
        """
        The broker a request was last sent to did not take it or did not
        answer: send it to the next broker of the list it has not tried,
        or fail it.
        """
        entry = self._pending[req]
        entry.stop_timer()
        left = entry.tried[-1]
        if self._ring.current == left:
            # New requests, too, go to the next broker from now on.
            self._ring.advance()
        untried = [e for e in self._rotation() if e not in entry.tried]
        command = entry.request.command.decode("ascii")
        if untried:
            self.log.warn(
                "{command} to {left}: {why}; trying {endpoint}",
                command=command,
                left=left,
                why=why,
                endpoint=untried[0],
            )
            self._transmit(req, untried[0])
            return
        del self._pending[req]
        if why == "its queue is full":
            reason = f"cannot send to {left}: its queue is full"
        else:
            reason = (
                f"no answer from {', '.join(entry.tried)} within "
                f"{self.timeout + entry.request.extra_time:g} s "
                f"to {command}"
            )
            if self._curve is not None:
                reason += CURVE_NO_ANSWER
        if entry.request.writes:
            reason += f"; the {command} may or may not have taken effect"
        entry.deferred.errback(BrokerUnavailable(reason))

    def _rotation(self):
        """
        The endpoints in the order to try them, from the current one.
        """
        endpoints, position = self._ring.endpoints, self._ring.position
        return endpoints[position:] + endpoints[:position]

    def _message_received(self, frames, endpoint):
        try:
            reply = read_reply(frames)
        except codec.ProtocolError as e:
            self.log.warn(
                "ignored an invalid message from {endpoint}: {reason}",
                endpoint=endpoint,
                reason=e.message,
            )
            return
        req = reply.req
        if req is None and len(self._pending) == 1:
            # An ERROR without req concerns a request the broker could not
            # read; with a single one outstanding, it can only be that one.
            [req] = self._pending
        entry = self._pending.pop(req, None)
        if entry is None:
            self.log.info(
                "discarded an answer to no outstanding request ({req}): "
                "it came after the timeout, or was an ERROR without req "
                "({error})",
                req=reply.req,
                error=reply.error,
            )
            return
        entry.stop_timer()
        if reply.error is not None:
            entry.deferred.errback(reply.error)
        else:
            entry.deferred.callback(reply.body)

    def _run(self, call):
        return ensureDeferred(self._drive(call))

    async def _drive(self, call):
        try:
            request = next(call)
            while True:
                try:
                    reply = await self._send(request)
                except Exception as e:
                    request = call.throw(e)
                else:
                    request = call.send(reply)
        except StopIteration as stop:
            return stop.value

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
        Submit one task.

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
        :returns: a ``Deferred`` firing with a
            :class:`taskbroker.client.Submission` ``(task, unserved)``: the
            task object and the ``list`` of handler names no connected
            worker has; its ``existing`` is ``{task["id"]}`` if the task
            already existed, else empty.  It fails with ``InvalidRequest``
            (nothing sent), ``RequestFailed`` (e.g. ``unknown_priority``)
            or ``BrokerUnavailable`` (the task may exist).
        """
        d = self._run(
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
        return d.addCallback(
            lambda result: Submission(
                result[0][0], result[1], result.existing, result.suggestions
            )
        )

    def submit_many(self, specs):
        """
        Submit tasks in as few ``SUBMIT`` requests as the limits allow, one
        after another.  Every spec is checked before anything is sent.

        :param specs: an iterable of ``dict`` s with ``handler`` and
            optionally ``payload``, ``priority``, ``max_attempts``,
            ``delay``, ``unique_key``, ``time_limit`` (see :meth:`submit`).
        :returns: a ``Deferred`` firing with a
            :class:`taskbroker.client.Submission` ``(tasks, unserved)``:
            the ``list`` of task objects in order and the ``set`` of
            handler names no connected worker has, with ``existing`` the
            ids of the tasks that already existed.  On failure the
            exception's ``submitted`` lists the tasks committed before.
        """
        d = self._run(submit_call(specs))
        return d.addCallback(
            lambda result: Submission(
                result[0], set(result[1]), result.existing, result.suggestions
            )
        )

    def get(self, task_id):
        """
        :param task_id: ``int``.
        :returns: a ``Deferred`` firing with the task object, or failing
            with ``TaskNotFound`` or ``BrokerUnavailable``.
        """
        return self._run(get_call(task_id))

    def wait(self, task_id, timeout=None):
        """
        Wait until a task is final, with as many ``WAIT`` requests as
        needed.

        :param task_id: ``int``.
        :param timeout: seconds to wait in all, or ``None`` for ever.
        :returns: a ``Deferred`` firing with the final task object or, when
            ``timeout`` passes first, with the task as it is then; failing
            with ``TaskNotFound``, or ``BrokerUnavailable`` when a ``WAIT``
            gets no answer within its hold time plus the client's timeout.
        """
        return self._run(wait_call(task_id, timeout, self._reactor.seconds))

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
        :returns: a ``Deferred`` firing with a ``list`` of task objects,
            in that order.
        """
        return self._run(
            list_call(state, handler, limit, priority, order, after, before)
        )

    def cancel(self, task_id):
        """
        Cancel a queued or running task (the worker running it is told to
        stop).  Cancelling a cancelled task succeeds, so this is safe to
        call again after a timeout.

        :param task_id: ``int``.
        :returns: a ``Deferred`` firing with the cancelled task object, or
            failing with ``TaskNotFound``, ``RequestFailed`` (code
            ``not_cancellable``: it succeeded or failed) or
            ``BrokerUnavailable``.
        """
        return self._run(cancel_call(task_id))

    def retry(self, task_id):
        """
        Queue a failed or cancelled task again, with all its attempts.

        :param task_id: ``int``.
        :returns: a ``Deferred`` firing with the task object, queued or
            running, or failing with ``TaskNotFound``, ``RequestFailed``
            (code ``not_retryable``: it succeeded, or another live task
            holds its unique key) or ``BrokerUnavailable`` (it may have
            been queued).
        """
        return self._run(retry_call(task_id))

    def workers(self):
        """
        :returns: a ``Deferred`` firing with a ``list`` of worker ``dict`` s.
        """
        return self._run(workers_call())

    def stats(self):
        """
        :returns: a ``Deferred`` firing with the broker's statistics
            ``dict``.
        """
        return self._run(stats_call())
