-- taskbroker schema, version 7, for SQLite.
--
-- This file is the whole schema at version 7: taskbroker runs it, in one
-- transaction, to create a new database.  A database created at an older
-- version gets here through the upgrade-to-v<N>.sql files instead; both
-- must yield the same database (upgrade-to-v4.sql rebuilds the table with
-- version 4's CREATE TABLE, and the later upgrades add the last columns).
--
-- The tasks table is a public, versioned interface.  Other programs may
-- enqueue work with plain SQL while the broker runs:
--
--     INSERT INTO tasks (handler, payload, priority)
--     VALUES ('echo', '{"a": 1}', NULL);
--
-- Every other column then takes its default.  A producer may also set
-- max_attempts, created_at, run_at, unique_key and time_limit, and should
-- leave the other columns to their defaults and to the broker.  The broker
-- finds the row (its poller looks above the last id it saw; at start it
-- reads each queue from the index tasks_queued_by_group), fails rows it
-- cannot run (an invalid handler name, an unknown priority, a payload
-- nested deeper than 64 levels) with an error, and fills a NULL priority
-- or max_attempts with its own defaults when it dispatches the task.  A
-- task for a handler that no connected worker has waits for one.
-- Changing the meaning of a column, or adding one without a default, needs
-- a new schema version.
--
-- Such an INSERT may also delay a task, or make it unique:
--
--     INSERT INTO tasks (handler, payload, priority, run_at, unique_key)
--     VALUES ('report', '{}', NULL,
--             (julianday('now') - 2440587.5) * 86400.0 + 3600,
--             'daily-report');
--
-- While a queued or running task holds a unique_key, an INSERT of another
-- task with the same key fails with a constraint error ("UNIQUE constraint
-- failed: tasks.unique_key"; sqlite3.IntegrityError in Python) and inserts
-- nothing: the program that inserts decides whether that is an error or
-- "already there".  To skip such a task quietly, use INSERT OR IGNORE; it
-- skips rows that break the other constraints (NOT NULL, CHECK) just as
-- quietly, so check how many rows were inserted.
--
-- Since version 4, CHECK constraints refuse values that no task could run
-- with or that no client could read: ids and tokens stay below 2^53 so
-- that JSON readers in any language read them exactly, times lie between
-- 1970 and the end of the year 9999, and a payload is JSON text of at
-- most 1 MiB.  The limits are the wire protocol's (taskbroker/protocol/
-- codec.py).  Each constraint is named after its column, so an INSERT or
-- UPDATE that breaks one fails, changing nothing, with for instance
--
--     CHECK constraint failed: token
--
-- (sqlite3.IntegrityError in Python).  A column declared INTEGER or REAL
-- only takes numbers: SQLite would store 'abc' there as text, so each
-- constraint checks typeof() too.  The payload's check uses json_valid(),
-- so writing to this table needs SQLite's JSON functions (built in since
-- SQLite 3.38; most earlier builds have them too).  What the constraints
-- cannot say (a handler name with control characters, a payload nested
-- more than 64 levels deep, an unknown priority level) the broker checks
-- when it reads the row, and fails that row alone.

