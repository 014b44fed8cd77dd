-- taskbroker schema, version 3, for SQLite.
--
-- This file is the whole schema at version 3: taskbroker runs it, in one
-- transaction, to create a new database.  A database created at an older
-- version gets here through the upgrade-to-v<N>.sql files instead; both
-- must yield the same database, so the columns added in version 2 come
-- last, in the order the upgrade adds them.
--
-- The tasks table is a public, versioned interface.  Other programs may
-- enqueue work with plain SQL while the broker runs:
--
--     INSERT INTO tasks (handler, payload, priority)
--     VALUES ('echo', '{"a": 1}', NULL);
--
-- Every other column then takes its default.  The broker finds the row
-- (its poller looks above the last id it saw; at start it reads each queue
-- from the index tasks_queued_by_group), fails rows it cannot run (an
-- invalid handler name, payload that is not JSON, an unknown priority) with
-- an error, and fills a NULL priority or max_attempts with its own defaults
-- when it dispatches the task.  A task for a handler that no connected worker has waits for
-- one.
-- Changing the meaning of a column, or adding one without a default, needs
-- a new schema version.
--
-- Since version 2 such an INSERT may also delay a task, or make it unique:
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

CREATE TABLE tasks (
    -- AUTOINCREMENT: an id is never reused, even after the highest rows are
    -- deleted, because ids are shown to users and compared by the poller
    -- ("id > last seen").
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    -- The name of the handler plugin that runs the task.
    handler TEXT NOT NULL,
    -- The input, as JSON text.
    payload TEXT NOT NULL DEFAULT 'null',
    -- A priority level name; NULL means the broker's default level.
    priority TEXT,
    state TEXT NOT NULL DEFAULT 'queued'
        CHECK (state IN ('queued', 'running', 'succeeded', 'failed',
                         'cancelled')),
    -- The number of attempts used: one more at each dispatch, one less when
    -- an attempt is given back (its worker was shut down gracefully, or the
    -- broker restarted), 0 again when a user retries a finished task.
    attempts INTEGER NOT NULL DEFAULT 0,
    -- NULL means the broker's default.
    max_attempts INTEGER,
    -- The worker that ran (or runs) the latest attempt.
    worker TEXT,
    -- Unix times in seconds.  julianday('now') has millisecond precision,
    -- so rows inserted by SQL keep the order in which they arrived.
    created_at REAL NOT NULL
        DEFAULT ((julianday('now') - 2440587.5) * 86400.0),
    started_at REAL,
    finished_at REAL,
    -- The handler's result as JSON text, for succeeded tasks.
    result TEXT,
    -- Why the latest attempt failed, or why the task was cancelled.  A task
    -- waiting for a retry keeps the error of the attempt that failed.
    error TEXT,

    -- Added in version 2.

    -- Do not run the task before this Unix time in seconds (a number);
    -- NULL means as soon as possible.  The broker also sets it to wait
    -- between attempts.
    run_at REAL,
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
    -- report of an earlier dispatch changes nothing.  Set by the broker.
    token INTEGER NOT NULL DEFAULT 0,
    -- How many seconds an attempt may run; NULL means the handler's default,
    -- or else the broker's.
    time_limit REAL,
    -- The traceback of the latest failed attempt, as text, if there is one.
    traceback TEXT
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

-- Exactly one row: the version of this schema that the database is at.
CREATE TABLE taskbroker_schema (
    version INTEGER NOT NULL
);
