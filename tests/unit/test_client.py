# -*- test-case-name: tests.unit.test_client -*-
"""
Tests for :mod:`taskbroker.client`: the shared calls, the blocking Lazy
Pirate client and the Twisted client, against a scripted fake broker.
"""

import itertools
import threading

import pytest
import pytest_twisted
from twisted.internet.defer import gatherResults
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread

from taskbroker.client import (
    FINAL_STATES,
    SUBMIT_CHUNK_BYTES,
    Submission,
    check_task_spec,
    retry_call,
    submit_call,
)
from taskbroker.client.api import BrokerClient
from taskbroker.client.blocking import BlockingClient
from taskbroker.client.errors import (
    BrokerUnavailable,
    InvalidRequest,
    RequestFailed,
    TaskNotFound,
)
from taskbroker.protocol import codec
from taskbroker.testing.fakebroker import (
    FakeBroker,
    error,
    lose_replies,
    make_task,
    reply,
    sequence,
    submitted,
)
from taskbroker.transport.zmq import ZmqFactoryService


@pytest.fixture
def client(broker):
    with BlockingClient(broker.endpoint, timeout=2.0) as blocking:
        yield blocking


# The shared calls, without I/O.


def test_check_task_spec_fills_defaults():
    task, size = check_task_spec({"handler": "echo"})
    assert task == {
        "handler": "echo",
        "payload": None,
        "priority": None,
        "max_attempts": None,
        "delay": None,
        "unique_key": None,
        "time_limit": None,
    }
    assert size == len(codec.dumps(task))


def test_check_task_spec_keeps_the_new_fields():
    spec = {
        "handler": "echo",
        "delay": 0,
        "unique_key": "nightly-report",
        "time_limit": 0.5,
    }
    task, _ = check_task_spec(spec)
    assert {key: task[key] for key in spec} == spec


@pytest.mark.parametrize(
    "spec, code, text",
    [
        ({"handler": ""}, "bad_request", "handler"),
        ({"payload": 1}, "bad_request", "handler"),
        (
            {"handler": "echo", "max_attempts": 0},
            "bad_request",
            "max_attempts",
        ),
        (
            {"handler": "echo", "max_attempts": True},
            "bad_request",
            "max_attempts",
        ),
        ({"handler": "echo", "priorty": "high"}, "bad_request", "priorty"),
        ({"handler": "echo", "delay": -1}, "bad_request", "delay"),
        ({"handler": "echo", "delay": True}, "bad_request", "delay"),
        ({"handler": "echo", "delay": "10"}, "bad_request", "delay"),
        ({"handler": "echo", "delay": float("nan")}, "bad_request", "delay"),
        ({"handler": "echo", "delay": float("inf")}, "bad_request", "delay"),
        (
            {"handler": "echo", "delay": codec.MAX_SECONDS + 1},
            "bad_request",
            "delay",
        ),
        ({"handler": "echo", "time_limit": 0}, "bad_request", "time_limit"),
        ({"handler": "echo", "time_limit": -5}, "bad_request", "time_limit"),
        (
            {"handler": "echo", "time_limit": float("nan")},
            "bad_request",
            "time_limit",
        ),
        ({"handler": "echo", "unique_key": ""}, "bad_request", "unique_key"),
        ({"handler": "echo", "unique_key": 7}, "bad_request", "unique_key"),
        (
            {"handler": "echo", "unique_key": "a\nb"},
            "bad_request",
            "unique_key",
        ),
        (
            {"handler": "echo", "unique_key": "k" * 201},
            "bad_request",
            "unique_key",
        ),
        (
            {"handler": "echo", "unique_key": {"a"}},
            "bad_request",
            "unique_key",
        ),
        (
            {"handler": "echo", "payload": float("nan")},
            "bad_request",
            "payload",
        ),
        (
            {"handler": "echo", "payload": "x" * codec.MAX_PAYLOAD_SIZE},
            "too_large",
            "payload",
        ),
        ("echo", "bad_request", "object"),
    ],
)
def test_check_task_spec_refuses(spec, code, text):
    with pytest.raises(InvalidRequest) as caught:
        check_task_spec(spec)
    assert caught.value.code == code
    assert text in caught.value.message
    assert isinstance(caught.value, ValueError)


def _requests_of(call, answer):
    """
    Drive a call, answering each request with ``answer(request)``; return
    the requests and the result.
    """
    requests = []
    try:
        request = next(call)
        while True:
            requests.append(request)
            request = call.send(answer(request))
    except StopIteration as stop:
        return requests, stop.value


def _accept(request):
    tasks = request.fields["tasks"]
    return {"tasks": [make_task(1) for _ in tasks], "unserved": []}


