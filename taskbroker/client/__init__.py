# -*- test-case-name: tests.unit.test_client -*-
"""
Clients of the broker's client protocol (docs/protocol.rst, "Clients").

- :class:`taskbroker.client.blocking.BlockingClient`: plain pyzmq, no
  reactor, with "Lazy Pirate" retries; for scripts and the CLI.
- :class:`taskbroker.client.api.BrokerClient`: Twisted, Deferred-returning.

Both clients run the *calls* defined here, which do no I/O.  A call is a
generator: it yields a :class:`Request`, is sent back the body of the
broker's ``REPLY`` (or has the client's error thrown into it), and returns
the result.  Building requests, checking them before they leave, splitting
big submissions, paging ``LIST``, looping ``WAIT`` and checking replies
therefore exist once; the two clients only move frames and keep time.
"""

import json
import os
import sys
from collections import Counter, namedtuple
from uuid import uuid4

from taskbroker import curve
from taskbroker.client.errors import (
    BrokerUnavailable,
    ClientError,
    InvalidKeys,
    InvalidRequest,
    RequestFailed,
    TaskNotFound,
    error_for_code,
)
from taskbroker.errors import ConfigError, one_line
from taskbroker.protocol import codec

__all__ = [
    "BrokerUnavailable",
    "ClientError",
    "InvalidKeys",
    "InvalidRequest",
    "RequestFailed",
    "TaskNotFound",
    "FINAL_STATES",
    "Request",
    "Reply",
    "Submission",
    "check_task_spec",
    "load_keys",
    "encode_request",
    "read_reply",
    "run_call",
    "submit_call",
    "get_call",
    "wait_call",
    "list_call",
    "cancel_call",
    "retry_call",
    "workers_call",
    "stats_call",
    "schedule_add_call",
    "schedule_list_call",
    "schedule_remove_call",
    "schedule_pause_call",
    "purge_call",
    "cancel_many_call",
    "retry_many_call",
    "HousekeepingMethods",
]

#: The states a task never leaves.
FINAL_STATES = frozenset({"succeeded", "failed", "cancelled"})

#: The longest one WAIT asks the broker to hold (seconds).  Below the
#: protocol's maximum, so that a client notices a vanished broker within
#: this plus its own timeout.
WAIT_SLICE = 30.0

#: The most encoded task bytes one SUBMIT carries, unless it is one task:
#: the largest task (a payload of MAX_PAYLOAD_SIZE and its fields) then
#: travels alone, and either way the SUBMIT fits the message limit.
SUBMIT_CHUNK_BYTES = codec.MAX_PAYLOAD_SIZE

# Replies are not subject to the request limit: a LIST page or a task with
# a large result may exceed it, and dropping it would look like a timeout.
_NO_SIZE_LIMIT = sys.maxsize

_SPEC_KEYS = (
    "handler",
    "payload",
    "priority",
    "max_attempts",
    "delay",
    "unique_key",
    "time_limit",
)

# The check of a SUBMIT's task list, run on a task before it is encoded
# when it cannot be (a NaN delay), for the message that names the field.
_CHECK_TASKS = codec.CLIENT_COMMANDS[b"SUBMIT"]["tasks"][0]

_SUBMIT_ONLY = {b"SUBMIT": codec.CLIENT_COMMANDS[b"SUBMIT"]}

#: Added to the reason of a request that got no answer, with CURVE: a
#: failed handshake is not reported to the socket's user.
CURVE_NO_ANSWER = (
    "; with CURVE, a wrong server key or a key the broker "
    "does not admit gets no answer either"
)


def load_keys(curve_server_key, curve_secret_key):
    """
    Read a client's CURVE keys.

    :param curve_server_key: the path of the broker's public key file
        (``NAME.key``), or ``None``.
    :param curve_secret_key: the path of the client's own key pair
        (``NAME.key_secret``, readable by its owner only), or ``None``;
        both or neither.
    :returns: ``None`` without CURVE, else ``(server, public, secret)``,
        Z85 ``bytes`` each.
    :raises InvalidKeys: with one line naming the argument and the file.
    """
    paths = [
        None if path is None else os.fspath(path)
        for path in (curve_server_key, curve_secret_key)
    ]
    try:
        return curve.load_peer_keys(
            *paths, "client", "curve_server_key", "curve_secret_key"
        )
    except ConfigError as e:
        raise InvalidKeys(str(e)) from None


