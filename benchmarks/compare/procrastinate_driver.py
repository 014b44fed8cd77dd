"""
Drives the procrastinate comparison: ``--install`` applies procrastinate's
schema to the run's; otherwise waits for the 2 workers to register, then
the throughput workload (``--tasks`` no-op jobs deferred with
``batch_defer_async`` in batches of 1,000; jobs/s from the first defer to
the last ``succeeded`` event, by its ``at``) and the latency workload
(``--latency`` jobs one at a time, submit->result as the client sees it:
see :mod:`pg_common`).  Prints a ``result {json}`` line.
"""

import asyncio
import sys
import time

import pg_common
from procrastinate_tasks import app, noop


async def install():
    async with app.open_async():
        await app.schema_manager.apply_schema_async()
    return 0


async def run(args):
    db = await pg_common.connect()

    async def registered():
        cur = await db.execute("SELECT count(*) FROM procrastinate_workers")
        return (await cur.fetchone())[0] >= 2

    async def finished(job_id):
        cur = await db.execute(
            "SELECT status FROM procrastinate_jobs WHERE id = %s", (job_id,)
        )
        status = (await cur.fetchone())[0]
        if status in ("failed", "aborted", "cancelled"):
            raise RuntimeError(f"job {job_id} is {status}")
        return status == "succeeded"

    out = {}
    async with app.open_async():
        await pg_common.wait_until(registered, 60, "2 workers registering")
        for i in range(args.warmup):
            job_id = await noop.defer_async(i=i)
            await pg_common.wait_until(
                lambda job_id=job_id: finished(job_id),
                30,
                "a warm-up job",
                poll=0.01,
            )

        if args.tasks:
            began = time.time()
            ids = []
            for k in range(0, args.tasks, 1000):
                ids += await noop.batch_defer_async(
                    *({"i": i} for i in range(k, min(k + 1000, args.tasks)))
                )
            out["submit_seconds"] = time.time() - began
            await pg_common.wait_until(
                lambda: finished(ids[-1]), 600, "the last job"
            )

            async def all_done():
                cur = await db.execute(
                    "SELECT count(*) FILTER (WHERE status = 'succeeded'), "
                    "count(*) FILTER (WHERE status NOT IN "
                    "('todo', 'doing', 'succeeded')) FROM procrastinate_jobs "
                    "WHERE id BETWEEN %s AND %s",
                    (min(ids), max(ids)),
                )
                done, bad = await cur.fetchone()
                if bad:
                    raise RuntimeError(f"{bad} jobs failed")
                return done >= len(ids)

            await pg_common.wait_until(all_done, 120, "every job succeeding")
            cur = await db.execute(
                "SELECT extract(epoch FROM max(at)) FROM procrastinate_events "
                "WHERE type = 'succeeded' AND job_id BETWEEN %s AND %s",
                (min(ids), max(ids)),
            )
            last = float((await cur.fetchone())[0])
            out["throughput"] = args.tasks / (last - began)

        await pg_common.notify_on(
            db, "procrastinate_jobs", "NEW.status = 'succeeded'", "id"
        )
        listener = pg_common.Listener(await pg_common.connect())
        await listener.start()

        async def defer(i):
            return await noop.defer_async(i=i)

        await pg_common.one_at_a_time(defer, listener, args.warmup)
        out["submit_to_result"] = await pg_common.one_at_a_time(
            defer, listener, args.latency, start=args.warmup
        )
        listener.stop()
    pg_common.report(out)
    return 0


def main():
    args = pg_common.arguments(__doc__.split("\n\n")[0])
    try:
        return asyncio.run(install() if args.install else run(args))
    except Exception as e:
        return pg_common.fail(e)


if __name__ == "__main__":
    sys.exit(main())
