"""
What the small PostgreSQL measurement scripts (``pg_claims``,
``pg_producers``) share: the server, and a fresh schema with the store's
tables in it.
"""

import os

import psycopg
from twisted.internet import defer, reactor

from taskbroker.store.postgresql import PostgresStore

#: The server the scripts measure on.
BASE = os.environ.get(
    "TASKBROKER_BENCH_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test"
)


def schema_url(schema):
    """
    The URL that reaches ``schema`` on :data:`BASE`.
    """
    return BASE + f"?options=-csearch_path%3D{schema}"


def fresh_tables(schema):
    """
    Drop and create ``schema``, and have the store create its tables in
    it (this runs the reactor, so call it once per process).

    :returns: ``(admin, url)``: a connection to drop the schema with at
        the end, and the URL that reaches the schema.
    """
    admin = psycopg.connect(BASE, autocommit=True)
    admin.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
    admin.execute(f"CREATE SCHEMA {schema}")
    url = schema_url(schema)

    @defer.inlineCallbacks
    def create():
        store = PostgresStore(url, reactor)
        yield store.open()
        yield store.close()
        reactor.stop()

    reactor.callWhenRunning(create)
    reactor.run()
    return admin, url
