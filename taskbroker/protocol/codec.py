# -*- test-case-name: tests.unit.test_codec -*-
"""
Encoding and validation of the wire protocol's multipart messages.

A message is three frames after ZeroMQ's routing envelope::

    [SIGNATURE, COMMAND, BODY]

``SIGNATURE`` names the protocol and its version, so that a stray or old
peer is recognised and answered instead of misread.  ``COMMAND`` is ASCII.
``BODY`` is a UTF-8 JSON object.  Nothing here does I/O: every function is
pure and every input is checked before anything acts on it.  See
docs/protocol.rst for the specification.
"""

import json
import re
from collections.abc import Callable, Mapping, Sequence
from numbers import Real
from typing import Any, NoReturn, TypeAlias, TypeVar

from taskbroker.schedules import Cron
from taskbroker.schedules import check_name as check_schedule_name

_T = TypeVar("_T")

#: A field check: takes a decoded JSON value and returns it (possibly
#: normalised), or raises ValueError with a reason.
Check: TypeAlias = Callable[[Any], Any]
#: A command's fields: name -> (check, required).
Fields: TypeAlias = Mapping[str, tuple[Check, bool]]
#: A table of commands: command -> its fields.
Commands: TypeAlias = Mapping[bytes, Fields]

SIGNATURE = b"TB1"

#: The largest payload a task may carry, as JSON text (bytes); results
#: too.
MAX_PAYLOAD_SIZE = 1024 * 1024
#: The largest message a peer accepts, all frames together (bytes): the
#: largest legal message (a SUBMIT, TASK or RESULT of one task of the
#: largest payload, with names and envelope) and no more, since every
#: peer may queue many messages of this size (docs/reliability.rst).
MAX_MESSAGE_SIZE = MAX_PAYLOAD_SIZE + 64 * 1024
#: The most tasks one SUBMIT may carry.
MAX_BATCH = 1000
#: The longest name (handler, worker, priority level).
MAX_NAME = 200
#: The most tasks one LIST reply carries.
MAX_LIST = 1000
#: A LIST reply also ends after the task that brings its payloads,
#: results, errors and tracebacks to this many characters (its ``next``
#: says where the next page starts), so that large tasks are never read
#: by the thousand.
MAX_LIST_BYTES = 1024 * 1024
#: The longest a WAIT may be held open by the broker (seconds).
MAX_WAIT = 60.0
#: The most levels of arrays and objects in a payload or a result.  Set
#: here, not left to each process's recursion limit, so that what one
#: process accepts every other can decode, inside a message's envelope.
MAX_DEPTH = 64
#: Ids, tokens and counts stay below 2**53, so that a JSON reader in any
#: language reads them exactly (and a token can always be incremented).
MAX_EXACT = 2**53 - 1
#: The highest attempt number.
MAX_ATTEMPT = 2**31 - 1


class ProtocolError(Exception):
    """
    A message failed validation.

    :ivar code: a short machine-readable reason, sent in ERROR replies.
    :ivar message: one line for a person.
    :ivar req: the request id, when it could be read, so the reply can be
        matched by the client.
    """

    def __init__(
        self, code: str, message: str, req: str | None = None
    ) -> None:
        Exception.__init__(self, message)
        self.code = code
        self.message = message
        self.req = req


_dumps = json.JSONEncoder(
    ensure_ascii=False, separators=(",", ":"), allow_nan=False
).encode


def _reject_constant(name: str) -> NoReturn:
    # Python's decoder accepts NaN and Infinity, which are not JSON: a
    # value holding one could be received but never sent on.
    raise ValueError(f"{name} is not JSON")


_decode = json.JSONDecoder(parse_constant=_reject_constant).decode
# A JSON escape of a UTF-16 surrogate; only such an escape can put an
# unpaired surrogate (which UTF-8 cannot encode) into decoded text.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def loads(text: str) -> Any:
    """
    Decode JSON text; ``ValueError`` if it is not JSON, including NaN and
    infinities, nesting too deep to decode, and unpaired surrogates (which
    could not be encoded as UTF-8 again).
    """
    try:
        value = _decode(text)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
    if _SURROGATE_ESCAPE.search(text):
        try:
            _dumps(value).encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("JSON text holds an unpaired surrogate") from None
        except RecursionError:
            raise ValueError("JSON nested too deeply") from None
    return value


_loads = loads


