"""
One procrastinate worker process taking one job at a time
(``concurrency=1``), with procrastinate's defaults otherwise (LISTEN/NOTIFY
for new jobs, polling as a fallback).  SIGTERM stops it gracefully.
"""

import argparse
import asyncio

from procrastinate_tasks import QUEUE, app


async def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", default="w")
    args = parser.parse_args()
    async with app.open_async():
        print("ready", flush=True)
        await app.run_worker_async(
            queues=[QUEUE], concurrency=1, name=args.name
        )


if __name__ == "__main__":
    asyncio.run(main())