def test_submit_call_chunks_by_count():
    specs = [{"handler": "echo", "payload": n} for n in range(2500)]
    requests, (tasks, _) = _requests_of(submit_call(specs), _accept)
    assert [len(r.fields["tasks"]) for r in requests] == [1000, 1000, 500]
    # Resendable, thanks to a request_id of its own per SUBMIT.
    assert all(r.idempotent and r.writes for r in requests)
    request_ids = [r.fields["request_id"] for r in requests]
    assert len(set(request_ids)) == 3
    assert all(len(rid) == 32 and int(rid, 16) >= 0 for rid in request_ids)
    assert [t["payload"] for r in requests for t in r.fields["tasks"]] == list(
        range(2500)
    )
    assert len(tasks) == 2500


def test_submit_call_chunks_by_size():
    big = "x" * (400 * 1024)
    specs = [{"handler": "echo", "payload": big} for _ in range(5)]
    requests, _ = _requests_of(submit_call(specs), _accept)
    assert [len(r.fields["tasks"]) for r in requests] == [2, 2, 1]
    for request in requests:
        assert len(codec.dumps(request.fields)) <= SUBMIT_CHUNK_BYTES + 100
    # The largest payload travels alone, within the message limit.
    largest = "x" * (codec.MAX_PAYLOAD_SIZE - 2)
    requests, _ = _requests_of(
        submit_call(
            [
                {
                    "handler": "h" * 200,
                    "payload": largest,
                    "unique_key": "k" * 200,
                    "priority": "p" * 200,
                }
            ]
            * 2
        ),
        _accept,
    )
    assert [len(r.fields["tasks"]) for r in requests] == [1, 1]


def test_submit_call_collects_existing_ids():
    counter = itertools.count(1)

    def answer(request):
        tasks = [make_task(next(counter)) for _ in request.fields["tasks"]]
        # One task per request already existed; an id not among the
        # tasks is not taken.
        return {
            "tasks": tasks,
            "unserved": [],
            "existing": [tasks[0]["id"], 99999],
        }

    specs = [{"handler": "echo"}] * 1500
    _, result = _requests_of(submit_call(specs), answer)
    assert isinstance(result, Submission)
    tasks, unserved = result
    assert len(tasks) == 1500 and unserved == []
    assert result.existing == {1, 1001}


def test_submit_call_without_existing_creates_everything():
    # A broker from before 'existing'.
    _, result = _requests_of(submit_call([{"handler": "echo"}]), _accept)
    assert result.existing == frozenset()


@pytest.mark.parametrize(
    "body",
    [
        {"tasks": [], "unserved": []},
        {"tasks": [make_task(1), make_task(2)], "unserved": []},
        {"tasks": [make_task(1)], "unserved": [], "existing": "1"},
        {"tasks": [make_task(1)], "unserved": [], "existing": [True]},
        {"tasks": [make_task(1)], "unserved": "echo"},
    ],
)
def test_submit_call_refuses_malformed_replies(body):
    call = submit_call([{"handler": "echo"}])
    next(call)
    with pytest.raises(RequestFailed) as caught:
        call.send(body)
    assert caught.value.code == "protocol"
    assert caught.value.submitted == []


def test_retry_call_may_be_resent():
    call = retry_call(4)
    request = next(call)
    assert (request.command, request.fields) == (b"RETRY", {"id": 4})
    assert request.idempotent and request.writes


def test_retry_call_refuses_a_task_left_as_it_was():
    # The broker answers a task whose unique key another live task holds
    # unchanged, as a success.
    call = retry_call(4)
    next(call)
    with pytest.raises(RequestFailed) as caught:
        call.send({"task": make_task(4, state="failed", unique_key="k")})
    assert caught.value.code == "not_retryable"
    assert "'k'" in caught.value.message


def test_submit_call_checks_everything_first():
    call = submit_call([{"handler": "echo"}] * 3 + [{"handler": ""}])
    with pytest.raises(InvalidRequest) as caught:
        next(call)
    assert caught.value.message.startswith("task 3: ")


# BlockingClient.


def test_submit(broker, client):
    broker.handlers["SUBMIT"] = submitted(unserved=["echo"])
    result = client.submit("echo", {"n": 1}, priority="high", max_attempts=2)
    task, unserved = result
    assert task["id"] == 1 and task["payload"] == {"n": 1}
    assert unserved == ["echo"]
    [(command, body)] = broker.requests
    assert command == "SUBMIT"
    assert body["tasks"] == [
        {
            "handler": "echo",
            "payload": {"n": 1},
            "priority": "high",
            "max_attempts": 2,
            "delay": None,
            "unique_key": None,
            "time_limit": None,
        }
    ]
    assert len(body["req"]) == 32
    assert len(body["request_id"]) == 32 and body["request_id"] != body["req"]
    assert isinstance(result, Submission) and result.existing == frozenset()


