# -*- test-case-name: tests.unit.test_store_sqlite -*-
"""
What only the SQLite store has, beyond the store contract
(test_store_contract.py): rows inserted by other programs, the ownership
lock (held by a child process that a test kills with SIGKILL), schema
versions and upgrades, group commit and the isolation of a bad write, WAL
checkpoints, and durability settings.
"""

import os
import re
import signal
import sqlite3
import sys
import time
from contextlib import closing

import pytest
import pytest_twisted
from twisted.internet import defer, protocol

import taskbroker
from taskbroker.errors import StoreError, StoreLocked, WriteRefused
from taskbroker.protocol import codec
from taskbroker.store import _schema
from taskbroker.store._sqlite_threads import ConnectionThread
from taskbroker.store.sqlite import INLINE_ROWS, SQLiteStore
from taskbroker.testing.store_contract import new_task, rows_of

#: The newest schema version.
LATEST = _schema.latest_version(_schema.schema_directory("sqlite"))


@pytest.fixture
def reactor():
    # pytest-twisted installs and runs the reactor; tests that need it ask
    # for this fixture so that no library code reaches for the global one.
    from twisted.internet import reactor

    return reactor


@pytest.fixture
def db_path(tmp_path):
    return str(tmp_path / "tasks.db")


@pytest_twisted.ensureDeferred
async def test_close_before_open_creates_no_file(reactor, db_path):
    store = SQLiteStore(db_path, reactor)
    await store.close()
    with pytest.raises(StoreError):
        await store.dispatch(1, 1, "w", 1.0)
    assert not os.path.exists(db_path)


@pytest_twisted.async_yield_fixture
async def sqlite_store(reactor, db_path):
    store = SQLiteStore(db_path, reactor)
    await store.open()
    try:
        yield store
    finally:
        await store.close()


def query(path, sql, *params):
    with closing(sqlite3.connect(path)) as connection:
        return connection.execute(sql, params).fetchall()


def execute(path, sql, *params):
    with closing(sqlite3.connect(path)) as connection:
        with connection:
            connection.execute(sql, params)


@pytest_twisted.ensureDeferred
async def test_sql_insert_by_another_program(sqlite_store, db_path):
    before = time.time()
    with closing(sqlite3.connect(db_path)) as connection:
        for _ in range(3):
            with connection:
                connection.execute(
                    "INSERT INTO tasks (handler, payload, priority) "
                    """VALUES ('echo', '{"a":1}', NULL)"""
                )
    after = time.time()
    rows = await sqlite_store.list("queued", None, 0, 10)
    assert [
        (row.handler, row.payload, row.priority, row.state, row.attempts)
        for row in rows
    ] == [("echo", '{"a":1}', None, "queued", 0)] * 3
    for row in rows:
        assert before - 0.01 <= row.created_at <= after + 0.01
    # Milliseconds, not whole seconds: with three rows, all landing on a
    # whole second has a chance of one in a billion.
    assert any(row.created_at != int(row.created_at) for row in rows)


@pytest_twisted.ensureDeferred
async def test_text_that_is_not_utf8_does_not_stop_reads(
    sqlite_store, db_path
):
    # sqlite3 would refuse to read the whole result; the one row is read
    # with replacement characters, for the broker to fail it alone.
    execute(
        db_path,
        "INSERT INTO tasks (handler, payload) "
        "VALUES (CAST(X'ff6563686f' AS TEXT), '1')",
    )
    execute(db_path, "INSERT INTO tasks (handler) VALUES ('echo')")
    rows = await sqlite_store.list("queued", None, 0, 10)
    assert [row.handler for row in rows] == ["\ufffdecho", "echo"]


@pytest_twisted.ensureDeferred
async def test_sql_insert_delayed_and_unique(sqlite_store, db_path):
    # The example of schema/sqlite/v3.sql.
    insert = (
        "INSERT INTO tasks (handler, payload, priority, run_at, unique_key) "
        "VALUES ('report', '{}', NULL, "
        "(julianday('now') - 2440587.5) * 86400.0 + 3600, 'daily-report')"
    )
    before = time.time()
    execute(db_path, insert)
    (row,) = await sqlite_store.list("queued", None, 0, 10)
    assert (row.handler, row.unique_key, row.token) == (
        "report",
        "daily-report",
        0,
    )
    assert before + 3600 - 0.01 <= row.run_at <= time.time() + 3600 + 0.01
    # An integer run_at is stored as a number of the column's type.
    execute(db_path, "INSERT INTO tasks (handler, run_at) VALUES ('a', 7)")
    assert query(
        db_path, "SELECT typeof(run_at) FROM tasks WHERE handler = 'a'"
    ) == [("real",)]

    # A second live task with the key: the other program's INSERT fails.
    with pytest.raises(
        sqlite3.IntegrityError,
        match="UNIQUE constraint failed: tasks.unique_key",
    ):
        execute(db_path, insert)
    # INSERT OR IGNORE skips it quietly.
    with closing(sqlite3.connect(db_path)) as connection:
        with connection:
            cursor = connection.execute(
                insert.replace("INSERT", "INSERT OR IGNORE", 1)
            )
        assert cursor.rowcount == 0
    assert len(await sqlite_store.list(None, None, 0, 10)) == 2

    # Once the task has ended, the key can be used again.
    assert await sqlite_store.dispatch(row.id, 1, "w1", 1.0) is True
    assert (
        await sqlite_store.finish(row.id, 1, "succeeded", "1", None, None, 2.0)
        is True
    )
    execute(db_path, insert)
    assert [
        r.unique_key for r in await sqlite_store.list("queued", None, 0, 10)
    ] == [None, "daily-report"]


