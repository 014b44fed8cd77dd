"""
What the PostgreSQL store does beyond the store contract: its schema and
levels, claims by several brokers at once (SKIP LOCKED), leases, the
reaper, adoption, and wake-ups.  Each test has a schema of its own on a
real server (tests/postgres.py); a lease is made to lapse by moving its
expiry into the past, as the database's clock would.
"""

import os

import pytest
import pytest_twisted
from twisted.internet import defer
from twisted.internet.task import deferLater

from taskbroker.errors import StoreError
from taskbroker.store.postgresql import PostgresStore
from taskbroker.testing.store_contract import new_task, submit_one
from tests.postgres import connect
from tests.unit.test_schema import PG_LATEST

NOW = 2000.0


@pytest.fixture
def reactor():
    from twisted.internet import reactor

    return reactor


@pytest.fixture
def sql(postgres_url):
    """
    Run one statement as another program would; returns its rows.
    """
    connection = connect(postgres_url)

    def run(statement, params=()):
        cursor = connection.execute(statement, params)
        return cursor.fetchall() if cursor.description else cursor.rowcount

    yield run
    connection.close()


@pytest_twisted.async_yield_fixture
async def open_stores(reactor, postgres_url):
    """
    ``open_store(broker_id=None, **kwargs)``: an open store (and the claims
    of ``broker_id`` on it, started), closed after the test.
    """
    opened = []

    async def open_store(broker_id=None, **kwargs):
        store = PostgresStore(postgres_url, reactor, **kwargs)
        await store.open()
        claims = None
        if broker_id is not None:
            claims = store.claims(broker_id)
            await claims.start(NOW, lambda: None)
        opened.append((store, claims))
        return store, claims

    yield open_store
    for store, claims in reversed(opened):
        if claims is not None:
            await claims.stop()
        await store.close()


def lapse(sql, broker_id, seconds_ago=1):
    sql(
        "UPDATE taskbroker_brokers SET lease_expires = now() - "
        "make_interval(secs => %s) WHERE id = %s",
        (seconds_ago, broker_id),
    )


@pytest_twisted.ensureDeferred
async def test_sql_inserts_are_ranked_by_level(open_stores, sql):
    await open_stores()
    sql(
        "INSERT INTO tasks (handler, payload, priority) VALUES "
        "('a', '1', 'high'), ('a', '2', NULL), ('a', '3', 'low'), "
        "('a', '4', 'urgent')"
    )
    rows = sql("SELECT payload::text, rank, ready_seq FROM tasks ORDER BY id")
    assert [(p, r) for p, r, _ in rows] == [
        ("1", 0),
        ("2", 1),
        ("3", 2),
        ("4", None),
    ]
    seqs = [s for _, _, s in rows]
    assert seqs == sorted(seqs) and len(set(seqs)) == 4


async def claimed(store, claims):
    """
    A task submitted and then claimed by ``claims``'s broker, as one it
    holds to dispatch (a broker's submitted tasks are its own only when
    dispatched in the insert).
    """
    row = await submit_one(store)
    [taken] = await claims.claim_for(
        [row.priority or "normal", None], [row.handler], 1, NOW
    )
    assert taken.id == row.id
    return taken


@pytest_twisted.ensureDeferred
async def test_a_task_queued_again_goes_to_the_back_of_its_level(
    open_stores, sql
):
    store, _ = await open_stores()
    first = await submit_one(store)
    second = await submit_one(store)
    assert await store.dispatch(first.id, 1, "w", NOW)
    assert await store.requeue(first.id, 1)
    (s1,), (s2,) = sql(
        "SELECT ready_seq FROM tasks WHERE id IN (%s, %s) ORDER BY id",
        (first.id, second.id),
    )
    assert s1 > s2


