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
        "name": "build-7", "slots": 4, "priorities": ["high", "normal"],
        "handlers": ["echo", "sleep"], "running": [{"id": 3, "attempt": 2}],
        "heartbeat": 1.5,
    },
    b"READY": {},
    b"RESULT": {"id": 9, "attempt": 1, "state": "succeeded",
                "result": {"x": [1, "é", None]}, "error": None},
    b"HEARTBEAT": {},
    b"BYE": {},
}
CLIENT_SAMPLES = {
    b"SUBMIT": {"req": "r1", "tasks": [
        {"handler": "echo", "payload": {"a": 1}, "priority": "high",
         "max_attempts": 5},
        {"handler": "sleep", "payload": None, "priority": None,
         "max_attempts": None},
    ]},
    b"GET": {"req": "r2", "id": 1},
    b"WAIT": {"req": "r3", "id": 2, "timeout": 60},
    b"LIST": {"req": "r4", "state": "queued", "handler": "echo",
              "after": 0, "limit": 1000},
    b"CANCEL": {"req": "r5", "id": 2**63 - 1},
    b"WORKERS": {"req": "r6"},
    b"STATS": {"req": "r" * 64},
}
BROKER_TO_WORKER_SAMPLES = {
    b"WELCOME": {"broker": "b-1", "priorities": ["high", "low"],
                 "heartbeat": 0.01},
    b"TASK": {"id": 1, "handler": "echo", "payload": [1, 2.5, "三"],
              "priority": "high", "attempt": 1, "max_attempts": 3},
    b"ACK": {"id": 1, "attempt": 2},
    b"HEARTBEAT": {"broker": "b-1"},
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


def test_encode_accepts_json_text_as_is():
    text = '{"id":1,"attempt":2}'
    assert encode(b"ACK", text) == [SIGNATURE, b"ACK", text.encode("utf-8")]


def test_encode_is_compact_utf8():
    assert encode(b"GET", {"req": "é", "id": 1})[2] == (
        '{"req":"é","id":1}'.encode("utf-8"))


def test_submit_task_payload_defaults_to_null():
    _, body = decode(frames(b"SUBMIT", '{"req":"r","tasks":[{"handler":"h"}]}'),
                     CLIENT_COMMANDS)
    assert body["tasks"] == [{"handler": "h", "payload": None}]


def test_optional_fields_may_be_absent():
    assert decode(frames(b"HELLO", '{"name":"w","slots":1,"handlers":[]}'),
                  WORKER_COMMANDS) == (
        b"HELLO", {"name": "w", "slots": 1, "handlers": []})


# -- rejections ---------------------------------------------------------------


@pytest.mark.parametrize("message", [
    [],
    [SIGNATURE],
    [SIGNATURE, b"READY"],
    [SIGNATURE, b"READY", b"{}", b"{}"],
])
def test_wrong_frame_count(message):
    error = rejected(message)
    assert error.code == "protocol"
    assert f"got {len(message)}" in error.message


@pytest.mark.parametrize("message", [
    [b"junk"],
    [b"GET / HTTP/1.1\r\n"],
    [b"TB2", b"READY", b"{}", b"extra"],
])
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
    error = rejected(frames(b"GET", '{"req":"r","id":1}'),
                     BROKER_TO_WORKER_COMMANDS)
    assert error.code == "unknown_command"


def test_too_large():
    body = '{"req":"r","id":1}'
    size = len(SIGNATURE) + len(b"GET") + len(body)
    assert decode(frames(b"GET", body), CLIENT_COMMANDS, max_size=size)
    error = rejected(frames(b"GET", body), CLIENT_COMMANDS, max_size=size - 1)
    assert error.code == "too_large"
    assert str(size) in error.message


def test_default_limit_is_four_mebibytes():
    body = b'{"req":"r","id":1,"pad":"' + b"x" * codec.MAX_MESSAGE_SIZE + b'"}'
    assert rejected(frames(b"GET", body)).code == "too_large"


def test_invalid_utf8():
    error = rejected(frames(b"GET", b'{"req":"\xff","id":1}'))
    assert (error.code, error.message) == ("bad_request", "body is not valid UTF-8")


@pytest.mark.parametrize("body", [
    "", "{", "{'req': 'r'}", '{"req":"r","id":1}x',
    '{"req":"r","id":NaN}', '{"req":"r","id":Infinity}',
    '{"req":"r","id":-Infinity}',
    # Nesting deep enough to overflow Python's decoder.
    "[" * 100_000 + "]" * 100_000,
    # Unpaired surrogates: decodable, but never encodable as UTF-8 again.
    '{"req":"\\ud800","id":1}',
    '{"req":"r","tasks":[{"handler":"h","payload":"\\udcff"}]}',
])
def test_invalid_json(body):
    error = rejected(frames(b"SUBMIT", body))
    assert error.code == "bad_request"
    assert error.message.startswith("body is not valid JSON")
    assert "\n" not in error.message


def test_paired_surrogate_escapes_are_fine():
    _, body = decode(
        frames(b"GET", '{"req":"\\ud83d\\ude00","id":1}'), CLIENT_COMMANDS)
    assert body["req"] == "\U0001F600"


@pytest.mark.parametrize("body", ["[]", '"x"', "1", "null", "true"])
def test_non_object_json(body):
    error = rejected(frames(b"READY", body))
    assert (error.code, error.message) == ("bad_request", "body is not a JSON object")


@pytest.mark.parametrize("command, body, field", [
    (b"GET", {"req": "r"}, "id"),
    (b"GET", {"id": 1}, "req"),
    (b"HELLO", {"name": "w", "handlers": []}, "slots"),
    (b"RESULT", {"id": 1, "attempt": 1}, "state"),
])
def test_missing_required_field(command, body, field):
    error = rejected(encode(command, body))
    assert error.code == "bad_request"
    assert f"missing field {field!r}" in error.message
    assert error.req == body.get("req")


@pytest.mark.parametrize("command, body, field", [
    # bool is an int in Python but not in the protocol.
    (b"GET", {"req": "r", "id": True}, "id"),
    (b"GET", {"req": "r", "id": 1.0}, "id"),
    (b"GET", {"req": "r", "id": "1"}, "id"),
    (b"GET", {"req": "r", "id": 0}, "id"),
    (b"GET", {"req": "r", "id": 2**63}, "id"),
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
    (b"HELLO", {"name": "w", "slots": 1, "handlers": [], "heartbeat": 0},
     "heartbeat"),
    (b"HELLO", {"name": "w", "slots": 1, "handlers": [],
                "running": [{"id": 1}]}, "running"),
    (b"HELLO", {"name": "w", "slots": 1, "handlers": [], "running": [1]},
     "running"),
    (b"RESULT", {"id": 1, "attempt": 1, "state": "queued"}, "state"),
    (b"RESULT", {"id": 1, "attempt": 1, "state": "failed", "error": 3},
     "error"),
])
def test_wrong_types_and_ranges(command, body, field):
    error = rejected(encode(command, body))
    assert error.code == "bad_request"
    assert f"field {field!r}" in error.message
    assert "\n" not in error.message


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_nan_is_not_encoded(value):
    with pytest.raises(ValueError):
        encode(b"RESULT", {"id": 1, "attempt": 1, "state": "succeeded",
                           "result": value})
    with pytest.raises(ValueError):
        codec.dumps([value])


def test_unencodable_string_is_not_dumped():
    # os.fsdecode's surrogateescape makes such strings; they cannot be sent.
    with pytest.raises(ValueError):
        codec.dumps({"path": "\udcff"})


def test_loads_is_strict():
    assert codec.loads('{"a":[1,2.5,"x",null]}') == {"a": [1, 2.5, "x", None]}
    for text in ["NaN", "[Infinity]", '"\\ud800"', "[" * 100_000]:
        with pytest.raises(ValueError):
            codec.loads(text)


@pytest.mark.parametrize("name", [
    "", "x" * (codec.MAX_NAME + 1), "bad\nname", "tab\there", "nul\x00",
    "\x7f", 5, None,
])
def test_bad_names(name):
    body = {"req": "r", "tasks": [{"handler": name}]}
    error = rejected(encode(b"SUBMIT", body))
    assert error.code == "bad_request"
    assert "'handler'" in error.message
    assert "\n" not in error.message


def test_longest_and_unicode_names_are_fine():
    for name in ["x" * codec.MAX_NAME, "résumé-build 7", "x"]:
        _, body = decode(encode(b"SUBMIT", {"req": "r", "tasks": [
            {"handler": name}]}), CLIENT_COMMANDS)
        assert body["tasks"][0]["handler"] == name


def test_worker_name_is_checked_like_a_handler_name():
    error = rejected(encode(b"HELLO", {"name": "a\x1b[31m", "slots": 1,
                                       "handlers": []}))
    assert "'name'" in error.message and "control" in error.message


@pytest.mark.parametrize("count", [0, codec.MAX_BATCH + 1])
def test_submit_batch_size(count):
    body = {"req": "batch", "tasks": [{"handler": "echo"}] * count}
    error = rejected(encode(b"SUBMIT", body))
    assert error.code == "bad_request"
    assert "'tasks'" in error.message
    assert error.req == "batch"


def test_submit_largest_batch():
    body = {"req": "batch", "tasks": [{"handler": "echo"}] * codec.MAX_BATCH}
    assert len(decode(encode(b"SUBMIT", body), CLIENT_COMMANDS)[1]["tasks"]) == (
        codec.MAX_BATCH)


def test_req_is_copied_into_the_error():
    error = rejected(encode(b"GET", {"req": "abc", "id": -1}))
    assert error.req == "abc"


def test_req_of_a_bad_task_in_a_submit_is_copied():
    error = rejected(encode(b"SUBMIT", {"req": "abc", "tasks": [
        {"handler": "echo"}, {"payload": 1}]}))
    assert error.code == "bad_request"
    assert "'handler'" in error.message
    assert error.req == "abc"


def test_req_of_a_bad_task_field_in_a_submit_is_copied():
    error = rejected(encode(b"SUBMIT", {"req": "abc", "tasks": [
        {"handler": "echo", "max_attempts": 0}]}))
    assert "'max_attempts'" in error.message
    assert error.req == "abc"


@pytest.mark.parametrize("req", [None, 7, "", "r" * 65])
def test_unreadable_req_is_not_copied(req):
    # It could not be sent back in an ERROR (whose req must be valid too).
    error = rejected(encode(b"GET", {"req": req, "id": 0}))
    assert error.req is None


def test_unknown_fields_are_dropped():
    assert decode(encode(b"GET", {"req": "r", "id": 1, "new": [1]}),
                  CLIENT_COMMANDS) == (b"GET", {"req": "r", "id": 1})


def test_unknown_fields_are_rejected_when_strict():
    error = rejected(encode(b"GET", {"req": "r", "id": 1, "new": 1, "b": 2}),
                     CLIENT_COMMANDS, strict=True)
    assert error.code == "bad_request"
    assert "'b', 'new'" in error.message
    assert error.req == "r"


# -- property: decode never fails in any other way ------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats()
    | st.text() | st.sampled_from(["\ud800", "\udfff", "a\udcff"]),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)