@pytest_twisted.ensureDeferred
async def test_second_store_is_locked_out(sqlite_store, reactor, db_path):
    other = SQLiteStore(db_path, reactor)
    with pytest.raises(StoreLocked) as caught:
        await other.open()
    message = str(caught.value)
    assert message == (
        f"database {os.path.abspath(db_path)} is in use by "
        f"another broker (pid {os.getpid()})"
    )
    await other.close()
    await sqlite_store.close()
    await other.open()
    await other.close()


class _LineReader(protocol.ProcessProtocol):
    """
    Fires ``line`` with the child's first line of output and ``ended`` when
    it exits.
    """

    def __init__(self):
        self.line = defer.Deferred()
        self.ended = defer.Deferred()
        self._out = b""
        self._err = b""

    def outReceived(self, data):
        self._out += data
        if b"\n" in self._out and self.line is not None:
            d, self.line = self.line, None
            d.callback(self._out.split(b"\n", 1)[0].decode())

    def errReceived(self, data):
        self._err += data

    def processEnded(self, reason):
        if self.line is not None:
            d, self.line = self.line, None
            d.errback(
                AssertionError(
                    "the child exited before its first line: "
                    + self._err.decode(errors="replace")
                )
            )
        # The reason itself, not the Failure, which would fail the Deferred.
        self.ended.callback(reason.value)


_HOLD_LOCK = """
import sys
from twisted.internet import defer, task
from taskbroker.store.sqlite import SQLiteStore

async def main(reactor):
    await SQLiteStore(sys.argv[1], reactor).open()
    print("opened", flush=True)
    await defer.Deferred()  # until killed

task.react(lambda reactor: defer.ensureDeferred(main(reactor)))
"""


@pytest_twisted.ensureDeferred
async def test_lock_released_when_owner_is_killed(reactor, db_path):
    reader = _LineReader()
    root = os.path.dirname(os.path.dirname(taskbroker.__file__))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [root, env.get("PYTHONPATH")])
    )
    child = reactor.spawnProcess(
        reader,
        sys.executable,
        [sys.executable, "-c", _HOLD_LOCK, db_path],
        env=env,
    )
    try:
        line = reader.line
        line.addTimeout(30, reactor)
        assert await line == "opened"
        store = SQLiteStore(db_path, reactor)
        with pytest.raises(StoreLocked, match=f"pid {child.pid}"):
            await store.open()
        # SIGKILL: no cleanup code runs in the child; only the kernel can
        # release the lock.
        os.kill(child.pid, signal.SIGKILL)
        assert (await reader.ended).signal == signal.SIGKILL
        await store.open()
        assert await store.list("queued", None, 0, 10) == []
        await store.close()
    finally:
        if child.pid is not None:
            child.signalProcess("KILL")
            await reader.ended


@pytest_twisted.ensureDeferred
async def test_schema_version_recorded(sqlite_store, db_path):
    assert query(db_path, "SELECT version FROM taskbroker_schema") == [
        (LATEST,)
    ]
    indexes = {
        name
        for (name,) in query(
            db_path,
            "SELECT name FROM sqlite_master WHERE type = 'index' "
            "AND tbl_name = 'tasks' AND sql IS NOT NULL",
        )
    }
    assert indexes == {
        "tasks_queued_by_group",
        "tasks_queued_by_run_at",
        "tasks_by_state_id",
        "tasks_by_handler_id",
        "tasks_live_unique_key",
        "tasks_by_request_id",
        "tasks_by_submitter_id",
        "tasks_finished_by_time",
    }
    assert query(db_path, "PRAGMA journal_mode") == [("wal",)]


@pytest.mark.parametrize(
    "where",
    [
        "state = 'queued' AND id > ?",
        "id > ? AND state = ?",
        "id > ? AND handler = ?",
        "request_id = ?",
    ],
)
@pytest_twisted.ensureDeferred
async def test_reads_use_an_index(sqlite_store, db_path, where):
    params = (0, "x")[: where.count("?")]
    plan = " ".join(
        detail
        for *_, detail in query(
            db_path,
            f"EXPLAIN QUERY PLAN SELECT * FROM tasks WHERE {where} "
            "ORDER BY id LIMIT 10",
            *params,
        )
    )
    # An index range, already in id order: no full scan and no sort, however
    # many finished tasks the table holds.
    assert "SEARCH tasks USING" in plan and "INDEX" in plan
    assert "TEMP B-TREE" not in plan


@pytest.mark.parametrize(
    "where, index",
    [
        # What submit looks for: a request sent again, a live task with a key
        # (the state condition as the partial index has it).
        ("request_id = ? ORDER BY id", "tasks_by_request_id"),
        (
            "unique_key = ? AND state IN ('queued', 'running')",
            "tasks_live_unique_key",
        ),
    ],
)
@pytest_twisted.ensureDeferred
async def test_submit_lookups_use_their_index(
    sqlite_store, db_path, where, index
):
    plan = " ".join(
        detail
        for *_, detail in query(
            db_path,
            f"EXPLAIN QUERY PLAN SELECT * FROM tasks WHERE {where}",
            "x",
        )
    )
    assert f"SEARCH tasks USING INDEX {index} " in plan
    assert "TEMP B-TREE" not in plan