@pytest_twisted.ensureDeferred
async def test_the_levels_are_recorded_and_other_levels_refused(
    open_stores, reactor, postgres_url, sql
):
    await open_stores(levels=("now", "later"), default_priority="later")
    assert sql(
        "SELECT rank, name, is_default FROM taskbroker_levels ORDER BY rank"
    ) == [(0, "now", False), (1, "later", True)]
    other = PostgresStore(postgres_url, reactor)
    with pytest.raises(StoreError) as raised:
        await other.open()
    message = str(raised.value)
    assert "now,later (default later)" in message
    assert "high,normal,low (default normal)" in message
    # To change them: empty the table with every broker stopped; the next
    # broker records its own and ranks the queued tasks anew.
    sql("INSERT INTO tasks (handler, priority) VALUES ('a', 'normal')")
    sql("DELETE FROM taskbroker_levels")
    await open_stores()
    assert sql("SELECT rank FROM tasks") == [(1,)]


@pytest_twisted.ensureDeferred
async def test_a_newer_schema_is_refused(
    open_stores, reactor, postgres_url, sql
):
    store, _ = await open_stores()
    await store.close()
    sql("UPDATE taskbroker_schema SET version = 99")
    with pytest.raises(StoreError, match="version 99 is newer"):
        await PostgresStore(postgres_url, reactor).open()


@pytest_twisted.ensureDeferred
async def test_brokers_starting_together_create_the_schema_once(
    reactor, postgres_url, sql
):
    stores = [PostgresStore(postgres_url, reactor) for _ in range(4)]
    try:
        await defer.gatherResults([s.open() for s in stores])
    finally:
        for store in stores:
            await store.close()
    assert sql("SELECT version FROM taskbroker_schema") == [(PG_LATEST,)]
    assert sql("SELECT count(*) FROM taskbroker_levels") == [(3,)]


@pytest_twisted.ensureDeferred
async def test_claims_take_the_most_urgent_and_oldest_first(open_stores, sql):
    store, claims = await open_stores("a")
    sql(
        "INSERT INTO tasks (handler, priority) VALUES ('h', 'low'), "
        "('h', 'normal'), ('h', 'high'), ('other', 'high'), ('h', 'high')"
    )
    sql(
        "INSERT INTO tasks (handler, priority, run_at) VALUES "
        "('h', 'high', 9999)"
    )
    rows = await claims.claim_for(["high", "normal", None], ["h"], 10, NOW)
    assert [(r.id, r.priority) for r in rows] == [
        (3, "high"),
        (5, "high"),
        (2, "normal"),
    ]
    assert sql("SELECT id FROM tasks WHERE owner = 'a' ORDER BY id") == [
        (2,),
        (3,),
        (5,),
    ]
    # Nothing is claimed twice, and the LIMIT holds.
    assert await claims.claim_for(
        ["high", "normal", "low"], ["h"], 10, NOW
    ) == [await store.get(1)]


@pytest_twisted.ensureDeferred
async def test_claims_dispatched_at_once_go_to_the_workers_given(
    open_stores, sql
):
    store, claims = await open_stores("a", default_priority="normal")
    sql(
        "INSERT INTO tasks (handler, priority, max_attempts) VALUES "
        "('h', 'low', NULL), ('h', NULL, 5), ('h', 'high', NULL), "
        "('other', 'high', NULL)"
    )
    dispatched = await claims.dispatch_for(
        ["high", "normal", None], ["h"], ["w1", "w2", "w3"], NOW, "normal", 3
    )
    first, second, third = dispatched
    assert third is None  # the low task is not for these workers
    assert [
        (r.id, r.worker, r.state, r.token, r.attempts, r.started_at)
        for r in (first, second)
    ] == [(3, "w1", "running", 1, 1, NOW), (2, "w2", "running", 1, 1, NOW)]
    # What the inserter left NULL takes the defaults given.
    assert [(r.priority, r.max_attempts) for r in (first, second)] == [
        ("high", 3),
        ("normal", 5),
    ]
    assert sql("SELECT id, owner, state FROM tasks ORDER BY id") == [
        (1, None, "queued"),
        (2, "a", "running"),
        (3, "a", "running"),
        (4, None, "queued"),
    ]
    # A worker's result lands on it as on any dispatch.
    assert await store.finish(3, 1, "succeeded", "1", None, None, NOW)


