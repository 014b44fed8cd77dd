"""
The ZAP handler's answers (taskbroker.transport.zap.answer).
"""

import zmq
from zmq.utils import z85

from taskbroker.transport.zap import answer

PUBLIC, _ = zmq.curve_keypair()
RAW = z85.decode(PUBLIC)


def request(mechanism=b"CURVE", credentials=(RAW,), version=b"1.0"):
    return [
        version,
        b"7",
        b"taskbroker",
        b"127.0.0.1",
        b"",
        mechanism,
        *credentials,
    ]


def test_an_admitted_key_gets_200_and_its_key_as_user_id():
    reply, key, reason = answer(
        request(), lambda key: None if key == PUBLIC else "no"
    )
    assert reply == [b"1.0", b"7", b"200", b"OK", PUBLIC, b""]
    assert (key, reason) == (PUBLIC, None)


def test_an_unknown_key_gets_400_and_no_user_id():
    reply, key, reason = answer(request(), lambda key: "unknown")
    assert reply == [b"1.0", b"7", b"400", b"Refused", b"", b""]
    assert (key, reason) == (PUBLIC, "unknown")


def test_other_mechanisms_and_bad_requests_are_refused():
    everyone = lambda key: None  # noqa: E731
    for frames in (
        request(b"NULL", ()),
        request(b"PLAIN", (b"u", b"p")),
        request(credentials=(b"short",)),
        request(version=b"2.0"),
        [b"1.0"],
        [],
    ):
        reply, key, reason = answer(frames, everyone)
        assert reply[2] == b"400" and key is None and reason


def test_a_handler_that_cannot_bind_raises_and_leaves_nothing_open():
    import pytest
    from twisted.internet import reactor
    from txzmq import ZmqFactory

    from taskbroker.transport.zap import ZAP_ENDPOINT, ZapHandler

    factory = ZmqFactory()
    factory.reactor = reactor
    squatter = factory.context.socket(zmq.REP)
    squatter.bind(ZAP_ENDPOINT)
    try:
        with pytest.raises(zmq.ZMQError):
            ZapHandler(factory, lambda key: None, lambda *args: None)
        assert factory.connections == set()
    finally:
        squatter.close()
        factory.shutdown()


def test_failed_handshakes_are_told_in_words():
    from taskbroker.transport.zap import why_failed

    assert (
        why_failed(
            zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
            zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH,
        )
        == "it does not use CURVE"
    )
    assert why_failed(
        zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
        zmq.PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC,
    ).startswith("its keys do not fit")
    assert why_failed(zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL, 32).startswith(
        "error 0x20 (a peer without CURVE"
    )