def test_submit_new_options(broker, client):
    broker.handlers["SUBMIT"] = submitted()
    task, _ = client.submit(
        "echo", delay=2.5, unique_key="report-7", time_limit=30
    )
    [(_, body)] = broker.requests
    [sent] = body["tasks"]
    assert (sent["delay"], sent["unique_key"], sent["time_limit"]) == (
        2.5,
        "report-7",
        30,
    )
    assert task["unique_key"] == "report-7" and task["time_limit"] == 30
    assert task["run_at"] is not None


@pytest.mark.parametrize(
    "kwargs",
    [
        {"delay": -1},
        {"delay": float("nan")},
        {"time_limit": 0},
        {"unique_key": ""},
        {"unique_key": 3},
    ],
)
def test_submit_new_options_are_checked(broker, client, kwargs):
    with pytest.raises(InvalidRequest):
        client.submit("echo", **kwargs)
    assert broker.requests == []


def test_submit_with_a_live_unique_key_gives_the_existing_task(broker, client):
    live = {"nightly": make_task(3, unique_key="nightly", state="running")}
    broker.handlers["SUBMIT"] = submitted(first_id=10, live_keys=live)
    result = client.submit("echo", unique_key="nightly")
    task, unserved = result
    assert task["id"] == 3 and result.existing == {3}
    result = client.submit_many(
        [
            {"handler": "echo", "unique_key": "other"},
            {"handler": "echo", "unique_key": "nightly"},
            {"handler": "echo", "unique_key": "other"},
        ]
    )
    tasks, unserved = result
    # Task 10 was created by this submission, for its first spec.
    assert [t["id"] for t in tasks] == [10, 3, 10]
    assert result.existing == {3}
    assert unserved == set()


def test_submit_many_returns_tasks_in_order_and_unserved_set(broker, client):
    broker.handlers["SUBMIT"] = submitted(
        unserved=lambda tasks: sorted({t["handler"] for t in tasks} - {"ok"})
    )
    specs = [{"handler": "ok"}] * 1500 + [{"handler": "lonely"}]
    tasks, unserved = client.submit_many(specs)
    assert [t["id"] for t in tasks] == list(range(1, 1502))
    assert unserved == {"lonely"}
    assert broker.commands() == ["SUBMIT", "SUBMIT"]


def test_submit_many_partial_failure_lists_committed(broker, client):
    broker.handlers["SUBMIT"] = sequence(
        submitted()({"tasks": [{"handler": "echo"}] * 1000}),
        error("unavailable", "database busy"),
    )
    with pytest.raises(RequestFailed) as caught:
        client.submit_many([{"handler": "echo"}] * 1001)
    assert caught.value.code == "unavailable"
    assert len(caught.value.submitted) == 1000


def test_invalid_spec_sends_nothing(broker, client):
    with pytest.raises(InvalidRequest):
        client.submit_many(
            [{"handler": "echo"}, {"handler": "echo", "max_attempts": -1}]
        )
    with pytest.raises(InvalidRequest):
        client.get(0)
    assert broker.requests == []


def test_get(broker, client):
    broker.handlers["GET"] = lambda body: reply(task=make_task(body["id"]))
    assert client.get(7)["id"] == 7


def test_not_found_raises_task_not_found(broker, client):
    broker.handlers["GET"] = lambda body: error("not_found", "no task 7")
    with pytest.raises(TaskNotFound) as caught:
        client.get(7)
    assert caught.value.code == "not_found"
    assert caught.value.message == "no task 7"


def test_error_without_req_answers_the_request(broker, client):
    broker.handlers["SUBMIT"] = lambda body: error(
        "bad_request", "task: missing field 'handler'", req=None
    )
    with pytest.raises(RequestFailed) as caught:
        client.submit("echo")
    assert caught.value.code == "bad_request"


def test_stale_and_invalid_replies_are_discarded(broker, client):
    broker.handlers["GET"] = lambda body: [
        reply(req="someone-else", task=make_task(99)),
        error("not_found", "stale", req="someone-else"),
        [b"XX9", b"REPLY", b"{}"],
        [codec.SIGNATURE, b"REPLY", b"not json"],
        reply(task=make_task(body["id"])),
    ]
    assert client.get(5)["id"] == 5


def test_read_only_request_is_resent_with_the_same_req(broker):
    broker.handlers["GET"] = sequence(None, reply(task=make_task(3)))
    with BlockingClient(broker.endpoint, timeout=0.2, retries=2) as client:
        assert client.get(3)["id"] == 3
    [(_, first), (_, second)] = broker.requests
    assert first == second


def test_submit_many_a_key_created_in_an_earlier_chunk_is_not_existing(
    broker, client
):
    broker.handlers["SUBMIT"] = submitted()
    specs = (
        [{"handler": "echo", "unique_key": "k"}]
        + [{"handler": "echo"}] * 999
        + [{"handler": "echo", "unique_key": "k"}]
    )
    result = client.submit_many(specs)
    tasks, _ = result
    assert broker.commands() == ["SUBMIT", "SUBMIT"]
    # The second chunk's broker reply lists task 1 as existing, but this
    # submission created it.
    assert tasks[0]["id"] == tasks[-1]["id"] == 1
    assert result.existing == frozenset()


