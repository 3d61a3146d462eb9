"""The `loopchat` command line."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(help="loopchat: chat serving with a feedback loop.", no_args_is_help=True)
model_app = typer.Typer(help="The base model.", no_args_is_help=True)
app.add_typer(model_app, name="model")


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Bind address (LOOPCHAT_HOST).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (LOOPCHAT_PORT).")] = None,
) -> None:
    """Serve the OpenAI-compatible API on the configured model."""
    import uvicorn

    from serving.app import create_app
    from serving.settings import Settings

    overrides = {k: v for k, v in {"host": host, "port": port}.items() if v is not None}
    settings = Settings(**overrides)
    _setup_logging(settings.log_level)
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=30,
    )


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
    _setup_logging(settings.log_level)
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


if __name__ == "__main__":
    app()
