"""
What the PostgreSQL comparison drivers share (they run in the comparison
virtualenv and never import taskbroker): the connection to the run's
schema, waiting for their jobs, and the one-at-a-time latency loop.

A job's result is known through a trigger the driver adds to the queue's
own table before the latency workload (never during the throughput one,
whose commits it would slow): when a job succeeds it sends
``pg_notify(<the run's schema name>, <job id>)``, delivered at the commit,
which the driver waits for on a connection of its own.  That is how soon
a client of the queue could know, without polling.
"""

import argparse
import asyncio
import json
import os
import time

import psycopg

URL = os.environ.get("BENCH_POSTGRES", "")
TAG = os.environ.get("BENCH_QUEUE", "")
#: The channel of the results: the run's schema, unique to the run.
CHANNEL = os.environ.get("BENCH_SCHEMA", "")


def arguments(description):
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--install",
        action="store_true",
        help="install the queue's schema and exit",
    )
    parser.add_argument("--tasks", type=int, default=20_000)
    parser.add_argument("--latency", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=20)
    return parser.parse_args()


async def connect():
    return await psycopg.AsyncConnection.connect(URL, autocommit=True)


async def notify_on(db, table, condition, id_column):
    """
    Add the trigger that notifies the run's channel with ``id_column``
    when a row of ``table`` meets ``condition``.
    """
    await db.execute(f"""
        CREATE FUNCTION bench_notify_done() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pg_notify('{CHANNEL}', NEW.{id_column}::text);
            RETURN NULL;
        END $$""")
    await db.execute(f"""
        CREATE TRIGGER bench_notify_done AFTER INSERT OR UPDATE ON {table}
        FOR EACH ROW WHEN ({condition})
        EXECUTE FUNCTION bench_notify_done()""")


class Listener:
    """
    Waits for the notifications of :func:`notify_on`, by job id.
    """

    def __init__(self, db):
        self.db = db
        self.done = {}
        self.waiting = {}
        self._task = None

    async def start(self):
        await self.db.execute(f'LISTEN "{CHANNEL}"')
        self._task = asyncio.create_task(self._read())

    async def _read(self):
        async for notify in self.db.notifies():
            future = self.waiting.pop(notify.payload, None)
            if future is not None and not future.done():
                future.set_result(None)
            else:
                self.done[notify.payload] = True

    async def wait(self, job_id, timeout=30):
        key = str(job_id)
        if self.done.pop(key, None):
            return
        future = asyncio.get_running_loop().create_future()
        self.waiting[key] = future
        await asyncio.wait_for(future, timeout)

    def stop(self):
        if self._task is not None:
            self._task.cancel()


async def wait_until(check, timeout, what, poll=0.05):
    """
    Call the coroutine function ``check`` until it returns true.
    """
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not happen in {timeout:g} s")
        await asyncio.sleep(poll)


async def one_at_a_time(defer, listener, n, start=0):
    """
    ``n`` jobs one at a time: defer (``await defer(i)`` returns the job's
    id), then wait for its notification.

    :returns: submit->result times in seconds, by the client's clock.
    """
    times = []
    for i in range(start, start + n):
        t0 = time.perf_counter()
        job_id = await defer(i)
        await listener.wait(job_id)
        times.append(time.perf_counter() - t0)
    return times


def report(out):
    print("result " + json.dumps(out), flush=True)


def fail(error):
    """
    Report ``error`` (an exception) on one line, with its cause.
    """
    cause = error.__cause__ or error.__context__
    text = f"{type(error).__name__}: {str(error).strip()}"
    if cause is not None:
        text += f" ({type(cause).__name__}: {str(cause).strip()})"
    print("error: " + " ".join(text.split()), flush=True)
    return 1