def test_submit_is_resent_with_the_same_req_and_request_id(broker):
    # The first SUBMIT is carried out but its reply is lost; the resent copy
    # is recognised by its request_id and answered with the same task.
    broker.handlers["SUBMIT"] = lose_replies(submitted(first_id=7))
    with BlockingClient(broker.endpoint, timeout=0.2, retries=2) as client:
        task, _ = client.submit("echo", {"n": 1})
        assert task["id"] == 7
        [(_, first), (_, second)] = broker.requests
        assert first == second
        assert len(first["request_id"]) == 32
        # Nothing was created twice: the next task is the next id.
        assert client.submit("echo")[0]["id"] == 8
    third = broker.requests[2][1]
    assert third["request_id"] != first["request_id"]
    assert third["req"] != first["req"]


def test_submit_many_resends_each_chunk_with_its_request_id(broker):
    broker.handlers["SUBMIT"] = lose_replies(submitted(), count=2)
    with BlockingClient(broker.endpoint, timeout=0.2, retries=2) as client:
        tasks, _ = client.submit_many([{"handler": "echo"}] * 1001)
    assert [t["id"] for t in tasks] == list(range(1, 1002))
    bodies = [body for _, body in broker.requests]
    # The first chunk sent three times (two replies lost), then the second.
    assert len(bodies) == 4
    assert bodies[0] == bodies[1] == bodies[2]
    assert bodies[3]["request_id"] != bodies[0]["request_id"]


def test_submit_without_any_answer_may_have_taken_effect(silent_endpoint):
    with BlockingClient(silent_endpoint, timeout=0.1, retries=1) as client:
        with pytest.raises(BrokerUnavailable) as caught:
            client.submit("echo")
    assert "2 attempts" in str(caught.value)
    assert "the SUBMIT may or may not have taken effect" in str(caught.value)


def test_read_only_request_does_not_mention_an_effect(silent_endpoint):
    with BlockingClient(silent_endpoint, timeout=0.1, retries=0) as client:
        with pytest.raises(BrokerUnavailable) as caught:
            client.get(1)
    assert "may or may not" not in str(caught.value)


def test_cancel_is_resent(broker):
    broker.handlers["CANCEL"] = sequence(
        None, reply(task=make_task(1, state="cancelled"))
    )
    with BlockingClient(broker.endpoint, timeout=0.2, retries=2) as client:
        assert client.cancel(1)["state"] == "cancelled"
    [(_, first), (_, second)] = broker.requests
    assert first == second


def test_cancel_finished_task_is_not_cancellable(broker, client):
    broker.handlers["CANCEL"] = lambda body: error(
        "not_cancellable", "task 1 is succeeded"
    )
    with pytest.raises(RequestFailed) as caught:
        client.cancel(1)
    assert caught.value.code == "not_cancellable"


def test_retry(broker, client):
    broker.handlers["RETRY"] = lambda body: reply(
        task=make_task(body["id"], state="queued", attempts=0)
    )
    task = client.retry(5)
    assert task["id"] == 5 and task["state"] == "queued"
    [(command, body)] = broker.requests
    assert command == "RETRY" and body["id"] == 5


@pytest.mark.parametrize(
    "code, exception",
    [("not_retryable", RequestFailed), ("not_found", TaskNotFound)],
)
def test_retry_refused(broker, client, code, exception):
    broker.handlers["RETRY"] = lambda body: error(code, "refused")
    with pytest.raises(exception) as caught:
        client.retry(5)
    assert caught.value.code == code


def test_retry_of_a_task_left_as_it_was_is_refused(broker, client):
    broker.handlers["RETRY"] = lambda body: reply(
        task=make_task(body["id"], state="cancelled")
    )
    with pytest.raises(RequestFailed) as caught:
        client.retry(5)
    assert caught.value.code == "not_retryable"


def test_retry_is_resent(broker):
    # The broker answers a resent RETRY with the task it already queued.
    broker.handlers["RETRY"] = sequence(
        None, reply(task=make_task(1, state="queued"))
    )
    with BlockingClient(broker.endpoint, timeout=0.2, retries=2) as client:
        assert client.retry(1)["state"] == "queued"
    assert broker.commands() == ["RETRY", "RETRY"]


def test_retry_checks_the_id(broker, client):
    with pytest.raises(InvalidRequest):
        client.retry(True)
    assert broker.requests == []


def test_no_answer_raises_broker_unavailable(silent_endpoint):
    with BlockingClient(silent_endpoint, timeout=0.1, retries=1) as client:
        with pytest.raises(BrokerUnavailable) as caught:
            client.stats()
    assert "2 attempts" in str(caught.value)


