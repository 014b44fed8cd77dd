"""
Fault injection with real daemons: kill, freeze and restart them under a
stream of tasks, feed the broker hostile messages, and check the promises:
every task ends exactly once, no attempt ran on two live workers at once,
and only current attempts' results are stored.

Daemons here run with a fast heartbeat (0.2 s, 3 misses: an allowance of
0.6 s) so that the suite stays quick.
"""

import glob
import json
import os
import signal
import time

import zmq

from taskbroker.client.blocking import BlockingClient
from taskbroker.protocol import codec
from tests.processes import wait_gone

HEARTBEAT = ("--heartbeat", "0.2")
ALLOWANCE = 0.6


def start(cluster, tmp_path, workers=2, broker_args=(), worker_args=()):
    record = tmp_path / "record"
    record.mkdir(exist_ok=True)
    if cluster.broker is None:
        cluster.start_broker(*HEARTBEAT, *broker_args)
    started = [
        cluster.start_worker(
            *HEARTBEAT,
            *worker_args,
            name=f"w{i}",
            env={"TASKBROKER_TEST_RECORD": str(record)},
        )
        for i in range(workers)
    ]
    return record, started


def events(record):
    found = []
    for path in glob.glob(os.path.join(record, "*.jsonl")):
        with open(path) as f:
            found.extend(json.loads(line) for line in f if line.strip())
    return sorted(found, key=lambda e: e["time"])


def check_promises(client, tasks, record, presumed_dead=()):
    """
    Every task ended once, succeeded, with the result of its current
    attempt; no two attempts of a task overlapped on live workers.
    """
    done = [client.wait(t["id"], timeout=60) for t in tasks]
    assert [t["state"] for t in done] == ["succeeded"] * len(tasks), done
    log = events(record)
    for task in done:
        runs = {}
        for e in log:
            if e["task"] == task["id"]:
                runs.setdefault(e["token"], {})[e["event"]] = e
        # The stored result is the current attempt's.
        assert task["result"]["token"] == max(runs), (task, runs)
        assert "end" in runs[task["result"]["token"]]
        # Attempts on live workers never overlapped: each one after the
        # first started only after the one before ended or its worker died.
        spans = sorted(
            (
                r["start"]["time"],
                r.get("end", {}).get("time"),
                r["start"]["pid"],
            )
            for r in runs.values()
        )
        for (_, end_a, pid_a), (start_b, _, _) in zip(spans, spans[1:]):
            assert (
                end_a is not None
                and end_a <= start_b
                or pid_a in presumed_dead
            ), (task["id"], spans)
    return done


def running_on(client, task_id):
    while True:
        task = client.wait(task_id, timeout=0.05)
        if task["state"] == "running":
            return task
        assert task["state"] == "queued", task


def test_sigkill_a_worker_mid_task(cluster, tmp_path):
    record, (w0, w1) = start(cluster, tmp_path)
    with BlockingClient(cluster.endpoint) as client:
        tasks, _ = client.submit_many(
            [{"handler": "record", "payload": {"seconds": 1}}] * 2
            + [{"handler": "record", "payload": {"seconds": 0.05}}] * 20
        )
        victim_task = running_on(client, tasks[0]["id"])
        victim = w0 if victim_task["worker"] == "w0" else w1
        killed_at = time.time()
        victim.signal(signal.SIGKILL)
        done = check_promises(
            client, tasks, record, presumed_dead={victim.pid}
        )
    restarted = [
        e
        for e in events(record)
        if e["task"] == tasks[0]["id"]
        and e["event"] == "start"
        and e["pid"] != victim.pid
    ]
    assert restarted, "the killed worker's task never restarted"
    recovery = restarted[0]["time"] - killed_at
    print(
        f"\nworker SIGKILL -> task restarted elsewhere: {recovery:.2f} s "
        f"(heartbeat 0.2 s x 3 misses)"
    )
    assert done[0]["attempts"] == 2