@pytest_twisted.ensureDeferred
async def test_a_claim_for_one_worker_dispatches_as_one_for_several(
    open_stores, sql
):
    # One worker takes a statement of its own (see _DISPATCH_ONE).
    store, claims = await open_stores("a", default_priority="normal")
    sql(
        "INSERT INTO tasks (handler, priority, max_attempts) VALUES "
        "('h', 'low', NULL), ('h', NULL, 5), ('h', 'high', NULL), "
        "('other', 'high', NULL)"
    )
    levels = ["high", "normal", None]
    rows = [
        (await claims.dispatch_for(levels, ["h"], [name], NOW, "normal", 3))
        for name in ("w1", "w2", "w3")
    ]
    assert rows[2] == [None]
    assert [
        (r.id, r.worker, r.state, r.token, r.attempts, r.started_at)
        + (r.priority, r.max_attempts)
        for [r] in rows[:2]
    ] == [
        (3, "w1", "running", 1, 1, NOW, "high", 3),
        (2, "w2", "running", 1, 1, NOW, "normal", 5),
    ]
    assert sql("SELECT id, owner, state FROM tasks ORDER BY id") == [
        (1, None, "queued"),
        (2, "a", "running"),
        (3, "a", "running"),
        (4, None, "queued"),
    ]


@pytest_twisted.ensureDeferred
async def test_brokers_dispatching_at_once_never_share_a_task(
    open_stores, sql
):
    stores = [await open_stores(name) for name in "abc"]
    sql("INSERT INTO tasks (handler) SELECT 'h' FROM generate_series(1, 300)")
    # Claims for one worker and for several, all at once.
    results = await defer.gatherResults(
        [
            claims.dispatch_for(
                ["normal"], ["h"], ["w"] * workers, NOW, "normal", 3
            )
            for workers in (7, 1) * 14
            for _, claims in stores
        ]
    )
    ids = [row.id for rows in results for row in rows if row is not None]
    assert len(ids) == len(set(ids)) == 300
    assert sql(
        "SELECT count(*) FROM tasks WHERE state = 'running' "
        "AND token = 1 AND owner IS NOT NULL"
    ) == [(300,)]


@pytest_twisted.ensureDeferred
async def test_a_submitted_task_is_claimed_only_when_dispatched_at_once(
    open_stores, sql
):
    store, _ = await open_stores("a")
    await store.submit([new_task(), new_task(worker="w1")])
    assert sql("SELECT state, owner FROM tasks ORDER BY id") == [
        ("queued", None),
        ("running", "a"),
    ]


@pytest_twisted.ensureDeferred
async def test_a_request_is_one_statement_and_carried_out_once(
    open_stores, sql
):
    store, _ = await open_stores("a")
    tasks = [new_task(request_id="r", payload=str(i)) for i in range(1000)]
    first = await store.submit(tasks)
    assert [row.payload for row, created in first] == [
        str(i) for i in range(1000)
    ]
    assert all(created for _, created in first)
    again = await store.submit(tasks)
    assert [(row.id, created) for row, created in again] == [
        (row.id, False) for row, _ in first
    ]
    assert sql("SELECT count(*) FROM tasks") == [(1000,)]


@pytest_twisted.ensureDeferred
async def test_brokers_claiming_at_once_never_share_a_task(open_stores, sql):
    sql("SELECT 1")
    stores = [await open_stores(name) for name in "abc"]
    sql("INSERT INTO tasks (handler) SELECT 'h' FROM generate_series(1, 300)")
    results = await defer.gatherResults(
        [
            claims.claim_for(["normal"], ["h"], 7, NOW)
            for _ in range(15)
            for _, claims in stores
        ]
    )
    ids = [row.id for rows in results for row in rows]
    assert len(ids) == len(set(ids)) == 300
    owners = sql("SELECT owner, count(*) FROM tasks GROUP BY owner")
    assert sum(n for _, n in owners) == 300 and None not in dict(owners)