@pytest_twisted.ensureDeferred
async def test_newer_schema_refused(reactor, db_path):
    store = SQLiteStore(db_path, reactor)
    await store.open()
    await store.close()
    execute(db_path, "UPDATE taskbroker_schema SET version = 99")
    with pytest.raises(StoreError) as caught:
        await store.open()
    assert (
        "database schema version 99 is newer than this taskbroker "
        f"supports ({LATEST})" in str(caught.value)
    )
    assert not isinstance(caught.value, StoreLocked)
    # The failed open let go of the lock and the pool.
    execute(db_path, f"UPDATE taskbroker_schema SET version = {LATEST}")
    await store.open()
    await store.close()


def create_old_database(path, version):
    """
    Create a database as the taskbroker of that schema version did, with
    ``v<version>.sql``.
    """
    script = _schema.read_script(
        _schema.schema_directory("sqlite"), f"v{version}.sql"
    )
    with closing(sqlite3.connect(path)) as connection:
        connection.executescript(script)
        connection.execute(
            "INSERT INTO taskbroker_schema VALUES (?)", (version,)
        )
        connection.commit()


def create_v1_database(path):
    create_old_database(path, 1)


def describe_schema(path):
    """
    What makes two databases' schemas the same: the columns of each table
    (name, type, NOT NULL, default, primary key) and its definition (with
    its CHECK constraints), and each index (unique, partial, columns, and
    its definition), each definition give or take comments and white
    space (next to commas and closing parentheses, none or one).
    """
    with closing(sqlite3.connect(path)) as connection:
        tables = {}
        for table, sql in connection.execute(
            "SELECT name, sql FROM sqlite_master WHERE type = 'table' "
            "AND name NOT LIKE 'sqlite_%' ORDER BY name"
        ):
            # A table rebuilt under another name and renamed is quoted.
            sql = sql.replace(
                f'CREATE TABLE "{table}"', f"CREATE TABLE {table}", 1
            )
            # ALTER TABLE ADD COLUMN splices the column into the text as
            # ", <definition>" before the closing parenthesis.
            tables[table] = (
                connection.execute(f"PRAGMA table_xinfo({table})").fetchall(),
                re.sub(
                    r" ?([,)]) ?",
                    r"\1 ",
                    " ".join(re.sub(r"--[^\n]*", "", sql).split()),
                ).strip(),
            )
        indexes = {}
        for name, sql in connection.execute(
            "SELECT name, sql FROM sqlite_master WHERE type = 'index' "
            "ORDER BY name"
        ):
            indexes[name] = (
                connection.execute(f"PRAGMA index_xinfo({name})").fetchall(),
                None if sql is None else " ".join(sql.split()),
            )
    return tables, indexes


@pytest_twisted.ensureDeferred
async def test_upgrade_from_v1(reactor, db_path):
    create_v1_database(db_path)
    # What a version 1 database holds: a row inserted by another program,
    # one a version 1 broker dispatched twice (its attempt number was the
    # fencing token then), and one that failed.
    execute(
        db_path,
        "INSERT INTO tasks (handler, payload, priority) "
        """VALUES ('echo', '{"a":1}', NULL)""",
    )
    execute(
        db_path,
        "INSERT INTO tasks (handler, priority, state, "
        "attempts, max_attempts, worker, started_at) "
        "VALUES ('echo', 'high', 'running', 2, 3, 'w1', 5.0)",
    )
    execute(
        db_path,
        "INSERT INTO tasks (handler, state, attempts, error, "
        "finished_at) VALUES ('echo', 'failed', 1, 'boom', 6.0)",
    )
    before = query(db_path, "SELECT * FROM tasks ORDER BY id")

    store = SQLiteStore(db_path, reactor)
    await store.open()
    try:
        assert query(db_path, "SELECT version FROM taskbroker_schema") == [
            (LATEST,)
        ]
        # The old columns are untouched, the new ones come after them.
        assert [
            row[:13]
            for row in query(db_path, "SELECT * FROM tasks ORDER BY id")
        ] == before
        external, running, failed = await store.list(None, None, 0, 10)
        assert (
            external.handler,
            external.payload,
            external.state,
            external.attempts,
        ) == ("echo", '{"a":1}', "queued", 0)
        for row in (external, running, failed):
            assert (
                row.run_at,
                row.unique_key,
                row.request_id,
                row.time_limit,
                row.traceback,
                row.submitter,
                row.progress,
            ) == (None,) * 7
        # The tokens go on from the attempt numbers.
        assert [row.token for row in (external, running, failed)] == [0, 2, 1]
        assert (running.state, running.attempts, running.worker) == (
            "running",
            2,
            "w1",
        )
        assert failed.error == "boom"

        # The broker restarts with it: the running task gets its attempt
        # back, and its next dispatch gets a token never used before.
        assert await store.requeue(running.id, 2, consumed=False) is True
        assert await store.dispatch(running.id, 3, "w2", 7.0) is True
        row = await store.get(running.id)
        assert (row.attempts, row.token) == (2, 3)
        assert (await store.retry(failed.id)).state == "queued"
        ((row, created),) = await store.submit([new_task(unique_key="k")])
        assert created and await store.submit([new_task(unique_key="k")]) == [
            (row, False)
        ]
    finally:
        await store.close()
    # A second open finds it current.
    await store.open()
    await store.close()


