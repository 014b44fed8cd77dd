"""
The Celery side of the comparison: one no-op task on a Redis broker and
result backend, with prefetch multiplier 1 and late acknowledgement.

Runs in the comparison virtualenv (never imports taskbroker).  The Redis
URL and the queue name come from BENCH_REDIS and BENCH_QUEUE, so that
every run uses keys of its own.
"""

import os
import time

from celery import Celery

app = Celery(
    "bench",
    broker=os.environ["BENCH_REDIS"],
    backend=os.environ["BENCH_REDIS"],
)
app.conf.update(
    worker_prefetch_multiplier=1,
    task_acks_late=True,
    task_default_queue=os.environ["BENCH_QUEUE"],
    result_expires=3600,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)


@app.task(name="bench.noop")
def noop(i):
    """
    Does nothing; returns when it ran (Unix time), for submit->start.
    """
    return time.time()
