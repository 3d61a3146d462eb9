"""What every `loopchat` command shares: logging set-up and error exits."""

from __future__ import annotations

import logging

import typer


def setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def fail(message: str) -> typer.Exit:
    """An `error: ...` line on stderr and exit status 1 (raise the result)."""
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(1)
