"""
Tests for taskbroker.wording.
"""

from taskbroker.wording import counted, edit_distance, nearest


def test_counted():
    assert [counted(n, "slot") for n in (0, 1, 2)] == [
        "0 slots",
        "1 slot",
        "2 slots",
    ]


def test_edit_distance():
    assert edit_distance("echo", "echo") == 0
    assert edit_distance("ecoh", "echo") == 2
    assert edit_distance("", "abc") == 3


def test_nearest_is_the_closest_within_two_edits():
    served = ["echo", "resize", "acme.checksum"]
    assert nearest("ecco", served) == "echo"
    assert nearest("resise", served) == "resize"
    assert nearest("acme.chcksum", served) == "acme.checksum"
    assert nearest("report", served) is None
    assert nearest("x", []) is None
    # Among equals, the first in order.
    assert nearest("ab", ["ac", "aa"]) == "aa"
