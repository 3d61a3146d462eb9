"""Migrations keep every row: each earlier revision, filled, upgraded to head, on SQLite and PostgreSQL.

The rows are generated from the schema reflected at each revision, so a new migration (or a new
table) is covered without new test code: every table gets a row, every foreign key points at a
real row, and after the upgrade every row is found with the same content.
"""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from alembic.script import ScriptDirectory
from sqlalchemy import (
    JSON,
    Boolean,
    Date,
    DateTime,
    Float,
    Integer,
    LargeBinary,
    MetaData,
    Numeric,
    String,
    select,
    text,
)
from typer.testing import CliRunner

from feedback.db import (
    MIGRATIONS_DIR,
    alembic_config,
    head_revision,
    list_backups,
    make_engine,
    migrate,
    schema_revision,
)

SCRIPTS = ScriptDirectory(str(MIGRATIONS_DIR))
EARLIER = [
    script.revision
    for script in reversed(list(SCRIPTS.walk_revisions()))
    if script.revision != head_revision()
]
WHEN = datetime(2026, 3, 4, 5, 6, 7)


def _value(table: str, column, row: dict[str, Any]) -> Any:
    """A value for `column` that a migration could plausibly mangle: not empty, not a default."""
    kind = column.type
    if isinstance(kind, Boolean):  # before Integer: some dialects reflect booleans as integers
        return True
    if isinstance(kind, Integer):
        return 4242
    if isinstance(kind, Float | Numeric):
        return Decimal("0.375") if isinstance(kind, Numeric) and kind.asdecimal else 0.375
    if isinstance(kind, DateTime):
        return WHEN.replace(tzinfo=UTC) if kind.timezone else WHEN
    if isinstance(kind, Date):
        return WHEN.date()
    if isinstance(kind, JSON):
        return {"kept": [table, column.name, 1.5, None, True]}
    if isinstance(kind, LargeBinary):
        return b"\x00kept\xff"
    if isinstance(kind, String):
        value = f"{table}.{column.name}:kept é"
        return value[: kind.length] if kind.length else value
    raise AssertionError(f"no test value for {table}.{column.name} of type {kind!r}: add one here")


def fill_every_table(url: str) -> dict[str, list[dict[str, Any]]]:
    """One row in every table, foreign keys pointing at the rows made before (or at the row itself)."""
    engine = make_engine(url)
    metadata = MetaData()
    try:
        with engine.begin() as connection:
            metadata.reflect(connection)
            made: dict[str, dict[str, Any]] = {}
            for table in metadata.sorted_tables:
                if table.name == "alembic_version":
                    continue
                row = {column.name: _value(table.name, column, {}) for column in table.columns}
                for key in table.foreign_keys:
                    target = key.column
                    source = made.get(target.table.name, row if target.table is table else None)
                    assert source is not None, f"{table.name}: {target.table.name} has no row yet"
                    row[key.parent.name] = source[target.name]
                connection.execute(table.insert(), [row])
                made[table.name] = row
        return snapshot(engine, metadata)
    finally:
        engine.dispose()


def snapshot(engine, metadata: MetaData | None = None) -> dict[str, list[dict[str, Any]]]:
    """Every row of every table, as the database returns it."""
    if metadata is None:
        metadata = MetaData()
        with engine.connect() as connection:
            metadata.reflect(connection)
    rows = {}
    with engine.connect() as connection:
        for table in metadata.sorted_tables:
            if table.name != "alembic_version":
                order = list(table.primary_key.columns) or list(table.columns)
                rows[table.name] = [
                    dict(r._mapping) for r in connection.execute(select(table).order_by(*order))
                ]
    return rows


def assert_every_row_kept(before: dict[str, list[dict]], after: dict[str, list[dict]]) -> None:
    for table, rows in before.items():
        assert table in after, f"table {table} is gone after the upgrade"
        kept = after[table]
        for row in rows:
            matches = [
                new for new in kept if all(new[name] == value for name, value in row.items() if name in new)
            ]
            assert matches, f"{table}: row {row} lost or changed by the upgrade; now {kept}"


@pytest.mark.parametrize("revision", EARLIER)
def test_upgrading_from_every_earlier_revision_keeps_every_row(database_url: str, revision: str):
    migrate(database_url, revision)
    before = fill_every_table(database_url)
    assert all(before.values()), f"tables left empty at {revision}: {[t for t, r in before.items() if not r]}"
    migrate(database_url)
    assert schema_revision(database_url) == head_revision()
    engine = make_engine(database_url)
    try:
        assert_every_row_kept(before, snapshot(engine))
        if engine.dialect.name == "sqlite":
            with engine.connect() as connection:
                assert connection.execute(text("PRAGMA foreign_key_check")).fetchall() == []
                assert connection.execute(text("PRAGMA foreign_keys")).scalar_one() == 1
    finally:
        engine.dispose()


def test_migrations_match_the_models_and_go_both_ways(database_url: str):
    from alembic import command

    migrate(database_url)
    assert schema_revision(database_url) == head_revision()
    command.check(alembic_config(database_url))  # raises if the models drifted from migrations
    migrate(database_url)  # idempotent
    command.downgrade(alembic_config(database_url), "base")
    assert schema_revision(database_url) is None
    migrate(database_url)
    assert schema_revision(database_url) == head_revision()


