"""
Drives the Celery comparison against workers the suite started: waits for
them, then the throughput workload (``--tasks`` no-op tasks sent one after
the other with a pooled producer; tasks/s from the first send to the last
result stored, by the backend's ``date_done``) and the latency workload
(``--latency`` tasks one at a time: submit->start by the task's own clock,
submit->result as the client sees it).  Prints a ``result {json}`` line,
then deletes the keys it made.
"""

import argparse
import json
import os
import sys
import time
from datetime import datetime

import redis

from celery_tasks import app, noop


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=20_000)
    parser.add_argument("--latency", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=20)
    args = parser.parse_args()
    tag = os.environ["BENCH_QUEUE"]
    store = redis.Redis.from_url(os.environ["BENCH_REDIS"])

    deadline = time.monotonic() + 60
    while len(app.control.ping(timeout=0.5) or ()) < args.workers:
        if time.monotonic() > deadline:
            print(
                "error: the Celery workers did not answer a ping in 60 s",
                flush=True,
            )
            return 1
    for i in range(args.warmup):
        noop.apply_async((i,), task_id=f"{tag}-warm-{i}").get(timeout=30)

    out = {}
    if args.tasks:
        ids = [f"{tag}-t-{i}" for i in range(args.tasks)]
        began = time.time()
        with app.producer_or_acquire() as producer:
            results = [
                noop.apply_async((i,), task_id=ids[i], producer=producer)
                for i in range(args.tasks)
            ]
        sent = time.time()
        results[-1].get(timeout=600)
        finished = []
        wait_until = time.monotonic() + 120
        pending = ids
        while pending:
            metas = []
            for k in range(0, len(pending), 1000):
                metas += store.mget(
                    [f"celery-task-meta-{i}" for i in pending[k : k + 1000]]
                )
            left = []
            for task_id, meta in zip(pending, metas):
                if meta is None:
                    left.append(task_id)
                    continue
                meta = json.loads(meta)
                if meta["status"] != "SUCCESS":
                    print(
                        f"error: task {task_id} is {meta['status']}",
                        flush=True,
                    )
                    return 1
                finished.append(
                    datetime.fromisoformat(meta["date_done"]).timestamp()
                )
            pending = left
            if pending:
                if time.monotonic() > wait_until:
                    print(f"error: {len(pending)} results missing", flush=True)
                    return 1
                time.sleep(0.1)
        out["throughput"] = args.tasks / (max(finished) - began)
        out["submit_seconds"] = sent - began

    start, result = [], []
    for i in range(args.latency):
        t0 = time.time()
        ran = noop.apply_async((i,), task_id=f"{tag}-l-{i}").get(timeout=30)
        t1 = time.time()
        start.append(ran - t0)
        result.append(t1 - t0)
    out["submit_to_start"] = start
    out["submit_to_result"] = result
    print("result " + json.dumps(out), flush=True)

    for key in store.scan_iter(match=f"*{tag}*", count=1000):
        store.delete(key)
    return 0


if __name__ == "__main__":
    sys.exit(main())
