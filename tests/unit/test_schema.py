# -*- test-case-name: tests.unit.test_schema -*-
"""
Tests for the versioned schema loader (taskbroker.store._schema): atomic
creation, step-by-step upgrades, and the packaged schema files.
"""

import json
import re
import sqlite3
from contextlib import closing

import pytest
from hypothesis import given
from hypothesis import strategies as st

from taskbroker.broker import validation
from taskbroker.errors import StoreError
from taskbroker.protocol import codec
from taskbroker.store import TaskRow, _schema, _sqlite_sql
from tests.postgres import connect, new_schema


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
    assert _schema.latest_version(directory) == 7
    for name in (
        "v1.sql",
        "v2.sql",
        "v3.sql",
        "v4.sql",
        "v5.sql",
        "v6.sql",
        "v7.sql",
    ):
        assert "CREATE TABLE tasks" in _schema.read_script(directory, name)
    assert "ALTER TABLE tasks" in _schema.read_script(
        directory, "upgrade-to-v2.sql"
    )
    assert "CREATE INDEX tasks_queued_by_group" in _schema.read_script(
        directory, "upgrade-to-v3.sql"
    )
    assert "CREATE TABLE tasks_v4" in _schema.read_script(
        directory, "upgrade-to-v4.sql"
    )
    assert "ADD COLUMN submitter" in _schema.read_script(
        directory, "upgrade-to-v5.sql"
    )
    assert "ADD COLUMN progress" in _schema.read_script(
        directory, "upgrade-to-v6.sql"
    )
    assert "CREATE TABLE schedules" in _schema.read_script(
        directory, "upgrade-to-v7.sql"
    )


def normalised(statement):
    """
    A statement without its comments and with its white space collapsed.
    """
    return " ".join(re.sub(r"--[^\n]*", "", statement).split())


def statements(name, prefix):
    script = _schema.read_script(_schema.schema_directory("sqlite"), name)
    return [
        normalised(statement)
        for statement in _schema.split_sqlite(script)
        if normalised(statement).startswith(prefix)
    ]


def test_the_upgrade_to_v4_builds_the_table_of_v4():
    # The same table, constraints and all, under its temporary name; then
    # the same indexes.
    (fresh,) = statements("v4.sql", "CREATE TABLE tasks ")
    (rebuilt,) = statements("upgrade-to-v4.sql", "CREATE TABLE tasks_v4 ")
    assert (
        rebuilt.replace("CREATE TABLE tasks_v4 ", "CREATE TABLE tasks ", 1)
        == fresh
    )
    for kind in ("CREATE INDEX", "CREATE UNIQUE INDEX"):
        assert statements("upgrade-to-v4.sql", kind) == statements(
            "v4.sql", kind
        )


@pytest.fixture
def v4():
    """
    A new database at the newest schema version (4's constraints and
    later ones), in memory.
    """
    with closing(sqlite3.connect(":memory:", isolation_level=None)) as db:
        _schema.ensure_schema(db, "sqlite")
        yield db


def accepts(db, column, value):
    """
    Whether a v4 database takes a row whose ``column`` holds ``value``;
    when it does not, the error names the column's constraint.
    """
    columns = "handler" if column == "handler" else f"handler, {column}"
    values = "?" if column == "handler" else "'echo', ?"
    db.execute("SAVEPOINT probe")
    try:
        db.execute(
            f"INSERT INTO tasks ({columns}) VALUES ({values})", (value,)
        )
    except sqlite3.IntegrityError as e:
        assert str(e) == f"CHECK constraint failed: {column}"
        return False
    finally:
        db.execute("ROLLBACK TO probe")
        db.execute("RELEASE probe")
    return True


def _codec_accepts(check, value):
    try:
        check(value)
    except ValueError:
        return False
    return True


_TASK = codec.BROKER_TO_WORKER_COMMANDS[b"TASK"]


