"""Test databases: a fresh SQLite file or a fresh schema in the local PostgreSQL."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

POSTGRES_URL = os.environ.get(
    "LOOPCHAT_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/loopchat_test"
)


def postgres_available() -> str | None:
    """None when the test database answers (created if missing), else why not."""
    url = make_url(POSTGRES_URL)
    try:
        engine = create_engine(url, connect_args={"connect_timeout": 3})
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
        engine.dispose()
        return None
    except Exception as exc:
        first_error = exc
    try:
        admin = create_engine(url.set(database="postgres"), isolation_level="AUTOCOMMIT")
        with admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{url.database}"'))
        admin.dispose()
        return None
    except Exception:
        return f"PostgreSQL at {url.render_as_string(hide_password=True)}: {first_error}"


def postgres_schema_url() -> tuple[str, Callable[[], None]]:
    """A URL whose connections use a new, empty schema; and a function that drops it."""
    schema = f"t_{uuid.uuid4().hex[:12]}"
    engine = create_engine(POSTGRES_URL)
    with engine.begin() as connection:
        connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    url = make_url(POSTGRES_URL).update_query_dict({"options": f"-csearch_path={schema}"})

    def drop() -> None:
        with engine.begin() as connection:
            connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        engine.dispose()

    return url.render_as_string(hide_password=False), drop


def skip_or_fail_without_postgres() -> None:
    reason = postgres_available()
    if reason is None:
        return
    if os.environ.get("LOOPCHAT_TEST_REQUIRE_POSTGRES") == "1":
        pytest.fail(f"PostgreSQL required (LOOPCHAT_TEST_REQUIRE_POSTGRES=1) but unavailable: {reason}")
    pytest.skip(f"no PostgreSQL test database: {reason}")


def wait_for_rows(url: str, sql: str, count: int, timeout: float = 10.0, **params: Any) -> list[Any]:
    """Poll until `sql` returns at least `count` rows (the writer commits in the background)."""
    engine = create_engine(url)
    deadline = time.monotonic() + timeout
    try:
        while True:
            with engine.connect() as connection:
                rows = connection.execute(text(sql), params).mappings().all()
            if len(rows) >= count or time.monotonic() > deadline:
                return list(rows)
            time.sleep(0.02)
    finally:
        engine.dispose()
