"""
Fixtures for the process-level tests.
"""

import pytest

from .daemons import Cluster


@pytest.fixture
def cluster(tmp_path):
    """
    A folder to run daemons in; every daemon started through it is
    stopped (by pid) when the test ends.
    """
    c = Cluster(tmp_path)
    try:
        yield c
    finally:
        c.stop_all()