@pytest_twisted.ensureDeferred
async def test_released_tasks_are_claimable_again(open_stores, sql):
    _, a = await open_stores("a")
    _, b = await open_stores("b")
    sql("INSERT INTO tasks (handler) VALUES ('h')")
    [row] = await a.claim_for(["normal"], ["h"], 1, NOW)
    assert await b.claim_for(["normal"], ["h"], 1, NOW) == []
    a.release([row.id])
    await a._store._write(lambda cursor, owner: None)  # after the release
    [again] = await b.claim_for(["normal"], ["h"], 1, NOW)
    assert again.id == row.id


@pytest_twisted.ensureDeferred
async def test_nothing_a_broker_that_lost_its_lease_writes_lands(
    open_stores, sql
):
    a_store, a = await open_stores("a")
    b_store, b = await open_stores("b")
    sql("INSERT INTO tasks (handler) VALUES ('h'), ('h')")
    first, second = await a.claim_for(["normal"], ["h"], 2, NOW)
    assert await a_store.dispatch(first.id, 1, "w1", NOW)
    lapse(sql, "a")
    # Within the grace, only the queued claim goes back.
    assert await b.reclaim(NOW, 3600.0) == 1
    assert sql("SELECT state, owner FROM tasks ORDER BY id") == [
        ("running", "a"),
        ("queued", None),
    ]
    # Past it, the running task is queued again with a new token, the
    # attempt given back, and a's broker forgotten.
    assert await b.reclaim(NOW, 0.0) == 1
    assert sql(
        "SELECT state, owner, token, attempts FROM tasks WHERE id = %s",
        (first.id,),
    ) == [("queued", None, 2, 0)]
    assert sql("SELECT id FROM taskbroker_brokers") == [("b",)]
    assert not await a_store.finish(
        first.id, 1, "succeeded", "1", None, None, NOW
    )
    assert not await a_store.dispatch(second.id, 1, "w1", NOW)
    # Running the reaper again, or on every broker, changes nothing.
    assert await b.reclaim(NOW, 0.0) == 0
    assert await a.reclaim(NOW, 0.0) == 0


@pytest_twisted.ensureDeferred
async def test_a_broker_whose_lease_lapsed_learns_what_it_lost(
    open_stores, sql
):
    a_store, a = await open_stores("a")
    _, b = await open_stores("b")
    sql("INSERT INTO tasks (handler) SELECT 'h' FROM generate_series(1, 3)")
    one, two, three = await a.claim_for(["normal"], ["h"], 3, NOW)
    for row in (one, two):
        assert await a_store.dispatch(row.id, 1, "w", NOW)
    assert await a.renew(NOW) is None
    lapse(sql, "a")
    # b takes only what it may: the queued claim; then a comes back.
    assert await b.reclaim(NOW, 3600.0) == 1
    sql("UPDATE tasks SET state = 'cancelled' WHERE id = %s", (two.id,))
    assert await a.renew(NOW) == {two.id}
    assert sql(
        "SELECT lease_expires > now() FROM taskbroker_brokers WHERE id = 'a'"
    ) == [(True,)]
    assert sql("SELECT owner FROM tasks WHERE id = %s", (one.id,)) == [("a",)]
    # A broker the others forgot registers again.
    sql("DELETE FROM taskbroker_brokers WHERE id = 'a'")
    assert await a.renew(NOW) == set()
    assert sql("SELECT count(*) FROM taskbroker_brokers WHERE id = 'a'") == [
        (1,)
    ]