def test_bad_endpoint_is_a_value_error():
    with pytest.raises(ValueError):
        BlockingClient("nonsense")


def test_closed_client_refuses(broker):
    client = BlockingClient(broker.endpoint)
    client.close()
    client.close()
    with pytest.raises(RuntimeError):
        client.get(1)


def test_wait_loops_until_final(broker, client):
    broker.handlers["WAIT"] = sequence(
        reply(task=make_task(4, state="queued")),
        reply(task=make_task(4, state="running")),
        reply(task=make_task(4, state="succeeded", result=[1])),
    )
    task = client.wait(4)
    assert task["state"] in FINAL_STATES and task["result"] == [1]
    bodies = [body for _, body in broker.requests]
    assert len(bodies) == 3
    assert all(
        body["id"] == 4 and 0 < body["timeout"] <= 30 for body in bodies
    )
    # Each WAIT is a new request.
    assert len({body["req"] for body in bodies}) == 3


def test_wait_with_zero_timeout_returns_the_task_as_it_is(broker, client):
    broker.handlers["WAIT"] = lambda body: reply(
        task=make_task(4, state="running")
    )
    assert client.wait(4, timeout=0)["state"] == "running"
    [(_, body)] = broker.requests
    assert body["timeout"] == 0


def _paged(total):
    """
    A LIST handler over tasks 1..total honouring after/limit, with ``next``
    the last id of a full page.
    """

    def handler(body):
        ids = [i for i in range(1, total + 1) if i > body["after"]]
        page = ids[: body["limit"]]
        following = page[-1] if len(ids) > len(page) else None
        return reply(tasks=[make_task(i) for i in page], next=following)

    return handler


def test_list_pages_until_limit(broker, client):
    broker.handlers["LIST"] = _paged(2500)
    tasks = client.list(state="queued", limit=1500)
    assert [t["id"] for t in tasks] == list(range(1, 1501))
    bodies = [body for _, body in broker.requests]
    assert [(b["after"], b["limit"]) for b in bodies] == [
        (0, 1000),
        (1000, 500),
    ]
    assert bodies[0]["state"] == "queued" and bodies[0]["handler"] is None


def test_list_stops_at_the_end(broker, client):
    broker.handlers["LIST"] = _paged(3)
    assert [t["id"] for t in client.list()] == [1, 2, 3]


def test_list_refuses_a_next_that_does_not_advance(broker, client):
    broker.handlers["LIST"] = lambda body: reply(
        tasks=[make_task(1)], next=body["after"]
    )
    with pytest.raises(RequestFailed) as caught:
        client.list()
    assert caught.value.code == "protocol"


def test_workers_and_stats(broker, client):
    worker = {
        "name": "w1",
        "priorities": None,
        "handlers": ["echo"],
        "slots": 2,
        "busy": 1,
        "connected_since": None,
        "last_seen": None,
    }
    broker.handlers["WORKERS"] = lambda body: reply(workers=[worker])
    broker.handlers["STATS"] = lambda body: reply(stats={"workers": 1})
    assert client.workers() == [worker]
    assert client.stats() == {"workers": 1}


def test_reply_fields_beyond_req_are_kept(broker, client):
    # codec.decode drops REPLY fields other than req; the client must not.
    broker.handlers["GET"] = lambda body: reply(
        task=make_task(1, extra="new"), more=1
    )
    assert client.get(1)["extra"] == "new"


# BrokerClient (Twisted), with the real reactor against the fake broker.


@pytest.fixture
def reactor():
    from twisted.internet import reactor

    return reactor


@pytest_twisted.ensureDeferred
async def test_twisted_submit_and_close_leaves_no_delayed_calls(
    reactor, broker
):
    broker.handlers["SUBMIT"] = submitted(unserved=["echo"])
    broker.handlers["GET"] = lambda body: reply(task=make_task(body["id"]))
    before = set(reactor.getDelayedCalls())
    client = BrokerClient(reactor, broker.endpoint, timeout=5.0)
    task, unserved = await client.submit("echo", {"n": 1})
    assert task["id"] == 1 and unserved == ["echo"]
    # Several requests in flight at once are matched by req.
    got = await gatherResults([client.get(i) for i in (3, 1, 2)])
    assert [t["id"] for t in got] == [3, 1, 2]
    await client.close()
    await client.close()
    leftover = [
        call
        for call in reactor.getDelayedCalls()
        if call not in before and call.active()
    ]
    assert leftover == []