class Request(
    namedtuple("Request", "command fields idempotent extra_time writes")
):
    """
    One request a call wants sent.

    :ivar command: ``bytes``, e.g. ``b"GET"``.
    :ivar fields: ``dict`` of the body's fields except ``req``, which the
        client adds.
    :ivar idempotent: ``True`` if sending it twice does no harm, so a
        client may resend it (the same frames) after a timeout.
    :ivar extra_time: seconds the broker may hold it before answering
        (a ``WAIT``'s timeout), added to the client's answer timeout.
    :ivar writes: ``True`` if it changes the broker's state (``SUBMIT``,
        ``CANCEL``, ``RETRY``): when no answer comes, its outcome is
        unknown, and the client says so.
    """

    __slots__ = ()

    def __new__(
        cls, command, fields, idempotent=True, extra_time=0.0, writes=False
    ):
        return super().__new__(
            cls, command, fields, idempotent, extra_time, writes
        )


class Reply(namedtuple("Reply", "req body error")):
    """
    A message from the broker, checked.

    :ivar req: the request id it answers, or ``None`` (an ``ERROR`` about
        a request the broker could not read).
    :ivar body: for a ``REPLY``, the whole body ``dict``; else ``None``.
    :ivar error: for an ``ERROR``, the :class:`RequestFailed` to raise;
        else ``None``.
    """

    __slots__ = ()


class Submission(tuple):
    """
    What a submission returns: a pair that unpacks as ``(tasks, unserved)``
    (``(task, unserved)`` for a single task), with the tasks that were not
    created by it.

    :ivar existing: a ``frozenset`` of the ids, among the returned tasks,
        that this submission did not create: the broker reported them as
        already existing because a live task held the spec's
        ``unique_key``, or because it had already carried out this very
        ``SUBMIT`` (its ``request_id``), whose reply was lost and which the
        client sent again (the broker does not say which of the two).  A
        task this submission created is not in it, even when a later spec
        with the same ``unique_key`` got it again: then the id is repeated
        in the tasks.
    :ivar suggestions: a ``dict``: an unserved handler name -> the name,
        among those the connected workers have, that it was probably meant
        to be (a few edits away).
    """

    def __new__(cls, tasks, unserved, existing=frozenset(), suggestions=None):
        self = super().__new__(cls, (tasks, unserved))
        self.existing = frozenset(existing)
        self.suggestions = dict(suggestions or {})
        return self

    def __repr__(self):
        return (
            f"Submission({self[0]!r}, {self[1]!r}, "
            f"existing={sorted(self.existing)!r})"
        )


def encode_request(req, request):
    """
    The frames of a request, checked as the broker will check them.

    :param req: ``str``, the request id.
    :param request: a :class:`Request`.
    :returns: a ``list`` of ``bytes`` frames.
    :raises InvalidRequest: the broker would refuse it; nothing is sent.
    """
    try:
        frames = codec.encode(request.command, {"req": req, **request.fields})
    except (TypeError, ValueError) as e:
        raise InvalidRequest("bad_request", f"not JSON: {e}") from None
    size = sum(map(len, frames))
    if size > codec.MAX_MESSAGE_SIZE:
        # The broker's ZMQ_MAXMSGSIZE makes libzmq drop the connection on
        # such a message: there would be no ERROR, only a timeout.
        raise InvalidRequest(
            "too_large",
            f"request of {size} bytes exceeds the limit of "
            f"{codec.MAX_MESSAGE_SIZE}",
        )
    try:
        codec.decode(frames, codec.CLIENT_COMMANDS)
    except codec.ProtocolError as e:
        raise InvalidRequest(e.code, e.message) from None
    return frames


def read_reply(frames):
    """
    Check a message from the broker.

    :param frames: the ``list`` of ``bytes`` frames received.
    :returns: a :class:`Reply`.
    :raises taskbroker.protocol.codec.ProtocolError: not a valid ``REPLY``
        or ``ERROR``; clients discard such a message.
    """
    command, checked = codec.decode(
        frames, codec.BROKER_TO_CLIENT_COMMANDS, max_size=_NO_SIZE_LIMIT
    )
    if command == b"ERROR":
        return Reply(
            checked.get("req"),
            None,
            error_for_code(checked["code"], one_line(checked["message"])),
        )
    # The codec's table declares only ``req`` for REPLY and drops every
    # other field; the body is known to be a JSON object, so read it whole.
    return Reply(checked["req"], json.loads(frames[2]), None)


