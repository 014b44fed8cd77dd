-- taskbroker schema, from version 2 to version 3, for PostgreSQL.
--
-- taskbroker runs this, and the update of taskbroker_schema, in one
-- transaction under the schema's advisory lock when it opens a version 2
-- database: a failure leaves the database at version 2.  Version 3 keeps
-- each running task's progress as its handler reports it (see v3.sql).
-- The columns are added at the end of the table, in the order v3.sql
-- lists them, NULL in every existing row: nothing is rewritten, and the
-- table's lock is held only for a moment (but it waits for other
-- programs' open transactions on tasks to end).

ALTER TABLE tasks
    ADD COLUMN progress double precision
        CONSTRAINT progress CHECK (progress BETWEEN 0 AND 1),
    ADD COLUMN progress_message text
        CONSTRAINT progress_message CHECK (length(progress_message) <= 200),
    ADD COLUMN progress_at double precision
        CONSTRAINT progress_at CHECK (progress_at BETWEEN 0 AND 253402300799);