@pytest_twisted.ensureDeferred
async def test_twisted_submit_options_existing_and_retry(reactor, broker):
    live = {"k": make_task(3, unique_key="k")}
    broker.handlers["SUBMIT"] = submitted(first_id=10, live_keys=live)
    broker.handlers["RETRY"] = lambda body: reply(
        task=make_task(body["id"], state="queued")
    )
    client = BrokerClient(reactor, broker.endpoint, timeout=5.0)
    try:
        result = await client.submit(
            "echo", delay=1, unique_key="k", time_limit=2
        )
        assert result[0]["id"] == 3 and result.existing == {3}
        result = await client.submit_many(
            [
                {"handler": "echo", "delay": 0},
                {"handler": "echo", "unique_key": "k"},
            ]
        )
        tasks, unserved = result
        assert [t["id"] for t in tasks] == [10, 3]
        assert result.existing == {3} and unserved == set()
        assert (await client.retry(4))["state"] == "queued"
        with pytest.raises(InvalidRequest):
            await client.submit("echo", time_limit=-1)
    finally:
        await client.close()
    bodies = [body for _, body in broker.requests]
    assert [len(b.get("request_id", "")) for b in bodies] == [32, 32, 0]
    assert bodies[0]["tasks"][0]["delay"] == 1
    assert bodies[0]["tasks"][0]["time_limit"] == 2
    assert broker.commands() == ["SUBMIT", "SUBMIT", "RETRY"]


@pytest_twisted.ensureDeferred
async def test_twisted_submit_timeout_may_have_taken_effect(
    reactor, silent_endpoint
):
    client = BrokerClient(reactor, silent_endpoint, timeout=0.2)
    try:
        with pytest.raises(BrokerUnavailable) as caught:
            await client.submit("echo")
    finally:
        await client.close()
    assert "may or may not have taken effect" in str(caught.value)


@pytest_twisted.ensureDeferred
async def test_twisted_not_found(reactor, broker):
    broker.handlers["GET"] = lambda body: error("not_found", "no task 9")
    client = BrokerClient(reactor, broker.endpoint)
    try:
        with pytest.raises(TaskNotFound):
            await client.get(9)
    finally:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_twisted_wait_loops_until_final(reactor, broker):
    broker.handlers["WAIT"] = sequence(
        reply(task=make_task(4, state="running")),
        reply(task=make_task(4, state="failed", error="boom")),
    )
    client = BrokerClient(reactor, broker.endpoint)
    try:
        task = await client.wait(4)
    finally:
        await client.close()
    assert task["state"] == "failed"
    assert broker.commands() == ["WAIT", "WAIT"]


@pytest_twisted.ensureDeferred
async def test_twisted_timeout_with_the_real_reactor(reactor, silent_endpoint):
    client = BrokerClient(reactor, silent_endpoint, timeout=0.2)
    try:
        with pytest.raises(BrokerUnavailable):
            await client.stats()
        assert client._pending == {}
    finally:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_twisted_timeout_forgets_the_request(reactor, broker):
    # The socket runs on the real reactor, timeouts on a Clock, so that the
    # test decides when time passes.  The fake holds its answer until the
    # request has timed out; that late answer must then be discarded.
    clock = Clock()
    service = ZmqFactoryService(reactor)
    client = BrokerClient(
        clock, broker.endpoint, timeout=5.0, zmq_factory=service.get_factory()
    )
    release = threading.Event()
    broker.handlers["STATS"] = lambda body: (
        release.wait(5) and reply(stats={"late": True})
    )
    broker.handlers["GET"] = lambda body: reply(task=make_task(body["id"]))
    try:
        d = client.stats()
        assert await _threaded(broker.wait_for_requests, 1)
        clock.advance(5.0)
        with pytest.raises(BrokerUnavailable):
            await d
        assert client._pending == {}
        assert clock.getDelayedCalls() == []
        release.set()
        # The late STATS answer arrives first on the same connection and
        # is dropped; the GET is still answered.
        assert (await client.get(2))["id"] == 2
    finally:
        await client.close()
        service.stopService()


async def _threaded(function, *args):
    return await deferToThread(function, *args)


@pytest_twisted.ensureDeferred
async def test_twisted_close_fails_outstanding_requests(
    reactor, silent_endpoint
):
    client = BrokerClient(reactor, silent_endpoint, timeout=30.0)
    d = client.get(1)
    await client.close()
    with pytest.raises(BrokerUnavailable):
        await d


def test_a_busy_broker_is_asked_again_after_a_pause(broker, client):
    broker.handlers["RETRY"] = sequence(
        error("busy"), error("busy"), reply(task=make_task(4, state="queued"))
    )
    assert client.retry(4)["state"] == "queued"
    reqs = [body["req"] for command, body in broker.requests]
    # The same request each time (even a RETRY: a busy one was not done).
    assert len(reqs) == 3 and len(set(reqs)) == 1


