"""
Tests for taskbroker.protocol.codec (the wire format of docs/protocol.rst)
and taskbroker.protocol.objects (the task object).
"""

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from taskbroker.protocol import codec
from taskbroker.protocol.codec import (
    BROKER_INBOUND,
    BROKER_TO_CLIENT_COMMANDS,
    BROKER_TO_WORKER_COMMANDS,
    CLIENT_COMMANDS,
    MAX_SECONDS,
    SIGNATURE,
    WORKER_COMMANDS,
    ProtocolError,
    decode,
    encode,
)
from taskbroker.protocol.objects import TASK_KEYS, iso_time, task_object
from taskbroker.store import TaskRow

# One valid, complete body for every command of every table.
WORKER_SAMPLES = {
    b"HELLO": {
        "name": "build-7",
        "slots": 4,
        "priorities": ["high", "normal"],
        "handlers": ["echo", "sleep"],
        "running": [{"id": 3, "token": 2}],
        "heartbeat": 1.5,
    },
    b"READY": {},
    b"RESULT": {
        "id": 9,
        "token": 1,
        "state": "succeeded",
        "result": {"x": [1, "é", None]},
        "error": None,
        "traceback": None,
        "permanent": False,
    },
    b"HEARTBEAT": {},
    b"BYE": {},
    b"PROGRESS": {
        "id": 9,
        "token": 1,
        "fraction": 0.25,
        "message": "step 1 of 4",
    },
}
CLIENT_SAMPLES = {
    b"SUBMIT": {
        "req": "r1",
        "request_id": "batch-2024-01-01",
        "tasks": [
            {
                "handler": "echo",
                "payload": {"a": 1},
                "priority": "high",
                "max_attempts": 5,
                "delay": 2.5,
                "unique_key": "nightly-echo",
                "time_limit": 30,
            },
            {
                "handler": "sleep",
                "payload": None,
                "priority": None,
                "max_attempts": None,
                "delay": None,
                "unique_key": None,
                "time_limit": None,
            },
        ],
    },
    b"GET": {"req": "r2", "id": 1},
    b"WAIT": {"req": "r3", "id": 2, "timeout": 60},
    b"LIST": {
        "req": "r4",
        "state": "queued",
        "handler": "echo",
        "after": 0,
        "limit": 1000,
    },
    b"CANCEL": {"req": "r5", "id": 2**53 - 1},
    b"RETRY": {"req": "r7", "id": 4},
    b"WORKERS": {"req": "r6"},
    b"STATS": {"req": "r" * 64},
    b"SCHEDULE_ADD": {
        "req": "r1",
        "name": "nightly.report-2",
        "handler": "report",
        "payload": {"a": [1]},
        "priority": "low",
        "max_attempts": 2,
        "time_limit": 60,
        "every": None,
        "cron": "0 3 * * mon-fri",
        "timezone": "Europe/Paris",
        "skip_if_running": True,
        "replace": False,
    },
    b"SCHEDULE_LIST": {"req": "r1"},
    b"SCHEDULE_REMOVE": {"req": "r1", "name": "n"},
    b"SCHEDULE_PAUSE": {"req": "r1", "name": "n"},
    b"SCHEDULE_RESUME": {"req": "r1", "name": "n"},
    b"PURGE": {
        "req": "r1",
        "older_than": 86400,
        "state": "failed",
        "handler": "echo",
    },
    b"CANCEL_MANY": {
        "req": "r1",
        "state": "queued",
        "handler": "echo",
        "after": 10,
        "count": True,
    },
    b"RETRY_MANY": {
        "req": "r1",
        "state": "failed",
        "handler": None,
        "after": 0,
        "count": False,
    },
}
BROKER_TO_WORKER_SAMPLES = {
    b"WELCOME": {
        "broker": "b-1",
        "priorities": ["high", "low"],
        "heartbeat": 0.01,
        "time_limit": 600,
        "progress": True,
    },
    b"TASK": {
        "id": 1,
        "handler": "echo",
        "payload": [1, 2.5, "三"],
        "priority": "high",
        "attempt": 1,
        "max_attempts": 3,
        "token": 5,
        "time_limit": 0.5,
    },
    b"ACK": {"id": 1, "token": 2},
    b"CANCEL": {"id": 1, "token": 2**53 - 1},
    b"HEARTBEAT": {"broker": "b-1", "store": "failing"},
    b"REHELLO": {"broker": "b-1"},
    b"ERROR": {"code": "unknown_priority", "message": "no", "fatal": True},
}
BROKER_TO_CLIENT_SAMPLES = {
    b"REPLY": {"req": "r1"},
    b"ERROR": {"req": None, "code": "protocol", "message": "bad"},
}

