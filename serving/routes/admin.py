"""Operator routes for the model registry; mounted only when an admin token is configured."""

from __future__ import annotations

import asyncio
from datetime import UTC
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Response
from sqlmodel import Session

from feedback.models import utcnow
from rollout.registry import (
    REPLICA_STALE_AFTER,
    Lineage,
    activate,
    list_replicas,
    list_versions,
    retire_version,
)
from serving.deps import AdaptersDep, AdminDep, DatabaseDep, ReadyDep, SettingsDep, WatcherDep
from serving.errors import APIError, bad_request, error_responses
from serving.protocol import (
    ActiveModelRequest,
    AdapterLoadRequest,
    ModelCard,
    ModelVersionList,
    RegisteredVersion,
)
from serving.registry_sync import RegistryWatcher

router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[AdminDep, ReadyDep])

_ERRORS = error_responses(400, 401, 403, 404, 409, 503)


@router.get("/adapters", response_model=ModelVersionList, responses=_ERRORS)
async def list_adapters(
    database: DatabaseDep, watcher: WatcherDep, adapters: AdaptersDep
) -> ModelVersionList:
    """Every registered model version, whatever its status, and whether this process serves it."""

    def read():
        with Session(database) as session:
            return list_versions(session=session)

    loaded = {v.name for v in adapters.versions()}
    data = [
        RegisteredVersion(
            **row.model_dump(), loaded=row.name in loaded, load_error=watcher.failed.get(row.name)
        )
        for row in await asyncio.to_thread(read)
    ]
    return ModelVersionList(data=data, count=len(data))


@router.post("/adapters", status_code=201, response_model=ModelCard, responses=_ERRORS)
async def load_adapter(
    body: AdapterLoadRequest, adapters: AdaptersDep, watcher: WatcherDep, settings: SettingsDep
) -> ModelCard:
    """Register a LoRA adapter as a new model version (status candidate): it is loaded here
    first, so a broken adapter is refused with nothing stored; every replica then loads it."""
    path = Path(body.path)
    if not path.is_dir():
        raise bad_request(f"adapter folder {body.path} does not exist", param="path")
    info = Lineage(body.parent, body.dataset_version, body.training_run, body.metrics)
    await watcher.register(body.name, path, base_model=settings.model_path, info=info)
    version = adapters.get(body.name)
    return ModelCard(
        id=version.name, created=version.created, root=str(path.resolve()), parent=version.parent
    )


async def _change(watcher: RegistryWatcher, database, change) -> None:
    """Run a registry change in one transaction, then apply it to this process at once."""

    def run() -> None:
        with Session(database) as session:
            change(session)
            session.commit()

    await asyncio.to_thread(run)
    await watcher.sync()


@router.delete("/adapters/{name}", status_code=204, responses=_ERRORS)
async def unload_adapter(name: str, database: DatabaseDep, watcher: WatcherDep) -> Response:
    """Retire a model version: every process unloads it (requests running on it finish first)."""
    await _change(watcher, database, lambda session: retire_version(session=session, name=name))
    return Response(status_code=204)


@router.put("/active", responses=_ERRORS)
async def set_active(
    body: ActiveModelRequest, database: DatabaseDep, watcher: WatcherDep, adapters: AdaptersDep
):
    """Choose the version the alias `loopchat` serves (the base model's name: the base)."""
    await _change(
        watcher,
        database,
        lambda session: activate(
            session=session, name=body.name, base_name=adapters.base.name, reason="operator"
        ),
    )
    if adapters.active.name != body.name:
        raise APIError(
            503, f"`{body.name}` is active but failed to load here: {watcher.failed.get(body.name)}"
        )
    # `live`: the version whose weights the engine holds (the active one once merged).
    return {"active": adapters.active.name, "live": adapters.live.name}


@router.get("/replicas", responses=_ERRORS)
async def replicas(database: DatabaseDep, watcher: WatcherDep) -> dict[str, Any]:
    """What each serving process reports it serves: the active version, the version whose
    weights its engine holds (`live`) and their folder, its LoRA room and the versions held as
    adapters. `stale`: no report for REPLICA_STALE_AFTER (the process stopped or is stuck)."""

    def read():
        with Session(database) as session:
            return list_replicas(session=session)

    now = utcnow()
    rows = []
    for row in await asyncio.to_thread(read):
        updated = row.updated_at if row.updated_at.tzinfo else row.updated_at.replace(tzinfo=UTC)
        rows.append(
            {
                **row.model_dump(mode="json"),
                "stale": now - updated > REPLICA_STALE_AFTER,
                "this_process": row.replica == watcher.replica,
            }
        )
    return {"data": rows, "count": len(rows)}