def test_a_broker_busy_for_too_long_is_an_error(broker):
    broker.handlers["STATS"] = lambda body: error("busy")
    with BlockingClient(broker.endpoint, timeout=0.3, retries=0) as client:
        with pytest.raises(RequestFailed) as caught:
            client.stats()
    assert caught.value.code == "busy"
    assert 2 <= len(broker.requests) <= 6


# Failover lists: a request that gets no answer goes to the next broker.


@pytest.fixture
def other():
    """
    A second scripted broker, for failover lists.
    """
    with FakeBroker() as fake:
        yield fake
        assert fake.errors == []


def test_a_list_is_read_and_a_bad_entry_named():
    with pytest.raises(ValueError) as info:
        BlockingClient("tcp://127.0.0.1:1,nowhere")
    assert "endpoint 'nowhere'" in str(info.value)
    with pytest.raises(ValueError) as info:
        BlockingClient(["tcp://127.0.0.1:1", "tcp://127.0.0.1:1"])
    assert "listed twice" in str(info.value)


def test_the_start_is_random_unless_given(broker, other):
    endpoints = [broker.endpoint, other.endpoint]
    with BlockingClient(endpoints, start=1) as client:
        assert client.endpoints == tuple(endpoints)
        assert client.endpoint == other.endpoint
    starts = set()
    for _ in range(40):
        with BlockingClient(",".join(endpoints)) as client:
            starts.add(client.endpoint)
    assert starts == set(endpoints)


def test_an_unanswered_submit_goes_to_the_next_broker_unchanged(broker, other):
    # The first broker carries the SUBMIT out but its answer never comes;
    # the second (sharing the database) sees the same request_id.
    broker.handlers["SUBMIT"] = lambda body: None
    other.handlers["SUBMIT"] = submitted(first_id=5)
    other.handlers["GET"] = lambda body: reply(task=make_task(body["id"]))
    with BlockingClient(
        [broker.endpoint, other.endpoint], timeout=0.2, retries=0, start=0
    ) as client:
        task, _ = client.submit("echo", {"n": 1})
        assert task["id"] == 5
        # It stays with the broker that answered.
        assert client.endpoint == other.endpoint
        assert client.get(5)["id"] == 5
    [(_, first)] = broker.requests
    [(_, second), (_, third)] = other.requests
    assert first == second
    assert len(first["request_id"]) == 32
    assert third["id"] == 5


def test_every_broker_is_tried_before_giving_up(broker, other):
    broker.handlers["STATS"] = other.handlers["STATS"] = lambda body: None
    with BlockingClient(
        [broker.endpoint, other.endpoint], timeout=0.1, retries=2, start=1
    ) as client:
        with pytest.raises(BrokerUnavailable) as caught:
            client.stats()
    message = str(caught.value)
    assert f"{other.endpoint}, {broker.endpoint}" in message
    assert "3 attempts" in message
    # Three sends, round the list: the second broker, the first, again
    # the second.
    assert len(other.requests) == 2 and len(broker.requests) == 1


def test_a_wait_moves_to_the_next_broker_and_goes_on_waiting(broker, other):
    broker.handlers["WAIT"] = sequence(
        reply(task=make_task(4, state="running")), None
    )
    other.handlers["WAIT"] = lambda body: reply(
        task=make_task(4, state="succeeded", result=1)
    )
    with BlockingClient(
        [broker.endpoint, other.endpoint], timeout=0.2, retries=0, start=0
    ) as client:
        task = client.wait(4, timeout=0.3)
    assert task["state"] == "succeeded"
    assert broker.commands() == ["WAIT", "WAIT"]
    assert other.commands() == ["WAIT"]
    assert other.requests[0][1]["req"] == broker.requests[1][1]["req"]


@pytest_twisted.ensureDeferred
async def test_twisted_unanswered_submit_goes_to_the_next_broker(
    reactor, broker, other
):
    broker.handlers["SUBMIT"] = lambda body: None
    other.handlers["SUBMIT"] = submitted(first_id=9)
    other.handlers["STATS"] = lambda body: reply(stats={"ok": 1})
    client = BrokerClient(
        reactor, f"{broker.endpoint},{other.endpoint}", timeout=0.2, start=0
    )
    try:
        task, _ = await client.submit("echo")
        assert task["id"] == 9
        assert client.endpoint == other.endpoint
        assert await client.stats() == {"ok": 1}
    finally:
        await client.close()
    [(_, first)] = broker.requests
    assert other.requests[0][1] == first
    assert other.commands() == ["SUBMIT", "STATS"]


@pytest_twisted.ensureDeferred
async def test_twisted_gives_up_once_every_broker_was_tried(
    reactor, broker, silent_endpoint
):
    broker.handlers["GET"] = lambda body: None
    client = BrokerClient(
        reactor, [silent_endpoint, broker.endpoint], timeout=0.1, start=1
    )
    try:
        with pytest.raises(BrokerUnavailable) as caught:
            await client.get(1)
        assert client._pending == {}
    finally:
        await client.close()
    assert f"no answer from {broker.endpoint}, {silent_endpoint}" in str(
        caught.value
    )
    assert broker.commands() == ["GET"]