def test_sigkill_the_broker_and_restart_it(cluster, tmp_path):
    record, _ = start(cluster, tmp_path)
    with BlockingClient(cluster.endpoint) as client:
        tasks, _ = client.submit_many(
            [{"handler": "record", "payload": {"seconds": 0.5}}] * 4
            + [{"handler": "record", "payload": {"seconds": 0.02}}] * 30
        )
        running_on(client, tasks[0]["id"])
    cluster.broker.signal(signal.SIGKILL)
    cluster.broker.wait_exit()
    killed_at = time.time()
    cluster.start_broker(*HEARTBEAT, listen=cluster.endpoint)
    with BlockingClient(cluster.endpoint, timeout=10) as client:
        late, _ = client.submit("record", {"seconds": 0})
        resumed = client.wait(late["id"], timeout=60)
        print(
            f"\nbroker SIGKILL -> a new task done after restart: "
            f"{resumed_at(resumed) - killed_at:.2f} s (including the "
            "broker's start)"
        )
        check_promises(client, tasks + [late], record)


def resumed_at(task):
    from datetime import datetime

    return datetime.fromisoformat(task["finished_at"]).timestamp()


def test_frozen_worker_is_replaced_and_told_to_stop(cluster, tmp_path):
    record, (w0, w1) = start(cluster, tmp_path)
    with BlockingClient(cluster.endpoint) as client:
        task, _ = client.submit("record", {"seconds": 3})
        first = running_on(client, task["id"])
        frozen = w0 if first["worker"] == "w0" else w1
        other = w1 if frozen is w0 else w0
        mark = frozen.mark()
        frozen.signal(signal.SIGSTOP)
        # Requeued after the allowance and started on the other worker.
        while client.get(task["id"])["worker"] != other.name.split()[-1]:
            client.wait(task["id"], timeout=0.1)
        frozen.signal(signal.SIGCONT)
        frozen.wait_for(rf"stopping task {task['id']}", start=mark)
        # While frozen it was presumed dead, so its attempt may overlap
        # the replacement's; once thawed it was stopped before its end.
        done = check_promises(
            client, [task], record, presumed_dead={frozen.pid}
        )
    assert not [
        e
        for e in events(record)
        if e["pid"] == frozen.pid and e["event"] == "end"
    ]
    assert done[0]["worker"] == other.name.split()[-1]
    assert done[0]["result"]["pid"] == other.pid


def test_graceful_stop_hands_back_unfinished_work(cluster, tmp_path):
    cluster.start_broker(*HEARTBEAT)
    record, (w0,) = start(
        cluster, tmp_path, workers=1, worker_args=("--grace", "0.5")
    )
    with BlockingClient(cluster.endpoint) as client:
        task, _ = client.submit("record", {"seconds": 5})
        running_on(client, task["id"])
        w0.stop()
        w0.wait_for(f"handing back task {task['id']}")
        row = client.get(task["id"])
        assert (row["state"], row["attempts"]) == ("queued", 0)
        # A replacement worker picks it up; the handed-back attempt did
        # not count.
        start(cluster, tmp_path, workers=1)
        done = check_promises(client, [task], record, presumed_dead={w0.pid})
    assert done[0]["attempts"] == 1


def test_retries_then_success(cluster, tmp_path):
    start(cluster, tmp_path, workers=1, broker_args=("--retry-delay", "0.1"))
    with BlockingClient(cluster.endpoint) as client:
        task, _ = client.submit("flaky", {"succeed_on": 3})
        done = client.wait(task["id"], timeout=30)
        assert (done["state"], done["attempts"], done["result"]) == (
            "succeeded",
            3,
            3,
        )
        hopeless, _ = client.submit("flaky", {"succeed_on": 9}, max_attempts=2)
        failed = client.wait(hopeless["id"], timeout=30)
    assert failed["state"] == "failed"
    assert failed["error"] == "RuntimeError: attempt 2 fails on purpose"
    assert "Traceback" in failed["traceback"]


def test_time_limit_stops_a_blocking_handler(cluster, tmp_path):
    start(cluster, tmp_path, workers=1)
    with BlockingClient(cluster.endpoint) as client:
        task, _ = client.submit(
            "blocking-sleep", {"seconds": 600}, max_attempts=1, time_limit=0.5
        )
        done = client.wait(task["id"], timeout=30)
        assert done["state"] == "failed"
        assert done["error"] == "time limit of 0.5 s exceeded"
        # The worker lives on and runs the next blocking task.
        quick, _ = client.submit("blocking-sleep", {"seconds": 0.01})
        assert client.wait(quick["id"], timeout=30)["state"] == "succeeded"


