"""Database engine and migrations: SQLite (WAL) by default, Postgres by URL.

The same Alembic migrations run on both; `migrate(url)` brings a database to the newest schema.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlmodel import Session

logger = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).parent / "migrations"


class ForeignKeyViolation(RuntimeError):
    """A migration left rows whose foreign keys point nowhere; it was rolled back."""


def is_sqlite(url: str) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


def make_engine(url: str, *, pool_size: int = 5) -> Engine:
    """An engine for `url`; SQLite gets WAL, foreign keys and a busy timeout on every connection."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    # Drop connections the server closed (restart, failover) instead of failing the next query.
    return create_engine(
        url,
        pool_pre_ping=True,
        pool_size=pool_size,
        max_overflow=pool_size,
        connect_args=_libpq_liveness(parsed),
    )


# libpq defaults leave a connection to a vanished host (a partition, a dead load balancer)
# waiting for an answer for the kernel's default of about 15 minutes; the writer would hold
# acknowledged ratings that long instead of spooling them. Set only what the URL leaves out.
LIBPQ_LIVENESS = {
    "keepalives": 1,
    "keepalives_idle": 30,
    "keepalives_interval": 10,
    "keepalives_count": 3,
    "tcp_user_timeout": 30_000,  # ms unacknowledged before the connection is dropped
}


def _libpq_liveness(parsed) -> dict[str, int]:
    if parsed.get_backend_name() != "postgresql" or parsed.get_driver_name() not in ("psycopg", "psycopg2"):
        return {}
    return {key: value for key, value in LIBPQ_LIVENESS.items() if key not in parsed.query}


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    # WAL: readers never wait for the writer. synchronous=NORMAL is durable across a process
    # crash in WAL mode; only a power loss can drop the last commits.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def dialect_insert(connection):
    """The INSERT construct of the connection's dialect (for ON CONFLICT and RETURNING)."""
    from sqlalchemy.dialects import postgresql, sqlite

    name = connection.dialect.name
    if name == "sqlite":
        return sqlite.insert
    if name == "postgresql":
        return postgresql.insert
    raise RuntimeError(f"unsupported database dialect {name!r}")


def upsert(
    connection,
    model: type,
    rows: list[dict[str, Any]],
    keys: list[str],
    updated: list[str] | None = None,
    *,
    newer: str | None = None,
    returning: str | None = None,
) -> list[Any] | None:
    """INSERT ... ON CONFLICT (`keys`) for the conversation log, the importer and augmentation.

    Updates the `updated` columns of a row that exists, only from a row at least as new as the
    stored one when `newer` names the timestamp (a stale replay never undoes a later change);
    without `updated`, keeps what is stored. With `returning`, that column of the rows inserted.
    """
    table = model.__table__  # type: ignore[attr-defined]
    statement = dialect_insert(connection)(table)
    if updated:
        statement = statement.on_conflict_do_update(
            index_elements=keys,
            set_={name: statement.excluded[name] for name in updated},
            where=None if newer is None else table.c[newer] <= statement.excluded[newer],
        )
    else:
        statement = statement.on_conflict_do_nothing(index_elements=keys)
    if returning is None:
        connection.execute(statement, rows)
        return None
    return [row[0] for row in connection.execute(statement.returning(table.c[returning]), rows)]


def alembic_config(url: str):
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    # '%' is ConfigParser's interpolation character; URLs may hold it (encoded passwords).
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def schema_revision(url: str) -> str | None:
    """The schema revision the database is at (None for an empty database)."""
    from alembic.runtime.migration import MigrationContext

    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()
    finally:
        engine.dispose()


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    return ScriptDirectory(str(MIGRATIONS_DIR)).get_current_head()


def migrate(url: str, revision: str = "head", *, backup: bool = True) -> Path | None:
    """Apply migrations up to `revision` (idempotent).

    Before a SQLite file that already holds a schema is changed, a consistent copy of it is
    kept beside it (`backup_sqlite`); the copy's path is returned (None when none was needed).
    """
    from alembic import command

    kept = None
    if is_sqlite(url):
        database = make_url(url).database
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
            target = head_revision() if revision == "head" else revision
            old = schema_revision(url) if Path(database).exists() else None
            if backup and old is not None and old != target:
                kept = backup_sqlite(url, revision=old)
                logger.warning(
                    "database %s is at revision %s; migrating to %s. A copy of it is kept at %s "
                    "(`loopchat db restore` brings it back)",
                    database,
                    old,
                    target,
                    kept,
                )
    command.upgrade(alembic_config(url), revision)
    return kept


# -- SQLite backups ----------------------------------------------------------------------------

BACKUP_SUFFIX = ".bak"


def _sqlite_path(url: str) -> Path:
    database = make_url(url).database
    if not is_sqlite(url) or not database or database == ":memory:":
        raise ValueError("backups are kept for SQLite database files only (use pg_dump for PostgreSQL)")
    return Path(database)


def backup_sqlite(url: str, *, revision: str | None, label: str | None = None) -> Path:
    """A consistent copy of the database file, through SQLite's online backup API.

    The copy is named after the schema revision it holds (`loopchat.db.rev-0004.<time>.bak`),
    is written under a temporary name and renamed once complete, so a crash never leaves a
    half-written backup that looks whole.
    """
    from datetime import UTC, datetime

    path = _sqlite_path(url)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    name = label or f"rev-{revision or 'none'}"
    target = path.with_name(f"{path.name}.{name}.{stamp}{BACKUP_SUFFIX}")
    partial = target.with_name(target.name + ".partial")
    _copy_sqlite(str(path), partial)
    partial.replace(target)
    return target


def _copy_sqlite(source: str, target: Path) -> None:
    """Copy one SQLite database (a path or a `file:` URI) into another file, page by page through
    the online backup API: consistent even while others write to the source."""
    import sqlite3

    with closing(sqlite3.connect(source, uri=True)) as origin, closing(sqlite3.connect(target)) as copy:
        origin.backup(copy)


def list_backups(url: str) -> list[Path]:
    """The database's backups, oldest first."""
    path = _sqlite_path(url)
    return sorted(path.parent.glob(f"{path.name}.*{BACKUP_SUFFIX}"), key=lambda p: p.name.rsplit(".", 2)[-2])


def restore_sqlite(url: str, backup: Path) -> Path | None:
    """Bring `backup` back as the database (the server must be stopped).

    The database as it is now is kept first (`...before-restore...bak`), so a restore can be
    undone. The copy goes through the backup API into the live file, which also takes care of
    its write-ahead log. Returns the path of the copy of the replaced database.
    """
    import sqlite3

    path = _sqlite_path(url)
    if not backup.is_file():
        raise FileNotFoundError(f"no backup at {backup}")
    with closing(sqlite3.connect(f"file:{backup}?mode=ro", uri=True)) as check:
        status = check.execute("PRAGMA integrity_check").fetchone()[0]
    if status != "ok":
        raise ValueError(f"{backup} is damaged ({status}); not restored")
    replaced = backup_sqlite(url, revision=None, label="before-restore") if path.exists() else None
    _copy_sqlite(f"file:{backup}?mode=ro", path)
    return replaced


@contextmanager
def session_scope(engine: Engine) -> Iterator[Session]:
    """A session that commits on success and rolls back on error."""
    with Session(engine) as session:
        try:
            yield session
            session.commit()
        except Exception:
            session.rollback()
            raise