@pytest_twisted.ensureDeferred
async def test_a_worker_brings_its_attempt_only_from_a_lapsed_broker(
    open_stores, sql
):
    a_store, a = await open_stores("a")
    _, b = await open_stores("b")
    row = await claimed(a_store, a)
    assert await a_store.dispatch(row.id, 1, "w", NOW)
    assert await b.adopt(row.id, 1) == ("held", None)
    lapse(sql, "a")
    assert await b.adopt(row.id, 2) == ("stale", None)  # not current
    outcome, adopted = await b.adopt(row.id, 1)
    assert (outcome, adopted.id, adopted.state, adopted.token) == (
        "adopted",
        row.id,
        "running",
        1,
    )
    assert sql("SELECT owner FROM tasks") == [("b",)]
    # The reaper leaves it alone now.
    assert await b.reclaim(NOW, 0.0) == 0


@pytest_twisted.ensureDeferred
async def test_an_insert_by_sql_wakes_the_brokers(reactor, postgres_url, sql):
    store = PostgresStore(postgres_url, reactor)
    await store.open()
    claims = store.claims("a")
    woken = defer.Deferred()
    await claims.start(NOW, lambda: woken.called or woken.callback(None))
    try:
        sql("INSERT INTO tasks (handler) VALUES ('h')")
        await woken.addTimeout(30, reactor)
    finally:
        await claims.stop()
        await store.close()


@pytest_twisted.ensureDeferred
async def test_brokers_hear_when_a_task_they_watch_ends(open_stores, reactor):
    a_store, a = await open_stores("a")
    b_store = (await open_stores())[0]
    heard = defer.Deferred()
    b = b_store.claims("b")
    await b.start(NOW, lambda: None, heard.callback)
    try:
        row = await claimed(a_store, a)
        unwatched = await claimed(a_store, a)
        await b.watch(row.id)
        for task in (unwatched, row):
            assert await a_store.dispatch(task.id, 1, "w", NOW)
            assert await a_store.finish(
                task.id, 1, "succeeded", "1", None, None, NOW
            )
        # Only the task a WAIT watches is told: most ends notify nobody.
        assert await heard.addTimeout(30, reactor) == [row.id]
    finally:
        await b.stop()


@pytest_twisted.ensureDeferred
async def test_ends_in_one_batch_are_told_together(open_stores, reactor):
    a_store, a = await open_stores("a")
    b_store = (await open_stores())[0]
    heard = []
    told = defer.Deferred()

    def on_finished(ids):
        heard.append(ids)
        if len(heard) == 2:
            told.callback(None)

    b = b_store.claims("b")
    await b.start(NOW, lambda: None, on_finished)
    try:
        rows = [await claimed(a_store, a) for _ in range(4)]
        for row in rows:
            await b.watch(row.id)
        for row in rows[:3]:
            assert await a_store.dispatch(row.id, 1, "w", NOW)
        # Issued in one turn: one transaction, with a write that is not
        # an end between them.
        batch = [
            a_store.finish(rows[0].id, 1, "succeeded", "1", None, None, NOW),
            a_store.progress(rows[2].id, 1, 0.5, None, NOW),
            a_store.finish(rows[1].id, 1, "failed", None, "e", None, NOW),
        ]
        assert all(await defer.gatherResults(batch))
        # A cancel is told too, of a queued task as of a running one.
        assert (await a_store.cancel(rows[3].id, NOW)).state == "cancelled"
        await told.addTimeout(30, reactor)
        assert heard == [sorted([rows[0].id, rows[1].id]), [rows[3].id]]
    finally:
        await b.stop()


@pytest_twisted.ensureDeferred
async def test_a_stopping_broker_gives_back_its_queued_claims(
    open_stores, sql
):
    store, a = await open_stores("a")
    await claimed(store, a)
    running = await claimed(store, a)
    assert await store.dispatch(running.id, 1, "w", NOW)
    await a.stop()
    assert sql("SELECT state, owner FROM tasks ORDER BY id") == [
        ("queued", None),
        ("running", "a"),
    ]
    assert sql("SELECT lease_expires <= now() FROM taskbroker_brokers") == [
        (True,)
    ]