def run_call(call, send):
    """
    Run a call synchronously.

    :param call: a call generator, such as ``get_call(1)``.
    :param send: a callable taking a :class:`Request` and returning the
        ``REPLY`` body or raising.
    :returns: what the call returns.
    """
    try:
        request = next(call)
        while True:
            try:
                reply = send(request)
            except Exception as e:
                request = call.throw(e)
            else:
                request = call.send(reply)
    except StopIteration as stop:
        return stop.value


def _malformed(what):
    # The broker answered, but not as the protocol says: a bug or an
    # incompatible version.  Code "protocol" is what the broker uses for
    # the same situation the other way round.
    return RequestFailed(
        "protocol", f"malformed reply from the broker: {what}"
    )


def _task_of(body):
    task = body.get("task")
    if not isinstance(task, dict) or "id" not in task or "state" not in task:
        raise _malformed("no valid 'task'")
    return task


def _task_id(task_id):
    # bool is an int, and True would pass the codec's range check as 1.
    if type(task_id) is not int:
        raise InvalidRequest(
            "bad_request", f"task id must be an integer, not {task_id!r}"
        )
    return task_id


def check_task_spec(spec):
    """
    Check one task to submit and give it every field.

    :param spec: a ``dict`` with ``handler`` and optionally ``payload``,
        ``priority`` (a level name, or ``None`` for the broker's default),
        ``max_attempts`` (``None`` for the broker's default), ``delay``
        (seconds ≥ 0: the task runs no sooner than that long after it is
        accepted), ``unique_key`` (a name: while a queued or running task
        holds it, submitting another with it gives that task instead of a
        new one) and ``time_limit`` (seconds > 0 an attempt may run; by
        default the broker's).
    :returns: ``(task, size)``: the task ``dict`` with exactly those seven
        keys, and its encoded size in bytes.
    :raises InvalidRequest: the broker would refuse it (priority levels are
        not known here: the broker checks them).
    """
    if not isinstance(spec, dict):
        raise InvalidRequest("bad_request", "a task must be a JSON object")
    unknown = sorted(set(spec) - set(_SPEC_KEYS))
    if unknown:
        raise InvalidRequest(
            "bad_request",
            "unknown field "
            + ", ".join(map(repr, unknown))
            + " (expected "
            + ", ".join(_SPEC_KEYS)
            + ")",
        )
    task = {key: spec.get(key) for key in _SPEC_KEYS}
    try:
        codec.check_depth(task["payload"])
    except ValueError as e:
        raise InvalidRequest("bad_request", f"field 'payload' {e}") from None
    try:
        payload_size = len(codec.dumps(task["payload"]).encode("utf-8"))
    except (TypeError, ValueError) as e:
        raise InvalidRequest(
            "bad_request", f"field 'payload' is not JSON: {e}"
        ) from None
    if payload_size > codec.MAX_PAYLOAD_SIZE:
        raise InvalidRequest(
            "too_large",
            f"payload of {payload_size} bytes exceeds the limit of "
            f"{codec.MAX_PAYLOAD_SIZE}",
        )
    try:
        text = codec.dumps(task)
    except (TypeError, ValueError) as e:
        # A field other than the payload is not JSON (NaN, a set): let the
        # codec's check name it, else say so plainly.
        try:
            _CHECK_TASKS([task])
        except codec.ProtocolError as refused:
            raise InvalidRequest(
                refused.code, refused.message.removeprefix("task: ")
            ) from None
        raise InvalidRequest("bad_request", f"not JSON: {e}") from None
    try:
        codec.decode(
            codec.encode(b"SUBMIT", '{"req":"-","tasks":[' + text + "]}"),
            _SUBMIT_ONLY,
            max_size=_NO_SIZE_LIMIT,
        )
    except codec.ProtocolError as e:
        raise InvalidRequest(
            e.code, e.message.removeprefix("task: ")
        ) from None
    return task, len(text.encode("utf-8"))


