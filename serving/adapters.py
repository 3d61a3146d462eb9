"""The model versions a serving process can answer with: the base model and its LoRA adapters.

Each adapter is one model version. The alias `loopchat` resolves to the active version.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from serving.engine.base import AdapterLoadError, AdapterSpec, ChatEngine, EngineError
from serving.settings import ALIAS_MODEL
from serving.weights import Version, WeightStore

if TYPE_CHECKING:
    from serving.openai_layer import OpenAILayer

logger = logging.getLogger(__name__)


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


class VersionGate:
    """Keeps weight switches and requests apart. A request holds a pass from before its model
    version is resolved to the engine until its answer ends; a switch lets no new pass start and
    waits for every one to end, so no answer mixes two weights."""

    def __init__(self) -> None:
        self._passes = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._open = asyncio.Event()
        self._open.set()

    async def enter(self) -> None:
        while not self._open.is_set():
            await self._open.wait()
        self._passes += 1
        self._idle.clear()

    def leave(self) -> None:
        self._passes -= 1
        if self._passes <= 0:
            self._passes = 0
            self._idle.set()

    @contextlib.asynccontextmanager
    async def closed(self, drain_s: float = 300.0) -> AsyncIterator[None]:
        self._open.clear()
        try:
            try:
                await asyncio.wait_for(self._idle.wait(), drain_s)
            except TimeoutError:
                # A pass never handed back (a stream its client never read) must not stop a
                # promotion; the engine's own pause still waits for what is really running.
                logger.warning("%d requests still hold a pass after %.0f s; switching", self._passes, drain_s)
            yield
        finally:
            self._open.set()


class AdapterSet:
    """The model versions one engine serves, by name; safe against concurrent admin calls.

    With a WeightStore the active version's adapter is merged into the engine's weights (the
    "live" version, served without LoRA) and every other version, the base included, is served
    as its exact LoRA delta over them. Without one the base weights stay live and each version
    is its own adapter.
    """

    def __init__(
        self, engine: ChatEngine, *, active: str | None = None, weights: WeightStore | None = None
    ) -> None:
        self._engine = engine
        self._versions: dict[str, ModelVersion] = {}
        self._ids = itertools.count(1)
        self._lock = asyncio.Lock()
        self._active = active
        self._base = ModelVersion(engine.model_name, None, None, int(time.time()))
        self._layer: OpenAILayer | None = None
        self._weights = weights
        self._live: str | None = None  # the version merged into the engine's weights (None: base)
        # What the engine applies for each version that is not live: its LoRA (a delta over live).
        self._served: dict[str, AdapterSpec] = {}
        self._unmergeable: set[str | None] = set()
        self.gate = VersionGate()

    def attach(self, layer: OpenAILayer) -> None:
        """Make every loaded adapter (and every one loaded later) a model vLLM's serving layer
        accepts by name."""
        self._layer = layer
        layer.serve_weights_as(self.live.name)
        for spec in self._served.values():
            layer.register_adapter(spec)

    @property
    def base(self) -> ModelVersion:
        return self._base

    @property
    def active(self) -> ModelVersion:
        if self._active is None:
            return self._base
        return self.get(self._active)

    @property
    def live(self) -> ModelVersion:
        """The version whose weights the engine holds (served without LoRA)."""
        return self._base if self._live is None else self.get(self._live)

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

    async def set_active(self, name: str | None) -> None:
        """Make `name` (None or the base's name: the base) the version the alias serves; with a
        WeightStore its weights become the engine's."""
        if name is not None and name != self._base.name:
            self.get(name)
        self._active = None if name == self._base.name else name
        if self._weights is None or self._active == self._live or self._active in self._unmergeable:
            return
        try:
            await self._go_live(self._active)
        except (AdapterLoadError, OSError, ValueError, EngineError) as exc:
            # Building the merged weights failed before anything changed: the active version is
            # still served, as a LoRA over the live weights (slower, not wrong).
            self._unmergeable.add(self._active)
            logger.error("%s could not be merged into the weights; served as a LoRA: %s", name, exc)

    def _version(self, name: str | None) -> Version:
        return self._version_of(self._base if name is None else self.get(name))

    async def _go_live(self, name: str | None) -> None:
        """Merge `name` into the engine's weights and serve every other version as a delta over
        them. The files are built first, while serving goes on; the switch itself waits for the
        answers in flight and holds new ones (none fails), then takes well under a second."""
        store = self._weights
        assert store is not None
        async with self._lock:
            live = self._version(name)
            started = time.perf_counter()
            others = [v for v in self.versions() if v.name != live[0]]
            deltas = {v.name: await asyncio.to_thread(store.delta, self._version_of(v), live) for v in others}
            merged = await asyncio.to_thread(store.merged, live)
            built = time.perf_counter()
            served = {
                version: AdapterSpec(version, path, next(self._ids))
                for version, path in deltas.items()
                if path is not None
            }
            previous = await asyncio.to_thread(store.merged, self._version(self._live))
            async with self.gate.closed(), self._engine.paused():
                try:
                    await self._load_weights(merged, served.values())
                except Exception:
                    # Back to what served before, so the service goes on as it was.
                    logger.exception(
                        "switching the weights to %s failed; restoring %s", live[0], self.live.name
                    )
                    await self._load_weights(previous, self._served.values())
                    raise
                if self._layer is not None:
                    for old in self._served:
                        self._layer.unregister_adapter(old)
                    self._layer.serve_weights_as(live[0])
                    for spec in served.values():
                        self._layer.register_adapter(spec)
                self._served, self._live = served, name
            logger.info(
                "%s is live (merged into the weights): built in %.1f s, switched in %.2f s",
                live[0],
                built - started,
                time.perf_counter() - built,
            )
            await asyncio.to_thread(store.prune, live)

    async def _load_weights(self, model_dir: Path, adapters: Iterable[AdapterSpec]) -> None:
        await self._engine.reload_weights(model_dir)
        for spec in adapters:
            await self._engine.add_adapter(spec)

    @staticmethod
    def _version_of(version: ModelVersion) -> Version:
        return version.name, version.adapter.path if version.adapter is not None else None

    async def load(self, name: str, path: Path, *, parent: str | None = None) -> ModelVersion:
        if name in (ALIAS_MODEL, self._base.name):
            raise AdapterConflictError(f"{name!r} is reserved")
        async with self._lock:
            if name in self._versions:
                raise AdapterConflictError(f"adapter {name!r} is already loaded")
            spec = AdapterSpec(name=name, path=path.expanduser().resolve(), engine_id=next(self._ids))
            version = ModelVersion(name, spec, parent or self._base.name, int(time.time()))
            served = spec
            if self._weights is not None:
                # Over merged weights: the version's delta to them (over the base: its own adapter).
                live = self._version_of(self.live)
                delta = await asyncio.to_thread(self._weights.delta, self._version_of(version), live)
                served = AdapterSpec(name, delta or spec.path, spec.engine_id)
            await self._engine.add_adapter(served)
            self._versions[name] = version
            self._served[name] = served
            if self._layer is not None:
                self._layer.register_adapter(served)
            return version

    async def unload(self, name: str) -> None:
        async with self._lock:
            version = self._versions.get(name)
            if version is None:
                raise UnknownModelError(name)
            if self._active == name or self._live == name:
                raise AdapterConflictError(
                    f"adapter {name!r} is the active version; activate another one first"
                )
            del self._versions[name]
            served = self._served.pop(name)
            if self._layer is not None:
                self._layer.unregister_adapter(name)
            await self._engine.remove_adapter(served)