TABLES = [
    (WORKER_COMMANDS, WORKER_SAMPLES),
    (CLIENT_COMMANDS, CLIENT_SAMPLES),
    (BROKER_INBOUND, {**WORKER_SAMPLES, **CLIENT_SAMPLES}),
    (BROKER_TO_WORKER_COMMANDS, BROKER_TO_WORKER_SAMPLES),
    (BROKER_TO_CLIENT_COMMANDS, BROKER_TO_CLIENT_SAMPLES),
]


def frames(command, body):
    """
    The frames of a message whose body is raw bytes or JSON text.
    """
    if isinstance(body, str):
        body = body.encode("utf-8")
    return [SIGNATURE, command, body]


def rejected(message_frames, commands=BROKER_INBOUND, **kw):
    with pytest.raises(ProtocolError) as info:
        decode(message_frames, commands, **kw)
    return info.value


# -- round trips --------------------------------------------------------------


@pytest.mark.parametrize("commands, samples", TABLES)
def test_every_command_round_trips(commands, samples):
    # A command added to a table without a sample here fails this test.
    assert set(samples) == set(commands)
    for command, body in samples.items():
        encoded = encode(command, body)
        assert encoded[:2] == [SIGNATURE, command]
        assert decode(encoded, commands, strict=True) == (command, body)


def test_a_broker_heartbeat_without_or_with_an_unknown_store_field_reads():
    # Older brokers send no "store"; a later one may send a value this
    # version does not know: neither is refused.
    for body in ({"broker": "b-1"}, {"broker": "b-1", "store": "degraded"}):
        assert decode(
            encode(b"HEARTBEAT", body), BROKER_TO_WORKER_COMMANDS
        ) == (b"HEARTBEAT", body)


def test_encode_accepts_json_text_as_is():
    text = '{"id":1,"token":2}'
    assert encode(b"ACK", text) == [SIGNATURE, b"ACK", text.encode("utf-8")]


def test_encode_is_compact_utf8():
    assert encode(b"GET", {"req": "é", "id": 1})[2] == (
        '{"req":"é","id":1}'.encode()
    )


def test_submit_task_payload_defaults_to_null():
    _, body = decode(
        frames(b"SUBMIT", '{"req":"r","tasks":[{"handler":"h"}]}'),
        CLIENT_COMMANDS,
    )
    assert body["tasks"] == [{"handler": "h", "payload": None}]


def test_optional_fields_may_be_absent():
    assert decode(
        frames(b"HELLO", '{"name":"w","slots":1,"handlers":[]}'),
        WORKER_COMMANDS,
    ) == (b"HELLO", {"name": "w", "slots": 1, "handlers": []})


@pytest.mark.parametrize(
    "command, text, commands",
    [
        (b"RESULT", '{"id":1,"token":2,"state":"released"}', WORKER_COMMANDS),
        (b"SUBMIT", '{"req":"r","tasks":[{"handler":"h"}]}', CLIENT_COMMANDS),
        (
            b"WELCOME",
            '{"broker":"b","priorities":[],"heartbeat":1}',
            BROKER_TO_WORKER_COMMANDS,
        ),
        (
            b"TASK",
            '{"id":1,"handler":"h","priority":"p","attempt":1,'
            '"max_attempts":1,"token":1}',
            BROKER_TO_WORKER_COMMANDS,
        ),
    ],
)
def test_new_optional_fields_are_not_filled_in(command, text, commands):
    # Absent means "the default", which the receiver chooses; decode does
    # not invent values (only a new task's payload defaults, to null).
    _, body = decode(frames(command, text), commands, strict=True)
    expected = json.loads(text)
    if command == b"SUBMIT":
        expected["tasks"][0]["payload"] = None
    assert body == expected


