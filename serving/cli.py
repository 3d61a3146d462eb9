"""`loopchat serve`, `model ...` and `keys ...`: the server, its base model and its API keys."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from feedback.cli import database
from loopchat.console import fail, setup_logging

model_app = typer.Typer(help="The base model.", no_args_is_help=True)
keys_app = typer.Typer(
    help="API keys for the /v1 routes (shown once at creation, stored as hashes).", no_args_is_help=True
)


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)
    app.add_typer(model_app, name="model")
    app.add_typer(keys_app, name="keys")


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

    from loopchat.settings import Settings
    from serving.app import create_app

    overrides = {k: v for k, v in {"host": host, "port": port}.items() if v is not None}
    settings = Settings(**overrides)
    setup_logging(settings.log_level)
    options = {
        "host": settings.host,
        "port": settings.port,
        "log_level": settings.log_level,
        "timeout_graceful_shutdown": 30,
    }
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
    from loopchat.embedded_model import EmbeddedModelError, is_prepared, prepare
    from loopchat.settings import Settings

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


@keys_app.command("create")
def keys_create(
    name: Annotated[str, typer.Argument(help="What the key is for (shown in `keys list`).")],
    site: Annotated[
        str | None,
        typer.Option(
            help="The site (of an existing key) this key joins: a site's keys share its "
            "conversations. Needed with --public; default: a new site."
        ),
    ] = None,
    public: Annotated[
        bool, typer.Option("--public", help="A key for web pages (the rating widget): it may only rate.")
    ] = False,
    origin: Annotated[
        list[str] | None, typer.Option(help="With --public: an origin of the pages that use it (repeatable).")
    ] = None,
    rpm: Annotated[
        int | None, typer.Option(min=1, help="Requests per minute (default: the service's).")
    ] = None,
    concurrency: Annotated[
        int | None, typer.Option(min=1, help="Requests in flight (default: the service's).")
    ] = None,
) -> None:
    """Create a key and print it once: it is stored only as a hash."""
    from serving.access import create_key

    with database() as (_, engine):
        try:
            kind = "public" if public else "secret"
            row, token = create_key(
                engine,
                name,
                site=site,
                kind=kind,
                origins=origin,
                requests_per_minute=rpm,
                max_concurrent=concurrency,
            )
        except ValueError as exc:
            raise fail(str(exc)) from exc
    typer.echo(f"{row.id} ({row.kind}, site {row.site}): {token}")
    typer.echo("Store it now: it cannot be shown again.", err=True)


@keys_app.command("list")
def keys_list() -> None:
    """Every key: id, name, site, kind, prefix, origins, limits, created, revoked."""
    from rich.console import Console
    from rich.table import Table

    from serving.access import list_keys

    with database() as (_, engine):
        rows = list_keys(engine)
    table = Table(
        "id",
        "name",
        "site",
        "kind",
        "prefix",
        "origins",
        "rpm",
        "concurrency",
        "created (UTC)",
        "revoked (UTC)",
    )
    for row in rows:
        table.add_row(
            row.id,
            row.name,
            row.site,
            row.kind,
            row.prefix + "…",
            " ".join(row.origins),
            str(row.requests_per_minute or "default"),
            str(row.max_concurrent or "default"),
            f"{row.created_at:%Y-%m-%d %H:%M}",
            f"{row.revoked_at:%Y-%m-%d %H:%M}" if row.revoked_at else "",
        )
    Console(width=160).print(table)


@keys_app.command("revoke")
def keys_revoke(
    key_id: Annotated[str, typer.Argument(help="The key's id (key_…), from `keys list`.")],
) -> None:
    """Revoke a key; every replica refuses it within `access.key_cache_s` (30 s by default)."""
    from serving.access import revoke_key

    with database() as (_, engine):
        try:
            row = revoke_key(engine, key_id)
        except LookupError:
            raise fail(f"no key {key_id!r}") from None
    typer.echo(f"revoked {row.id} ({row.name}) at {row.revoked_at:%Y-%m-%d %H:%M:%S} UTC")
