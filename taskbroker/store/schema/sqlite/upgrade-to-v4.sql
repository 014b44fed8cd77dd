-- taskbroker schema, from version 3 to version 4, for SQLite.
--
-- taskbroker runs these statements, and the update of taskbroker_schema, in
-- one transaction when it opens a version 3 database: a crash leaves the
-- database at version 3 or at version 4.  Version 4 adds CHECK constraints
-- (see v4.sql for what they refuse).  SQLite cannot add a constraint to a
-- table, so this rebuilds it, following SQLite's procedure for "other
-- kinds of table schema changes" (https://www.sqlite.org/lang_altertable.html):
-- create the new table, copy the rows, drop the old table, rename the new
-- one, create the indexes again.  taskbroker's schema has no foreign keys,
-- triggers or views; the steps for those are left out.  Each row is read
-- and written once, and the constraints are checked as it is written: on
-- 100,000 tasks of about 560 bytes the upgrade took 1.2 to 1.7 seconds.
-- The old table's pages stay in the file, free, for new rows to reuse
-- (VACUUM gives them back to the file system).
--
-- No row is lost.  A row that breaks a constraint is repaired on the way:
--
-- - each value that breaks one is replaced: a bad id by a new id after the
--   highest one (in the order of the old ids), handler by its first 200
--   characters (or '?' if it has none, or is not text), payload by its text
--   as a JSON string (or 'null' if that is not JSON text of at most 1 MiB),
--   token, attempts and created_at by 0, and priority, max_attempts,
--   started_at, finished_at, run_at and time_limit by NULL;
-- - its error starts with what was replaced, one entry per column, and
--   says "(found by the upgrade to schema 4)"; an error it had before
--   follows after "; before: ";
-- - a queued or running one is failed (finished_at: the upgrade's time), so
--   that it never runs with what was replaced; finished ones keep their
--   state.
--
-- A trigger on the tasks table would be dropped with it, silently: the
-- upgrade refuses to run while one exists (drop it, start the broker, and
-- create it again).  A view or another table's trigger that names the tasks
-- table makes the rename fail, which rolls the whole upgrade back.

-- Refuse, rather than drop another program's triggers with the table.
CREATE TEMP TABLE tasks_v4_guard (
    triggers INTEGER NOT NULL
        CONSTRAINT "the upgrade to schema 4 rebuilds the tasks table, which would drop the triggers on it: drop them, start the broker, then create them again"
        CHECK (triggers = 0)
);

INSERT INTO tasks_v4_guard (triggers)
SELECT count(*) FROM sqlite_master WHERE type = 'trigger' AND tbl_name = 'tasks';

DROP TABLE tasks_v4_guard;

-- v4.sql's CREATE TABLE, under another name (tests/unit/test_schema.py
-- checks that the two stay the same).
CREATE TABLE tasks_v4 (
    id INTEGER PRIMARY KEY AUTOINCREMENT
        CONSTRAINT id CHECK (id BETWEEN 1 AND 9007199254740990),
    handler TEXT NOT NULL
        CONSTRAINT handler CHECK (typeof(handler) = 'text'
                                  AND length(handler) BETWEEN 1 AND 200),
    payload TEXT NOT NULL DEFAULT 'null'
        CONSTRAINT payload CHECK (typeof(payload) = 'text'
                                  AND length(CAST(payload AS BLOB)) <= 1048576
                                  AND json_valid(payload)),
    priority TEXT
        CONSTRAINT priority CHECK (priority IS NULL
                                   OR typeof(priority) = 'text'),
    state TEXT NOT NULL DEFAULT 'queued'
        CONSTRAINT state CHECK (state IN ('queued', 'running', 'succeeded',
                                          'failed', 'cancelled')),
    attempts INTEGER NOT NULL DEFAULT 0
        CONSTRAINT attempts CHECK (typeof(attempts) = 'integer'
                                   AND attempts BETWEEN 0 AND 2147483647),
    max_attempts INTEGER
        CONSTRAINT max_attempts CHECK (
            max_attempts IS NULL
            OR (typeof(max_attempts) = 'integer'
                AND max_attempts BETWEEN 1 AND 1000)),
    worker TEXT,
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
    result TEXT,
    error TEXT,
    run_at REAL
        CONSTRAINT run_at CHECK (
            run_at IS NULL
            OR (typeof(run_at) IN ('integer', 'real')
                AND run_at BETWEEN 0 AND 253402300799)),
    unique_key TEXT,
    request_id TEXT,
    token INTEGER NOT NULL DEFAULT 0
        CONSTRAINT token CHECK (typeof(token) = 'integer'
                                AND token BETWEEN 0 AND 9007199254740991),
    time_limit REAL
        CONSTRAINT time_limit CHECK (
            time_limit IS NULL
            OR (typeof(time_limit) IN ('integer', 'real')
                AND time_limit BETWEEN 0.001 AND 31622400)),
    traceback TEXT
);

