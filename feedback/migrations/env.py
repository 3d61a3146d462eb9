"""Alembic environment: the models' metadata, the URL from the caller's config.

On SQLite, batch mode rebuilds a table to alter it (create a copy, drop the original, rename
the copy). With foreign keys enforced, dropping `completion` would cascade to every rating,
rating event, preference and training sample that points at it, so a migration runs with
foreign keys off, inside one real transaction, and `PRAGMA foreign_key_check` must find no
dangling reference before it commits (SQLite's documented procedure for schema changes).
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import event, text
from sqlmodel import SQLModel

import feedback.models  # noqa: F401  (registers the tables on SQLModel.metadata)
from feedback.db import ForeignKeyViolation, is_sqlite, make_engine

config = context.config
target_metadata = SQLModel.metadata


def run_migrations_offline() -> None:
    context.configure(
        url=config.get_main_option("sqlalchemy.url"),
        target_metadata=target_metadata,
        literal_binds=True,
        render_as_batch=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    url = config.get_main_option("sqlalchemy.url")
    engine = make_engine(url)
    if is_sqlite(url):
        _transactional_sqlite_ddl(engine)
    try:
        with engine.connect() as connection:
            _run(connection)
    finally:
        engine.dispose()


def _transactional_sqlite_ddl(engine) -> None:
    """Let SQLAlchemy, not the sqlite3 module, open transactions, so that DDL is transactional.

    The sqlite3 module begins a transaction only before INSERT/UPDATE/DELETE, so a table
    rebuild would otherwise commit step by step; SQLAlchemy's documented recipe.
    """

    @event.listens_for(engine, "connect")
    def _autocommit_driver(dbapi_connection, _record):
        dbapi_connection.isolation_level = None

    @event.listens_for(engine, "begin")
    def _begin(connection):
        connection.exec_driver_sql("BEGIN")


def _run(connection) -> None:
    sqlite = connection.dialect.name == "sqlite"
    if sqlite:
        _set_foreign_keys(connection, on=False)
    try:
        # Batch mode lets ALTER TABLE work on SQLite (it copies the table) and is a no-op elsewhere.
        # transactional_ddl: Alembic assumes SQLite cannot roll DDL back and commits step by step.
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            render_as_batch=True,
            transactional_ddl=sqlite or None,
        )
        with context.begin_transaction():
            context.run_migrations()
            if sqlite:
                _check_foreign_keys(connection)
    finally:
        if sqlite:
            if connection.in_transaction():
                connection.rollback()
            _set_foreign_keys(connection, on=True)


def _set_foreign_keys(connection, *, on: bool) -> None:
    # The PRAGMA is a no-op inside a transaction, so it goes to the driver's connection
    # directly (SQLAlchemy would open one first), and is read back to be sure it took.
    if connection.in_transaction():
        connection.commit()
    raw = connection.connection.driver_connection
    raw.execute(f"PRAGMA foreign_keys={'ON' if on else 'OFF'}")
    if bool(raw.execute("PRAGMA foreign_keys").fetchone()[0]) != on:
        raise RuntimeError("could not switch SQLite foreign keys for the migration")


def _check_foreign_keys(connection) -> None:
    problems = connection.execute(text("PRAGMA foreign_key_check")).fetchall()
    if problems:
        tables = sorted({str(row[0]) for row in problems})
        raise ForeignKeyViolation(
            f"migration left {len(problems)} row(s) with dangling foreign keys in {', '.join(tables)}; "
            "rolled back"
        )


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