ALL_COMMANDS = sorted({c for table, _ in TABLES for c in table})


@st.composite
def bodies(draw):
    """
    JSON text: objects that use the commands' field names (so that the
    field checks run) as well as anything else.
    """
    field_names = sorted({f for table, _ in TABLES for fields in table.values()
                          for f in fields})
    obj = draw(st.dictionaries(
        st.sampled_from(field_names) | st.text(max_size=5), json_values,
        max_size=6))
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


SAMPLES = [(table, command, body) for table, samples in TABLES
           for command, body in samples.items()]
awkward_values = st.sampled_from(
    [float("nan"), float("inf"), "\ud800", ["\udcff"], {"x": -float("inf")}])


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
@given(st.lists(st.binary(max_size=40), max_size=5),
       st.sampled_from([t for t, _ in TABLES]))
def test_random_frames_decode_or_raise_protocol_error(message, commands):
    assert_decodes_or_protocol_error(message, commands)


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(ALL_COMMANDS), bodies(),
       st.sampled_from([t for t, _ in TABLES]))
def test_random_bodies_decode_or_raise_protocol_error(command, body, commands):
    assert_decodes_or_protocol_error([SIGNATURE, command, body], commands)


# -- task objects ---------------------------------------------------------------


def row(**changes):
    fields = dict(
        id=7, handler="echo", payload='{"a":[1,2]}', priority="high",
        state="succeeded", attempts=1, max_attempts=3, worker="w1",
        created_at=0.0, started_at=1.5, finished_at=1_800_000_000.123456,
        result='"done"', error=None)
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
        "id": 7, "handler": "echo", "payload": {"a": [1, 2]},
        "priority": "high", "state": "succeeded", "attempts": 1,
        "max_attempts": 3, "worker": "w1",
        "created_at": "1970-01-01T00:00:00.000000+00:00",
        "started_at": "1970-01-01T00:00:01.500000+00:00",
        "finished_at": "2027-01-15T08:00:00.123456+00:00",
        "result": "done", "error": None,
    }
    # It is sendable as it is.
    codec.dumps(obj)


def test_task_object_nulls():
    obj = task_object(row(started_at=None, finished_at=None, result=None,
                          worker=None, state="queued", attempts=0))
    assert obj["started_at"] is obj["finished_at"] is obj["result"] is None
    assert obj["worker"] is None


@pytest.mark.parametrize("text", ["{not json", "NaN", "[Infinity]",
                                  '"\\ud800"'])
def test_task_object_shows_invalid_json_payload_as_text(text):
    # Only rows inserted by SQL carry such payloads.
    obj = task_object(row(payload=text, state="failed",
                          error="payload is not valid JSON"))
    assert obj["payload"] == text
    codec.dumps(obj)