-- Every row that meets the constraints, as it is.  OR IGNORE leaves the
-- others behind (no row breaks a NOT NULL or a key: version 3 had the same
-- ones), so that the table's own CHECKs say which rows need repairs.
INSERT OR IGNORE INTO tasks_v4 SELECT * FROM tasks ORDER BY id;

-- What is wrong with each row left behind, read before anything is
-- replaced.  Each condition is its column's CHECK in v4.sql.
CREATE TEMP TABLE tasks_v4_problems (
    id INTEGER PRIMARY KEY,
    problems TEXT NOT NULL
);

INSERT INTO tasks_v4_problems (id, problems)
-- Every row left behind is listed, so that none can be lost: one that no
-- repair below fixes makes its copy fail, and the whole upgrade with it.
SELECT id, substr(problems, 3) FROM (
    SELECT id,
        CASE WHEN id BETWEEN 1 AND 9007199254740990 THEN ''
            ELSE '; id ' || id || ' is not from 1 to 9007199254740990: '
                 || 'the task has a new id' END
        || CASE WHEN typeof(handler) = 'text'
                     AND length(handler) BETWEEN 1 AND 200 THEN ''
            ELSE '; handler is not text of 1 to 200 characters: '
                 || CASE WHEN typeof(handler) = 'text'
                              AND length(handler) > 200
                         THEN 'cut to 200 characters'
                         ELSE 'set to ''?''' END END
        || CASE WHEN typeof(payload) = 'text'
                     AND length(CAST(payload AS BLOB)) <= 1048576
                     AND json_valid(payload) THEN ''
            ELSE '; payload is not JSON text of at most 1048576 bytes: '
                 || CASE WHEN typeof(payload) = 'text'
                              AND length(CAST(json_quote(payload) AS BLOB))
                                  <= 1048576
                              AND json_valid(json_quote(payload))
                         THEN 'kept as a JSON string'
                         ELSE 'set to null' END END
        || CASE WHEN priority IS NULL OR typeof(priority) = 'text' THEN ''
            ELSE '; priority is not text: set to NULL' END
        || CASE WHEN typeof(attempts) = 'integer'
                     AND attempts BETWEEN 0 AND 2147483647 THEN ''
            ELSE '; attempts ' || substr(quote(attempts), 1, 40)
                 || ' is not a whole number from 0 to 2147483647: set to 0'
            END
        || CASE WHEN max_attempts IS NULL
                     OR (typeof(max_attempts) = 'integer'
                         AND max_attempts BETWEEN 1 AND 1000) THEN ''
            ELSE '; max_attempts ' || substr(quote(max_attempts), 1, 40)
                 || ' is not a whole number from 1 to 1000: set to NULL' END
        || CASE WHEN typeof(created_at) IN ('integer', 'real')
                     AND created_at BETWEEN 0 AND 253402300799 THEN ''
            ELSE '; created_at ' || substr(quote(created_at), 1, 40)
                 || ' is not a Unix time from 0 to 253402300799: set to 0'
            END
        || CASE WHEN started_at IS NULL
                     OR (typeof(started_at) IN ('integer', 'real')
                         AND started_at BETWEEN 0 AND 253402300799) THEN ''
            ELSE '; started_at ' || substr(quote(started_at), 1, 40)
                 || ' is not a Unix time from 0 to 253402300799: set to NULL'
            END
        || CASE WHEN finished_at IS NULL
                     OR (typeof(finished_at) IN ('integer', 'real')
                         AND finished_at BETWEEN 0 AND 253402300799) THEN ''
            ELSE '; finished_at ' || substr(quote(finished_at), 1, 40)
                 || ' is not a Unix time from 0 to 253402300799: set to NULL'
            END
        || CASE WHEN run_at IS NULL
                     OR (typeof(run_at) IN ('integer', 'real')
                         AND run_at BETWEEN 0 AND 253402300799) THEN ''
            ELSE '; run_at ' || substr(quote(run_at), 1, 40)
                 || ' is not a Unix time from 0 to 253402300799: set to NULL'
            END
        || CASE WHEN typeof(token) = 'integer'
                     AND token BETWEEN 0 AND 9007199254740991 THEN ''
            ELSE '; token ' || substr(quote(token), 1, 40)
                 || ' is not a whole number from 0 to 9007199254740991: '
                 || 'set to 0' END
        || CASE WHEN time_limit IS NULL
                     OR (typeof(time_limit) IN ('integer', 'real')
                         AND time_limit BETWEEN 0.001 AND 31622400) THEN ''
            ELSE '; time_limit ' || substr(quote(time_limit), 1, 40)
                 || ' is not a number of seconds from 0.001 to 31622400: '
                 || 'set to NULL' END
        AS problems
    FROM tasks WHERE id NOT IN (SELECT id FROM tasks_v4)
);