# -- rejections ---------------------------------------------------------------


@pytest.mark.parametrize(
    "message",
    [
        [],
        [SIGNATURE],
        [SIGNATURE, b"READY"],
        [SIGNATURE, b"READY", b"{}", b"{}"],
    ],
)
def test_wrong_frame_count(message):
    error = rejected(message)
    assert error.code == "protocol"
    assert f"got {len(message)}" in error.message


@pytest.mark.parametrize(
    "message",
    [
        [b"junk"],
        [b"GET / HTTP/1.1\r\n"],
        [b"TB2", b"READY", b"{}", b"extra"],
    ],
)
def test_junk_with_wrong_frame_count_is_a_bad_signature(message):
    error = rejected(message)
    assert error.code == "protocol"
    assert "signature" in error.message


@pytest.mark.parametrize("signature", [b"TB2", b"", b"tb1", b"TB1 "])
def test_bad_signature(signature):
    error = rejected([signature, b"READY", b"{}"])
    assert error.code == "protocol"
    assert "signature" in error.message
    assert "\n" not in error.message


def test_unknown_command():
    error = rejected(frames(b"FROB", "{}"))
    assert error.code == "unknown_command"
    assert "FROB" in error.message


def test_command_of_another_table_is_unknown():
    # A worker's inbound table does not accept what a client sends.
    error = rejected(
        frames(b"GET", '{"req":"r","id":1}'), BROKER_TO_WORKER_COMMANDS
    )
    assert error.code == "unknown_command"


def test_too_large():
    body = '{"req":"r","id":1}'
    size = len(SIGNATURE) + len(b"GET") + len(body)
    assert decode(frames(b"GET", body), CLIENT_COMMANDS, max_size=size)
    error = rejected(frames(b"GET", body), CLIENT_COMMANDS, max_size=size - 1)
    assert error.code == "too_large"
    assert str(size) in error.message


def test_default_limit_is_the_largest_legal_message():
    body = b'{"req":"r","id":1,"pad":"' + b"x" * codec.MAX_MESSAGE_SIZE + b'"}'
    assert rejected(frames(b"GET", body)).code == "too_large"


def test_invalid_utf8():
    error = rejected(frames(b"GET", b'{"req":"\xff","id":1}'))
    assert (error.code, error.message) == (
        "bad_request",
        "body is not valid UTF-8",
    )


@pytest.mark.parametrize(
    "body",
    [
        "",
        "{",
        "{'req': 'r'}",
        '{"req":"r","id":1}x',
        '{"req":"r","id":NaN}',
        '{"req":"r","id":Infinity}',
        '{"req":"r","id":-Infinity}',
        # Nesting deep enough to overflow Python's decoder.
        "[" * 100_000 + "]" * 100_000,
        # Unpaired surrogates: decodable, but never encodable as UTF-8 again.
        '{"req":"\\ud800","id":1}',
        '{"req":"r","tasks":[{"handler":"h","payload":"\\udcff"}]}',
    ],
)
def test_invalid_json(body):
    error = rejected(frames(b"SUBMIT", body))
    assert error.code == "bad_request"
    assert error.message.startswith("body is not valid JSON")
    assert "\n" not in error.message


def test_paired_surrogate_escapes_are_fine():
    _, body = decode(
        frames(b"GET", '{"req":"\\ud83d\\ude00","id":1}'), CLIENT_COMMANDS
    )
    assert body["req"] == "\U0001f600"


@pytest.mark.parametrize("body", ["[]", '"x"', "1", "null", "true"])
def test_non_object_json(body):
    error = rejected(frames(b"READY", body))
    assert (error.code, error.message) == (
        "bad_request",
        "body is not a JSON object",
    )


