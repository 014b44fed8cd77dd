"""
How long the PostgreSQL store's claim takes with many finished tasks in
the table: ``python -m benchmarks.pg_claims 1000000`` (default 0) makes a
schema of its own on ``$TASKBROKER_BENCH_POSTGRES`` (default
``postgresql://postgres@127.0.0.1:5432/test``), inserts that many
finished rows and 2,000 queued ones, claims and dispatches 1,000 tasks
one at a time with the store's own statement, each committed as the
broker commits it (durably, on its own), prints p50 and p99 and the
plan, and drops the schema.
"""

import statistics
import sys
import time

import psycopg

from benchmarks._pg_scripts import fresh_tables
from taskbroker.store import _postgresql_sql as sql

finished = int(sys.argv[1]) if len(sys.argv) > 1 else 0
schema = f"measure_claim_{finished}"
admin, url = fresh_tables(schema)

c = psycopg.connect(url, autocommit=True)
c.execute("ALTER TABLE tasks DISABLE TRIGGER tasks_notify_insert")
t0 = time.time()
c.execute(
    "INSERT INTO tasks (handler, payload, state, finished_at, owner) "
    "SELECT 'echo', '{}', 'succeeded', 1, 'x' FROM generate_series(1, %s)",
    (finished,),
)
c.execute(
    "INSERT INTO tasks (handler, payload) SELECT 'echo', '{}' FROM generate_series(1, 2000)"
)
c.execute("VACUUM ANALYZE tasks")
print(f"{finished} finished rows inserted in {time.time() - t0:.1f} s")
times = []
claim = [(sql.dispatch_for, ([0, 1, 2], ["echo"], ["w1"], 2e9, "normal", 3))]
for _ in range(1000):
    start = time.perf_counter()
    [(ok, [row])] = sql.run_batch(c, claim, "b1", None)
    times.append(time.perf_counter() - start)
    assert ok and row is not None
    c.execute("UPDATE tasks SET state = 'succeeded' WHERE id = %s", (row.id,))
times.sort()
print(
    f"claim and dispatch of 1 task, {finished} finished rows: "
    f"p50 {statistics.median(times) * 1000:.3f} ms, "
    f"p99 {times[989] * 1000:.3f} ms"
)
with c.transaction(force_rollback=True):
    plan = c.execute(
        "EXPLAIN (ANALYZE, BUFFERS) " + sql._DISPATCH_FOR,
        ([0, 1, 2], ["echo"], 2e9, 1, 1, ["w1"], "b1", 2e9, "normal", 3),
    ).fetchall()
print("\n".join(r[0] for r in plan))
admin.execute(f"DROP SCHEMA {schema} CASCADE")