@pytest.mark.parametrize("version", [1, 2, 3, 4, 5, 6])
@pytest_twisted.ensureDeferred
async def test_upgraded_schema_is_the_new_schema(reactor, tmp_path, version):
    upgraded = str(tmp_path / "upgraded.db")
    fresh = str(tmp_path / "fresh.db")
    create_old_database(upgraded, version)
    for path in (upgraded, fresh):
        store = SQLiteStore(path, reactor)
        await store.open()
        await store.close()
    tables, indexes = describe_schema(upgraded)
    assert (tables, indexes) == describe_schema(fresh)
    assert "tasks_queued_by_group" in indexes
    assert {"schedules", "taskbroker_settings"} <= set(tables)
    assert "tasks_finished_by_time" in indexes
    # An upgraded database keeps its history unless told otherwise; a new
    # one keeps a week of it.
    assert [
        query(path, "SELECT name, value FROM taskbroker_settings")
        for path in (upgraded, fresh)
    ] == [
        [("default_keep_finished", "none")],
        [("default_keep_finished", "7d")],
    ]
    columns, definition = tables["tasks"]
    assert [column[1] for column in columns][-10:] == [
        "run_at",
        "unique_key",
        "request_id",
        "token",
        "time_limit",
        "traceback",
        "submitter",
        "progress",
        "progress_message",
        "progress_at",
    ]
    assert "CONSTRAINT token CHECK (typeof(token) = 'integer'" in definition
    # The partial unique index, with its condition.
    assert indexes["tasks_live_unique_key"][1].endswith(
        "WHERE unique_key IS NOT NULL AND state IN ('queued', 'running')"
    )


@pytest_twisted.ensureDeferred
async def test_upgrade_to_v5_keeps_every_row_and_adds_the_submitter(
    reactor, db_path
):
    create_old_database(db_path, 4)
    ids = [
        insert_row(db_path, payload='{"a": 1}'),
        insert_row(db_path, state="failed", error="boom", attempts=3),
    ]
    before = query(db_path, "SELECT * FROM tasks ORDER BY id")
    store = SQLiteStore(db_path, reactor)
    await store.open()
    try:
        assert query(db_path, "SELECT * FROM tasks ORDER BY id") == [
            row + (None,) * 4 for row in before
        ]
        key = "k" * 40
        (mine,) = rows_of(await store.submit([new_task(submitter=key)]))
        assert mine.submitter == key and mine.id == ids[-1] + 1
        assert await store.get(mine.id) == mine
        assert [
            row.id
            for row in await store.list(None, None, 0, 10, submitter=key)
        ] == [mine.id]
        with pytest.raises(
            sqlite3.IntegrityError, match="CHECK constraint failed: submitter"
        ):
            insert_row(db_path, submitter="too short")
    finally:
        await store.close()


#: Rows that break schema 4's constraints, as another program could have
#: inserted them before it: (the columns, the schema version that has
#: them, the column the upgrade names).
BROKEN_ROWS = [
    (
        {"attempts": "abc", "state": "running", "started_at": 5.0},
        1,
        "attempts",
    ),
    ({"created_at": "yesterday"}, 1, "created_at"),
    ({"payload": "{", "state": "succeeded", "result": "1"}, 1, "payload"),
    (
        {"max_attempts": 0, "state": "failed", "error": "boom"},
        1,
        "max_attempts",
    ),
    ({"handler": "h" * 201}, 1, "handler"),
    ({"token": "abc"}, 2, "token"),
    ({"token": 2**63 - 1, "state": "running"}, 2, "token"),
    ({"run_at": 1e300}, 2, "run_at"),
    ({"time_limit": 1e-9, "state": "cancelled"}, 2, "time_limit"),
    # Last: after the id at 2**63 - 1, AUTOINCREMENT had nowhere to go
    # ("database or disk is full").
    ({"id": -4}, 1, "id"),
    ({"id": 2**63 - 1}, 1, "id"),
]


def insert_row(path, **columns):
    columns = {"handler": "echo", **columns}
    with closing(sqlite3.connect(path)) as connection:
        with connection:
            return connection.execute(
                f"INSERT INTO tasks ({', '.join(columns)}) "
                f"VALUES ({', '.join('?' for _ in columns)})",
                tuple(columns.values()),
            ).lastrowid


