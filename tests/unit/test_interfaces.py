"""
Implementations provide the interfaces of taskbroker.interfaces.
"""

import pytest
from twisted.internet.task import Clock
from twisted.plugin import IPlugin
from zope.interface.verify import verifyClass, verifyObject

from taskbroker.interfaces import ITask, ITaskHandler
from taskbroker.plugins import taskbroker_builtin_handlers as builtins
from taskbroker.protocol.codec import MAX_NAME
from taskbroker.worker.task import RunningTask


@pytest.mark.parametrize("handler", [builtins.echo, builtins.sleep])
def test_builtin_handlers_provide_ITaskHandler(handler):
    assert verifyClass(ITaskHandler, type(handler))
    assert verifyObject(ITaskHandler, handler)
    # getPlugins finds only what provides IPlugin too.
    assert IPlugin.providedBy(handler)
    # The attributes' documented constraints.
    assert isinstance(handler.name, str) and 0 < len(handler.name) <= MAX_NAME
    assert handler.blocking in (True, False)


def test_builtin_names():
    assert (builtins.echo.name, builtins.sleep.name) == ("echo", "sleep")


def test_running_task_provides_ITask():
    task = RunningTask(
        {
            "id": 1,
            "handler": "echo",
            "payload": None,
            "priority": "normal",
            "attempt": 1,
            "max_attempts": 3,
        },
        Clock(),
    )
    assert verifyObject(ITask, task)


def test_one_line_and_describe():
    from taskbroker.errors import describe, one_line

    assert one_line("a\n  b\tc ") == "a b c"
    assert one_line(ValueError()) == "ValueError"
    assert describe(ValueError("bad\nthing")) == "ValueError: bad thing"
    assert describe(KeyError()) == "KeyError"

    class Broken(Exception):
        def __str__(self):
            raise AttributeError("detail")

    assert describe(Broken()) == "Broken: (its message could not be shown)"


def test_stores_provide_their_interfaces_and_a_claim_source(tmp_path):
    from taskbroker.interfaces import IClaimSource, IQueueReads, ITaskStore
    from taskbroker.store.claims import OwnerClaims
    from taskbroker.store.sqlite import SQLiteStore
    from taskbroker.testing import MemoryStore

    for store in (
        MemoryStore(),
        SQLiteStore(str(tmp_path / "t.sqlite"), Clock()),
    ):
        assert verifyObject(ITaskStore, store)
        assert verifyObject(IQueueReads, store)
        claims = store.claims("b1")
        assert isinstance(claims, OwnerClaims)
        assert verifyObject(IClaimSource, claims)
        assert (claims.shared, claims.lease) == (False, None)