def _chunks(specs):
    """
    Check every spec, then split them into SUBMIT-sized lists, so that a bad
    spec anywhere stops the submission before anything is committed.
    """
    specs = list(specs)
    chunks, chunk, chunk_size = [], [], 0
    for index, spec in enumerate(specs):
        try:
            task, size = check_task_spec(spec)
        except InvalidRequest as e:
            if len(specs) == 1:
                raise
            raise InvalidRequest(
                e.code, f"task {index}: {e.message}"
            ) from None
        # One separating comma per task; the envelope is far below the slack
        # between SUBMIT_CHUNK_BYTES and the message limit.
        if chunk and (
            len(chunk) == codec.MAX_BATCH
            or chunk_size + size + 1 > SUBMIT_CHUNK_BYTES
        ):
            chunks.append(chunk)
            chunk, chunk_size = [], 0
        chunk.append(task)
        chunk_size += size + 1
    if chunk:
        chunks.append(chunk)
    return chunks


def submit_call(specs):
    """
    Submit tasks, in as many ``SUBMIT`` requests as the limits need.

    Each request carries its own ``request_id`` (a random hex string), so
    that the broker answers a copy of a request it already carried out
    with the tasks it created the first time: a client may resend a
    ``SUBMIT`` whose reply was lost without creating its tasks twice.

    :param specs: an iterable of task ``dict`` s (see
        :func:`check_task_spec`).
    :returns: a :class:`Submission` ``(tasks, unserved)``: the task objects
        in the order of ``specs``, and the ``list`` of handler names that
        no connected worker has, without duplicates; its ``existing`` holds
        the ids of the tasks that already existed.
    :raises InvalidRequest: a spec is invalid (its index is in the
        message when there are several); nothing was sent.
    :raises ClientError: a request failed; its ``submitted`` attribute
        lists the tasks that earlier requests committed.
    """
    chunks = _chunks(specs)
    tasks, unserved, existing, created = [], {}, set(), set()
    suggestions = {}
    for chunk in chunks:
        try:
            body = yield Request(
                b"SUBMIT",
                {"tasks": chunk, "request_id": uuid4().hex},
                writes=True,
            )
            got = body.get("tasks")
            if not isinstance(got, list) or not all(
                isinstance(task, dict) and "id" in task for task in got
            ):
                raise _malformed(f"expected {len(chunk)} task objects")
            if len(got) != len(chunk):
                raise _malformed(
                    f"expected {len(chunk)} task objects, got {len(got)}; "
                    "list the tasks to see which exist"
                )
            names = body.get("unserved") or []
            if not isinstance(names, list) or not all(
                isinstance(name, str) for name in names
            ):
                raise _malformed("'unserved' is not a list of names")
            # A broker older than 'existing' creates every task.
            old = body.get("existing") or []
            if not isinstance(old, list) or not all(
                type(task_id) is int for task_id in old
            ):
                raise _malformed("'existing' is not a list of task ids")
            # ... and one older than 'suggestions' suggests nothing.
            meant = body.get("suggestions") or {}
            if not isinstance(meant, dict) or not all(
                isinstance(name, str) for name in meant.values()
            ):
                raise _malformed("'suggestions' is not an object of names")
        except ClientError as e:
            e.submitted = list(tasks)
            raise
        tasks.extend(got)
        unserved.update(dict.fromkeys(names))
        suggestions.update(meant)
        # 'existing' has one entry per task that was not created: an id
        # that the tasks hold more often than it is listed was created by
        # this request (for its first spec with that unique_key).
        listed = Counter(old)
        for task_id, count in Counter(task["id"] for task in got).items():
            (existing if listed[task_id] >= count else created).add(task_id)
    return Submission(tasks, list(unserved), existing - created, suggestions)


def get_call(task_id):
    """
    :param task_id: ``int``.
    :returns: the task object.
    :raises TaskNotFound: no such task.
    """
    body = yield Request(b"GET", {"id": _task_id(task_id)})
    return _task_of(body)