def dumps(value: Any) -> str:
    """
    Encode a JSON value compactly; ``ValueError``/``TypeError`` if it is
    not JSON (NaN and infinities are not) or if the text could not be sent
    as UTF-8 (a string holds an unpaired surrogate, as ``surrogateescape``
    makes).
    """
    try:
        text = _dumps(value)
    except RecursionError:
        raise ValueError("value nested too deeply") from None
    text.encode("utf-8")  # UnicodeEncodeError is a ValueError
    return text


def check_depth(value: _T) -> _T:
    """
    ``value``, or ``ValueError`` if it holds more than :data:`MAX_DEPTH`
    levels of arrays and objects (a cycle is as deep as it goes).
    """
    level: list[Any] = (
        [value] if isinstance(value, (dict, list, tuple)) else []
    )
    depth = 0
    while level:
        depth += 1
        if depth > MAX_DEPTH:
            raise ValueError(f"is nested deeper than {MAX_DEPTH} levels")
        level = [
            child
            for item in level
            for child in (item.values() if isinstance(item, dict) else item)
            if isinstance(child, (dict, list, tuple))
        ]
    return value


def encode_value(value: Any, what: str) -> str:
    """
    The JSON text of a payload or result, checked against the limits that
    every peer applies.

    :param what: ``"payload"`` or ``"result"``, for the error.
    :raises ValueError: one line naming why ``value`` cannot be sent: not
        JSON, nested too deeply, or too large.
    """
    try:
        check_depth(value)
    except ValueError as e:
        raise ValueError(f"{what} {e}") from None
    try:
        text = dumps(value)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what} is not JSON-serialisable: {e}") from None
    size = len(text.encode("utf-8"))
    if size > MAX_PAYLOAD_SIZE:
        raise ValueError(
            f"{what} of {size} bytes exceeds the limit of {MAX_PAYLOAD_SIZE}"
        )
    return text


def check_text(text: object, what: str) -> str:
    """
    ``text``, if it is JSON that :func:`encode_value` could have made;
    else ``ValueError`` naming why (for payloads stored by other
    programs).
    """
    if not isinstance(text, str):
        raise ValueError(f"{what} is not JSON text")
    if len(text.encode("utf-8", "surrogatepass")) > MAX_PAYLOAD_SIZE:
        raise ValueError(
            f"{what} exceeds the limit of {MAX_PAYLOAD_SIZE} bytes"
        )
    try:
        value = loads(text)
    except ValueError:
        raise ValueError(f"{what} is not valid JSON") from None
    try:
        check_depth(value)
    except ValueError as e:
        raise ValueError(f"{what} {e}") from None
    return text


def encode(command: bytes, body: str | Mapping[str, Any]) -> list[bytes]:
    """
    The frames of a message (without any routing envelope).

    :param command: ``bytes``, one of the commands below.
    :param body: a ``dict`` of JSON values, or JSON text (``str``) already
        encoded, which the hot path uses to avoid decoding payloads.
    """
    if not isinstance(body, str):
        body = _dumps(body)
    return [SIGNATURE, command, body.encode("utf-8")]


# Field checks.  Each takes the value and returns it (possibly normalised)
# or raises ValueError with a reason.


def _name(value: object) -> str:
    if not isinstance(value, str) or not (0 < len(value) <= MAX_NAME):
        raise ValueError(f"must be a string of 1 to {MAX_NAME} characters")
    if not value.isprintable():
        raise ValueError("must not contain control characters")
    return value


def _optional(check: Callable[[Any], _T]) -> Callable[[Any], _T | None]:
    def optional(value: Any) -> _T | None:
        return None if value is None else check(value)

    return optional


def _int(low: int, high: int) -> Callable[[Any], int]:
    def check(value: Any) -> int:
        if type(value) is not int or not (low <= value <= high):
            raise ValueError(f"must be an integer from {low} to {high}")
        return value

    return check


def _number(low: float, high: float) -> Check:
    def check(value: Any) -> Any:
        if (
            isinstance(value, bool)
            or not isinstance(value, Real)
            # numbers.Real is declared without comparisons.
            or not (low <= value <= high)  # type: ignore[operator]
        ):
            raise ValueError(f"must be a number from {low} to {high}")
        return value

    return check


#: The most handler names (or priority levels) one HELLO may list.
MAX_NAMES = 1000


