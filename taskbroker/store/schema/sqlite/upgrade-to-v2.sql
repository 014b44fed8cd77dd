-- taskbroker schema, from version 1 to version 2, for SQLite.
--
-- taskbroker runs these statements, and the update of taskbroker_schema, in
-- one transaction when it opens a version 1 database: a crash leaves the
-- database at version 1 or at version 2.  The result must match v2.sql, so
-- the columns are added in the order that file lists them (ALTER TABLE adds
-- each at the end).  See v2.sql for what the columns mean.
--
-- Every new column is nullable or has a default, so the INSERTs that other
-- programs wrote for version 1 keep working.

ALTER TABLE tasks ADD COLUMN run_at REAL;
ALTER TABLE tasks ADD COLUMN unique_key TEXT;
ALTER TABLE tasks ADD COLUMN request_id TEXT;
ALTER TABLE tasks ADD COLUMN token INTEGER NOT NULL DEFAULT 0;
ALTER TABLE tasks ADD COLUMN time_limit REAL;
ALTER TABLE tasks ADD COLUMN traceback TEXT;

-- Version 1 fenced a worker's report with the attempt number.  Starting the
-- tokens from there keeps them increasing across the upgrade, so a report
-- of a dispatch made before it can never name a token handed out after it.
UPDATE tasks SET token = attempts;

CREATE UNIQUE INDEX tasks_live_unique_key ON tasks (unique_key)
    WHERE unique_key IS NOT NULL AND state IN ('queued', 'running');

CREATE INDEX tasks_by_request_id ON tasks (request_id)
    WHERE request_id IS NOT NULL;
