"""
Shared by every test: the tests that need PostgreSQL (those that use the
``postgres_url`` fixture of tests/postgres.py) are left out, with one line
in the summary saying how to run them, when no server is configured; under
CI (``CI=true``) they stay in and fail.
"""

import os

import pytest

from tests.postgres import ENVIRONMENT, new_schema

_left_out = []


def pytest_collection_modifyitems(config, items):
    if os.environ.get(ENVIRONMENT) or os.environ.get("CI") == "true":
        return
    kept = []
    for item in items:
        needs = "postgres_url" in getattr(item, "fixturenames", ())
        (_left_out if needs else kept).append(item)
    if _left_out:
        config.hook.pytest_deselected(items=list(_left_out))
        items[:] = kept


def pytest_terminal_summary(terminalreporter):
    if _left_out:
        terminalreporter.write_line(
            f"{len(_left_out)} PostgreSQL tests left out: set {ENVIRONMENT}="
            "postgresql://USER@HOST:PORT/DB to run them (docs/testing.rst)"
        )


@pytest.fixture
def postgres_url():
    """
    The URI of a schema of the test's own on the test server.
    """
    with new_schema() as url:
        yield url
