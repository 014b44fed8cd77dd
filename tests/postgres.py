"""
PostgreSQL for the tests: each test that needs one gets a schema of its
own on the server that ``TASKBROKER_TEST_POSTGRES`` names (a libpq URI,
such as ``postgresql://postgres@127.0.0.1:5432/test``), dropped after it.

Without that variable the tests that need PostgreSQL skip, with one line
saying how to run them; under CI (``CI=true``) they fail instead, so that
CI never passes without them.
"""

import os
import secrets
from contextlib import contextmanager
from urllib.parse import quote

import pytest

ENVIRONMENT = "TASKBROKER_TEST_POSTGRES"


def server_url():
    """
    The server's URI, or skip (fail under CI) when none is configured.
    """
    url = os.environ.get(ENVIRONMENT)
    if url:
        return url
    reason = (
        f"PostgreSQL tests need {ENVIRONMENT}=postgresql://... "
        "(see docs/testing.rst)"
    )
    if os.environ.get("CI") == "true":
        pytest.fail(reason + "; under CI they must run", pytrace=False)
    pytest.skip(reason)


def with_schema(url, schema):
    """
    ``url`` with the connections' search_path set to ``schema``.
    """
    option = quote(f"-c search_path={schema}")
    return url + ("&" if "?" in url else "?") + f"options={option}"


def connect(url):
    import psycopg

    return psycopg.connect(url, autocommit=True)


@contextmanager
def new_schema():
    """
    Make a schema of its own and yield the URI of a connection to it;
    drop it (and all in it) afterwards.
    """
    url = server_url()
    schema = "test_" + secrets.token_hex(6)
    with connect(url) as connection:
        connection.execute(f"CREATE SCHEMA {schema}")
    try:
        yield with_schema(url, schema)
    finally:
        with connect(url) as connection:
            connection.execute("SET lock_timeout = '10s'")
            connection.execute(f"DROP SCHEMA {schema} CASCADE")
