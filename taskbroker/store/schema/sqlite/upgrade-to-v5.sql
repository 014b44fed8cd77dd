-- taskbroker schema, from version 4 to version 5, for SQLite.
--
-- taskbroker runs these statements, and the update of taskbroker_schema, in
-- one transaction when it opens a version 4 database: a crash leaves the
-- database at version 4 or at version 5.  Version 5 records who submitted
-- each task (see v5.sql).  The column is added at the end of the table,
-- as v5.sql lists it, and is NULL in every existing row: those tasks were
-- submitted without CURVE, and belong to the admins.  Adding a nullable
-- column changes no row, so this takes milliseconds on any table.

ALTER TABLE tasks ADD COLUMN submitter TEXT
        CONSTRAINT submitter CHECK (submitter IS NULL
                                    OR (typeof(submitter) = 'text'
                                        AND length(submitter) = 40));

CREATE INDEX tasks_by_submitter_id ON tasks (submitter, id)
    WHERE submitter IS NOT NULL;