@pytest.mark.parametrize(
    "command, body, field",
    [
        (b"GET", {"req": "r"}, "id"),
        (b"GET", {"id": 1}, "req"),
        (b"HELLO", {"name": "w", "handlers": []}, "slots"),
        (b"RESULT", {"id": 1, "token": 1}, "state"),
        # What a worker of the previous protocol sends: no token.
        (b"RESULT", {"id": 1, "attempt": 1, "state": "succeeded"}, "token"),
        (b"RESULT", {"token": 1, "state": "failed"}, "id"),
        (b"RETRY", {"req": "r"}, "id"),
        (b"RETRY", {"id": 1}, "req"),
        (b"CANCEL", {"id": 1, "token": 1}, "req"),
    ],
)
def test_missing_required_field(command, body, field):
    error = rejected(encode(command, body))
    assert error.code == "bad_request"
    assert f"missing field {field!r}" in error.message
    assert error.req == body.get("req")


TASK_BODY = BROKER_TO_WORKER_SAMPLES[b"TASK"]


@pytest.mark.parametrize(
    "command, body, field",
    [
        (b"ACK", {"id": 1, "attempt": 2}, "token"),
        (b"ACK", {"token": 2}, "id"),
        (b"CANCEL", {"id": 1}, "token"),
        # A client's CANCEL is not a worker's.
        (b"CANCEL", {"req": "r", "id": 1}, "token"),
        (b"CANCEL", {"token": 1}, "id"),
        (
            b"TASK",
            {k: v for k, v in TASK_BODY.items() if k != "token"},
            "token",
        ),
    ],
)
def test_missing_required_field_to_a_worker(command, body, field):
    error = rejected(encode(command, body), BROKER_TO_WORKER_COMMANDS)
    assert error.code == "bad_request"
    assert f"missing field {field!r}" in error.message


@pytest.mark.parametrize(
    "command, body, field",
    [
        # bool is an int in Python but not in the protocol.
        (b"GET", {"req": "r", "id": True}, "id"),
        (b"GET", {"req": "r", "id": 1.0}, "id"),
        (b"GET", {"req": "r", "id": "1"}, "id"),
        (b"GET", {"req": "r", "id": 0}, "id"),
        (b"GET", {"req": "r", "id": 2**53}, "id"),
        (b"GET", {"req": 1, "id": 1}, "req"),
        (b"GET", {"req": "", "id": 1}, "req"),
        (b"GET", {"req": "r" * 65, "id": 1}, "req"),
        (b"WAIT", {"req": "r", "id": 1, "timeout": True}, "timeout"),
        (b"WAIT", {"req": "r", "id": 1, "timeout": 61}, "timeout"),
        (b"WAIT", {"req": "r", "id": 1, "timeout": "5"}, "timeout"),
        (b"LIST", {"req": "r", "state": "sleeping"}, "state"),
        (b"LIST", {"req": "r", "limit": 1001}, "limit"),
        (b"HELLO", {"name": "w", "slots": True, "handlers": []}, "slots"),
        (b"HELLO", {"name": "w", "slots": 1, "handlers": "echo"}, "handlers"),
        (
            b"HELLO",
            {"name": "w", "slots": 1, "handlers": [], "heartbeat": 0},
            "heartbeat",
        ),
        (
            b"HELLO",
            {"name": "w", "slots": 1, "handlers": [], "running": [{"id": 1}]},
            "running",
        ),
        (
            b"HELLO",
            {"name": "w", "slots": 1, "handlers": [], "running": [1]},
            "running",
        ),
        # The items of the previous protocol carry an attempt, not a token.
        (
            b"HELLO",
            {
                "name": "w",
                "slots": 1,
                "handlers": [],
                "running": [{"id": 1, "attempt": 1}],
            },
            "running",
        ),
        (b"RESULT", {"id": 1, "token": 1, "state": "queued"}, "state"),
        (
            b"RESULT",
            {"id": 1, "token": 1, "state": "failed", "error": 3},
            "error",
        ),
        (
            b"RESULT",
            {"id": 1, "token": 1, "state": "failed", "traceback": 3},
            "traceback",
        ),
        (
            b"RESULT",
            {"id": 1, "token": 1, "state": "failed", "traceback": ["line"]},
            "traceback",
        ),
        (b"RETRY", {"req": "r", "id": 0}, "id"),
        (b"RETRY", {"req": "r", "id": "1"}, "id"),
        (b"RETRY", {"req": "", "id": 1}, "req"),
    ],
)
def test_wrong_types_and_ranges(command, body, field):
    error = rejected(encode(command, body))
    assert error.code == "bad_request"
    assert f"field {field!r}" in error.message
    assert "\n" not in error.message


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_nan_is_not_encoded(value):
    with pytest.raises(ValueError):
        encode(
            b"RESULT",
            {"id": 1, "token": 1, "state": "succeeded", "result": value},
        )
    with pytest.raises(ValueError):
        codec.dumps([value])


