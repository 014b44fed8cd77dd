-- taskbroker schema, from version 6 to version 7, for SQLite.
--
-- taskbroker runs these statements, and the update of taskbroker_schema, in
-- one transaction when it opens a version 6 database: a crash leaves the
-- database at version 6 or at version 7.  Version 7 adds periodic tasks
-- (the schedules table), an index of finished tasks for retention, and
-- the database's settings (see v7.sql).  Building the index reads the
-- whole table once; the tasks themselves are not rewritten.

-- Finished tasks in the order they finished: what retention
-- (--keep-finished) and purges delete, oldest first, a small batch at a
-- time.  Partial, so queued and running tasks do not pay for it.  Added
-- in version 7.
CREATE INDEX tasks_finished_by_time ON tasks (finished_at)
    WHERE state IN ('succeeded', 'failed', 'cancelled');

-- Periodic tasks.  The brokers keep this table (taskbroker schedule add,
-- the Python clients and the HTTP API write it); every broker on the
-- database sees the same schedules.  A broker enqueues a schedule's task
-- for a tick in the transaction that moves next_tick on from that tick,
-- and only if next_tick still holds it, so each tick is enqueued once
-- however many brokers run.  Added in version 7.
CREATE TABLE schedules (
    name TEXT NOT NULL PRIMARY KEY
        CONSTRAINT name CHECK (typeof(name) = 'text'
                               AND length(name) BETWEEN 1 AND 100),
    handler TEXT NOT NULL
        CONSTRAINT handler CHECK (typeof(handler) = 'text'
                                  AND length(handler) BETWEEN 1 AND 200),
    -- The payload of each task, JSON text.
    payload TEXT NOT NULL DEFAULT 'null'
        CONSTRAINT payload CHECK (typeof(payload) = 'text'
                                  AND length(CAST(payload AS BLOB)) <= 1048576
                                  AND json_valid(payload)),
    -- NULL: the broker's default level, max_attempts and time limit.
    priority TEXT,
    max_attempts INTEGER,
    time_limit REAL,
    -- Exactly one of every (seconds between ticks) and cron (an
    -- expression run in the wall time of timezone).
    every REAL
        CONSTRAINT every CHECK (every IS NULL OR every > 0),
    cron TEXT,
    timezone TEXT NOT NULL DEFAULT 'UTC',
    -- 1: a tick whose previous task is still queued or running enqueues
    -- nothing.
    skip_if_running INTEGER NOT NULL DEFAULT 0
        CONSTRAINT skip_if_running CHECK (skip_if_running IN (0, 1)),
    paused INTEGER NOT NULL DEFAULT 0
        CONSTRAINT paused CHECK (paused IN (0, 1)),
    -- Unix times: the tick to enqueue next and the last one handled;
    -- and the last task the schedule enqueued (a skipped tick keeps it).
    next_tick REAL NOT NULL,
    last_tick REAL,
    last_task_id INTEGER,
    created_at REAL NOT NULL,
    -- The CURVE public key of the client that added it, or NULL.
    submitter TEXT,
    CONSTRAINT timing CHECK ((every IS NULL) != (cron IS NULL))
);

CREATE INDEX schedules_due ON schedules (next_tick) WHERE paused = 0;

-- Settings that belong to the database rather than to a broker.
-- default_keep_finished is how long finished tasks are kept when the
-- broker is given no --keep-finished: 7d for a database created at
-- version 7 or later, none (for ever) for one upgraded from before, whose
-- users may rely on the whole history.  Added in version 7.
CREATE TABLE taskbroker_settings (
    name TEXT NOT NULL PRIMARY KEY,
    value TEXT NOT NULL
);

-- An existing database keeps its whole history unless told otherwise:
-- other programs may read it.
INSERT INTO taskbroker_settings (name, value)
    VALUES ('default_keep_finished', 'none');
