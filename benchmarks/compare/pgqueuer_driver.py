"""
Drives the pgqueuer comparison: ``--install`` installs pgqueuer's tables
into the run's schema; otherwise the throughput workload (``--tasks``
no-op jobs enqueued with one ``enqueue`` of lists per 1,000; jobs/s from
the first enqueue to the last ``successful`` row of ``pgqueuer_log``, by
its ``created``) and the latency workload (``--latency`` jobs one at a
time, submit->result as the client sees it: see :mod:`pg_common`).
Prints a ``result {json}`` line.
"""

import asyncio
import sys
import time

from pgqueuer.adapters.drivers.psycopg import PsycopgDriver
from pgqueuer.queries import Queries

import pg_common


async def install():
    db = await pg_common.connect()
    # create_schema=False: the tables go into the run's schema, the first
    # of the search_path.
    await Queries(PsycopgDriver(db)).install(create_schema=False)
    await db.close()
    return 0


async def run(args):
    db = await pg_common.connect()
    queries = Queries(PsycopgDriver(await pg_common.connect()))
    tag = pg_common.TAG

    async def logged(job_id):
        cur = await db.execute(
            "SELECT status::text FROM pgqueuer_log WHERE job_id = %s "
            "AND status::text NOT IN ('queued', 'picked')",
            (job_id,),
        )
        row = await cur.fetchone()
        if row and row[0] != "successful":
            raise RuntimeError(f"job {job_id} is {row[0]}")
        return row is not None

    async def enqueue(i):
        return (await queries.enqueue(tag, str(i).encode()))[0]

    out = {}
    for i in range(args.warmup):
        job_id = await enqueue(i)
        await pg_common.wait_until(
            lambda job_id=job_id: logged(job_id),
            60,
            "a warm-up job",
            poll=0.01,
        )

    if args.tasks:
        began = time.time()
        ids = []
        for k in range(0, args.tasks, 1000):
            chunk = range(k, min(k + 1000, args.tasks))
            ids += await queries.enqueue(
                [tag] * len(chunk),
                [str(i).encode() for i in chunk],
                [0] * len(chunk),
            )
        out["submit_seconds"] = time.time() - began

        async def all_done():
            cur = await db.execute(
                "SELECT count(*) FILTER (WHERE status = 'successful'), "
                "count(*) FILTER (WHERE status::text NOT IN "
                "('queued', 'picked', 'successful')) FROM pgqueuer_log "
                "WHERE job_id BETWEEN %s AND %s",
                (min(ids), max(ids)),
            )
            done, bad = await cur.fetchone()
            if bad:
                raise RuntimeError(f"{bad} jobs did not succeed")
            return done >= len(ids)

        await pg_common.wait_until(
            lambda: logged(ids[-1]), 600, "the last job"
        )
        await pg_common.wait_until(all_done, 120, "every job succeeding")
        cur = await db.execute(
            "SELECT extract(epoch FROM max(created)) FROM pgqueuer_log "
            "WHERE status = 'successful' AND job_id BETWEEN %s AND %s",
            (min(ids), max(ids)),
        )
        last = float((await cur.fetchone())[0])
        out["throughput"] = args.tasks / (last - began)

    await pg_common.notify_on(
        db, "pgqueuer_log", "NEW.status = 'successful'", "job_id"
    )
    listener = pg_common.Listener(await pg_common.connect())
    await listener.start()
    await pg_common.one_at_a_time(enqueue, listener, args.warmup)
    out["submit_to_result"] = await pg_common.one_at_a_time(
        enqueue, listener, args.latency, start=args.warmup
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