@pytest_twisted.ensureDeferred
async def test_text_postgresql_cannot_hold_is_kept_readable(open_stores):
    store, _ = await open_stores()
    row = await submit_one(store)
    assert await store.dispatch(row.id, 1, "w", NOW)
    assert await store.finish(
        row.id, 1, "failed", None, "bad\x00byte", "Traceback\x00", NOW
    )
    got = await store.get(row.id)
    assert (got.error, got.traceback) == ("bad\ufffdbyte", "Traceback\ufffd")


@pytest_twisted.ensureDeferred
async def test_one_request_sent_to_two_brokers_creates_its_tasks_once(
    open_stores,
):
    a, _ = await open_stores("a")
    b, _ = await open_stores("b")
    tasks = [new_task(request_id="r1"), new_task(request_id="r1")]
    first, second = await defer.gatherResults(
        [a.submit(tasks), b.submit(tasks)]
    )
    assert sorted(created for _, created in first + second) == [
        False,
        False,
        True,
        True,
    ]
    assert [row.id for row, _ in first] == [row.id for row, _ in second]


@pytest_twisted.ensureDeferred
async def test_claims_held_without_knowing_are_let_go(open_stores, sql):
    store, a = await open_stores("a")
    queued = await claimed(store, a)
    running = await claimed(store, a)
    assert await store.dispatch(running.id, 1, "w", NOW)
    assert await a.holding() == {queued.id: "queued", running.id: "running"}
    assert await a.let_go([queued.id, running.id]) == 2
    assert sql(
        "SELECT state, owner, token, attempts FROM tasks ORDER BY id"
    ) == [("queued", None, 0, 0), ("queued", None, 2, 0)]
    assert await a.holding() == {}


@pytest_twisted.ensureDeferred
async def test_batches_of_two_writers_that_deadlock_both_land(
    open_stores, sql, reactor
):
    store, _ = await open_stores()
    sql("INSERT INTO tasks (handler) VALUES ('h'), ('h')")

    def locking(first, then):
        # Takes one row, waits for the other writer to take the second,
        # then wants it too.
        def write(cursor, owner):
            cursor.execute(
                "UPDATE tasks SET worker = coalesce(worker, '') "
                "|| %s WHERE id = %s",
                (str(first), first),
            )
            cursor.execute("SELECT pg_sleep(0.3)")
            cursor.execute(
                "UPDATE tasks SET worker = coalesce(worker, '') "
                "|| %s WHERE id = %s",
                (str(first), then),
            )
            return first

        return write

    one = store._write(locking(1, 2))
    await deferLater(reactor, 0.05)  # the next batch: the other writer
    two = store._write(locking(2, 1))
    assert await defer.gatherResults([one, two]) == [1, 2]
    # Each batch landed once, whole.
    assert sorted(sql("SELECT id, length(worker) FROM tasks")) == [
        (1, 2),
        (2, 2),
    ]


@pytest_twisted.ensureDeferred
async def test_a_read_after_the_server_dropped_the_connection_works(
    open_stores, sql
):
    store, _ = await open_stores()
    row = await submit_one(store)
    assert (await store.get(row.id)).id == row.id
    sql(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE application_name = %s",
        (f"taskbroker reader {os.getpid()}",),
    )
    assert (await store.get(row.id)).id == row.id


@pytest_twisted.ensureDeferred
async def test_the_queues_are_found_one_seek_each(open_stores, sql):
    _, a = await open_stores("a")
    sql(
        "INSERT INTO tasks (handler, priority) VALUES ('b', 'high'), "
        "('a', 'low'), ('b', NULL), ('a', 'high'), ('b', 'high'), "
        "('c', NULL), ('a', 'urgent')"
    )
    sql(
        "INSERT INTO tasks (handler, priority, state) VALUES "
        "('d', 'low', 'failed')"
    )
    assert sorted(await a.queues(), key=repr) == sorted(
        [
            ("a", "high"),
            ("a", "low"),
            ("a", "urgent"),
            ("b", "high"),
            ("b", None),
            ("c", None),
        ],
        key=repr,
    )
