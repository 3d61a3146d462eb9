"""The model versions a serving process can answer with: the base model and its LoRA adapters.

Each adapter is one model version. The alias `loopchat` resolves to the active version.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from serving.engine.base import AdapterSpec, ChatEngine
from serving.settings import ALIAS_MODEL

if TYPE_CHECKING:
    from serving.openai_layer import OpenAILayer


class UnknownModelError(LookupError):
    pass


class AdapterConflictError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class ModelVersion:
    name: str
    # None for the base model.
    adapter: AdapterSpec | None
    parent: str | None
    created: int


class AdapterSet:
    """Adapters loaded into one engine, by name; safe against concurrent admin calls."""

    def __init__(self, engine: ChatEngine, *, active: str | None = None) -> None:
        self._engine = engine
        self._versions: dict[str, ModelVersion] = {}
        self._ids = itertools.count(1)
        self._lock = asyncio.Lock()
        self._active = active
        self._base = ModelVersion(engine.model_name, None, None, int(time.time()))
        self._layer: OpenAILayer | None = None

    def attach(self, layer: OpenAILayer) -> None:
        """Make every loaded adapter (and every one loaded later) a model vLLM's serving layer
        accepts by name."""
        self._layer = layer
        for version in self._versions.values():
            assert version.adapter is not None
            layer.register_adapter(version.adapter)

    @property
    def base(self) -> ModelVersion:
        return self._base

    @property
    def active(self) -> ModelVersion:
        if self._active is None:
            return self._base
        return self.get(self._active)

    def versions(self) -> list[ModelVersion]:
        return [self._base, *self._versions.values()]

    def get(self, name: str) -> ModelVersion:
        if name == self._base.name:
            return self._base
        try:
            return self._versions[name]
        except KeyError:
            raise UnknownModelError(name) from None

    def resolve(self, requested: str | None) -> ModelVersion:
        """The version that serves a request naming `requested` (None or the alias: active)."""
        if requested is None or requested == ALIAS_MODEL:
            return self.active
        return self.get(requested)

    def set_active(self, name: str | None) -> None:
        if name is not None and name != self._base.name:
            self.get(name)
        self._active = None if name == self._base.name else name

    async def load(self, name: str, path: Path, *, parent: str | None = None) -> ModelVersion:
        if name in (ALIAS_MODEL, self._base.name):
            raise AdapterConflictError(f"{name!r} is reserved")
        async with self._lock:
            if name in self._versions:
                raise AdapterConflictError(f"adapter {name!r} is already loaded")
            spec = AdapterSpec(name=name, path=path.expanduser().resolve(), engine_id=next(self._ids))
            await self._engine.add_adapter(spec)
            version = ModelVersion(name, spec, parent or self._base.name, int(time.time()))
            self._versions[name] = version
            if self._layer is not None:
                self._layer.register_adapter(spec)
            return version

    async def unload(self, name: str) -> None:
        async with self._lock:
            version = self._versions.get(name)
            if version is None:
                raise UnknownModelError(name)
            if self._active == name:
                raise AdapterConflictError(
                    f"adapter {name!r} is the active version; activate another one first"
                )
            del self._versions[name]
            if self._layer is not None:
                self._layer.unregister_adapter(name)
            assert version.adapter is not None
            await self._engine.remove_adapter(version.adapter)
