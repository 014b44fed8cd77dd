-- taskbroker schema, from version 3 to version 4, for PostgreSQL.
--
-- taskbroker runs this, and the update of taskbroker_schema, in one
-- transaction under the schema's advisory lock when it opens a version 3
-- database: a failure leaves the database at version 3.  Version 4 adds
-- periodic tasks (the schedules table), an index of finished tasks for
-- retention, and the database's settings (see v4.sql).  Building the
-- index reads the table once and holds off writes to it meanwhile (a few
-- seconds for millions of tasks); the tasks are not rewritten.

-- Finished tasks in the order they finished: what retention
-- (--keep-finished) and purges delete, oldest first, a small batch at a
-- time.  Partial, so queued and running tasks do not pay for it.  Added
-- in version 4.
CREATE INDEX tasks_finished_by_time ON tasks (finished_at)
    WHERE state IN ('succeeded', 'failed', 'cancelled');

-- Periodic tasks.  The brokers keep this table (taskbroker schedule add,
-- the Python clients and the HTTP API write it); every broker on the
-- database sees the same schedules.  A broker enqueues a schedule's task
-- for a tick in the transaction that moves next_tick on from that tick,
-- and only if next_tick still holds it (UPDATE ... WHERE next_tick = the
-- tick), so each tick is enqueued once however many brokers run.  Added
-- in version 4.
CREATE TABLE schedules (
    name text PRIMARY KEY
        CONSTRAINT name CHECK (length(name) BETWEEN 1 AND 100),
    handler text NOT NULL
        CONSTRAINT handler CHECK (length(handler) BETWEEN 1 AND 200
                                  AND handler !~ '[[:cntrl:]]'),
    -- The payload of each task.
    payload json NOT NULL DEFAULT 'null'
        CONSTRAINT payload CHECK (octet_length(payload::text) <= 1048576),
    -- NULL: the brokers' default level, max_attempts and time limit.
    priority text,
    max_attempts integer
        CONSTRAINT max_attempts CHECK (max_attempts BETWEEN 1 AND 1000),
    time_limit double precision
        CONSTRAINT time_limit CHECK (time_limit BETWEEN 0.001 AND 31622400),
    -- Exactly one of every (seconds between ticks) and cron (an
    -- expression run in the wall time of timezone).
    every double precision
        CONSTRAINT every CHECK (every > 0),
    cron text,
    timezone text NOT NULL DEFAULT 'UTC',
    -- A tick whose previous task is still queued or running enqueues
    -- nothing.
    skip_if_running boolean NOT NULL DEFAULT false,
    paused boolean NOT NULL DEFAULT false,
    -- Unix times: the tick to enqueue next and the last one handled;
    -- and the last task the schedule enqueued (a skipped tick keeps it).
    next_tick double precision NOT NULL,
    last_tick double precision,
    last_task_id bigint,
    created_at double precision NOT NULL,
    -- The CURVE public key of the client that added it, or NULL.
    submitter text,
    CONSTRAINT timing CHECK ((every IS NULL) <> (cron IS NULL))
);

CREATE INDEX schedules_due ON schedules (next_tick) WHERE NOT paused;

-- Settings that belong to the database rather than to a broker.
-- default_keep_finished is how long finished tasks are kept when a
-- broker is given no --keep-finished: 7d for a database created at
-- version 4 or later, none (for ever) for one upgraded from before, whose
-- users may rely on the whole history.  Added in version 4.
CREATE TABLE taskbroker_settings (
    name text PRIMARY KEY,
    value text NOT NULL
);

-- An existing database keeps its whole history unless told otherwise:
-- other programs may read it.
INSERT INTO taskbroker_settings (name, value)
    VALUES ('default_keep_finished', 'none');