@pytest.mark.parametrize("version", [1, 2, 3])
@pytest_twisted.ensureDeferred
async def test_upgrade_repairs_the_rows_that_break_the_constraints(
    reactor, db_path, version
):
    create_old_database(db_path, version)
    good = [
        insert_row(db_path, payload='{"a": 1}'),
        insert_row(db_path, state="succeeded", result='"ok"'),
    ]
    broken = [
        (insert_row(db_path, **columns), columns, column)
        for columns, since, column in BROKEN_ROWS
        if since <= version
    ]
    count = len(good) + len(broken)
    upgraded_at = time.time()
    store = SQLiteStore(db_path, reactor)
    await store.open()
    try:
        assert query(db_path, "SELECT version FROM taskbroker_schema") == [
            (LATEST,)
        ]
        rows = await store.list(None, None, 0, 100)
        assert len(rows) == count
        # The good rows as they were.
        assert [(row.id, row.state, row.error) for row in rows[:2]] == [
            (good[0], "queued", None),
            (good[1], "succeeded", None),
        ]
        # Broken ids come last, with new ids after the highest, in the
        # order of the old ones.
        by_id = {row.id: row for row in rows}
        last = max(i for i, _, _ in broken if 0 < i < 2**53)
        renumbered = [i for i, _, _ in broken if not 0 < i < 2**53]
        new_ids = dict(zip(sorted(renumbered), range(last + 1, count + 1)))
        assert sorted(by_id) == sorted(
            good + [new_ids.get(i, i) for i, _, _ in broken]
        )
        for old_id, columns, column in broken:
            row = by_id[new_ids.get(old_id, old_id)]
            state = columns.get("state", "queued")
            # The live ones fail; the others keep their state.
            expected = "failed" if state in ("queued", "running") else state
            assert row.state == expected, row
            assert row.error.startswith(f"{column} "), row
            assert "(found by the upgrade to schema 4)" in row.error
            if "error" in columns:
                assert row.error.endswith("; before: boom")
            if state in ("queued", "running"):
                assert upgraded_at - 1 <= row.finished_at <= time.time() + 1
        # What each broken value became.
        replaced = {
            column: by_id[new_ids.get(i, i)] for i, _, column in broken
        }
        assert replaced["attempts"].attempts == 0
        assert replaced["created_at"].created_at == 0
        assert replaced["payload"].payload == '"{"'  # its text, kept
        assert replaced["max_attempts"].max_attempts is None
        assert replaced["handler"].handler == "h" * 200
        if version >= 2:
            assert replaced["token"].token == 0
            assert replaced["run_at"].run_at is None
            assert replaced["time_limit"].time_limit is None
        assert (
            "id 9223372036854775807 is not from 1 to 9007199254740990"
            in by_id[new_ids[2**63 - 1]].error
        )

        # The constraints are in force, and the ids go on.
        with pytest.raises(
            sqlite3.IntegrityError, match="CHECK constraint failed: token"
        ):
            insert_row(db_path, token="abc")
        (row,) = rows_of(await store.submit([new_task()]))
        assert row.id == count + 1
    finally:
        await store.close()


@pytest_twisted.ensureDeferred
async def test_upgrade_keeps_the_id_sequence(reactor, db_path):
    create_old_database(db_path, 3)
    for _ in range(5):
        insert_row(db_path)
    # AUTOINCREMENT: the ids of deleted rows are not used again.
    execute(db_path, "DELETE FROM tasks WHERE id > 3")
    store = SQLiteStore(db_path, reactor)
    await store.open()
    try:
        (row,) = rows_of(await store.submit([new_task()]))
        assert row.id == 6
        assert query(db_path, "SELECT name, seq FROM sqlite_sequence") == [
            ("tasks", 6)
        ]
    finally:
        await store.close()


@pytest_twisted.ensureDeferred
async def test_an_id_at_the_top_is_refused_and_submits_go_on(
    sqlite_store, db_path
):
    # Version 3 took it, and AUTOINCREMENT had nowhere to go after it: every
    # insert failed from then on.
    first = insert_row(db_path)
    for top in (2**63 - 1, 2**53 - 1):
        with pytest.raises(
            sqlite3.IntegrityError, match="CHECK constraint failed: id"
        ):
            insert_row(db_path, id=top)
    assert query(db_path, "SELECT seq FROM sqlite_sequence") == [(first,)]
    (row,) = rows_of(await sqlite_store.submit([new_task()]))
    assert row.id == first + 1
    assert insert_row(db_path) == first + 2


@pytest_twisted.ensureDeferred
async def test_upgrade_refuses_to_drop_a_trigger(reactor, db_path):
    create_old_database(db_path, 3)
    insert_row(db_path)
    execute(
        db_path,
        "CREATE TRIGGER audit AFTER INSERT ON tasks BEGIN SELECT 1; END",
    )
    before = describe_schema(db_path)
    store = SQLiteStore(db_path, reactor)
    with pytest.raises(StoreError, match="would drop the triggers on it"):
        await store.open()
    assert describe_schema(db_path) == before
    assert query(
        db_path, "SELECT name FROM sqlite_master WHERE type = 'trigger'"
    ) == [("audit",)]
    execute(db_path, "DROP TRIGGER audit")
    await store.open()
    await store.close()


@pytest_twisted.ensureDeferred
async def test_a_refused_write_fails_alone_in_its_group(sqlite_store, db_path):
    # A queued task with the highest token a message carries: its next
    # dispatch would take it past, which the token's CHECK refuses.
    top = insert_row(db_path, token=codec.MAX_EXACT)
    before = sqlite_store.transactions
    writes = [
        sqlite_store.submit([new_task(payload='"fine"')]),
        sqlite_store.submit([new_task(payload="not JSON")]),
        sqlite_store.dispatch(top, codec.MAX_EXACT + 1, "w", 1.0),
        sqlite_store.submit([new_task(payload='"also fine"')]),
    ]
    outcomes = await defer.DeferredList(writes, consumeErrors=True)
    assert sqlite_store.transactions - before == 1
    (ok1, (first,)), (ok2, payload), (ok3, token), (ok4, (last,)) = outcomes
    assert (ok1, ok2, ok3, ok4) == (True, False, False, True)
    assert payload.check(WriteRefused)
    assert str(payload.value) == (
        "submit failed: CHECK constraint failed: payload"
    )
    assert token.check(WriteRefused)
    assert str(token.value) == (
        "dispatch failed: CHECK constraint failed: token"
    )
    rows = await sqlite_store.list(None, None, 0, 10)
    assert [(row.id, row.payload, row.state, row.token) for row in rows] == [
        (top, "null", "queued", codec.MAX_EXACT),
        (first.row.id, '"fine"', "queued", 0),
        (last.row.id, '"also fine"', "queued", 0),
    ]


