"""
Tests for taskbroker.broker.attempts: the ledger of current attempts and
their fencing tokens.
"""

from taskbroker.broker.attempts import Attempts


def live(*identities):
    return set(identities).__contains__


def test_a_report_counts_only_for_the_current_token():
    attempts = Attempts()
    attempts.start(1, 2, "row", b"w1")
    assert attempts.current(1, 1) is None
    assert attempts.end(1, 1) is None
    assert 1 in attempts
    ended = attempts.end(1, 2)
    assert (ended.task_id, ended.token, ended.row, ended.session) == (
        1,
        2,
        "row",
        b"w1",
    )
    assert 1 not in attempts and attempts.end(1, 2) is None


def test_a_new_dispatch_replaces_the_earlier_attempt():
    attempts = Attempts()
    attempts.start(1, 1, "row", b"w1")
    attempts.start(1, 2, "row", b"w2")
    assert attempts.current(1, 1) is None
    assert attempts.get(1).session == b"w2" and len(attempts) == 1


def test_end_without_a_token_forgets_any_attempt():
    attempts = Attempts()
    attempts.orphan(1, 5, "row", deadline=10)
    assert attempts.end(1).token == 5
    assert attempts.expired(100, live()) == []


def test_an_orphan_is_claimed_by_the_worker_that_runs_it():
    attempts = Attempts()
    attempts.orphan(1, 3, "row", deadline=10)
    assert attempts.claim(1, 3, b"w1", live()) == "claimed"
    assert attempts.get(1).session == b"w1"
    # Claimed: its deadline no longer applies.
    assert attempts.expired(100, live(b"w1")) == []


def test_a_stale_claim_is_refused():
    attempts = Attempts()
    attempts.orphan(1, 3, "row", deadline=10)
    assert attempts.claim(1, 2, b"w1", live()) == "stale"
    assert attempts.claim(2, 1, b"w1", live()) == "stale"
    assert attempts.get(1).session is None


def test_an_attempt_a_live_session_holds_is_not_taken_over():
    attempts = Attempts()
    attempts.start(1, 1, "row", b"w1")
    assert attempts.claim(1, 1, b"w2", live(b"w1")) == "held"
    assert attempts.get(1).session == b"w1"
    # Once w1 is gone, the attempt may be claimed by its new route.
    assert attempts.claim(1, 1, b"w2", live()) == "claimed"
    assert attempts.get(1).session == b"w2"


def test_orphans_expire_at_their_deadline_unless_held():
    attempts = Attempts()
    attempts.orphan(1, 1, "a", deadline=10)
    attempts.orphan(2, 1, "b", deadline=20)
    assert attempts.expired(9.9, live()) == []
    [taken] = attempts.expired(10, live())
    assert taken.task_id == 1 and 1 not in attempts
    attempts.claim(2, 1, b"w1", live())
    assert attempts.expired(30, live(b"w1")) == []
    assert 2 in attempts


def test_a_dispatch_clears_an_orphans_deadline():
    attempts = Attempts()
    attempts.orphan(1, 1, "a", deadline=10)
    attempts.start(1, 2, "a", b"w1")
    assert attempts.expired(100, live()) == []
    assert attempts.get(1).token == 2
