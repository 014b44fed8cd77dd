"""
Tests for taskbroker.broker.admission: the bounds on client work.
"""

from taskbroker.broker.admission import Admission, cost
from taskbroker.protocol import codec


def test_requests_are_taken_on_until_either_bound_then_released():
    admission = Admission(max_pending=2, max_pending_bytes=100)
    assert admission.admit(40) and admission.admit(40)
    assert not admission.admit(1)  # two in progress
    admission.release(40)
    assert not admission.admit(61)  # 40 + 61 bytes > 100
    assert admission.admit(60)
    admission.release(40)
    admission.release(60)
    assert (admission.pending, admission.pending_bytes) == (0, 0)


def test_held_waits_are_bounded():
    admission = Admission(max_waits=1)
    assert admission.hold_wait() and not admission.hold_wait()
    admission.end_wait()
    assert admission.hold_wait()


def test_a_read_costs_the_reply_it_may_make():
    assert cost(b"GET", b"{}") == 2 + codec.MAX_MESSAGE_SIZE
    assert cost(b"LIST", b"{}") == (
        2 + codec.MAX_LIST_BYTES + codec.MAX_MESSAGE_SIZE
    )
