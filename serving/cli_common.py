"""What every `loopchat` command group shares: logging set-up, error exits, the database."""

from __future__ import annotations

import logging

import typer


def setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def fail(message: str) -> typer.Exit:
    """An `error: ...` line on stderr and exit status 1 (raise the result)."""
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(1)


def database():
    """The configured database, migrated; exits with a clear message when it is unreachable."""
    from sqlalchemy.exc import SQLAlchemyError

    from feedback.db import make_engine, migrate
    from serving.settings import Settings

    settings = Settings()
    setup_logging("warning")
    try:
        migrate(settings.db_url)
    except SQLAlchemyError as exc:
        raise database_failure(settings.db_url, exc) from exc
    return settings, make_engine(settings.db_url)


def database_failure(url: str, exc: Exception) -> typer.Exit:
    """The error exit for a database that failed, naming it without its credentials."""
    return fail(f"database {url.split('@')[-1]}: {exc.__class__.__name__}: {getattr(exc, 'orig', exc)}")