def test_unencodable_string_is_not_dumped():
    # os.fsdecode's surrogateescape makes such strings; they cannot be sent.
    with pytest.raises(ValueError):
        codec.dumps({"path": "\udcff"})


def nested_lists(depth):
    value = []
    for _ in range(depth):
        value = [value]
    return value


def test_value_nested_too_deeply_is_not_dumped():
    with pytest.raises(ValueError):
        codec.dumps(nested_lists(100_000))


def nested(depth):
    value = "x"
    for level in range(depth):
        value = [value] if level % 2 else {"k": value}
    return value


@pytest.mark.parametrize(
    "command, field, body, commands",
    [
        (
            b"SUBMIT",
            "payload",
            lambda v: {"req": "r", "tasks": [{"handler": "h", "payload": v}]},
            codec.CLIENT_COMMANDS,
        ),
        (
            b"RESULT",
            "result",
            lambda v: {"id": 1, "token": 1, "state": "succeeded", "result": v},
            codec.WORKER_COMMANDS,
        ),
        (
            b"TASK",
            "payload",
            lambda v: {
                "id": 1,
                "handler": "h",
                "payload": v,
                "priority": "p",
                "attempt": 1,
                "max_attempts": 1,
                "token": 1,
            },
            codec.BROKER_TO_WORKER_COMMANDS,
        ),
    ],
)
@pytest.mark.parametrize("depth", [63, 64, 65])
def test_payloads_and_results_are_nested_at_most_64_levels(
    command, field, body, commands, depth
):
    frames = codec.encode(command, body(nested(depth)))
    if depth <= codec.MAX_DEPTH:
        codec.decode(frames, commands)
    else:
        with pytest.raises(ProtocolError) as e:
            codec.decode(frames, commands)
        assert e.value.code == "bad_request"
        assert e.value.message.endswith(
            f"field {field!r} is nested deeper than 64 levels"
        )


def test_the_depth_check_ends_on_a_cycle():
    cycle = []
    cycle.append(cycle)
    with pytest.raises(ValueError):
        codec.check_depth(cycle)


@pytest.mark.parametrize(
    "value, error",
    [
        (nested(65), "result is nested deeper than 64 levels"),
        (
            "x" * codec.MAX_PAYLOAD_SIZE,
            "result of 1048578 bytes exceeds the limit of 1048576",
        ),
        (
            object(),
            "result is not JSON-serialisable: Object of type object is "
            "not JSON serializable",
        ),
    ],
)
def test_encode_value_says_why_a_value_cannot_be_sent(value, error):
    with pytest.raises(ValueError) as e:
        codec.encode_value(value, "result")
    assert str(e.value) == error


@pytest.mark.parametrize(
    "delay, ok",
    [(0, True), (MAX_SECONDS, True), (MAX_SECONDS + 1, False), (-1, False)],
)
def test_delay_bounds(delay, ok):
    body = {"req": "r", "tasks": [{"handler": "echo", "delay": delay}]}
    frames = codec.encode(b"SUBMIT", body)
    if ok:
        assert (
            codec.decode(frames, codec.CLIENT_COMMANDS)[1]["tasks"][0]["delay"]
            == delay
        )
    else:
        with pytest.raises(ProtocolError):
            codec.decode(frames, codec.CLIENT_COMMANDS)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text()
    | st.sampled_from(["\ud800", "\udfff", "a\udcff"]),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)

ALL_COMMANDS = sorted({c for table, _ in TABLES for c in table})


