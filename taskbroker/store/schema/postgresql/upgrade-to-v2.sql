-- taskbroker schema, from version 1 to version 2, for PostgreSQL.
--
-- taskbroker runs this, and the update of taskbroker_schema, in one
-- transaction under the schema's advisory lock when it opens a version 1
-- database: a failure leaves the database at version 1.  Version 2 records
-- who submitted each task (see v2.sql).  The column is added at the end of
-- the table, as v2.sql lists it, and is NULL in every existing row: those
-- tasks were submitted without CURVE, and belong to the admins.  Adding a
-- nullable column with no default rewrites no row, and the CHECK is true
-- of NULL, so the ACCESS EXCLUSIVE lock it takes is brief; but it waits
-- for every open transaction on the table: stop other programs' long
-- transactions on it first.  The index is built under the same lock
-- (CREATE INDEX CONCURRENTLY cannot run in a transaction); it holds only
-- the rows that name a submitter, none yet, so that is quick too.

ALTER TABLE tasks ADD COLUMN submitter text
    CONSTRAINT submitter CHECK (length(submitter) = 40);

CREATE INDEX tasks_by_submitter_id ON tasks (submitter, id)
    WHERE submitter IS NOT NULL;