def wait_call(task_id, timeout, clock):
    """
    Wait for a task to reach a final state, one ``WAIT`` of at most
    :data:`WAIT_SLICE` seconds after another.

    :param task_id: ``int``.
    :param timeout: seconds to wait in all, or ``None`` for no limit.
    :param clock: a callable returning the current time in seconds.
    :returns: the task object once it is final or, if ``timeout`` passed
        first, as it was then.
    :raises TaskNotFound: no such task.
    """
    task_id = _task_id(task_id)
    if timeout is not None and not timeout >= 0:
        raise InvalidRequest("bad_request", "the wait timeout must be >= 0")
    deadline = None if timeout is None else clock() + timeout
    while True:
        if deadline is None:
            wait = WAIT_SLICE
        else:
            wait = max(0.0, min(WAIT_SLICE, deadline - clock()))
        body = yield Request(
            b"WAIT", {"id": task_id, "timeout": wait}, extra_time=wait
        )
        task = _task_of(body)
        if task["state"] in FINAL_STATES:
            return task
        if deadline is not None and clock() >= deadline:
            return task


def list_call(
    state=None,
    handler=None,
    limit=100,
    priority=None,
    order="oldest",
    after=0,
    before=None,
):
    """
    List tasks by id, following ``next`` from page to page.

    :param state: a state name to filter on, or ``None``.
    :param handler: a handler name to filter on, or ``None``.
    :param priority: a level name to filter on, or ``None``.
    :param limit: the most tasks to return (``int`` ≥ 1), or ``None`` for
        all.
    :param order: ``"oldest"`` (lowest ids first) or ``"newest"``.
    :param after: only tasks with a greater id (``0``: from the first).
    :param before: only tasks with a smaller id, or ``None``.
    :returns: a ``list`` of task objects in that order.
    :raises InvalidRequest: for a bad argument.
    :raises RequestFailed: code ``protocol``, when ``order`` is
        ``"newest"`` and the broker is too old to list that way.
    """
    if limit is not None and (type(limit) is not int or limit < 1):
        raise InvalidRequest("bad_request", "limit must be an integer >= 1")
    if order not in ("oldest", "newest"):
        raise InvalidRequest(
            "bad_request", f"order must be oldest or newest, not {order!r}"
        )
    tasks = []
    while limit is None or len(tasks) < limit:
        page = (
            codec.MAX_LIST
            if limit is None
            else min(codec.MAX_LIST, limit - len(tasks))
        )
        body = yield Request(
            b"LIST",
            {
                "state": state,
                "handler": handler,
                "priority": priority,
                "order": order,
                "after": after,
                "before": before,
                "limit": page,
            },
        )
        if order == "newest" and body.get("order") != "newest":
            raise RequestFailed(
                "protocol",
                "this broker cannot list newest first (it is "
                "older than that); list oldest first",
            )
        got, following = body.get("tasks"), body.get("next")
        if not isinstance(got, list) or not all(
            isinstance(task, dict) for task in got
        ):
            raise _malformed("no 'tasks' list")
        tasks.extend(got)
        if following is None:
            break
        # A 'next' that does not move on would page forever.
        if type(following) is not int or (
            following <= after
            if order == "oldest"
            else before is not None and following >= before
        ):
            raise _malformed(f"'next' {following!r} does not move on")
        if order == "oldest":
            after = following
        else:
            before = following
    return tasks if limit is None else tasks[:limit]


def cancel_call(task_id):
    """
    Cancel a queued or running task (the broker tells the worker running it
    to stop).  A task that is already cancelled is answered the same way,
    so the request may be resent.

    :param task_id: ``int``.
    :returns: the task object, now cancelled.
    :raises TaskNotFound: no such task.
    :raises RequestFailed: code ``not_cancellable`` if it succeeded or
        failed.
    """
    body = yield Request(b"CANCEL", {"id": _task_id(task_id)}, writes=True)
    return _task_of(body)


def retry_call(task_id):
    """
    Queue a failed or cancelled task again, with all its attempts.  A task
    that is already queued or running is answered as it is, so the request
    is safe to resend.

    :param task_id: ``int``.
    :returns: the task object, queued or running.
    :raises TaskNotFound: no such task.
    :raises RequestFailed: code ``not_retryable`` if it succeeded, if
        another queued or running task holds its ``unique_key``, or if it
        cannot run (a row inserted with SQL that fails validation).
    """
    task_id = _task_id(task_id)
    body = yield Request(b"RETRY", {"id": task_id}, writes=True)
    task = _task_of(body)
    if task["state"] in ("failed", "cancelled"):
        key = task.get("unique_key")
        raise RequestFailed(
            "not_retryable",
            f"task {task_id} is still {task['state']}: the broker did not "
            "queue it again"
            + (
                f" (another queued or running task holds its unique key "
                f"{key!r})"
                if key is not None
                else ""
            ),
        )
    return task


