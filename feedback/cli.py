"""`loopchat db ...`, `export`, `import` and `imports ...`: the conversation and feedback database.

`database()` opens the configured database, migrated, for any package's commands.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from loopchat.console import fail, setup_logging

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from loopchat.settings import Settings

db_app = typer.Typer(help="The conversation and feedback database.", no_args_is_help=True)
imports_app = typer.Typer(help="Imported transcript files.", no_args_is_help=True)
_ERRORS_SHOWN = 20


def register(app: typer.Typer) -> None:
    app.add_typer(db_app, name="db")
    app.command("export")(export)
    app.command("import")(import_transcripts)
    app.add_typer(imports_app, name="imports")


@contextmanager
def database() -> Iterator[tuple[Settings, Engine]]:
    """The settings and the configured database, migrated; exits with a clear message when the
    database is unreachable, and releases its connections at the end of the block."""
    from sqlalchemy.exc import SQLAlchemyError

    from feedback.db import make_engine, migrate
    from loopchat.settings import Settings

    settings = Settings()
    setup_logging("warning")
    try:
        migrate(settings.db_url)
    except SQLAlchemyError as exc:
        raise database_failure(settings.db_url, exc) from exc
    engine = make_engine(settings.db_url)
    try:
        yield settings, engine
    finally:
        engine.dispose()


def database_failure(url: str, exc: Exception) -> typer.Exit:
    """The error exit for a database that failed, naming it without its credentials."""
    return fail(f"database {url.split('@')[-1]}: {exc.__class__.__name__}: {getattr(exc, 'orig', exc)}")


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Apply the database migrations (the server also does this at start-up).

    A SQLite file is copied beside itself first (named with its old revision).
    """
    from sqlalchemy.exc import SQLAlchemyError

    from feedback.db import ForeignKeyViolation, migrate, schema_revision
    from loopchat.settings import Settings

    settings = Settings()
    setup_logging("warning")
    try:
        before = schema_revision(settings.db_url)
        kept = migrate(settings.db_url)
        after = schema_revision(settings.db_url)
    except SQLAlchemyError as exc:
        raise database_failure(settings.db_url, exc) from exc
    except ForeignKeyViolation as exc:
        raise fail(str(exc)) from exc
    if kept is not None:
        typer.echo(f"kept a copy of revision {before} at {kept}")
    typer.echo(f"database at revision {after}" + (f" (was {before})" if before != after else ""))


@db_app.command("restore")
def db_restore(
    backup: Annotated[
        Path | None, typer.Argument(help="The backup file; default: the newest one beside the database.")
    ] = None,
    list_only: Annotated[bool, typer.Option("--list", help="List the backups; restore nothing.")] = False,
) -> None:
    """Bring back a SQLite backup kept by an upgrade (stop the server first).

    The database as it is now is kept as a backup too, so a restore can be undone.
    """
    import sqlite3

    from feedback.db import list_backups, restore_sqlite
    from loopchat.settings import Settings

    settings = Settings()
    setup_logging("warning")
    try:
        backups = list_backups(settings.db_url)
    except ValueError as exc:
        raise fail(str(exc)) from exc
    if list_only:
        for path in backups:
            typer.echo(str(path))
        return
    if backup is None:
        if not backups:
            raise fail(f"no backups beside {settings.db_url.removeprefix('sqlite:///')}")
        backup = backups[-1]
    try:
        replaced = restore_sqlite(settings.db_url, backup)
    except (OSError, ValueError, sqlite3.Error) as exc:
        raise fail(str(exc)) from exc
    if replaced is not None:
        typer.echo(f"kept the replaced database at {replaced}")
    typer.echo(f"restored {backup}")


@db_app.command("purge")
def db_purge(
    older_than: Annotated[str, typer.Option(help="Age to keep, e.g. 90d, 12h, 2w.")],
    dry_run: Annotated[bool, typer.Option(help="Count what would be deleted; delete nothing.")] = False,
) -> None:
    """Delete completions (with their ratings) and conversations older than a cut-off.

    Also spool/rejected/ files older than it; spooled records older than it are dropped on replay.
    """
    from feedback.retention import parse_duration, purge_older_than

    try:
        age = parse_duration(older_than)
    except ValueError as exc:
        raise fail(str(exc)) from exc
    from feedback.spool import purge_rejected

    with database() as (settings, engine):
        deleted = purge_older_than(engine, age, dry_run=dry_run)
    rejected = purge_rejected(settings.spool_dir, age.total_seconds(), dry_run=dry_run)
    typer.echo(f"{'would delete' if dry_run else 'deleted'}: {deleted}, {rejected} rejected spool files")


@db_app.command("delete-user")
def db_delete_user(
    user: Annotated[str, typer.Argument(help="The user key (the chat requests' `user` field).")],
    dry_run: Annotated[bool, typer.Option(help="Count what would be deleted; delete nothing.")] = False,
) -> None:
    """Erase one user's conversations, completions and ratings (also from spool/rejected/).

    A tombstone is kept (a hash of the key), so records of theirs still spooled on a replica
    during an outage are dropped when replayed instead of bringing the user back.
    """
    from feedback.retention import delete_user

    if not user:
        raise fail("a user key is required")
    from feedback.spool import erase_user_from_rejected

    with database() as (settings, engine):
        deleted = delete_user(engine, user, dry_run=dry_run)
    rejected = erase_user_from_rejected(settings.spool_dir, user, dry_run=dry_run)
    typer.echo(f"{'would delete' if dry_run else 'deleted'}: {deleted}, {rejected} rejected spool records")