def test_cancel_a_running_task(cluster, tmp_path):
    _, (w0,) = start(cluster, tmp_path, workers=1)
    with BlockingClient(cluster.endpoint) as client:
        task, _ = client.submit("blocking-sleep", {"seconds": 600})
        running_on(client, task["id"])
        mark = w0.mark()
        result = cluster.cli("cancel", str(task["id"]))
        assert result.returncode == 0, result.stderr
        w0.wait_for(f"stopping task {task['id']}", start=mark)
        assert client.get(task["id"])["state"] == "cancelled"
        after, _ = client.submit("echo", 1)
        assert client.wait(after["id"], timeout=30)["state"] == "succeeded"


def test_handler_processes_die_with_their_worker(cluster, tmp_path):
    _, (w0,) = start(cluster, tmp_path, workers=1)
    with BlockingClient(cluster.endpoint) as client:
        task, _ = client.submit("blocking-sleep", {"seconds": 600})
        running_on(client, task["id"])
    children = [
        int(p)
        for p in open(f"/proc/{w0.pid}/task/{w0.pid}/children").read().split()
    ]
    assert children
    w0.signal(signal.SIGKILL)
    w0.wait_exit()
    for pid in children:
        assert wait_gone(pid, 10), "handler process outlived its worker"


def test_hostile_messages_do_not_hurt_the_broker(cluster, tmp_path):
    start(cluster, tmp_path, workers=1)
    context = zmq.Context()
    hostile = context.socket(zmq.DEALER)
    hostile.setsockopt(zmq.LINGER, 0)
    hostile.connect(cluster.endpoint)
    worker_like = context.socket(zmq.DEALER)
    worker_like.setsockopt(zmq.LINGER, 0)
    worker_like.setsockopt(zmq.IDENTITY, b"evil/1")
    worker_like.connect(cluster.endpoint)
    try:
        junk = [
            [b"GET / HTTP/1.0"],
            [b"TB9", b"SUBMIT", b"{}"],
            [codec.SIGNATURE, b"EXPLODE", b"{}"],
            [codec.SIGNATURE, b"SUBMIT"],
            [codec.SIGNATURE, b"SUBMIT", b"{}", b"extra"],
            [codec.SIGNATURE, b"SUBMIT", b"\xff\xfe"],
            [codec.SIGNATURE, b"SUBMIT", b"{not json"],
            [codec.SIGNATURE, b"SUBMIT", b'{"req": "x", "tasks": "no"}'],
            [codec.SIGNATURE, b"SUBMIT", b"[" * 100_000],
            [
                codec.SIGNATURE,
                b"RESULT",
                b'{"id": 99999, "token": 1, "state": "succeeded"}',
            ],
        ]
        for frames in junk:
            hostile.send_multipart(frames)
        replies = []
        while len(replies) < len(junk) - 1:  # the RESULT gets only REHELLO
            assert hostile.poll(5000), f"only {len(replies)} replies"
            replies.append(hostile.recv_multipart())
        codes = [
            json.loads(r[2]).get("code") for r in replies if r[1] == b"ERROR"
        ]
        assert set(codes) >= {"protocol", "unknown_command", "bad_request"}
        # A flood of credits from a stranger, and an oversized message.
        for _ in range(5000):
            worker_like.send_multipart(codec.encode(b"READY", {}))
        hostile.send_multipart(
            [codec.SIGNATURE, b"SUBMIT", b"x" * (codec.MAX_MESSAGE_SIZE + 1)]
        )
        with BlockingClient(cluster.endpoint) as client:
            task, _ = client.submit("echo", "still here")
            assert (
                client.wait(task["id"], timeout=30)["result"] == "still here"
            )
            stats = client.stats()
        assert stats["counters"]["protocol_errors"] >= 9
    finally:
        hostile.close()
        worker_like.close()
        context.term()
