"""The `loopchat` command line."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from retrain.cli import demo, retrain, runs_app, simulate
from serving.cli_common import database, database_failure, fail, setup_logging
from serving.cli_import import import_transcripts, imports_app
from serving.cli_keys import keys_app
from serving.cli_registry import ab_app, adapters_app

app = typer.Typer(help="loopchat: chat serving with a feedback loop.", no_args_is_help=True)
model_app = typer.Typer(help="The base model.", no_args_is_help=True)
app.add_typer(model_app, name="model")
db_app = typer.Typer(help="The conversation and feedback database.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(adapters_app, name="adapters")
app.add_typer(ab_app, name="ab")
app.add_typer(keys_app, name="keys")
app.add_typer(runs_app, name="runs")
app.add_typer(imports_app, name="imports")
app.command("import")(import_transcripts)
app.command("retrain")(retrain)
app.command("demo")(demo)
app.command("simulate")(simulate)


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Bind address (LOOPCHAT_HOST).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (LOOPCHAT_PORT).")] = None,
    workers: Annotated[
        int,
        typer.Option(
            min=1,
            help="Worker processes on the port, each with its own engine (several GPUs or CPU sockets); "
            "metrics then run in Prometheus's multiprocess mode.",
        ),
    ] = 1,
) -> None:
    """Serve the OpenAI-compatible API on the configured model."""
    import uvicorn

    from serving.app import create_app
    from serving.settings import Settings

    overrides = {k: v for k, v in {"host": host, "port": port}.items() if v is not None}
    settings = Settings(**overrides)
    setup_logging(settings.log_level)
    options = {"host": settings.host, "port": settings.port, "log_level": settings.log_level,
               "timeout_graceful_shutdown": 30}  # fmt: skip
    if workers == 1:
        app = create_app(settings)
        server = uvicorn.Server(uvicorn.Config(app, **options))
        # An engine failure stops the server like SIGTERM does (draining), then exits with 3.
        app.state.request_shutdown = lambda: setattr(server, "should_exit", True)
        server.run()
        if getattr(app.state, "engine_error", None):
            raise typer.Exit(3)  # supervisors that restart only failed processes see a failure
        return
    # Workers are fresh processes: they read the settings (and these overrides) from the
    # environment, and share metric values through files in PROMETHEUS_MULTIPROC_DIR, which
    # must start empty.
    os.environ.update({f"LOOPCHAT_{k.upper()}": str(v) for k, v in overrides.items()})
    metrics_dir = Path(os.environ.get("PROMETHEUS_MULTIPROC_DIR") or settings.data_dir / "metrics")
    metrics_dir.mkdir(parents=True, exist_ok=True)
    for stale in metrics_dir.glob("*.db"):
        stale.unlink()
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    uvicorn.run("serving.app:create_app_from_env", factory=True, workers=workers, **options)


@model_app.command("prepare")
def model_prepare(
    target: Annotated[
        Path | None, typer.Option(help="Output folder; default: the configured base model path.")
    ] = None,
    force: Annotated[bool, typer.Option(help="Convert again even if already prepared.")] = False,
) -> None:
    """Convert the embedded SmolLM2-135M-Instruct GGUF into a servable model folder (once)."""
    from serving.embedded_model import EmbeddedModelError, is_prepared, prepare
    from serving.settings import Settings

    settings = Settings()
    setup_logging(settings.log_level)
    if target is None:
        if settings.base_model is not None:
            typer.echo(f"base model is configured: {settings.model_path} (nothing to prepare)")
            return
        target = settings.model_path
    if is_prepared(target) and not force:
        typer.echo(f"model ready: {target}")
        return
    try:
        prepare(target, force=force)
    except EmbeddedModelError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    typer.echo(f"model ready: {target}")


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Apply the database migrations (the server also does this at start-up).

    A SQLite file is copied beside itself first (named with its old revision).
    """
    from sqlalchemy.exc import SQLAlchemyError

    from feedback.db import ForeignKeyViolation, current_revision, migrate
    from serving.settings import Settings

    settings = Settings()
    setup_logging("warning")
    try:
        before = current_revision(settings.db_url)
        kept = migrate(settings.db_url)
        after = current_revision(settings.db_url)
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
    from serving.settings import Settings

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

    settings, engine = database()
    deleted = purge_older_than(engine, age, dry_run=dry_run)
    engine.dispose()
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

    settings, engine = database()
    deleted = delete_user(engine, user, dry_run=dry_run)
    engine.dispose()
    rejected = erase_user_from_rejected(settings.spool_dir, user, dry_run=dry_run)
    typer.echo(f"{'would delete' if dry_run else 'deleted'}: {deleted}, {rejected} rejected spool records")


@app.command("export")
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
    settings, engine = database()
    redactor = Redactor(settings.feedback.custom_patterns)
    count = export_jsonl(engine, format, out, redactor, where, metadata=metadata)  # type: ignore[arg-type]
    engine.dispose()
    typer.echo(f"wrote {count} {format} examples to {out}")


if __name__ == "__main__":
    app()
