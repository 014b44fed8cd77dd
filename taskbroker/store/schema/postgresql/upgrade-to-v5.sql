-- taskbroker schema, from version 4 to version 5, for PostgreSQL.
--
-- taskbroker runs this, and the update of taskbroker_schema, in one
-- transaction under the schema's advisory lock when it opens a version 4
-- database: a failure leaves the database at version 4.  Version 5
-- wakes the brokers only for inserts of queued tasks (see v5.sql): a
-- broker's insert of a task it dispatches at once no longer sends a
-- NOTIFY, which serialised its commit with every other notifying one.
-- Replacing the trigger takes the table's strongest lock for a moment,
-- so it waits for other programs' open transactions on tasks (and holds
-- off their reads meanwhile); no row is read or rewritten.

CREATE OR REPLACE FUNCTION taskbroker_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM inserted WHERE state = 'queued') THEN
        PERFORM pg_notify(left('taskbroker_' || TG_TABLE_SCHEMA, 63), '');
    END IF;
    RETURN NULL;
END
$$;

-- The trigger is made anew with its transition table, and left as it
-- was found: disabled, or enabled for replicas only or always, if an
-- operator set it so; absent if one dropped it.
DO $$
DECLARE
    was "char";
BEGIN
    SELECT tgenabled INTO was FROM pg_trigger
        WHERE tgrelid = 'tasks'::regclass
        AND tgname = 'tasks_notify_insert';
    IF was IS NULL THEN
        RETURN;
    END IF;
    DROP TRIGGER tasks_notify_insert ON tasks;
    CREATE TRIGGER tasks_notify_insert AFTER INSERT ON tasks
        REFERENCING NEW TABLE AS inserted
        FOR EACH STATEMENT EXECUTE FUNCTION taskbroker_notify();
    IF was = 'D' THEN
        ALTER TABLE tasks DISABLE TRIGGER tasks_notify_insert;
    ELSIF was = 'R' THEN
        ALTER TABLE tasks ENABLE REPLICA TRIGGER tasks_notify_insert;
    ELSIF was = 'A' THEN
        ALTER TABLE tasks ENABLE ALWAYS TRIGGER tasks_notify_insert;
    END IF;
END
$$;