@pytest.mark.parametrize(
    "column, values, valid",
    [
        # Ids below 2**53 as the broker runs them (validation.invalid_row);
        # tokens and attempts as a TASK carries them, or 0 before the first.
        (
            "id",
            [0, 1, codec.MAX_EXACT - 1, codec.MAX_EXACT, 2**63 - 1, -1],
            lambda v: 1 <= v <= codec.MAX_EXACT - 1,
        ),
        (
            "token",
            [
                -1,
                0,
                1,
                codec.MAX_EXACT,
                codec.MAX_EXACT + 1,
                2**63 - 1,
                "abc",
                1.5,
            ],
            lambda v: v == 0 or _codec_accepts(_TASK["token"][0], v),
        ),
        (
            "attempts",
            [-1, 0, codec.MAX_ATTEMPT, codec.MAX_ATTEMPT + 1, "abc"],
            lambda v: v == 0 or _codec_accepts(_TASK["attempt"][0], v),
        ),
        (
            "max_attempts",
            [None, 0, 1, 1000, 1001, 2.5, "abc"],
            lambda v: v is None or _codec_accepts(_TASK["max_attempts"][0], v),
        ),
        (
            "time_limit",
            [
                None,
                0,
                0.0009,
                0.001,
                codec.MAX_SECONDS,
                codec.MAX_SECONDS + 0.001,
                1e300,
                "1s",
            ],
            lambda v: _codec_accepts(_TASK["time_limit"][0], v),
        ),
        (
            "handler",
            [
                "",
                "h",
                "h" * codec.MAX_NAME,
                "h" * (codec.MAX_NAME + 1),
                b"echo",
            ],
            lambda v: _codec_accepts(_TASK["handler"][0], v),
        ),
        (
            "priority",
            [None, "high", b"high"],
            lambda v: not isinstance(v, bytes),
        ),
        # A CURVE public key in Z85.
        (
            "submitter",
            [None, "k" * 40, "k" * 39, "k" * 41, b"k" * 40, 40],
            lambda v: v is None or (isinstance(v, str) and len(v) == 40),
        ),
        (
            "progress",
            [None, -0.1, 0, 0.5, 1, 1.01, "half"],
            lambda v: (
                v is None or (isinstance(v, (int, float)) and 0 <= v <= 1)
            ),
        ),
        (
            "progress_message",
            [None, "", "m" * 200, "m" * 201, b"m"],
            lambda v: v is None or (isinstance(v, str) and len(v) <= 200),
        ),
    ]
    + [
        (
            column,
            [
                None,
                -0.001,
                0,
                1.5,
                validation.MAX_TIME,
                validation.MAX_TIME + 1,
                1e300,
                "yesterday",
            ],
            lambda v, column=column: (
                (v is None and column != "created_at")
                or (
                    isinstance(v, (int, float))
                    and 0 <= v <= validation.MAX_TIME
                )
            ),
        )
        for column in (
            "created_at",
            "started_at",
            "finished_at",
            "run_at",
            "progress_at",
        )
    ],
)
def test_the_constraints_are_the_codecs_limits(v4, column, values, valid):
    for value in values:
        if column == "created_at" and value is None:
            continue  # NOT NULL, as since version 1
        assert accepts(v4, column, value) == valid(value), value


def test_a_payload_is_json_text_of_at_most_a_mebibyte(v4):
    largest = '"' + "x" * (codec.MAX_PAYLOAD_SIZE - 2) + '"'
    assert accepts(v4, "payload", largest)
    assert not accepts(v4, "payload", largest + " ")
    # Bytes in UTF-8, as the codec counts them, not characters.
    two_byte = '"' + "\u00e9" * ((codec.MAX_PAYLOAD_SIZE - 2) // 2) + '"'
    assert accepts(v4, "payload", two_byte)
    assert not accepts(v4, "payload", two_byte[:-1] + 'e"')
    for text in (
        "NaN",
        "Infinity",
        "-Infinity",
        '{"a": NaN}',
        "",
        "{",
        "[1,]",
        "{a: 1}",
        "'x'",
        "0x10",
    ):
        assert not accepts(v4, "payload", text), text
    assert not accepts(v4, "payload", b"null")


# What SQLite's json_valid() must refuse for its CHECK to be no looser than
# the codec on these (SQLite 3.42 and later read JSON5, but json_valid()
# with one argument still means strict RFC 8259 JSON).
NOT_JSON = [
    "NaN",
    "Infinity",
    "-Infinity",
    "[1,]",
    "{'a':1}",
    "{a:1}",
    "01",
    ".5",
    "1.",
    "+1",
    "0x10",
    "\ufeff1",
    "",
    " ",
    '"\t"',
    "/*c*/1",
    "[1]//c",
    "'x'",
    '"\\x41"',
    "1 2",
    "[1]]",
]

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)


