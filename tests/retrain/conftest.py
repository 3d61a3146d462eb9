"""A migrated database engine on each database (SQLite and PostgreSQL) for the retraining tests."""

from __future__ import annotations

import pytest

from feedback.db import make_engine, migrate


@pytest.fixture
def engine(database_url: str):
    migrate(database_url)
    engine = make_engine(database_url)
    yield engine
    engine.dispose()