CREATE TABLE tasks (
    -- AUTOINCREMENT: an id is never reused, even after the highest rows are
    -- deleted, because ids are shown to users and compared by the poller
    -- ("id > last seen").  Leave it to the database: an id set by hand
    -- near the top of the range leaves no room for the ids after it.
    id INTEGER PRIMARY KEY AUTOINCREMENT
        CONSTRAINT id CHECK (id BETWEEN 1 AND 9007199254740990),
    -- The name of the handler plugin that runs the task.
    handler TEXT NOT NULL
        CONSTRAINT handler CHECK (typeof(handler) = 'text'
                                  AND length(handler) BETWEEN 1 AND 200),
    -- The input, as JSON text (RFC 8259: no NaN or Infinity) of at most
    -- 1 MiB in UTF-8.
    payload TEXT NOT NULL DEFAULT 'null'
        CONSTRAINT payload CHECK (typeof(payload) = 'text'
                                  AND length(CAST(payload AS BLOB)) <= 1048576
                                  AND json_valid(payload)),
    -- A priority level name; NULL means the broker's default level.
    priority TEXT
        CONSTRAINT priority CHECK (priority IS NULL
                                   OR typeof(priority) = 'text'),
    state TEXT NOT NULL DEFAULT 'queued'
        CONSTRAINT state CHECK (state IN ('queued', 'running', 'succeeded',
                                          'failed', 'cancelled')),
    -- The number of attempts used: one more at each dispatch, one less when
    -- an attempt is given back (its worker was shut down gracefully, or the
    -- broker restarted), 0 again when a user retries a finished task.  At
    -- most the highest attempt number a TASK message carries.
    attempts INTEGER NOT NULL DEFAULT 0
        CONSTRAINT attempts CHECK (typeof(attempts) = 'integer'
                                   AND attempts BETWEEN 0 AND 2147483647),
    -- NULL means the broker's default.
    max_attempts INTEGER
        CONSTRAINT max_attempts CHECK (
            max_attempts IS NULL
            OR (typeof(max_attempts) = 'integer'
                AND max_attempts BETWEEN 1 AND 1000)),
    -- The worker that ran (or runs) the latest attempt.
    worker TEXT,
    -- Unix times in seconds, from 0 to 253402300799 (the end of 9999, UTC).
    -- julianday('now') has millisecond precision, so rows inserted by SQL
    -- keep the order in which they arrived.
    created_at REAL NOT NULL
        DEFAULT ((julianday('now') - 2440587.5) * 86400.0)
        CONSTRAINT created_at CHECK (
            typeof(created_at) IN ('integer', 'real')
            AND created_at BETWEEN 0 AND 253402300799),
    started_at REAL
        CONSTRAINT started_at CHECK (
            started_at IS NULL
            OR (typeof(started_at) IN ('integer', 'real')
                AND started_at BETWEEN 0 AND 253402300799)),
    finished_at REAL
        CONSTRAINT finished_at CHECK (
            finished_at IS NULL
            OR (typeof(finished_at) IN ('integer', 'real')
                AND finished_at BETWEEN 0 AND 253402300799)),
    -- The handler's result as JSON text, for succeeded tasks.
    result TEXT,
    -- Why the latest attempt failed, or why the task was cancelled.  A task
    -- waiting for a retry keeps the error of the attempt that failed.
    error TEXT,

    -- Added in version 2.

    -- Do not run the task before this Unix time in seconds (a number, as
    -- for created_at); NULL means as soon as possible.  The broker also
    -- sets it to wait between attempts.
    run_at REAL
        CONSTRAINT run_at CHECK (
            run_at IS NULL
            OR (typeof(run_at) IN ('integer', 'real')
                AND run_at BETWEEN 0 AND 253402300799)),
    -- At most one queued or running task has a given key (see the index
    -- tasks_live_unique_key); NULL for none.  Finished tasks do not count,
    -- so a key may be used again once its task has ended.
    unique_key TEXT,
    -- The client request that created the task, so that a client resending
    -- a request whose reply it lost gets the tasks it created the first
    -- time.  Set by the broker; other programs leave it NULL.
    request_id TEXT,
    -- The fencing token: one more at every dispatch, never less.  A worker's
    -- report counts only if it names the task's current token, so a late
    -- report of an earlier dispatch changes nothing.  Set by the broker.  A
    -- running task may hold the highest token a message carries (2^53 - 1);
    -- a queued one must leave room for its next dispatch, which the broker
    -- checks when it reads the row.
    token INTEGER NOT NULL DEFAULT 0
        CONSTRAINT token CHECK (typeof(token) = 'integer'
                                AND token BETWEEN 0 AND 9007199254740991),
    -- How many seconds an attempt may run, from 0.001 to 31622400 (366
    -- days); NULL means the handler's default, or else the broker's.
    time_limit REAL
        CONSTRAINT time_limit CHECK (
            time_limit IS NULL
            OR (typeof(time_limit) IN ('integer', 'real')
                AND time_limit BETWEEN 0.001 AND 31622400)),
    -- The traceback of the latest failed attempt, as text, if there is one.
    traceback TEXT,
    -- The CURVE public key (Z85 text, 40 characters) of the client that
    -- submitted the task, or NULL: submitted without CURVE, or inserted
    -- by SQL.  On a broker that checks client keys, a client key sees and
    -- changes only the tasks that name it, and NULL ones are its admins'
    -- (docs/security.rst); a program may set it to give the task to a
    -- client.  Added in version 5.
    submitter TEXT
        CONSTRAINT submitter CHECK (submitter IS NULL
                                    OR (typeof(submitter) = 'text'
                                        AND length(submitter) = 40)),
    -- How far the running attempt has got, as its handler last reported
    -- it: a fraction from 0 to 1, a short message, and when (a Unix
    -- time).  NULL until the handler reports; set again to NULL at each
    -- dispatch.  The broker writes it at most about once a second per
    -- task.  Added in version 6.
    progress REAL
        CONSTRAINT progress CHECK (progress IS NULL
                                   OR (typeof(progress) IN ('integer', 'real')
                                       AND progress BETWEEN 0 AND 1)),
    progress_message TEXT
        CONSTRAINT progress_message CHECK (
            progress_message IS NULL
            OR (typeof(progress_message) = 'text'
                AND length(progress_message) <= 200)),
    progress_at REAL
        CONSTRAINT progress_at CHECK (
            progress_at IS NULL
            OR (typeof(progress_at) IN ('integer', 'real')
                AND progress_at BETWEEN 0 AND 253402300799))
);

-- The broker keeps only a window of each queue (level and handler) in
-- memory and reads the next tasks of a queue from here, oldest first, as
-- its window drains; at start it finds which queues have tasks with one
-- seek per queue.  Partial, so it stays as small as the queue however many
-- finished tasks the table keeps.  Added in version 3.
CREATE INDEX tasks_queued_by_group ON tasks (handler, priority, id)
    WHERE state = 'queued';

-- Delayed tasks, read in the order they come due.  Added in version 3.
CREATE INDEX tasks_queued_by_run_at ON tasks (run_at, id)
    WHERE state = 'queued' AND run_at IS NOT NULL;

-- Listing and paging by state (running tasks at start, the status pages),
-- and the poller's scan of queued ids for rows other programs inserted.
CREATE INDEX tasks_by_state_id ON tasks (state, id);

-- Listing and paging by handler.
CREATE INDEX tasks_by_handler_id ON tasks (handler, id);

-- At most one live (queued or running) task per unique_key.  The database
-- enforces it, for the broker and for other programs' INSERTs alike.
CREATE UNIQUE INDEX tasks_live_unique_key ON tasks (unique_key)
    WHERE unique_key IS NOT NULL AND state IN ('queued', 'running');

-- Finding the tasks of a client request that was sent again.
CREATE INDEX tasks_by_request_id ON tasks (request_id)
    WHERE request_id IS NOT NULL;

-- Listing and paging a client's own tasks.  Added in version 5.
CREATE INDEX tasks_by_submitter_id ON tasks (submitter, id)
    WHERE submitter IS NOT NULL;

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

INSERT INTO taskbroker_settings (name, value)
    VALUES ('default_keep_finished', '7d');

-- Exactly one row: the version of this schema that the database is at.
CREATE TABLE taskbroker_schema (
    version INTEGER NOT NULL
);
