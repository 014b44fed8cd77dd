-- taskbroker schema, from version 5 to version 6, for SQLite.
--
-- taskbroker runs these statements, and the update of taskbroker_schema, in
-- one transaction when it opens a version 5 database: a crash leaves the
-- database at version 5 or at version 6.  Version 6 keeps each running
-- task's progress as its handler reports it (see v6.sql).  The columns are
-- added at the end of the table, in the order v6.sql lists them, NULL in
-- every existing row; adding them rewrites no row.

ALTER TABLE tasks ADD COLUMN progress REAL
        CONSTRAINT progress CHECK (progress IS NULL
                                   OR (typeof(progress) IN ('integer', 'real')
                                       AND progress BETWEEN 0 AND 1));

ALTER TABLE tasks ADD COLUMN progress_message TEXT
        CONSTRAINT progress_message CHECK (
            progress_message IS NULL
            OR (typeof(progress_message) = 'text'
                AND length(progress_message) <= 200));

ALTER TABLE tasks ADD COLUMN progress_at REAL
        CONSTRAINT progress_at CHECK (
            progress_at IS NULL
            OR (typeof(progress_at) IN ('integer', 'real')
                AND progress_at BETWEEN 0 AND 253402300799));