# CURVE keys: both or neither, read when the client is made.


def _make_blocking(**keys):
    return BlockingClient("tcp://127.0.0.1:1", **keys)


def _make_twisted(**keys):
    from twisted.internet import reactor

    return BrokerClient(reactor, "tcp://127.0.0.1:1", **keys)


@pytest.mark.parametrize("make", [_make_blocking, _make_twisted])
@pytest.mark.parametrize(
    "server, secret, expected",
    [
        (
            "broker.key",
            None,
            "curve_server_key without curve_secret_key: give both (the broker's "
            "public key file and this client's NAME.key_secret file) or neither",
        ),
        (
            None,
            "c1.key_secret",
            "curve_secret_key without curve_server_key: give both (the broker's "
            "public key file and this client's NAME.key_secret file) or neither",
        ),
        (
            "broker.key",
            "c1.key",
            "curve_secret_key: {c1.key}: no secret key in it (a public .key "
            "file? the secret one ends in .key_secret)",
        ),
        (
            "nothing.key",
            "c1.key_secret",
            "curve_server_key: {nothing.key}: No such file or directory",
        ),
    ],
)
def test_unusable_curve_keys_are_invalid_keys(
    curve_keys, make, server, secret, expected
):
    from taskbroker.client.errors import InvalidKeys
    from taskbroker.errors import ConfigError

    with pytest.raises(InvalidKeys) as caught:
        make(
            curve_server_key=server and curve_keys(server),
            curve_secret_key=secret and curve_keys(secret),
        )
    # Caught as the daemons' errors, or as the clients' other bad
    # arguments.
    assert isinstance(caught.value, ConfigError)
    assert isinstance(caught.value, ValueError)
    for name in ("c1.key", "nothing.key"):
        expected = expected.replace("{" + name + "}", curve_keys(name))
    assert str(caught.value) == expected


def test_curve_key_paths_may_be_path_objects(curve_keys):
    import pathlib

    with BlockingClient(
        "tcp://127.0.0.1:1",
        curve_server_key=pathlib.Path(curve_keys("broker.key")),
        curve_secret_key=pathlib.Path(curve_keys("c1.key_secret")),
    ) as client:
        assert client._curve is not None


def test_no_answer_with_curve_says_a_key_may_be_why(
    silent_endpoint, curve_keys
):
    with BlockingClient(
        silent_endpoint,
        timeout=0.05,
        retries=0,
        curve_server_key=curve_keys("broker.key"),
        curve_secret_key=curve_keys("c1.key_secret"),
    ) as client:
        with pytest.raises(BrokerUnavailable) as caught:
            client.stats()
    assert str(caught.value).endswith(
        "; with CURVE, a wrong server key or a key the broker does not "
        "admit gets no answer either"
    )


@pytest_twisted.ensureDeferred
async def test_twisted_no_answer_with_curve_says_a_key_may_be_why(
    reactor, silent_endpoint, curve_keys
):
    client = BrokerClient(
        reactor,
        silent_endpoint,
        timeout=0.2,
        curve_server_key=curve_keys("broker.key"),
        curve_secret_key=curve_keys("c1.key_secret"),
    )
    try:
        with pytest.raises(BrokerUnavailable) as caught:
            await client.stats()
    finally:
        await client.close()
    assert "with CURVE, a wrong server key" in str(caught.value)


# Nothing listening: said at once, not after every timeout.


@pytest.fixture
def closed_port():
    """
    A loopback port where nothing listens (connections are refused).
    """
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{probe.getsockname()[1]}"


def test_nothing_listening_is_said_without_waiting_for_the_timeout(
    closed_port,
):
    # A timeout this long would take minutes: the refusal is what ends it.
    with BlockingClient(closed_port, timeout=60, retries=2) as client:
        with pytest.raises(BrokerUnavailable) as caught:
            client.stats()
    assert str(caught.value) == (
        f"nothing listens at {closed_port} (connection refused); is the "
        "broker running?"
    )


def test_a_refusing_broker_of_a_list_is_passed_over(closed_port, broker):
    broker.handlers["STATS"] = lambda body: reply(stats={"workers": 0})
    with BlockingClient(
        [closed_port, broker.endpoint], timeout=60, start=0
    ) as client:
        assert client.stats() == {"workers": 0}
        assert client.endpoint == broker.endpoint


def test_a_broker_that_answers_slowly_is_not_refused(silent_endpoint):
    # Connected, but silent: the timeout applies, not the refusal.
    with BlockingClient(silent_endpoint, timeout=1.5, retries=0) as client:
        with pytest.raises(BrokerUnavailable) as caught:
            client.stats()
    assert "no answer from" in str(caught.value)
