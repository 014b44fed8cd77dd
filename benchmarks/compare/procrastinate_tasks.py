"""
The procrastinate side of the PostgreSQL comparison: an app on the run's
schema (through the ``search_path`` of BENCH_POSTGRES) and a no-op task
on the run's queue (BENCH_QUEUE).  An ``async`` task, so that it runs in
the worker's event loop, as taskbroker's ``echo`` runs in its reactor.

Runs in the comparison virtualenv (never imports taskbroker).
"""

import os

import procrastinate

QUEUE = os.environ["BENCH_QUEUE"]

app = procrastinate.App(
    connector=procrastinate.PsycopgConnector(
        conninfo=os.environ["BENCH_POSTGRES"]
    )
)


@app.task(name="bench.noop", queue=QUEUE)
async def noop(i):
    """
    Does nothing.
    """
    return None
