-- taskbroker schema, version 1, for SQLite.
--
-- This file is the whole schema at version 1: taskbroker runs it, in one
-- transaction, to create a new database.  A later version N ships as vN.sql
-- (the whole schema, for new databases) plus upgrade-to-vN.sql (the steps
-- from version N-1, for existing ones); both must yield the same database.
--
-- The tasks table is a public, versioned interface.  Other programs may
-- enqueue work with plain SQL while the broker runs:
--
--     INSERT INTO tasks (handler, payload, priority)
--     VALUES ('echo', '{"a": 1}', NULL);
--
-- Every other column then takes its default.  The broker's poller finds the
-- row (queued, id above the last one it saw), fills a NULL priority or
-- max_attempts with its own defaults, and fails rows it cannot run (unknown
-- handler, payload that is not JSON, unknown priority) with an error.
-- Changing the meaning of a column, or adding one without a default, needs
-- a new schema version.

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
    -- The number of the latest attempt (0 before the first dispatch).  A
    -- result counts only for the current attempt: it is the fencing token.
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
    -- Why the task failed or was cancelled.
    error TEXT
);

-- What the broker loads at start and what its poller scans for rows
-- inserted by other programs.  Partial, so it stays as small as the queue
-- however many finished tasks the table keeps.
CREATE INDEX tasks_queued_by_id ON tasks (id) WHERE state = 'queued';

-- Listing and paging by state (running tasks at start, the status pages).
CREATE INDEX tasks_by_state_id ON tasks (state, id);

-- Listing and paging by handler.
CREATE INDEX tasks_by_handler_id ON tasks (handler, id);

-- Exactly one row: the version of this schema that the database is at.
CREATE TABLE taskbroker_schema (
    version INTEGER NOT NULL
);