@pytest_twisted.ensureDeferred
async def test_failed_upgrade_from_v1_changes_nothing(reactor, db_path):
    create_v1_database(db_path)
    execute(db_path, "INSERT INTO tasks (handler) VALUES ('echo')")
    # Something in the way of the upgrade's last statement.
    execute(db_path, "CREATE TABLE tasks_by_request_id (x)")
    v1 = describe_schema(db_path)
    store = SQLiteStore(db_path, reactor)
    with pytest.raises(StoreError, match="tasks_by_request_id"):
        await store.open()
    assert describe_schema(db_path) == v1
    assert query(db_path, "SELECT version FROM taskbroker_schema") == [(1,)]
    assert query(db_path, "SELECT id, handler FROM tasks") == [(1, "echo")]
    # It let go of the database: once the obstacle is gone, it upgrades.
    execute(db_path, "DROP TABLE tasks_by_request_id")
    await store.open()
    try:
        assert (await store.get(1)).token == 0
    finally:
        await store.close()


@pytest_twisted.ensureDeferred
async def test_not_a_database(reactor, db_path):
    with open(db_path, "wb") as f:
        f.write(b"this is not a database\n" * 200)
    store = SQLiteStore(db_path, reactor)
    with pytest.raises(StoreError) as caught:
        await store.open()
    message = str(caught.value)
    assert os.path.abspath(db_path) in message
    assert "not a database" in message
    assert "\n" not in message
    with pytest.raises(StoreError):
        await store.get(1)


@pytest_twisted.ensureDeferred
async def test_someone_elses_tasks_table(reactor, db_path):
    execute(db_path, "CREATE TABLE tasks (x)")
    with pytest.raises(StoreError, match="not created by taskbroker"):
        await SQLiteStore(db_path, reactor).open()


@pytest_twisted.ensureDeferred
async def test_missing_directory(reactor, tmp_path):
    path = str(tmp_path / "missing" / "tasks.db")
    with pytest.raises(StoreError) as caught:
        await SQLiteStore(path, reactor).open()
    assert str(tmp_path / "missing") in str(caught.value)
    assert not os.path.exists(tmp_path / "missing")


def test_bad_synchronous(reactor, db_path):
    with pytest.raises(ValueError):
        SQLiteStore(db_path, reactor, synchronous="off")


@pytest_twisted.ensureDeferred
async def test_checkpoints_run_apart_from_commits(sqlite_store, db_path):
    # SQLite's own checkpoints (inside commits) are off; the store's
    # checkpointer copies the WAL into the database on its own connection.
    autocheckpoint = await sqlite_store._thread.run(
        lambda c: c.execute("PRAGMA wal_autocheckpoint").fetchone()[0]
    )
    assert autocheckpoint == 0
    await sqlite_store.submit([new_task() for _ in range(200)])
    busy, frames, copied = await sqlite_store.checkpoint()
    assert busy == 0 and frames > 0 and copied == frames
    # Another connection sees the rows in the database file itself.
    assert query(db_path, "SELECT count(*) FROM tasks") == [(200,)]


@pytest_twisted.ensureDeferred
async def test_a_long_wal_is_restarted(sqlite_store, db_path, monkeypatch):
    # A passive checkpoint never lets SQLite write the WAL from its start
    # again while writes keep coming; past RESTART_FRAMES a RESTART one
    # follows.  A reader of old frames shows which ran: a RESTART waits
    # for it (briefly) and reports busy, where a passive one does not.
    from taskbroker.store import _sqlite_threads

    monkeypatch.setattr(_sqlite_threads, "RESTART_FRAMES", 10)
    await sqlite_store.submit([new_task() for _ in range(50)])
    with closing(sqlite3.connect(db_path, isolation_level=None)) as reader:
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM tasks").fetchone()
        for _ in range(5):
            await sqlite_store.submit([new_task() for _ in range(50)])
        busy, frames, copied = await sqlite_store.checkpoint()
        assert busy == 1 and frames >= 10
        reader.execute("COMMIT")
    busy, frames, copied = await sqlite_store.checkpoint()
    assert (busy, copied) == (0, frames)
    # The next write starts the WAL again from its beginning.
    await sqlite_store.submit([new_task()])
    _, after, _ = await sqlite_store.checkpoint()
    assert after < 10 <= frames


@pytest_twisted.ensureDeferred
async def test_group_commit(sqlite_store):
    before = sqlite_store.transactions
    submitted = [
        sqlite_store.submit([new_task(payload=str(i))]) for i in range(100)
    ]
    results = await defer.gatherResults(submitted)
    assert sqlite_store.transactions - before <= 2
    ids = [rows[0].row.id for rows in results]
    assert ids == sorted(set(ids))
    listed = await sqlite_store.list(None, None, 0, 1000)
    assert [(row.id, row.payload) for row in listed] == [
        (rows[0].row.id, str(i)) for i, rows in enumerate(results)
    ]


@pytest_twisted.ensureDeferred
async def test_writes_during_a_flush_go_in_the_next(sqlite_store, reactor):
    before = sqlite_store.transactions
    # Too many rows to commit in the reactor's thread.
    first = sqlite_store.submit(
        [new_task(payload='"first"') for _ in range(INLINE_ROWS + 1)]
    )
    later = []
    # Runs just after the first flush was handed to the store's thread, in
    # the same timer pass, so that flush cannot have finished yet.
    reactor.callLater(
        0,
        lambda: later.extend(
            sqlite_store.submit([new_task(payload=str(i))]) for i in range(10)
        ),
    )
    await first
    await defer.gatherResults(later)
    assert len(later) == 10
    assert sqlite_store.transactions - before == 2
    assert len(await sqlite_store.list(None, None, 0, 100)) == 11 + INLINE_ROWS


