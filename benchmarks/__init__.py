"""
taskbroker's benchmark suite.

Run it from the repository root with the project's virtualenv::

    make bench                          # the defaults: 3 runs, < 10 minutes
    make bench-quick                    # one run of smaller workloads
    .venv/bin/python -m benchmarks --help
    .venv/bin/python -m benchmarks --only throughput,latency --runs 5

It starts real ``twistd taskbroker`` and ``twistd taskworker`` daemons on
loopback, in temporary folders, with their default settings and durability
(only ``--listen``, ``--database``, ``--name`` and, for the worker reserved
for urgent work, ``--priorities`` are set), and measures:

1. throughput: 20,000 ``echo`` tasks, 2 workers x 1 slot, submitted with
   the bulk API and, separately, inserted by one SQL transaction;
2. latency: 1,000 tasks one at a time through the Python client;
3. priority under load: how long ``high`` tasks wait for the worker
   reserved for them behind 10,000 queued ``low`` tasks;
4. many workers: 1,000 worker connections from one light load process
   (:mod:`benchmarks.load_workers`, the real protocol): the broker's idle
   CPU, and throughput compared with 10 connections;
5. deep queue: 1,000,000 tasks queued by SQL before the broker starts: its
   RSS, time to first dispatch, drain rate compared with an empty queue;
6. worker alone: one worker fed by :mod:`benchmarks.stub_broker`;
7. the floor: a storage-less ZeroMQ load-balancing broker (``floor/``) in
   the same run, which every figure is quoted as a ratio of; and, where
   Redis answers on 127.0.0.1:6379, Celery and RQ (``compare/``), in a
   virtualenv of their own (``bench-results/.venv-compare``, created on
   first use; never a dependency of taskbroker);
8. where PostgreSQL answers on 127.0.0.1:5432 (:mod:`benchmarks.postgresql`):
   throughput on 1, 2 and 3 brokers sharing one database, latency on 1
   and 2, priority behind 100,000 queued ``low`` tasks, and procrastinate
   and pgqueuer on the same server, each run in a fresh schema.

Each measure runs ``--runs`` times (default 3); the table shows the median
and the spread (min-max), and is written with every per-run value to
``bench-results/latest.json`` and ``latest.txt``.

``recovery.py`` (how fast work recovers from a killed or frozen worker or
broker) is a separate script.
"""
