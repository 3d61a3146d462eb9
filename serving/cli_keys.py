"""`loopchat keys`: API keys for the /v1 routes (shown once at creation, stored as hashes)."""

from __future__ import annotations

from typing import Annotated

import typer

from serving.cli_common import database, fail

keys_app = typer.Typer(help="API keys for the /v1 routes.", no_args_is_help=True)


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

    _, engine = database()
    try:
        kind = "public" if public else "secret"
        row, token = create_key(engine, name, site=site, kind=kind, origins=origin,
                                requests_per_minute=rpm, max_concurrent=concurrency)  # fmt: skip
    except ValueError as exc:
        raise fail(str(exc)) from exc
    finally:
        engine.dispose()
    typer.echo(f"{row.id} ({row.kind}, site {row.site}): {token}")
    typer.echo("Store it now: it cannot be shown again.", err=True)


@keys_app.command("list")
def keys_list() -> None:
    """Every key: id, name, site, kind, prefix, origins, limits, created, revoked."""
    from rich.console import Console
    from rich.table import Table

    from serving.access import list_keys

    _, engine = database()
    rows = list_keys(engine)
    engine.dispose()
    table = Table("id", "name", "site", "kind", "prefix", "origins", "rpm", "concurrency", "created (UTC)",
                  "revoked (UTC)")  # fmt: skip
    for row in rows:
        table.add_row(row.id, row.name, row.site, row.kind, row.prefix + "…", " ".join(row.origins),
                      str(row.requests_per_minute or "default"), str(row.max_concurrent or "default"),
                      f"{row.created_at:%Y-%m-%d %H:%M}",
                      f"{row.revoked_at:%Y-%m-%d %H:%M}" if row.revoked_at else "")  # fmt: skip
    Console(width=160).print(table)


@keys_app.command("revoke")
def keys_revoke(
    key_id: Annotated[str, typer.Argument(help="The key's id (key_…), from `keys list`.")],
) -> None:
    """Revoke a key; every replica refuses it within `access.key_cache_s` (30 s by default)."""
    from serving.access import revoke_key

    _, engine = database()
    try:
        row = revoke_key(engine, key_id)
    except LookupError:
        raise fail(f"no key {key_id!r}") from None
    finally:
        engine.dispose()
    typer.echo(f"revoked {row.id} ({row.name}) at {row.revoked_at:%Y-%m-%d %H:%M:%S} UTC")