def workers_call():
    """
    :returns: a ``list`` of worker ``dict`` s (``name``, ``priorities``,
        ``handlers``, ``slots``, ``busy``, ``connected_since``,
        ``last_seen``).
    """
    body = yield Request(b"WORKERS", {})
    workers = body.get("workers")
    if not isinstance(workers, list) or not all(
        isinstance(worker, dict) for worker in workers
    ):
        raise _malformed("no 'workers' list")
    return workers


def stats_call():
    """
    :returns: the ``stats`` ``dict`` (see docs/protocol.rst, ``STATS``).
    """
    body = yield Request(b"STATS", {})
    stats = body.get("stats")
    if not isinstance(stats, dict):
        raise _malformed("no 'stats' object")
    return stats


# -- schedules ---------------------------------------------------------------


def _schedule_of(body):
    schedule = body.get("schedule")
    if not isinstance(schedule, dict) or "name" not in schedule:
        raise _malformed("no valid 'schedule'")
    return schedule


def schedule_add_call(
    name,
    handler,
    every=None,
    cron=None,
    payload=None,
    priority=None,
    timezone=None,
    skip_if_running=False,
    max_attempts=None,
    time_limit=None,
    replace=False,
):
    """
    Add a periodic task: ``handler`` with ``payload``, every ``every``
    seconds or at the times of the cron expression ``cron`` (``MIN HOUR
    DOM MON DOW``) in the wall time of ``timezone`` (an IANA name; UTC by
    default).  With ``skip_if_running``, a tick whose previous task is
    still queued or running enqueues nothing.  Not resent after a
    timeout unless ``replace`` (a resent add would find its own schedule
    and fail with ``exists``).

    :returns: the schedule object.
    :raises InvalidRequest: a bad name, expression or value; nothing was
        sent.
    :raises RequestFailed: code ``exists`` (a schedule of that name),
        ``bad_schedule``, ``unknown_priority`` or ``forbidden`` (under
        CURVE, for keys that are not an admin's).
    """
    if (every is None) == (cron is None):
        raise InvalidRequest(
            "bad_request", "give every (seconds) or cron, and not both"
        )
    body = yield Request(
        b"SCHEDULE_ADD",
        {
            "name": name,
            "handler": handler,
            "every": every,
            "cron": cron,
            "payload": payload,
            "priority": priority,
            "timezone": timezone,
            "skip_if_running": bool(skip_if_running),
            "max_attempts": max_attempts,
            "time_limit": time_limit,
            "replace": bool(replace),
        },
        idempotent=bool(replace),
        writes=True,
    )
    return _schedule_of(body)


def schedule_list_call():
    """
    :returns: a ``list`` of schedule objects, by name.
    """
    body = yield Request(b"SCHEDULE_LIST", {})
    schedules = body.get("schedules")
    if not isinstance(schedules, list) or not all(
        isinstance(schedule, dict) for schedule in schedules
    ):
        raise _malformed("no 'schedules' list")
    return schedules


def schedule_remove_call(name):
    """
    Remove a schedule; the tasks it enqueued stay.

    :raises RequestFailed: code ``not_found``.
    """
    yield Request(
        b"SCHEDULE_REMOVE", {"name": name}, idempotent=False, writes=True
    )


def schedule_pause_call(name, paused=True):
    """
    Pause a schedule, or resume it (``paused=False``): it next comes due
    at its first tick from now, and the ticks missed while it was paused
    are not enqueued.

    :returns: the schedule object.
    :raises RequestFailed: code ``not_found``.
    """
    body = yield Request(
        b"SCHEDULE_PAUSE" if paused else b"SCHEDULE_RESUME",
        {"name": name},
        writes=True,
    )
    return _schedule_of(body)


# -- many tasks at once --------------------------------------------------------


def purge_call(older_than, state=None, handler=None):
    """
    Delete the finished tasks (succeeded, failed or cancelled, or only
    ``state``) that finished over ``older_than`` seconds ago, of
    ``handler`` if given: a request per 2,000 at most, until none is left.
    Under CURVE, a client key deletes only its own tasks.

    :returns: how many it deleted (``int``).
    """
    deleted = 0
    while True:
        body = yield Request(
            b"PURGE",
            {"older_than": older_than, "state": state, "handler": handler},
            writes=True,
        )
        count, more = body.get("deleted"), body.get("more")
        if type(count) is not int or not isinstance(more, bool):
            raise _malformed("no 'deleted' count")
        deleted += count
        if not more:
            return deleted