@given(json_values, st.sampled_from([None, 1]))
def test_json_valid_takes_every_payload_the_codec_makes(value, indent):
    # The broker's own payloads must never break the CHECK: the compact
    # text it stores, and any layout another program's encoder may use.
    with closing(sqlite3.connect(":memory:")) as db:
        for text in (
            codec.encode_value(value, "payload"),
            json.dumps(value, indent=indent, ensure_ascii=False),
        ):
            assert db.execute("SELECT json_valid(?)", (text,)).fetchone() == (
                1,
            ), text


@pytest.mark.parametrize("text", NOT_JSON)
def test_json_valid_refuses_what_the_codec_refuses(text):
    with pytest.raises(ValueError):
        codec.check_text(text, "payload")
    with closing(sqlite3.connect(":memory:")) as db:
        assert db.execute("SELECT json_valid(?)", (text,)).fetchone() == (0,)


def test_what_the_broker_dispatches_fits_the_constraints(v4):
    # A queued row at validation's limits is valid; its dispatch writes the
    # next token and attempt, which the constraints must take.
    v4.execute(
        "INSERT INTO tasks (handler, token, attempts) VALUES ('echo', ?, ?)",
        (codec.MAX_EXACT - 1, codec.MAX_ATTEMPT - 1),
    )
    (row,) = v4.execute(f"SELECT {_sqlite_sql._COLUMNS} FROM tasks")
    row = TaskRow(*row)
    assert validation.invalid_row(row, ("normal",)) is None
    assert (
        _sqlite_sql.dispatch(
            v4.cursor(), row.id, row.token + 1, "w", 1.0, "normal", 3
        )
        is True
    )
    assert v4.execute("SELECT token, attempts FROM tasks").fetchall() == [
        (codec.MAX_EXACT, codec.MAX_ATTEMPT)
    ]
    running = TaskRow(
        *v4.execute(f"SELECT {_sqlite_sql._COLUMNS} FROM tasks").fetchone()
    )
    assert validation.invalid_row(running, ("normal",)) is None


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
        assert _schema.ensure_schema(connection, "sqlite", schemas) == (
            None,
            3,
        )
        assert connection.execute(
            "SELECT version FROM taskbroker_schema"
        ).fetchall() == [(3,)]
        # A second start finds it current.
        assert _schema.ensure_schema(connection, "sqlite", schemas) == (3, 3)


def test_schema_upgraded_step_by_step(schemas, tmp_path):
    with _connect(tmp_path / "old.db") as connection:
        connection.executescript(
            "CREATE TABLE taskbroker_schema (version INTEGER);"
            "INSERT INTO taskbroker_schema VALUES (1);"
            "CREATE TABLE a (x);"
        )
        assert _schema.ensure_schema(connection, "sqlite", schemas) == (1, 3)
        connection.execute("INSERT INTO a (x, y) VALUES (1, 2)")
        connection.execute("INSERT INTO b (z) VALUES (3)")
        assert connection.execute(
            "SELECT version FROM taskbroker_schema"
        ).fetchall() == [(3,)]


def test_failed_upgrade_changes_nothing(schemas, tmp_path):
    (schemas / "upgrade-to-v3.sql").write_text(
        "CREATE TABLE b (z);\nTHIS IS NOT SQL;"
    )
    with _connect(tmp_path / "old.db") as connection:
        connection.executescript(
            "CREATE TABLE taskbroker_schema (version INTEGER);"
            "INSERT INTO taskbroker_schema VALUES (1);"
            "CREATE TABLE a (x);"
        )
        with pytest.raises(sqlite3.OperationalError):
            _schema.ensure_schema(connection, "sqlite", schemas)
        assert not connection.in_transaction
        assert connection.execute(
            "SELECT version FROM taskbroker_schema"
        ).fetchall() == [(1,)]
        columns = [
            row[1] for row in connection.execute("PRAGMA table_info(a)")
        ]
        assert columns == ["x"]
        assert (
            connection.execute(
                "SELECT name FROM sqlite_master WHERE name = 'b'"
            ).fetchall()
            == []
        )


def test_failed_creation_leaves_empty_database(schemas, tmp_path):
    (schemas / "v3.sql").write_text("CREATE TABLE a (x);\nNOT SQL;")
    with _connect(tmp_path / "new.db") as connection:
        with pytest.raises(sqlite3.OperationalError):
            _schema.ensure_schema(connection, "sqlite", schemas)
        assert (
            connection.execute("SELECT name FROM sqlite_master").fetchall()
            == []
        )


# -- PostgreSQL: the same loader, with its dialect ---------------------------


#: The newest packaged PostgreSQL schema version.
PG_LATEST = 5


