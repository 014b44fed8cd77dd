"""
The Twisted client against a real broker and worker: submit, wait, read.
"""

import pytest_twisted
from twisted.internet import defer, reactor

from taskbroker.client.api import BrokerClient
from taskbroker.client.errors import TaskNotFound


@pytest_twisted.inlineCallbacks
def test_twisted_client(cluster):
    cluster.start_broker()
    cluster.start_worker(name="w1", wait=False)
    client = BrokerClient(reactor, cluster.endpoint, timeout=10)
    try:
        task, unserved = yield client.submit(
            "echo", {"hello": "world"}, priority="high"
        )
        assert task["state"] == "queued" and task["priority"] == "high"
        done = yield client.wait(task["id"])
        assert done["state"] == "succeeded"
        assert done["result"] == {"hello": "world"}

        many, _ = yield client.submit_many(
            [{"handler": "echo", "payload": i} for i in range(1500)]
        )
        assert len(many) == 1500
        results = yield defer.gatherResults(
            [client.wait(t["id"]) for t in many[-3:]]
        )
        assert [r["result"] for r in results] == [1497, 1498, 1499]

        listed = yield client.list(state="succeeded", limit=2000)
        assert len(listed) == 1501
        stats = yield client.stats()
        assert stats["tasks"]["succeeded"] == {"high": 1, "normal": 1500}
        workers = yield client.workers()
        assert [w["name"] for w in workers] == ["w1"]
        try:
            yield client.get(10**9)
        except TaskNotFound:
            pass
        else:
            raise AssertionError("expected TaskNotFound")
    finally:
        yield client.close()