def export(
    format: Annotated[str, typer.Option("--format", help="sft, kto or dpo (TRL dataset formats).")],
    out: Annotated[Path, typer.Option(help="Output file (JSON lines).")],
    since: Annotated[str | None, typer.Option(help="Only ratings from the last 30d, 12h, ...")] = None,
    model_version: Annotated[str | None, typer.Option(help="Only completions of this version.")] = None,
    metadata: Annotated[bool, typer.Option(help="Add completion ids and versions to each row.")] = False,
) -> None:
    """Export ratings as redacted training data."""
    from datetime import UTC, datetime

    from feedback.export import FORMATS, ExportFilter, export_jsonl
    from feedback.redact import Redactor
    from feedback.retention import parse_duration

    if format not in FORMATS:
        raise fail(f"--format must be one of {', '.join(FORMATS)}")
    where = ExportFilter(model_version=model_version)
    if since is not None:
        try:
            where.since = datetime.now(UTC) - parse_duration(since)
        except ValueError as exc:
            raise fail(str(exc)) from exc
    with database() as (settings, engine):
        redactor = Redactor(settings.feedback.custom_patterns)
        count = export_jsonl(engine, format, out, redactor, where, metadata=metadata)  # type: ignore[arg-type]
    typer.echo(f"wrote {count} {format} examples to {out}")


def import_transcripts(
    file: Annotated[
        Path, typer.Argument(help="JSONL (OpenAI messages) or CSV transcript; .gz works too.", exists=False)
    ],
    format: Annotated[
        str | None, typer.Option("--format", help="jsonl or csv (default: from the file name).")
    ] = None,
    source: Annotated[
        str | None, typer.Option(help="Name the conversations are marked with (default: the file name).")
    ] = None,
    assume_approved: Annotated[
        bool, typer.Option(help="Rate every answer that has no label up (trusted transcripts).")
    ] = False,
    config: Annotated[
        Path | None, typer.Option(help="Retraining config (YAML) whose `cleaning:` section applies.")
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Conversations per transaction.")] = 500,
) -> None:
    """Import chat transcripts: validate, clean, anonymize, and log them with their labels as ratings."""
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    from feedback.clean import load_cleaning_config
    from feedback.importer import import_file
    from feedback.redact import Redactor
    from feedback.transcripts import detect_format

    if not file.is_file():
        raise fail(f"{file}: no such file")
    try:
        fmt = format or detect_format(file)
        if fmt not in ("jsonl", "csv"):
            raise ValueError("--format must be jsonl or csv")
        cleaning = load_cleaning_config(config)
    except ValueError as exc:
        raise fail(str(exc)) from exc
    with database() as (settings, engine):
        console = Console(stderr=True)
        columns = (
            TextColumn("importing {task.description}"),
            BarColumn(),
            DownloadColumn(),
            TimeRemainingColumn(),
        )
        try:
            with Progress(*columns, console=console, transient=True) as progress:
                task = progress.add_task(file.name, total=file.stat().st_size)
                report = import_file(
                    engine,
                    file,
                    source=source,
                    fmt=fmt,  # type: ignore[arg-type]
                    cleaning=cleaning,
                    redactor=Redactor(settings.feedback.custom_patterns),
                    assume_approved=assume_approved,
                    batch_size=batch_size,
                    progress=lambda done: progress.update(task, completed=done),
                )
        except KeyboardInterrupt:
            typer.echo(
                "interrupted: what was written so far is kept; run the import again to go on", err=True
            )
            raise typer.Exit(130) from None
    _print_report(report.as_dict())


def _print_report(body: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=120)
    table = Table("imported", "count", title=f"{body['batch']} (source {body['source']}): {body['status']}")
    for name, count in body["counts"].items():
        table.add_row(name, str(count))
    console.print(table)
    cleaning = Table("cleaning step", "messages changed or examples removed")
    for name, count in body["cleaning"].items():
        cleaning.add_row(name, str(count))
    console.print(cleaning)
    errors = body["errors"]
    for error in errors[:_ERRORS_SHOWN]:
        typer.echo(f"line {error['line']}: {error['error']}", err=True)
    if len(errors) > _ERRORS_SHOWN:
        typer.echo(
            f"... {len(errors) - _ERRORS_SHOWN} more (loopchat imports show {body['batch']})", err=True
        )


@imports_app.command("list")
def imports_list(limit: Annotated[int, typer.Option(help="Most recent imports shown.")] = 20) -> None:
    """Recent imports: source, file, outcome, what was added."""
    from rich.console import Console
    from rich.table import Table
    from sqlmodel import Session, col, select

    from feedback.models import ImportBatch

    with database() as (_, engine), Session(engine) as session:
        batches = session.exec(
            select(ImportBatch).order_by(col(ImportBatch.started_at).desc()).limit(limit)
        ).all()
    table = Table("import", "source", "file", "status", "answers added", "ratings", "malformed")
    for batch in batches:
        counts = batch.counts
        table.add_row(
            batch.id,
            batch.source,
            Path(batch.path).name,
            batch.status,
            str(counts.get("answers added", 0)),
            str(counts.get("ratings added", 0)),
            str(counts.get("malformed records", 0)),
        )
    Console(width=160).print(table)


@imports_app.command("show")
def imports_show(batch_id: Annotated[str, typer.Argument(help="Import id.")]) -> None:
    """One import in full: counts, cleaning report, every malformed record kept."""
    from sqlmodel import Session

    from feedback.models import ImportBatch

    with database() as (_, engine), Session(engine) as session:
        batch = session.get(ImportBatch, batch_id)
        body = None if batch is None else batch.model_dump(mode="json")
    if body is None:
        raise fail(f"no import {batch_id!r}")
    typer.echo(json.dumps(body, indent=2))