def test_packaged_postgresql_schema():
    directory = _schema.schema_directory("postgresql")
    assert _schema.latest_version(directory) == PG_LATEST
    for version in range(1, PG_LATEST + 1):
        assert "CREATE TABLE tasks" in _schema.read_script(
            directory, f"v{version}.sql"
        )
    assert "ADD COLUMN submitter" in _schema.read_script(
        directory, "upgrade-to-v2.sql"
    )
    assert "ADD COLUMN progress" in _schema.read_script(
        directory, "upgrade-to-v3.sql"
    )
    assert "REFERENCING NEW TABLE" in _schema.read_script(
        directory, "upgrade-to-v5.sql"
    )


def pg_schema_files(tmp_path, version):
    """
    A folder of the packaged PostgreSQL schema files up to ``version``,
    to create a database as the taskbroker of that version did.
    """
    packaged = _schema.schema_directory("postgresql")
    directory = tmp_path / f"pg-v{version}"
    directory.mkdir()
    for n in range(1, version + 1):
        names = [f"v{n}.sql"] + ([f"upgrade-to-v{n}.sql"] if n > 1 else [])
        for name in names:
            (directory / name).write_text(_schema.read_script(packaged, name))
    return directory


def describe_pg_schema(connection):
    """
    What makes two PostgreSQL schemas the same: each table's columns (in
    order, with type, default and nullability), its constraints and
    indexes, the triggers and the sequences, as the server describes them.
    """

    def rows(sql):
        return connection.execute(sql).fetchall()

    return {
        "columns": rows(
            "SELECT table_name, ordinal_position, column_name, data_type, "
            "column_default, is_nullable FROM information_schema.columns "
            "WHERE table_schema = current_schema() ORDER BY 1, 2"
        ),
        "constraints": rows(
            "SELECT c.conrelid::regclass::text, c.conname, "
            "pg_get_constraintdef(c.oid) FROM pg_constraint c "
            "JOIN pg_namespace n ON n.oid = c.connamespace "
            "WHERE n.nspname = current_schema() ORDER BY 1, 2"
        ),
        "indexes": rows(
            "SELECT tablename, indexname, "
            "replace(indexdef, current_schema() || '.', '') FROM pg_indexes "
            "WHERE schemaname = current_schema() ORDER BY 1, 2"
        ),
        "triggers": rows(
            "SELECT event_object_table, trigger_name, event_manipulation, "
            "action_statement, action_timing, action_reference_new_table "
            "FROM information_schema.triggers "
            "WHERE trigger_schema = current_schema() ORDER BY 1, 2, 3"
        ),
        "functions": rows(
            "SELECT proname, prosrc, replace(array_to_string(proconfig, ','), "
            "current_schema(), '<schema>') FROM pg_proc "
            "WHERE pronamespace = current_schema()::regnamespace ORDER BY 1"
        ),
        "sequences": rows(
            "SELECT sequence_name FROM information_schema.sequences "
            "WHERE sequence_schema = current_schema() ORDER BY 1"
        ),
        "options": rows(
            "SELECT relname, reloptions FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = current_schema() AND relkind = 'r' "
            "ORDER BY 1"
        ),
    }


@pytest.mark.parametrize("version", range(1, PG_LATEST))
def test_postgresql_schema_upgraded_from_each_version(tmp_path, version):
    packaged = _schema.schema_directory("postgresql")
    with new_schema() as upgraded_url, new_schema() as fresh_url:
        with connect(upgraded_url) as connection:
            assert _schema.ensure_schema(
                connection, "postgresql", pg_schema_files(tmp_path, version)
            ) == (None, version)
            connection.execute("INSERT INTO tasks (handler) VALUES ('a')")
            assert _schema.ensure_schema(
                connection, "postgresql", packaged
            ) == (version, PG_LATEST)
            assert connection.execute(
                "SELECT handler, submitter, progress FROM tasks"
            ).fetchall() == [("a", None, None)]
            # A database from before version 4 keeps its history unless
            # told otherwise; one created at 4 or later kept the default.
            assert connection.execute(
                "SELECT name, value FROM taskbroker_settings"
            ).fetchall() == [
                ("default_keep_finished", "none" if version < 4 else "7d")
            ]
            upgraded = describe_pg_schema(connection)
        with connect(fresh_url) as connection:
            assert _schema.ensure_schema(
                connection, "postgresql", packaged
            ) == (None, PG_LATEST)
            assert describe_pg_schema(connection) == upgraded
            assert connection.execute(
                "SELECT name, value FROM taskbroker_settings"
            ).fetchall() == [("default_keep_finished", "7d")]


