"""
Drives the RQ comparison against workers the suite started: waits for
them, then the throughput workload (``--tasks`` no-op jobs enqueued in
bulk with ``enqueue_many``; jobs/s from the first enqueue to the last
job's ``ended_at``) and the latency workload (``--latency`` jobs one at a
time: submit->start by the job's own clock, submit->result as the client
sees it, through ``latest_result``).  Prints a ``result {json}`` line,
then deletes the keys it made.
"""

import argparse
import json
import os
import sys
import time
from datetime import UTC

import redis
from rq import Queue, Worker
from rq.job import Job, JobStatus

from rq_tasks import noop


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=20_000)
    parser.add_argument("--latency", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=20)
    args = parser.parse_args()
    tag = os.environ["BENCH_QUEUE"]
    connection = redis.Redis.from_url(os.environ["BENCH_REDIS"])
    queue = Queue(tag, connection=connection)

    deadline = time.monotonic() + 60
    while len(Worker.all(queue=queue)) < args.workers:
        if time.monotonic() > deadline:
            print("error: the RQ workers did not register in 60 s", flush=True)
            return 1
        time.sleep(0.05)
    for i in range(args.warmup):
        job = queue.enqueue(noop, i, job_id=f"{tag}-warm-{i}")
        if job.latest_result(timeout=30) is None:
            print("error: a warm-up job got no result in 30 s", flush=True)
            return 1

    out = {}
    if args.tasks:
        ids = [f"{tag}-t-{i}" for i in range(args.tasks)]
        began = time.time()
        for k in range(0, args.tasks, 1000):
            queue.enqueue_many(
                [
                    Queue.prepare_data(noop, (i,), job_id=ids[i])
                    for i in range(k, min(k + 1000, args.tasks))
                ]
            )
        sent = time.time()
        # Wait for the last job cheaply (one key), then read them all.
        last = Job.fetch(ids[-1], connection=connection)
        wait_until = time.monotonic() + 600
        while last.get_status(refresh=True) not in (
            JobStatus.FINISHED,
            JobStatus.FAILED,
        ):
            if time.monotonic() > wait_until:
                print(
                    "error: the last job did not finish in 600 s", flush=True
                )
                return 1
            time.sleep(0.02)
        ended = []
        wait_until = time.monotonic() + 120
        pending = ids
        while pending:
            left = []
            for k in range(0, len(pending), 1000):
                chunk = pending[k : k + 1000]
                for job_id, job in zip(
                    chunk, Job.fetch_many(chunk, connection=connection)
                ):
                    status = job.get_status(refresh=False) if job else None
                    if status == JobStatus.FINISHED and job.ended_at:
                        ended.append(
                            job.ended_at.replace(tzinfo=UTC).timestamp()
                        )
                    elif status == JobStatus.FAILED:
                        print(f"error: job {job_id} failed", flush=True)
                        return 1
                    else:
                        left.append(job_id)
            pending = left
            if pending:
                if time.monotonic() > wait_until:
                    print(f"error: {len(pending)} jobs unfinished", flush=True)
                    return 1
                time.sleep(0.1)
        out["throughput"] = args.tasks / (max(ended) - began)
        out["submit_seconds"] = sent - began

    start, result = [], []
    for i in range(args.latency):
        t0 = time.time()
        job = queue.enqueue(noop, i, job_id=f"{tag}-l-{i}")
        outcome = job.latest_result(timeout=30)
        t1 = time.time()
        if outcome is None or outcome.return_value is None:
            print(f"error: job {job.id} got no result", flush=True)
            return 1
        start.append(outcome.return_value - t0)
        result.append(t1 - t0)
    out["submit_to_start"] = start
    out["submit_to_result"] = result
    print("result " + json.dumps(out), flush=True)

    for key in connection.scan_iter(match=f"*{tag}*", count=1000):
        connection.delete(key)
    return 0


if __name__ == "__main__":
    sys.exit(main())
