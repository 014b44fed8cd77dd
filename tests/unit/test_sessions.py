"""
Tests for taskbroker.broker.sessions: the registry of connected workers.
"""

from taskbroker.broker.sessions import Session, Sessions


def session(identity=b"r1", name="w1", heartbeat=1.0, seen=0.0, slots=2):
    return Session(
        identity,
        name,
        ("normal",),
        ("echo",),
        slots,
        heartbeat,
        now=1000.0,
        monotonic_now=seen,
    )


def test_sessions_are_found_by_route_and_by_name():
    sessions = Sessions()
    s = session()
    sessions.add(s)
    assert sessions.get(b"r1") is s and b"r1" in sessions
    assert sessions.holder_of("w1") is s
    assert sessions.holder_of("w2") is None
    assert list(sessions) == [s] and len(sessions) == 1
    assert sessions.total_slots() == 2


def test_removing_a_session_frees_its_name():
    sessions = Sessions()
    s = session()
    sessions.add(s)
    sessions.remove(s)
    assert sessions.get(b"r1") is None and sessions.holder_of("w1") is None
    assert len(sessions) == 0


def test_a_replaced_session_is_no_longer_current():
    sessions = Sessions()
    old, new = session(), session(name="w1b")
    sessions.add(old)
    assert sessions.is_current(old)
    sessions.remove(old)
    sessions.add(new)
    assert not sessions.is_current(old) and sessions.is_current(new)
    # Removing the old one again leaves the new one alone.
    sessions.remove(old)
    assert sessions.get(b"r1") is new and sessions.holder_of("w1b") is new


def test_a_name_held_by_another_route_stays_with_it():
    sessions = Sessions()
    first = session(b"r1", "w1")
    sessions.add(first)
    other = session(b"r2", "w1")
    # Removing a session whose name another route holds keeps the holder.
    sessions.remove(other)
    assert sessions.holder_of("w1") is first


def test_silent_sessions_by_their_own_heartbeat():
    sessions = Sessions()
    fast = session(b"r1", "fast", heartbeat=1.0, seen=0.0)
    slow = session(b"r2", "slow", heartbeat=5.0, seen=0.0)
    sessions.add(fast)
    sessions.add(slow)
    assert sessions.silent(3.0, misses=3) == []
    assert sessions.silent(3.1, misses=3) == [fast]
    assert set(sessions.silent(15.1, misses=3)) == {fast, slow}