@st.composite
def bodies(draw):
    """
    JSON text: objects that use the commands' field names (so that the
    field checks run) as well as anything else.
    """
    field_names = sorted(
        {f for table, _ in TABLES for fields in table.values() for f in fields}
    )
    obj = draw(
        st.dictionaries(
            st.sampled_from(field_names) | st.text(max_size=5),
            json_values,
            max_size=6,
        )
    )
    value = draw(st.one_of(st.just(obj), json_values))
    text = json.dumps(value, ensure_ascii=draw(st.booleans()))
    return text.encode("utf-8", "surrogatepass")


def assert_decodes_or_protocol_error(message, commands):
    try:
        result = decode(message, commands, strict=False)
    except ProtocolError as e:
        assert isinstance(e.code, str) and isinstance(e.message, str)
        assert "\n" not in e.message
        assert e.req is None or isinstance(e.req, str)
        return
    command, body = result
    assert isinstance(command, bytes) and isinstance(body, dict)
    # What decode accepted can always be sent on.
    encode(command, body)


SAMPLES = [
    (table, command, body)
    for table, samples in TABLES
    for command, body in samples.items()
]
awkward_values = st.sampled_from(
    [float("nan"), float("inf"), "\ud800", ["\udcff"], {"x": -float("inf")}]
)


@st.composite
def mutated_samples(draw):
    """
    A valid message with some fields replaced by random JSON values, so
    that what reaches the deeper checks (and the fields kept as they are,
    such as payloads) is random too.
    """
    table, command, body = draw(st.sampled_from(SAMPLES))
    body = dict(body)
    if body:
        keys = draw(st.lists(st.sampled_from(sorted(body)), max_size=2))
        for key in keys:
            body[key] = draw(json_values | awkward_values)
    text = json.dumps(body, ensure_ascii=draw(st.booleans()))
    return table, [SIGNATURE, command, text.encode("utf-8", "surrogatepass")]


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(mutated_samples())
def test_mutated_messages_decode_or_raise_protocol_error(sample):
    commands, message = sample
    assert_decodes_or_protocol_error(message, commands)


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.binary(max_size=40), max_size=5),
    st.sampled_from([t for t, _ in TABLES]),
)
def test_random_frames_decode_or_raise_protocol_error(message, commands):
    assert_decodes_or_protocol_error(message, commands)


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(ALL_COMMANDS),
    bodies(),
    st.sampled_from([t for t, _ in TABLES]),
)
def test_random_bodies_decode_or_raise_protocol_error(command, body, commands):
    assert_decodes_or_protocol_error([SIGNATURE, command, body], commands)


# -- task objects ---------------------------------------------------------------


def row(**changes):
    fields = dict(
        id=7,
        handler="echo",
        payload='{"a":[1,2]}',
        priority="high",
        state="succeeded",
        attempts=1,
        max_attempts=3,
        worker="w1",
        created_at=0.0,
        started_at=1.5,
        finished_at=1_800_000_000.123456,
        result='"done"',
        error=None,
        run_at=1.25,
        unique_key="nightly",
        request_id="req-9",
        token=4,
        time_limit=30.0,
        traceback="Traceback (most recent call last):\n  ...\n",
    )
    fields.update(changes)
    return TaskRow(**fields)


def test_iso_time():
    assert iso_time(0) == "1970-01-01T00:00:00.000000+00:00"
    assert iso_time(1.5) == "1970-01-01T00:00:01.500000+00:00"
    assert iso_time(1_800_000_000.25) == "2027-01-15T08:00:00.250000+00:00"
    assert iso_time(None) is None


def test_task_object():
    obj = task_object(row())
    assert tuple(obj) == TASK_KEYS
    assert obj == {
        "id": 7,
        "handler": "echo",
        "payload": {"a": [1, 2]},
        "priority": "high",
        "state": "succeeded",
        "attempts": 1,
        "max_attempts": 3,
        "worker": "w1",
        "created_at": "1970-01-01T00:00:00.000000+00:00",
        "started_at": "1970-01-01T00:00:01.500000+00:00",
        "finished_at": "2027-01-15T08:00:00.123456+00:00",
        "result": "done",
        "error": None,
        "traceback": "Traceback (most recent call last):\n  ...\n",
        "run_at": "1970-01-01T00:00:01.250000+00:00",
        "unique_key": "nightly",
        "time_limit": 30.0,
        "submitter": None,
        "progress": None,
    }
    # It is sendable as it is.
    codec.dumps(obj)