def test_sqlite_runs_in_wal_mode(tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'x.db'}"
    migrate(url)
    engine = make_engine(url)
    with engine.connect() as connection:
        assert connection.execute(text("PRAGMA journal_mode")).scalar_one() == "wal"
        assert connection.execute(text("PRAGMA foreign_keys")).scalar_one() == 1
    engine.dispose()


def test_a_migration_that_would_leave_dangling_rows_is_rolled_back_whole(tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'x.db'}"
    migrate(url, EARLIER[-1])
    before = fill_every_table(url)
    # A rating whose completion is gone (written once with foreign keys off): the check after the
    # migration finds it, and the whole upgrade, table rebuilds included, is undone.
    with sqlite3.connect(tmp_path / "x.db") as raw:
        raw.execute("PRAGMA foreign_keys=OFF")
        raw.execute("UPDATE rating SET completion_id = 'nowhere'")
    before["rating"][0]["completion_id"] = "nowhere"
    with pytest.raises(RuntimeError, match="dangling foreign keys in rating"):
        migrate(url, backup=False)
    assert schema_revision(url) == EARLIER[-1]
    engine = make_engine(url)
    try:
        assert snapshot(engine) == before
    finally:
        engine.dispose()


def test_a_fresh_database_needs_no_backup(tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'new.db'}"
    assert migrate(url) is None
    assert migrate(url) is None  # already at head
    assert list_backups(url) == []


def test_an_upgrade_keeps_a_copy_named_with_the_old_revision_and_restore_brings_it_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    from loopchat.cli import app

    path = tmp_path / "loopchat.db"
    url = f"sqlite:///{path}"
    old = EARLIER[0]
    migrate(url, old)
    before = fill_every_table(url)
    monkeypatch.setenv("LOOPCHAT_DATABASE_URL", url)
    monkeypatch.setenv("LOOPCHAT_DATA_DIR", str(tmp_path))
    runner = CliRunner()

    result = runner.invoke(app, ["db", "upgrade"])
    assert result.exit_code == 0, result.output
    assert f"kept a copy of revision {old} at" in result.output
    assert f"database at revision {head_revision()} (was {old})" in result.output
    [backup] = list_backups(url)
    assert f".rev-{old}." in backup.name and backup.parent == tmp_path
    copy = make_engine(f"sqlite:///{backup}")
    try:
        assert snapshot(copy) == before
    finally:
        copy.dispose()

    # New data after the upgrade, then the way back: the restore keeps the replaced database too.
    engine = make_engine(url)
    with engine.begin() as connection:
        connection.execute(text("DELETE FROM rating"))
    engine.dispose()
    result = runner.invoke(app, ["db", "restore"])
    assert result.exit_code == 0, result.output
    assert f"restored {backup}" in result.output
    assert schema_revision(url) == old
    engine = make_engine(url)
    try:
        assert snapshot(engine) == before
    finally:
        engine.dispose()
    listed = runner.invoke(app, ["db", "restore", "--list"]).output.split()
    assert str(backup) in listed and any("before-restore" in name for name in listed)

    assert runner.invoke(app, ["db", "upgrade"]).exit_code == 0  # and forward again, rows intact
    engine = make_engine(url)
    try:
        assert_every_row_kept(before, snapshot(engine))
    finally:
        engine.dispose()


def test_restore_refuses_a_file_that_is_not_a_database(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from loopchat.cli import app

    url = f"sqlite:///{tmp_path / 'loopchat.db'}"
    migrate(url)
    junk = tmp_path / "junk.bak"
    junk.write_bytes(b"not a database at all" * 100)
    monkeypatch.setenv("LOOPCHAT_DATABASE_URL", url)
    monkeypatch.setenv("LOOPCHAT_DATA_DIR", str(tmp_path))
    result = CliRunner().invoke(app, ["db", "restore", str(junk)])
    assert result.exit_code == 1
    assert "error:" in result.output
    assert schema_revision(url) == head_revision()


def test_the_server_keeps_a_copy_before_it_migrates_at_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    from fastapi.testclient import TestClient

    from loopchat.settings import Settings
    from serving.app import create_app
    from tests.conftest import ADMIN_TOKEN, wait_ready
    from tests.utils.fake_engine import FakeEngine

    url = f"sqlite:///{tmp_path / 'loopchat.db'}"
    migrate(url, EARLIER[-1])
    before = fill_every_table(url)
    settings = Settings(
        data_dir=tmp_path, admin_token=ADMIN_TOKEN, base_model=tmp_path / "m", database_url=url
    )
    app = create_app(settings, engine=FakeEngine(), exit_on_engine_failure=False)
    with caplog.at_level("WARNING", logger="feedback.db"), TestClient(app) as client:
        wait_ready(client)
    [backup] = list_backups(url)
    assert str(backup) in caplog.text and "loopchat db restore" in caplog.text
    assert schema_revision(url) == head_revision()
    engine = make_engine(url)
    try:
        assert_every_row_kept(before, snapshot(engine))
    finally:
        engine.dispose()