@pytest.mark.parametrize(
    "statement, state",
    [
        ("ALTER TABLE tasks DISABLE TRIGGER tasks_notify_insert", "D"),
        ("ALTER TABLE tasks ENABLE REPLICA TRIGGER tasks_notify_insert", "R"),
        ("ALTER TABLE tasks ENABLE ALWAYS TRIGGER tasks_notify_insert", "A"),
        ("DROP TRIGGER tasks_notify_insert ON tasks", None),
    ],
)
def test_postgresql_upgrade_keeps_the_operators_choice_of_wake_ups(
    tmp_path, statement, state
):
    # deployment.rst tells producers they may disable the trigger.
    with new_schema() as url, connect(url) as connection:
        _schema.ensure_schema(
            connection, "postgresql", pg_schema_files(tmp_path, 4)
        )
        connection.execute(statement)
        assert _schema.ensure_schema(
            connection, "postgresql", _schema.schema_directory("postgresql")
        ) == (4, PG_LATEST)
        assert connection.execute(
            "SELECT tgenabled FROM pg_trigger WHERE tgrelid = 'tasks'::regclass "
            "AND tgname = 'tasks_notify_insert'"
        ).fetchall() == ([(state,)] if state else [])


def test_postgresql_only_queued_inserts_wake_the_brokers():
    with new_schema() as url, connect(url) as connection:
        _schema.ensure_schema(
            connection, "postgresql", _schema.schema_directory("postgresql")
        )
        (schema,) = connection.execute("SELECT current_schema()").fetchone()
        channel = "taskbroker_" + schema
        with connect(url) as listener:
            listener.execute(f"LISTEN {channel}")
            # A broker's insert of a task it dispatches at once: nothing
            # to claim.  Then a queued one, then a marker: notifications
            # arrive in the order their transactions committed.
            connection.execute(
                "INSERT INTO tasks (handler, state, worker, token, attempts) "
                "VALUES ('h', 'running', 'w', 1, 1)"
            )
            connection.execute(
                "INSERT INTO tasks (handler) VALUES ('h'), ('h')"
            )
            connection.execute("SELECT pg_notify(%s, 'end')", (channel,))
            heard = []
            for notify in listener.notifies(timeout=30):
                heard.append(notify.payload)
                if notify.payload == "end":
                    break
        assert heard == ["", "end"]


def test_postgresql_newer_schema_is_refused(tmp_path, postgres_url):
    with connect(postgres_url) as connection:
        newer = pg_schema_files(tmp_path, PG_LATEST)
        (newer / f"v{PG_LATEST + 1}.sql").write_text("")
        (newer / f"upgrade-to-v{PG_LATEST + 1}.sql").write_text(
            "ALTER TABLE tasks ADD COLUMN note text;"
        )
        assert _schema.ensure_schema(
            connection, "postgresql", _schema.schema_directory("postgresql")
        ) == (None, PG_LATEST)
        assert _schema.ensure_schema(connection, "postgresql", newer) == (
            PG_LATEST,
            PG_LATEST + 1,
        )
        with pytest.raises(
            StoreError, match=f"version {PG_LATEST + 1} is newer"
        ):
            _schema.ensure_schema(
                connection,
                "postgresql",
                _schema.schema_directory("postgresql"),
            )


def test_postgresql_failed_upgrade_changes_nothing(tmp_path, postgres_url):
    import psycopg

    directory = pg_schema_files(tmp_path, PG_LATEST)
    (directory / f"v{PG_LATEST + 1}.sql").write_text("")
    (directory / f"upgrade-to-v{PG_LATEST + 1}.sql").write_text(
        "ALTER TABLE tasks ADD COLUMN note text;\nNOT SQL;"
    )
    with connect(postgres_url) as connection:
        _schema.ensure_schema(
            connection, "postgresql", _schema.schema_directory("postgresql")
        )
        with pytest.raises(psycopg.errors.SyntaxError):
            _schema.ensure_schema(connection, "postgresql", directory)
        assert connection.execute(
            "SELECT version FROM taskbroker_schema"
        ).fetchall() == [(PG_LATEST,)]
        assert connection.execute(
            "SELECT count(*) FROM information_schema.columns WHERE "
            "table_schema = current_schema() AND column_name = 'note'"
        ).fetchall() == [(0,)]