def _names(value: object) -> list[str]:
    if not isinstance(value, list) or len(value) > MAX_NAMES:
        raise ValueError(f"must be a list of at most {MAX_NAMES} names")
    return [_name(item) for item in value]


def _any(value: _T) -> _T:
    return value


def _string(value: object) -> str:
    if not isinstance(value, str) or len(value) > 1_000_000:
        raise ValueError("must be a string")
    return value


#: The longest progress message (characters).
MAX_PROGRESS_MESSAGE = 200


def _short_text(value: object) -> str:
    if not isinstance(value, str) or len(value) > MAX_PROGRESS_MESSAGE:
        raise ValueError(
            f"must be a string of at most {MAX_PROGRESS_MESSAGE} characters"
        )
    return value


def _boolean(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError("must be true or false")
    return value


def _choice(*choices: str) -> Check:
    def check(value: Any) -> Any:
        if value not in choices:
            raise ValueError("must be one of " + ", ".join(choices))
        return value

    return check


def _request_id(value: object) -> str:
    if not isinstance(value, str) or not (0 < len(value) <= 64):
        raise ValueError("must be a string of 1 to 64 characters")
    return value


_TASK_ID = _int(1, MAX_EXACT)
_ATTEMPT = _int(1, MAX_ATTEMPT)
_TOKEN = _int(1, MAX_EXACT)
#: The longest a task may be delayed, or run (seconds): a year.
MAX_SECONDS = 366 * 24 * 3600.0


def _running(value: object) -> list[dict[str, int]]:
    if not isinstance(value, list) or len(value) > 100_000:
        raise ValueError("must be a list of {id, token} objects")
    result = []
    for item in value:
        if not isinstance(item, dict):
            raise ValueError("must be a list of {id, token} objects")
        result.append(
            {
                "id": _TASK_ID(item.get("id")),
                "token": _TOKEN(item.get("token")),
            }
        )
    return result


def _new_task(value: object) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError("each task must be an object")
    checked = _check_fields(value, _NEW_TASK_FIELDS, "task")
    checked.setdefault("payload", None)
    return checked


def _new_tasks(value: object) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not (0 < len(value) <= MAX_BATCH):
        raise ValueError(f"must be a list of 1 to {MAX_BATCH} tasks")
    return [_new_task(item) for item in value]


_NEW_TASK_FIELDS: Fields = {
    "handler": (_name, True),
    "payload": (check_depth, False),
    "priority": (_optional(_name), False),
    "max_attempts": (_optional(_int(1, 1000)), False),
    "delay": (_optional(_number(0, MAX_SECONDS)), False),
    "unique_key": (_optional(_name), False),
    "time_limit": (_optional(_number(0.001, MAX_SECONDS)), False),
}

_REQ: Fields = {"req": (_request_id, True)}


def _cron(value: Any) -> str:
    return Cron(value).expression


def _final_state(value: Any) -> Any:
    return _choice("succeeded", "failed", "cancelled")(value)


_SCHEDULE_NAME: Fields = {"name": (check_schedule_name, True)}
#: Where a bulk request (CANCEL_MANY, RETRY_MANY) starts and what it
#: acts on; with "count", it only counts.
_BULK: Fields = {
    "handler": (_optional(_name), False),
    "after": (_optional(_int(0, MAX_EXACT)), False),
    "count": (_optional(_boolean), False),
}

#: Checks of one value, for requests that come another way (the HTTP
#: API): each returns the value or raises ValueError with a reason.
check_name = _name
check_task_id = _TASK_ID

#: What a worker may send: command -> {field: (check, required)}.
WORKER_COMMANDS: Commands = {
    b"HELLO": {
        "name": (_name, True),
        "slots": (_int(1, 10_000), True),
        "priorities": (_optional(_names), False),
        "handlers": (_names, True),
        "running": (_running, False),
        "heartbeat": (_number(0.01, 3600), False),
        # taskbroker's version; older workers leave it out.
        "version": (_optional(_short_text), False),
    },
    b"READY": {},
    b"RESULT": {
        "id": (_TASK_ID, True),
        "token": (_TOKEN, True),
        "state": (_choice("succeeded", "failed", "released"), True),
        "result": (check_depth, False),
        "error": (_optional(_string), False),
        "traceback": (_optional(_string), False),
        "permanent": (_optional(_boolean), False),
        "ready": (_optional(_boolean), False),
    },
    b"HEARTBEAT": {"running": (_running, False)},
    b"BYE": {},
    b"PROGRESS": {
        "id": (_TASK_ID, True),
        "token": (_TOKEN, True),
        "fraction": (_number(0, 1), True),
        "message": (_optional(_short_text), False),
    },
}

#: What a client may send.
CLIENT_COMMANDS: Commands = {
    b"SUBMIT": {
        **_REQ,
        "tasks": (_new_tasks, True),
        "request_id": (_optional(_request_id), False),
    },
    b"GET": {**_REQ, "id": (_TASK_ID, True)},
    b"WAIT": {
        **_REQ,
        "id": (_TASK_ID, True),
        "timeout": (_number(0, MAX_WAIT), False),
    },
    b"LIST": {
        **_REQ,
        "state": (
            _optional(
                _choice(
                    "queued", "running", "succeeded", "failed", "cancelled"
                )
            ),
            False,
        ),
        "handler": (_optional(_name), False),
        "priority": (_optional(_name), False),
        "order": (_optional(_choice("oldest", "newest")), False),
        "after": (_optional(_int(0, MAX_EXACT)), False),
        "before": (_optional(_int(1, MAX_EXACT)), False),
        "limit": (_optional(_int(1, MAX_LIST)), False),
    },
    b"CANCEL": {**_REQ, "id": (_TASK_ID, True)},
    b"RETRY": {**_REQ, "id": (_TASK_ID, True)},
    b"WORKERS": {**_REQ},
    b"STATS": {**_REQ},
    # Periodic tasks (docs/protocol.rst, "Schedules").
    b"SCHEDULE_ADD": {
        **_REQ,
        **_SCHEDULE_NAME,
        "handler": (_name, True),
        "payload": (check_depth, False),
        "priority": (_optional(_name), False),
        "max_attempts": (_optional(_int(1, 1000)), False),
        "time_limit": (_optional(_number(0.001, MAX_SECONDS)), False),
        "every": (_optional(_number(1, MAX_SECONDS)), False),
        "cron": (_optional(_cron), False),
        "timezone": (_optional(_name), False),
        "skip_if_running": (_optional(_boolean), False),
        "replace": (_optional(_boolean), False),
    },
    b"SCHEDULE_LIST": {**_REQ},
    b"SCHEDULE_REMOVE": {**_REQ, **_SCHEDULE_NAME},
    b"SCHEDULE_PAUSE": {**_REQ, **_SCHEDULE_NAME},
    b"SCHEDULE_RESUME": {**_REQ, **_SCHEDULE_NAME},
    # Work on many tasks, a bounded batch per request.
    b"PURGE": {
        **_REQ,
        "older_than": (_number(0, 100 * MAX_SECONDS), True),
        "state": (_optional(_final_state), False),
        "handler": (_optional(_name), False),
    },
    b"CANCEL_MANY": {
        **_REQ,
        **_BULK,
        "state": (_optional(_choice("queued", "running")), False),
    },
    b"RETRY_MANY": {
        **_REQ,
        **_BULK,
        "state": (_optional(_choice("failed", "cancelled")), False),
    },
}

#: What the broker sends to a worker.
BROKER_TO_WORKER_COMMANDS: Commands = {
    b"WELCOME": {
        "broker": (_string, True),
        "priorities": (_names, True),
        "heartbeat": (_number(0.01, 3600), True),
        "time_limit": (_optional(_number(0.001, MAX_SECONDS)), False),
        # Whether the broker takes PROGRESS (older ones do not say).
        "progress": (_optional(_boolean), False),
        "version": (_optional(_short_text), False),
    },
    b"TASK": {
        "id": (_TASK_ID, True),
        "handler": (_name, True),
        "payload": (check_depth, False),
        "priority": (_name, True),
        "attempt": (_ATTEMPT, True),
        "max_attempts": (_int(1, 1000), True),
        "token": (_TOKEN, True),
        "time_limit": (_optional(_number(0.001, MAX_SECONDS)), False),
    },
    b"ACK": {"id": (_TASK_ID, True), "token": (_TOKEN, True)},
    b"CANCEL": {"id": (_TASK_ID, True), "token": (_TOKEN, True)},
    # "store" is "ok" or "failing" (whether the broker can use its
    # database); optional, and any other value reads as "ok", so that
    # older brokers and later values still interoperate.
    b"HEARTBEAT": {"broker": (_string, True), "store": (_any, False)},
    b"REHELLO": {"broker": (_string, True)},
    b"ERROR": {
        "code": (_string, True),
        "message": (_string, True),
        "fatal": (_any, False),
    },
}

#: What the broker sends to a client.
BROKER_TO_CLIENT_COMMANDS: Commands = {
    b"REPLY": {"req": (_request_id, True)},
    b"ERROR": {
        "req": (_optional(_request_id), False),
        "code": (_string, True),
        "message": (_string, True),
    },
}

#: Everything the broker accepts on its ROUTER socket.
BROKER_INBOUND: Commands = {**WORKER_COMMANDS, **CLIENT_COMMANDS}


def _readable_req(body: Mapping[str, Any]) -> str | None:
    """
    The body's ``req`` if it is a valid request id, else ``None``: an
    invalid one could not be sent back in an ``ERROR``.
    """
    try:
        return _request_id(body.get("req"))
    except ValueError:
        return None


_LEADING_REQ = re.compile(rb'\A\{"req":"([\x21\x23-\x5b\x5d-\x7e]{1,64})"')


def peek_req(body: bytes) -> str | None:
    """
    The request id at the start of an undecoded body, as taskbroker's
    clients write it, or ``None``: for refusing a request without reading
    all of it.
    """
    match = _LEADING_REQ.match(body)
    return match.group(1).decode("ascii") if match else None


def _check_fields(
    body: Mapping[str, Any], fields: Fields, where: str
) -> dict[str, Any]:
    checked: dict[str, Any] = {}
    for key, (check, required) in fields.items():
        if key in body:
            try:
                checked[key] = check(body[key])
            except ValueError as e:
                raise ProtocolError(
                    "bad_request",
                    f"{where}: field {key!r} {e}",
                    req=_readable_req(body),
                ) from None
            except ProtocolError as e:
                # A nested object (a SUBMIT's task) failed: the reply
                # still belongs to this request.
                if e.req is None:
                    e.req = _readable_req(body)
                raise
        elif required:
            raise ProtocolError(
                "bad_request",
                f"{where}: missing field {key!r}",
                req=_readable_req(body),
            )
    return checked


def decode(
    frames: Sequence[bytes],
    commands: Commands,
    max_size: int = MAX_MESSAGE_SIZE,
    strict: bool = False,
) -> tuple[bytes, dict[str, Any]]:
    """
    Validate and decode a message.

    :param frames: the ``list`` of ``bytes`` frames after the routing
        envelope.
    :param commands: the table of allowed commands and their fields, such
        as :data:`BROKER_INBOUND`.
    :param strict: if true, reject unknown fields; if false (the default,
        so that newer peers may add fields), drop them.
    :returns: ``(command, body)``: ``bytes`` and a ``dict`` holding only
        known, checked fields.
    :raises ProtocolError: with a code and a one-line reason.
    """
    if len(frames) != 3:
        if frames and frames[0] != SIGNATURE:
            raise ProtocolError(
                "protocol", "not a taskbroker message (bad signature)"
            )
        raise ProtocolError(
            "protocol", f"expected 3 frames, got {len(frames)}"
        )
    signature, command, body = frames
    if signature != SIGNATURE:
        raise ProtocolError(
            "protocol",
            "not a taskbroker message or an unsupported protocol version "
            f"(signature {bytes(signature[:16])!r}, expected {SIGNATURE!r})",
        )
    size = len(signature) + len(command) + len(body)
    if size > max_size:
        raise ProtocolError(
            "too_large", f"message of {size} bytes exceeds {max_size}"
        )
    fields = commands.get(command)
    if fields is None:
        raise ProtocolError(
            "unknown_command", f"unknown command {bytes(command[:32])!r}"
        )
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError("bad_request", "body is not valid UTF-8") from None
    try:
        value = _loads(text)
    except ValueError as e:
        raise ProtocolError(
            "bad_request", f"body is not valid JSON ({e})"
        ) from None
    if not isinstance(value, dict):
        raise ProtocolError("bad_request", "body is not a JSON object")
    if strict:
        unknown = set(value) - set(fields)
        if unknown:
            raise ProtocolError(
                "bad_request",
                f"{command.decode('ascii', 'replace')}: unknown fields "
                + ", ".join(sorted(map(repr, unknown))),
                req=_readable_req(value),
            )
    return command, _check_fields(
        value, fields, command.decode("ascii", "replace")
    )