def record_commit_threads(store):
    """
    :returns: the list to which each of ``store``'s transactions appends
        the name of the thread that committed it.
    """
    import threading

    threads = []
    commit = store._commit

    def recording(connection, operations):
        threads.append(threading.current_thread().name)
        return commit(connection, operations)

    store._commit = recording
    return threads


@pytest_twisted.ensureDeferred
async def test_small_writes_commit_in_the_reactor_thread(sqlite_store):
    threads = record_commit_threads(sqlite_store)
    (row,) = rows_of(await sqlite_store.submit([new_task()]))
    assert await sqlite_store.dispatch(row.id, 1, "w", 1.0) is True
    assert await sqlite_store.finish(
        row.id, 1, "succeeded", "1", None, None, 2.0
    )
    many = [new_task() for _ in range(INLINE_ROWS + 1)]
    assert len(await sqlite_store.submit(many)) == INLINE_ROWS + 1
    await sqlite_store.purge(3.0)
    assert threads == ["MainThread"] * 3 + ["taskbroker-sqlite"] * 2
    # Statements in the store's thread wait for other programs' locks as
    # configured; see test_a_locked_database_never_blocks_the_reactor.
    timeout = await sqlite_store._thread.run(
        lambda c: c.execute("PRAGMA busy_timeout").fetchone()[0]
    )
    assert timeout == 5000


@pytest_twisted.ensureDeferred
async def test_a_task_is_read_in_the_reactor_thread_when_the_store_is_idle(
    sqlite_store, monkeypatch
):
    import threading

    from taskbroker.store import _sqlite_sql

    threads = []
    get = _sqlite_sql.get

    def recording(connection, task_id):
        threads.append(threading.current_thread().name)
        return get(connection, task_id)

    monkeypatch.setattr(_sqlite_sql, "get", recording)
    (row,) = rows_of(await sqlite_store.submit([new_task()]))
    assert await sqlite_store.get(row.id) == row
    release = threading.Event()
    busy = sqlite_store._thread.run(lambda connection: release.wait(30))
    read = sqlite_store.get(row.id)
    assert not read.called
    release.set()
    await busy
    assert await read == row
    assert threads == ["MainThread", "taskbroker-sqlite"]


@pytest_twisted.ensureDeferred
async def test_writes_wait_for_the_store_thread_to_keep_their_order(
    sqlite_store,
):
    import threading

    threads = record_commit_threads(sqlite_store)
    release = threading.Event()
    busy = sqlite_store._thread.run(lambda connection: release.wait(30))
    submitted = sqlite_store.submit([new_task()])
    # A turn later the write was flushed: to the thread, which is held.
    await deferLater(0)
    assert not submitted.called
    release.set()
    await busy
    assert len(await submitted) == 1
    assert threads == ["taskbroker-sqlite"]


@pytest_twisted.ensureDeferred
async def test_full_sync_commits_in_the_store_thread(reactor, db_path):
    store = SQLiteStore(db_path, reactor, synchronous="full")
    await store.open()
    try:
        threads = record_commit_threads(store)
        await store.submit([new_task()])
    finally:
        await store.close()
    assert threads == ["taskbroker-sqlite"]


