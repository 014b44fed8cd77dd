"""
One pgqueuer worker process on the run's schema (the ``search_path`` of
BENCH_POSTGRES), with a no-op entrypoint named after the run's queue
(BENCH_QUEUE), claiming one job at a time (``batch_size=1``; a job runs as an asyncio
task, so the next claim may start before the last job's status is
written).  pgqueuer's defaults otherwise; SIGTERM stops it.
"""

import argparse
import asyncio
import os
import signal

import asyncpg
from pgqueuer.adapters.drivers.asyncpg import AsyncpgDriver
from pgqueuer.core.qm import QueueManager
from pgqueuer.queries import Queries

QUEUE = os.environ["BENCH_QUEUE"]


async def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", default="w")
    parser.parse_args()
    # asyncpg, pgqueuer's first driver (its psycopg one left a job picked
    # and never finished in our trials); the schema through search_path.
    connection = await asyncpg.connect(
        os.environ["BENCH_POSTGRES"].split("?")[0],
        server_settings={"search_path": os.environ["BENCH_SCHEMA"]},
    )
    qm = QueueManager(Queries(AsyncpgDriver(connection)))

    @qm.entrypoint(QUEUE)
    async def noop(job):
        return None

    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, qm.shutdown.set)
    print("ready", flush=True)
    await qm.run(batch_size=1)
    await connection.close()


if __name__ == "__main__":
    asyncio.run(main())
