"""
What the brokers' wake-up trigger costs producers: ``python -m
benchmarks.pg_producers`` has 8 processes insert 2,000 tasks each, one
per transaction, into a schema of its own on
``$TASKBROKER_BENCH_POSTGRES`` (default
``postgresql://postgres@127.0.0.1:5432/test``), with the trigger
``tasks_notify_insert`` enabled and disabled in turn (3 runs each), and
prints the medians.
"""

import multiprocessing
import statistics
import time

import psycopg

from benchmarks._pg_scripts import fresh_tables, schema_url

schema = "measure_producers"
url = schema_url(schema)
PER = 2000


def produce(_):
    c = psycopg.connect(url, autocommit=True)
    for _ in range(PER):
        c.execute(
            "INSERT INTO tasks (handler, payload, priority) VALUES ('echo', '{}', NULL)"
        )
    c.close()


def run(trigger):
    c = psycopg.connect(url, autocommit=True)
    c.execute(
        f"ALTER TABLE tasks {'ENABLE' if trigger else 'DISABLE'} TRIGGER tasks_notify_insert"
    )
    c.execute("TRUNCATE tasks")
    with multiprocessing.Pool(8) as pool:
        t0 = time.perf_counter()
        pool.map(produce, range(8))
        elapsed = time.perf_counter() - t0
    return 8 * PER / elapsed


if __name__ == "__main__":
    admin, _ = fresh_tables(schema)
    results = {True: [], False: []}
    for _ in range(3):
        for trigger in (True, False):
            results[trigger].append(run(trigger))
    for trigger in (True, False):
        print(
            f"trigger {'on ' if trigger else 'off'}: median {statistics.median(results[trigger]):.0f} inserts/s "
            f"(runs: {', '.join(f'{r:.0f}' for r in results[trigger])})"
        )
    print(
        f"ratio on/off: {statistics.median(results[True]) / statistics.median(results[False]):.2f}"
    )
    admin.execute(f"DROP SCHEMA {schema} CASCADE")