@pytest_twisted.ensureDeferred
async def test_a_locked_database_never_blocks_the_reactor(reactor, db_path):
    # Another program holds the write lock: the commit tried in the
    # reactor's thread fails at once and waits in the store's thread.
    store = SQLiteStore(db_path, reactor)
    await store.open()
    try:
        threads = record_commit_threads(store)
        other = sqlite3.connect(db_path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        ticks = []
        submitted = store.submit([new_task()])
        for _ in range(5):
            await deferLater(0.01)
            ticks.append(submitted.called)
        other.execute("ROLLBACK")
        other.close()
        assert len(await submitted) == 1
        assert ticks == [False] * 5
        assert threads == ["MainThread", "taskbroker-sqlite"]
        # The next one is back in the reactor's thread, not waiting.
        await store.submit([new_task()])
        assert threads[2:] == ["MainThread"]
        assert len(await store.list(None, None, 0, 10)) == 2
    finally:
        await store.close()


def deferLater(seconds):
    from twisted.internet import reactor, task

    return task.deferLater(reactor, seconds, lambda: None)


@pytest_twisted.ensureDeferred
async def test_failed_transaction_fails_every_write(reactor, db_path):
    store = SQLiteStore(db_path, reactor, busy_timeout=0.05)
    await store.open()
    try:
        (task,) = rows_of(await store.submit([new_task()]))
        with closing(sqlite3.connect(db_path, isolation_level=None)) as other:
            # Another program holds the write lock longer than the store
            # waits for it.
            other.execute("BEGIN IMMEDIATE")
            writes = [
                store.submit([new_task()]),
                store.dispatch(task.id, 1, "w", 1.0),
                store.cancel(task.id, 2.0),
                store.retry(task.id),
            ]
            outcomes = await defer.DeferredList(writes, consumeErrors=True)
            other.execute("ROLLBACK")
        for ok, failure in outcomes:
            assert not ok
            assert failure.check(StoreError)
            assert "locked" in str(failure.value)
        assert await store.get(task.id) == task
        assert await store.dispatch(task.id, 1, "w", 1.0) is True
        assert len(await store.list(None, None, 0, 10)) == 1
    finally:
        await store.close()


@pytest_twisted.ensureDeferred
async def test_close_waits_for_pending_writes(reactor, db_path):
    store = SQLiteStore(db_path, reactor)
    await store.open()
    submitted = store.submit([new_task(handler="late")])
    closed = store.close()
    also_closed = store.close()
    (row,) = rows_of(await submitted)
    await closed
    await also_closed
    assert query(db_path, "SELECT id, handler FROM tasks") == [
        (row.id, "late")
    ]
    # Closing the last connection checkpointed the WAL into the file.
    assert not os.path.exists(db_path + "-wal")


@pytest_twisted.ensureDeferred
async def test_data_survives_reopen(reactor, db_path):
    store = SQLiteStore(db_path, reactor)
    await store.open()
    rows = rows_of(
        await store.submit(
            [
                new_task(handler="a", request_id="r"),
                new_task(
                    handler="b",
                    run_at=9.5,
                    unique_key="k",
                    request_id="r",
                    time_limit=2.5,
                ),
            ]
        )
    )
    await store.dispatch(rows[0].id, 1, "w1", 5.0)
    await store.close()

    again = SQLiteStore(db_path, reactor)
    await again.open()
    try:
        assert [row.id for row in await again.running()] == [rows[0].id]
        assert await again.get(rows[1].id) == rows[1]
        (third,) = rows_of(await again.submit([new_task(handler="c")]))
        assert third.id > rows[1].id
        assert await again.submit([new_task(request_id="r")]) == [
            (await again.get(rows[0].id), False),
            (rows[1], False),
        ]
    finally:
        await again.close()


@pytest_twisted.ensureDeferred
async def test_synchronous_full(reactor, db_path):
    store = SQLiteStore(db_path, reactor, synchronous="full")
    await store.open()
    try:
        (row,) = rows_of(await store.submit([new_task()]))
        assert await store.dispatch(row.id, 1, "w", 1.0) is True
        assert await store.finish(row.id, 1, "succeeded", "1", None, None, 2.0)
    finally:
        await store.close()


@pytest_twisted.ensureDeferred
async def test_counting_does_not_wait_for_the_store_thread(
    sqlite_store, reactor
):
    # A count of a large table takes long: it must not hold up commits,
    # nor wait for them.  Here the store's thread is held busy.
    import threading

    release = threading.Event()
    busy = sqlite_store._thread.run(lambda connection: release.wait(30))
    try:
        await submit_one_sql(sqlite_store)
        counts = await sqlite_store.counts(0.0).addTimeout(5, reactor)
    finally:
        release.set()
        await busy
    assert counts == {("queued", "normal", "echo", False): 1}


async def submit_one_sql(store):
    with closing(sqlite3.connect(store.path)) as connection:
        with connection:
            connection.execute(
                "INSERT INTO tasks (handler, priority) "
                "VALUES ('echo', 'normal')"
            )


@pytest_twisted.ensureDeferred
async def test_a_connection_thread_whose_connect_fails_at_once_stops(reactor):
    # The thread reports its end from its own start: it must find
    # something to report to, however soon its connect fails.
    def connect():
        raise sqlite3.OperationalError("unable to open database file")

    for _ in range(20):
        thread = ConnectionThread(reactor, connect, "taskbroker-test")
        with pytest.raises(sqlite3.OperationalError):
            await thread.start()
        await thread.stop().addTimeout(5, reactor)


@pytest_twisted.ensureDeferred
async def test_running_rows_no_broker_could_run_fail_alone_at_start(
    reactor, db_path
):
    # A version 3 database, with running rows another program broke (the
    # upgrade fails those), and running rows that schema 4's constraints
    # take but that no broker could run again (the broker fails those).
    from taskbroker.broker.core import Broker
    from taskbroker.config import BrokerConfig

    create_old_database(db_path, 3)
    running = {
        "state": "running",
        "attempts": 1,
        "token": 1,
        "priority": "normal",
        "worker": "w1",
        "started_at": 5.0,
    }
    good = insert_row(db_path, **running)
    broken = {
        column: insert_row(db_path, **{**running, column: value})
        for column, value in (
            ("token", "abc"),
            ("attempts", "abc"),
            ("created_at", "yesterday"),
        )
    }
    unrunnable = {
        "priority": insert_row(db_path, **{**running, "priority": "urgent"}),
        "payload": insert_row(
            db_path, **{**running, "payload": "[" * 65 + "]" * 65}
        ),
        "handler": insert_row(db_path, **{**running, "handler": "a\nb"}),
    }
    store = SQLiteStore(db_path, reactor)
    await store.open()
    broker = Broker(BrokerConfig(), store, reactor, lambda *_: True)
    try:
        await broker.load()
        for column, task_id in {**broken, **unrunnable}.items():
            row = await store.get(task_id)
            assert row.state == "failed" and column in row.error, row
            assert task_id not in broker.attempts
        for task_id in broken.values():
            assert (await store.get(task_id)).error.endswith(
                "(found by the upgrade to schema 4)"
            )
        # The good attempt waits for its worker to claim it.
        assert broker.attempts.get(good).token == 1
        assert (await store.get(good)).state == "running"
    finally:
        broker.stop()
        await store.close()
