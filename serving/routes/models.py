from __future__ import annotations

from fastapi import APIRouter

from serving.adapters import AdapterSet, LoadedVersion
from serving.deps import AdaptersDep, EngineDep
from serving.engine.base import ChatEngine
from serving.errors import error_responses
from serving.protocol import ModelCard, ModelList

router = APIRouter(prefix="/v1", tags=["models"])


def _card(version: LoadedVersion, adapters: AdapterSet, engine: ChatEngine) -> ModelCard:
    return ModelCard(
        id=version.name,
        created=version.created,
        root=str(version.adapter.path) if version.adapter else adapters.base.name,
        parent=version.parent,
        max_model_len=engine.max_model_len or None,
    )


@router.get("/models", response_model=ModelList)
async def list_models(adapters: AdaptersDep, engine: EngineDep) -> ModelList:
    """The base model and every loaded adapter (model version), each adapter with its parent."""
    return ModelList(data=[_card(v, adapters, engine) for v in adapters.versions()])


@router.get("/models/{model:path}", response_model=ModelCard, responses=error_responses(404))
async def get_model(model: str, adapters: AdaptersDep, engine: EngineDep) -> ModelCard:
    return _card(adapters.resolve(model), adapters, engine)