def test_task_keys_are_the_old_keys_then_the_new_ones():
    # Readers ignore keys they do not know: keys are only ever added.
    assert TASK_KEYS[:13] == (
        "id",
        "handler",
        "payload",
        "priority",
        "state",
        "attempts",
        "max_attempts",
        "worker",
        "created_at",
        "started_at",
        "finished_at",
        "result",
        "error",
    )
    assert TASK_KEYS[13:] == (
        "traceback",
        "run_at",
        "unique_key",
        "time_limit",
        "submitter",
        "progress",
    )


def test_task_object_nulls():
    obj = task_object(
        row(
            started_at=None,
            finished_at=None,
            result=None,
            worker=None,
            state="queued",
            attempts=0,
            run_at=None,
            unique_key=None,
            time_limit=None,
            traceback=None,
        )
    )
    assert obj["started_at"] is obj["finished_at"] is obj["result"] is None
    assert obj["worker"] is None
    assert obj["run_at"] is obj["unique_key"] is obj["time_limit"] is None
    assert obj["traceback"] is None


def test_task_object_of_a_row_without_the_new_fields():
    # Rows built with the first thirteen fields (schema version 1) still
    # make a complete task object.
    fields = dict(
        id=1,
        handler="echo",
        payload="null",
        priority="normal",
        state="queued",
        attempts=0,
        max_attempts=3,
        worker=None,
        created_at=10.0,
        started_at=None,
        finished_at=None,
        result=None,
        error=None,
    )
    obj = task_object(TaskRow(**fields))
    assert tuple(obj) == TASK_KEYS
    assert {k: obj[k] for k in TASK_KEYS[13:]} == {
        "traceback": None,
        "run_at": None,
        "unique_key": None,
        "time_limit": None,
        "submitter": None,
        "progress": None,
    }
    codec.dumps(obj)


def test_task_object_run_at_is_an_iso_time():
    assert task_object(row(run_at=1_800_000_000.25))["run_at"] == (
        "2027-01-15T08:00:00.250000+00:00"
    )


def test_task_object_keeps_the_failed_attempts_error_and_traceback():
    # A task waiting to be retried keeps them.
    obj = task_object(
        row(
            state="queued",
            result=None,
            error="ValueError: bad",
            traceback="Traceback...",
        )
    )
    assert (obj["state"], obj["error"], obj["traceback"]) == (
        "queued",
        "ValueError: bad",
        "Traceback...",
    )


@pytest.mark.parametrize(
    "text", ["{not json", "NaN", "[Infinity]", '"\\ud800"']
)
def test_task_object_shows_invalid_json_payload_as_text(text):
    # Only rows inserted by SQL carry such payloads.
    obj = task_object(
        row(payload=text, state="failed", error="payload is not valid JSON")
    )
    assert obj["payload"] == text
    codec.dumps(obj)


@pytest.mark.parametrize(
    "fields",
    [
        {"created_at": "yesterday"},
        {"created_at": 1e300, "run_at": float("inf"), "started_at": -1e20},
        {"handler": b"\xffecho", "error": float("nan"), "payload": b"[1]"},
        {"time_limit": float("-inf"), "attempts": "abc", "token": "x"},
    ],
)
def test_task_object_of_a_row_broken_by_another_program_can_be_sent(fields):
    # One such row must not break a GET or a whole LIST page.
    obj = task_object(row(**fields))
    codec.dumps(obj)
    assert obj["created_at"] is not None


def test_task_object_progress():
    obj = task_object(
        row(
            state="running",
            progress=0.5,
            progress_message="half",
            progress_at=1.25,
        )
    )
    assert obj["progress"] == {
        "fraction": 0.5,
        "message": "half",
        "at": "1970-01-01T00:00:01.250000+00:00",
    }
    codec.dumps(obj)
