"""`loopchat import FILE` and `loopchat imports list|show`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from serving.cli_common import database, fail

imports_app = typer.Typer(help="Imported transcript files.", no_args_is_help=True)
_ERRORS_SHOWN = 20


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

    from feedback.importer import detect_format, import_file
    from feedback.redact import Redactor
    from retrain.config import load_config

    if not file.is_file():
        raise fail(f"{file}: no such file")
    try:
        fmt = format or detect_format(file)
        if fmt not in ("jsonl", "csv"):
            raise ValueError("--format must be jsonl or csv")
        cleaning = load_config(config).cleaning
    except ValueError as exc:
        raise fail(str(exc)) from exc
    settings, engine = database()
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
        typer.echo("interrupted: what was written so far is kept; run the import again to go on", err=True)
        raise typer.Exit(130) from None
    finally:
        engine.dispose()
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

    _, engine = database()
    with Session(engine) as session:
        batches = session.exec(
            select(ImportBatch).order_by(col(ImportBatch.started_at).desc()).limit(limit)
        ).all()
    engine.dispose()
    table = Table("import", "source", "file", "status", "answers added", "ratings", "malformed")
    for batch in batches:
        counts = batch.counts
        table.add_row(batch.id, batch.source, Path(batch.path).name, batch.status,
                      str(counts.get("answers added", 0)), str(counts.get("ratings added", 0)),
                      str(counts.get("malformed records", 0)))  # fmt: skip
    Console(width=160).print(table)


@imports_app.command("show")
def imports_show(batch_id: Annotated[str, typer.Argument(help="Import id.")]) -> None:
    """One import in full: counts, cleaning report, every malformed record kept."""
    from sqlmodel import Session

    from feedback.models import ImportBatch

    _, engine = database()
    with Session(engine) as session:
        batch = session.get(ImportBatch, batch_id)
        body = None if batch is None else batch.model_dump(mode="json")
    engine.dispose()
    if body is None:
        raise fail(f"no import {batch_id!r}")
    typer.echo(json.dumps(body, indent=2))