def _many_call(command, done_key, state, handler, count_only):
    if count_only:
        body = yield Request(
            command, {"state": state, "handler": handler, "count": True}
        )
        if type(body.get("count")) is not int:
            raise _malformed("no 'count'")
        return body["count"]
    done = refused = 0
    after = 0
    while True:
        body = yield Request(
            command,
            {"state": state, "handler": handler, "after": after},
            writes=True,
        )
        acted, skipped, following = (
            body.get(done_key),
            body.get("refused"),
            body.get("next"),
        )
        if type(acted) is not int or type(skipped) is not int:
            raise _malformed(f"no '{done_key}' count")
        done += acted
        refused += skipped
        if following is None:
            return (done, refused)
        if type(following) is not int or following <= after:
            raise _malformed(f"'next' {following!r} does not move on")
        after = following


def cancel_many_call(state="queued", handler=None, count_only=False):
    """
    Cancel every task in ``state`` (``"queued"`` or ``"running"``), of
    ``handler`` if given, as :func:`cancel_call` does each; a request per
    thousand.  Under CURVE, a client key cancels only its own tasks.

    :returns: with ``count_only``, how many there are (nothing is
        cancelled); else ``(cancelled, refused)``: how many it cancelled,
        and how many it could not (they ended meanwhile).
    """
    return (
        yield from _many_call(
            b"CANCEL_MANY", "cancelled", state, handler, count_only
        )
    )


def retry_many_call(state="failed", handler=None, count_only=False):
    """
    Queue again every task in ``state`` (``"failed"`` or
    ``"cancelled"``), of ``handler`` if given, as :func:`retry_call` does
    each; a request per thousand.  Under CURVE, a client key retries only
    its own tasks.

    :returns: with ``count_only``, how many there are; else ``(retried,
        refused)`` (refused: another live task holds its unique key, say).
    """
    return (
        yield from _many_call(
            b"RETRY_MANY", "retried", state, handler, count_only
        )
    )


class HousekeepingMethods:
    """
    The schedule and bulk requests, for both clients: each method returns
    what its call returns (a ``Deferred`` of it from
    :class:`~taskbroker.client.api.BrokerClient`), and raises (or fails
    with) what it raises.  Under CURVE with client checks, schedules are
    for admin keys.
    """

    def _run(self, call):
        raise NotImplementedError()

    def add_schedule(
        self,
        name,
        handler,
        every=None,
        cron=None,
        payload=None,
        priority=None,
        timezone=None,
        skip_if_running=False,
        max_attempts=None,
        time_limit=None,
        replace=False,
    ):
        """
        Add a periodic task; see :func:`schedule_add_call`.
        """
        return self._run(
            schedule_add_call(
                name,
                handler,
                every,
                cron,
                payload,
                priority,
                timezone,
                skip_if_running,
                max_attempts,
                time_limit,
                replace,
            )
        )

    def schedules(self):
        """
        The schedules, by name; see :func:`schedule_list_call`.
        """
        return self._run(schedule_list_call())

    def remove_schedule(self, name):
        """
        Remove a schedule; see :func:`schedule_remove_call`.
        """
        return self._run(schedule_remove_call(name))

    def pause_schedule(self, name):
        """
        Pause a schedule; see :func:`schedule_pause_call`.
        """
        return self._run(schedule_pause_call(name, True))

    def resume_schedule(self, name):
        """
        Resume a paused schedule from its next tick; see
        :func:`schedule_pause_call`.
        """
        return self._run(schedule_pause_call(name, False))

    def purge(self, older_than, state=None, handler=None):
        """
        Delete old finished tasks; see :func:`purge_call`.
        """
        return self._run(purge_call(older_than, state, handler))

    def cancel_many(self, state="queued", handler=None, count_only=False):
        """
        Cancel tasks in bulk; see :func:`cancel_many_call`.
        """
        return self._run(cancel_many_call(state, handler, count_only))

    def retry_many(self, state="failed", handler=None, count_only=False):
        """
        Queue failed tasks again in bulk; see :func:`retry_many_call`.
        """
        return self._run(retry_many_call(state, handler, count_only))
