# -*- test-case-name: tests.unit.test_schema -*-
"""
Tests for the versioned schema loader (taskbroker.store._schema): atomic
creation, step-by-step upgrades, and the packaged schema files.
"""

import sqlite3
from contextlib import closing

import pytest

from taskbroker.errors import StoreError
from taskbroker.store import _schema


def test_split_sqlite():
    script = """
    -- a comment; with a semicolon
    CREATE TABLE t (x TEXT DEFAULT ';');
    CREATE TRIGGER t_ins AFTER INSERT ON t BEGIN
        UPDATE t SET x = 'a;b';
    END;
    -- trailing comment
    """
    statements = _schema.split_sqlite(script)
    assert len(statements) == 2
    assert statements[0].endswith("DEFAULT ';');")
    assert statements[1].startswith("CREATE TRIGGER")
    with pytest.raises(StoreError, match="incomplete"):
        _schema.split_sqlite("CREATE TABLE t (x);\nCREATE TABLE u (y")


def test_packaged_schema_is_latest():
    directory = _schema.schema_directory("sqlite")
    assert _schema.latest_version(directory) == 3
    for name in ("v1.sql", "v2.sql", "v3.sql"):
        assert "CREATE TABLE tasks" in _schema.read_script(directory, name)
    assert "ALTER TABLE tasks" in _schema.read_script(
        directory, "upgrade-to-v2.sql")
    assert "CREATE INDEX tasks_queued_by_group" in _schema.read_script(
        directory, "upgrade-to-v3.sql")


@pytest.fixture
def schemas(tmp_path):
    """
    A folder of schema files at version 3, with upgrades.
    """
    directory = tmp_path / "schemas"
    directory.mkdir()
    files = {
        "v1.sql": "CREATE TABLE taskbroker_schema (version INTEGER);\n"
                  "CREATE TABLE a (x);",
        "v3.sql": "CREATE TABLE taskbroker_schema (version INTEGER);\n"
                  "CREATE TABLE a (x, y);\nCREATE TABLE b (z);",
        "upgrade-to-v2.sql": "ALTER TABLE a ADD COLUMN y;",
        "upgrade-to-v3.sql": "CREATE TABLE b (z);",
        "README": "not a schema",
    }
    for name, text in files.items():
        (directory / name).write_text(text)
    return directory


def _connect(path):
    return closing(sqlite3.connect(path, isolation_level=None))


def test_schema_created_at_latest(schemas, tmp_path):
    with _connect(tmp_path / "new.db") as connection:
        assert _schema.ensure_schema(connection, "sqlite", schemas) == (None, 3)
        assert connection.execute(
            "SELECT version FROM taskbroker_schema").fetchall() == [(3,)]
        # A second start finds it current.
        assert _schema.ensure_schema(connection, "sqlite", schemas) == (3, 3)


def test_schema_upgraded_step_by_step(schemas, tmp_path):
    with _connect(tmp_path / "old.db") as connection:
        connection.executescript(
            "CREATE TABLE taskbroker_schema (version INTEGER);"
            "INSERT INTO taskbroker_schema VALUES (1);"
            "CREATE TABLE a (x);")
        assert _schema.ensure_schema(connection, "sqlite", schemas) == (1, 3)
        connection.execute("INSERT INTO a (x, y) VALUES (1, 2)")
        connection.execute("INSERT INTO b (z) VALUES (3)")
        assert connection.execute(
            "SELECT version FROM taskbroker_schema").fetchall() == [(3,)]


def test_failed_upgrade_changes_nothing(schemas, tmp_path):
    (schemas / "upgrade-to-v3.sql").write_text(
        "CREATE TABLE b (z);\nTHIS IS NOT SQL;")
    with _connect(tmp_path / "old.db") as connection:
        connection.executescript(
            "CREATE TABLE taskbroker_schema (version INTEGER);"
            "INSERT INTO taskbroker_schema VALUES (1);"
            "CREATE TABLE a (x);")
        with pytest.raises(sqlite3.OperationalError):
            _schema.ensure_schema(connection, "sqlite", schemas)
        assert not connection.in_transaction
        assert connection.execute(
            "SELECT version FROM taskbroker_schema").fetchall() == [(1,)]
        columns = [row[1] for row in connection.execute("PRAGMA table_info(a)")]
        assert columns == ["x"]
        assert connection.execute(
            "SELECT name FROM sqlite_master WHERE name = 'b'").fetchall() == []


def test_failed_creation_leaves_empty_database(schemas, tmp_path):
    (schemas / "v3.sql").write_text("CREATE TABLE a (x);\nNOT SQL;")
    with _connect(tmp_path / "new.db") as connection:
        with pytest.raises(sqlite3.OperationalError):
            _schema.ensure_schema(connection, "sqlite", schemas)
        assert connection.execute(
            "SELECT name FROM sqlite_master").fetchall() == []