-- Fail the live ones and note what was found, before the evidence goes.
UPDATE tasks SET
    state = CASE WHEN state IN ('queued', 'running') THEN 'failed'
                 ELSE state END,
    finished_at = CASE WHEN state IN ('queued', 'running')
                       THEN (julianday('now') - 2440587.5) * 86400.0
                       ELSE finished_at END,
    error = (SELECT problems FROM tasks_v4_problems AS p
             WHERE p.id = tasks.id)
            || ' (found by the upgrade to schema 4)'
            || CASE WHEN error IS NULL THEN ''
                    ELSE '; before: ' || error END
WHERE id IN (SELECT id FROM tasks_v4_problems);

-- Replace what breaks a constraint (the id comes with the copy, below).
UPDATE tasks SET
    handler = CASE
        WHEN typeof(handler) = 'text' AND length(handler) BETWEEN 1 AND 200
            THEN handler
        WHEN typeof(handler) = 'text' AND length(handler) > 200
            THEN substr(handler, 1, 200)
        ELSE '?' END,
    payload = CASE
        WHEN typeof(payload) = 'text'
             AND length(CAST(payload AS BLOB)) <= 1048576
             AND json_valid(payload)
            THEN payload
        WHEN typeof(payload) = 'text'
             AND length(CAST(json_quote(payload) AS BLOB)) <= 1048576
             AND json_valid(json_quote(payload))
            THEN json_quote(payload)
        ELSE 'null' END,
    priority = CASE WHEN priority IS NULL OR typeof(priority) = 'text'
                    THEN priority END,
    attempts = CASE WHEN typeof(attempts) = 'integer'
                         AND attempts BETWEEN 0 AND 2147483647
                    THEN attempts ELSE 0 END,
    max_attempts = CASE WHEN typeof(max_attempts) = 'integer'
                             AND max_attempts BETWEEN 1 AND 1000
                        THEN max_attempts END,
    created_at = CASE WHEN typeof(created_at) IN ('integer', 'real')
                           AND created_at BETWEEN 0 AND 253402300799
                      THEN created_at ELSE 0 END,
    started_at = CASE WHEN typeof(started_at) IN ('integer', 'real')
                           AND started_at BETWEEN 0 AND 253402300799
                      THEN started_at END,
    finished_at = CASE WHEN typeof(finished_at) IN ('integer', 'real')
                            AND finished_at BETWEEN 0 AND 253402300799
                       THEN finished_at END,
    run_at = CASE WHEN typeof(run_at) IN ('integer', 'real')
                       AND run_at BETWEEN 0 AND 253402300799
                  THEN run_at END,
    token = CASE WHEN typeof(token) = 'integer'
                      AND token BETWEEN 0 AND 9007199254740991
                 THEN token ELSE 0 END,
    time_limit = CASE WHEN typeof(time_limit) IN ('integer', 'real')
                           AND time_limit BETWEEN 0.001 AND 31622400
                      THEN time_limit END
WHERE id IN (SELECT id FROM tasks_v4_problems);

-- The repaired rows that keep their id.
INSERT INTO tasks_v4
SELECT * FROM tasks
WHERE id IN (SELECT id FROM tasks_v4_problems)
    AND id BETWEEN 1 AND 9007199254740990
ORDER BY id;

-- AUTOINCREMENT: the next id comes after every id ever used, as before,
-- unless a bad id had pushed the sequence out of range.
DELETE FROM sqlite_sequence WHERE name = 'tasks_v4';

INSERT INTO sqlite_sequence (name, seq)
SELECT 'tasks_v4', max(
    (SELECT coalesce(max(id), 0) FROM tasks_v4),
    (SELECT coalesce(max(seq), 0) FROM sqlite_sequence
     WHERE name = 'tasks' AND seq BETWEEN 0 AND 9007199254740990));

-- Rows with a bad id get the next ones, in the order of their old ids.
INSERT INTO tasks_v4 (
    handler, payload, priority, state, attempts, max_attempts, worker,
    created_at, started_at, finished_at, result, error, run_at, unique_key,
    request_id, token, time_limit, traceback)
SELECT
    handler, payload, priority, state, attempts, max_attempts, worker,
    created_at, started_at, finished_at, result, error, run_at, unique_key,
    request_id, token, time_limit, traceback
FROM tasks
WHERE id IN (SELECT id FROM tasks_v4_problems)
    AND NOT (id BETWEEN 1 AND 9007199254740990)
ORDER BY id;

DROP TABLE tasks_v4_problems;

DROP TABLE tasks;

ALTER TABLE tasks_v4 RENAME TO tasks;

CREATE INDEX tasks_queued_by_group ON tasks (handler, priority, id)
    WHERE state = 'queued';

CREATE INDEX tasks_queued_by_run_at ON tasks (run_at, id)
    WHERE state = 'queued' AND run_at IS NOT NULL;

CREATE INDEX tasks_by_state_id ON tasks (state, id);

CREATE INDEX tasks_by_handler_id ON tasks (handler, id);

CREATE UNIQUE INDEX tasks_live_unique_key ON tasks (unique_key)
    WHERE unique_key IS NOT NULL AND state IN ('queued', 'running');

CREATE INDEX tasks_by_request_id ON tasks (request_id)
    WHERE request_id IS NOT NULL;
