"""Operator routes; mounted only when an admin token is configured."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Response

from serving.adapters import AdapterConflictError, UnknownModelError
from serving.deps import AdaptersDep, AdminDep, ReadyDep
from serving.engine.base import AdapterLoadError
from serving.errors import APIError, bad_request
from serving.protocol import ActiveModelRequest, AdapterLoadRequest, ErrorResponse, ModelCard

router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[AdminDep, ReadyDep])

_ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 403, 404, 409, 503)}


@router.post("/adapters", status_code=201, response_model=ModelCard, responses=_ERRORS)
async def load_adapter(body: AdapterLoadRequest, adapters: AdaptersDep) -> ModelCard:
    """Load a LoRA adapter into the running engine as a new model version."""
    path = Path(body.path)
    if not path.is_dir():
        raise bad_request(f"adapter folder {body.path} does not exist", param="path")
    try:
        version = await adapters.load(body.name, path, parent=body.parent)
    except AdapterConflictError as exc:
        raise APIError(409, str(exc), param="name") from exc
    except AdapterLoadError as exc:
        raise bad_request(str(exc), param="path") from exc
    return ModelCard(id=version.name, created=version.created, root=str(path), parent=version.parent)


@router.delete("/adapters/{name}", status_code=204, responses=_ERRORS)
async def unload_adapter(name: str, adapters: AdaptersDep) -> Response:
    """Unload an adapter; requests already running on it finish first in the engine."""
    try:
        await adapters.unload(name)
    except UnknownModelError:
        raise APIError(404, f"adapter `{name}` is not loaded", param="name") from None
    except AdapterConflictError as exc:
        raise APIError(409, str(exc), param="name") from exc
    return Response(status_code=204)


@router.put("/active", responses=_ERRORS)
async def set_active(body: ActiveModelRequest, adapters: AdaptersDep) -> dict[str, str]:
    """Choose the version the alias `loopchat` serves."""
    try:
        adapters.set_active(body.name)
    except UnknownModelError:
        raise APIError(404, f"The model `{body.name}` does not exist.", param="name") from None
    return {"active": adapters.active.name}
