-- taskbroker schema, from version 2 to version 3, for SQLite.
--
-- taskbroker runs these statements, and the update of taskbroker_schema, in
-- one transaction when it opens a version 2 database.  Version 3 changes
-- only indexes (see v3.sql for what they are for); building them reads the
-- queue once.  tasks_by_state_id does the work of tasks_queued_by_id.

DROP INDEX tasks_queued_by_id;

CREATE INDEX tasks_queued_by_group ON tasks (handler, priority, id)
    WHERE state = 'queued';

CREATE INDEX tasks_queued_by_run_at ON tasks (run_at, id)
    WHERE state = 'queued' AND run_at IS NOT NULL;
