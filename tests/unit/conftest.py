"""
Shared setup for the unit tests: Hypothesis profiles, and the fake broker
the client and CLI tests talk to.

``ci`` (selected when ``CI=true``) is reproducible and has no deadline,
because shared CI machines are slow and a flaky deadline proves nothing;
``dev`` keeps Hypothesis' defaults.
"""

import json
import os

import pytest
import zmq
from hypothesis import settings
from twisted.internet.task import Clock

from taskbroker.protocol import codec
from taskbroker.testing import MemoryStore, SharedMemoryDatabase, result_of
from taskbroker.testing.fakebroker import FakeBroker

settings.register_profile("ci", deadline=None, derandomize=True)
settings.register_profile("dev")
settings.load_profile("ci" if os.environ.get("CI") == "true" else "dev")


@pytest.fixture
def broker():
    """
    A scripted fake broker (tests/unit/fakebroker.py).  test_broker.py has
    a fixture of the same name for the real broker core, which takes
    precedence there.
    """
    with FakeBroker() as fake:
        yield fake
        assert fake.errors == []


@pytest.fixture
def silent_endpoint():
    """
    A bound ROUTER that never reads: connections succeed, answers never
    come, so requests time out quickly.
    """
    context = zmq.Context()
    router = context.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.bind("tcp://127.0.0.1:*")
    yield router.getsockopt_string(zmq.LAST_ENDPOINT)
    router.close(0)
    context.term()


@pytest.fixture
def curve_keys(tmp_path):
    """
    Key pairs made by ``taskbroker keygen`` in ``tmp_path/keys``: the
    broker's, a worker's (``w1``) and a client's (``c1``).

    :returns: a function of a file name in that folder (``"broker.key"``,
        ``"c1.key_secret"``) to its path, a ``str``.
    """
    from taskbroker import curve

    folder = tmp_path / "keys"
    for name in ("broker", "w1", "c1"):
        curve.keygen(str(folder), name)
    return lambda name: str(folder / name)


# The broker core's tests (test_broker.py and its neighbours): a Clock,
# the store, and a list in place of the socket.


class Peers:
    """
    Stands in for the ROUTER socket: records what the broker sends.
    """

    def __init__(self):
        self.sent = []
        self.gone = set()

    def send(self, identity, frames):
        if identity in self.gone:
            return False
        assert frames[0] == codec.SIGNATURE
        self.sent.append((identity, frames[1], json.loads(frames[2])))
        return True

    def take(self, identity=None, command=None):
        """
        Remove and return the messages sent (to ``identity``, of
        ``command``).
        """
        taken = [
            m
            for m in self.sent
            if (identity is None or m[0] == identity)
            and (command is None or m[1] == command)
        ]
        self.sent = [m for m in self.sent if m not in taken]
        return taken


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture(params=["owner", "shared"])
def store(clock, request):
    """
    The store, as one broker's own (claims ahead), or as a database shared
    by several brokers (claims only for idle credits).
    """
    if request.param == "owner":
        s = MemoryStore(clock)
    else:
        s = SharedMemoryDatabase(clock).store
    result_of(s.open())
    return s


@pytest.fixture
def peers():
    return Peers()
