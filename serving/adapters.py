"""The model versions a serving process can answer with: the base model and its LoRA adapters.

Each adapter is one model version. The alias `loopchat` resolves to the active version.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loopchat.errors import AdapterLoadError, ConflictError, ModelNotFoundError
from loopchat.names import ALIAS_MODEL, check_version_name
from rollout.registry import read_adapter_config
from serving.engine.base import (
    AdapterSpec,
    ChatEngine,
    EngineError,
    EngineNotReady,
    LoRACapacity,
)
from serving.weights import Version, WeightStore

if TYPE_CHECKING:
    from vllm.engine.protocol import EngineClient

    from serving.openai_layer import OpenAILayer

    LayerBuilder = Callable[[EngineClient], Awaitable[OpenAILayer]]

logger = logging.getLogger(__name__)


class UnknownModelError(ModelNotFoundError):
    """A model name this process does not serve."""


class AdapterConflictError(ConflictError):
    """A version name that is reserved or taken, or a version that is in use."""

    def __init__(self, message: str) -> None:
        super().__init__(message, param="name")


@dataclass(frozen=True, slots=True)
class LoadedVersion:
    name: str
    # None for the base model.
    adapter: AdapterSpec | None
    parent: str | None
    created: int


# How long a switch waits for the answers in flight (a stream never read holds its pass).
DRAIN_S = 300.0


class VersionGate:
    """Keeps weight and engine switches apart from the answers in flight.

    A request holds a pass from before its model version meets the engine until its answer ends.
    A weight switch (`closed`) lets no new pass start and waits for every one to end, so no answer
    mixes two weights. An engine switch starts a new epoch (`mark`): passes taken before it are
    served by the old engine, which is shut down once they are `drained`.
    """

    def __init__(self) -> None:
        self._epoch = 0
        self._passes: Counter[int] = Counter()
        self._idle = asyncio.Event()
        self._idle.set()
        self._left = asyncio.Event()
        self._open = asyncio.Event()
        self._open.set()

    @property
    def busy(self) -> int:
        return sum(self._passes.values())

    @property
    def switching(self) -> bool:
        """A weight switch holds new passes back."""
        return not self._open.is_set()

    async def enter(self) -> int:
        """Takes a pass; returns its epoch (for `leave`)."""
        while not self._open.is_set():
            await self._open.wait()
        self._passes[self._epoch] += 1
        self._idle.clear()
        return self._epoch

    def leave(self, taken: int) -> None:
        if self._passes[taken] <= 1:
            del self._passes[taken]
        else:
            self._passes[taken] -= 1
        if not self._passes:
            self._idle.set()
        self._left.set()

    def mark(self) -> int:
        """Starts a new epoch; returns the last one of the passes before it."""
        self._epoch += 1
        return self._epoch - 1

    async def drained(self, mark: int, timeout: float = DRAIN_S) -> bool:
        """Waits until no pass of epoch `mark` or before is held; False after `timeout`."""
        deadline = time.monotonic() + timeout
        while any(epoch <= mark for epoch in self._passes):
            self._left.clear()
            try:
                await asyncio.wait_for(self._left.wait(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                return False
        return True

    @contextlib.asynccontextmanager
    async def closed(self, drain_s: float = DRAIN_S) -> AsyncIterator[None]:
        self._open.clear()
        try:
            try:
                await asyncio.wait_for(self._idle.wait(), drain_s)
            except TimeoutError:
                # A pass never handed back (a stream its client never read) must not stop a
                # promotion; the engine's own pause still waits for what is really running.
                logger.warning("%d requests still hold a pass after %.0f s; switching", self.busy, drain_s)
            yield
        finally:
            self._open.set()


@dataclass(frozen=True, slots=True)
class Admission:
    """A request's hold on the engine that serves it: vLLM's OpenAI layer over that engine, and
    the pass that keeps the engine (and its weights) until the answer ends."""

    layer: OpenAILayer
    epoch: int
    version: str


# After a failed LoRA switch, requests needing one are refused (503) this long before a retry.
LORA_RETRY_S = 60.0


class AdapterSet:
    """The model versions one engine serves, by name; safe against concurrent admin calls.

    With a WeightStore the active version's adapter is merged into the engine's weights (the
    "live" version, served without LoRA) and every other version, the base included, is served
    as its exact LoRA delta over them. Without one the base weights stay live and each version
    is its own adapter.

    Where the engine's LoRA room follows demand (`engine.lora_on_demand`), the engine holds only
    the adapters in use: the running experiment's versions, an active version that is not live
    and versions requested by name in the last `lora_idle_s`. A request for any other version
    first has a replacement engine built with room for it (`fit_lora`); with none in use the
    engine runs without LoRA, at the base model's speed.
    """

    def __init__(
        self,
        engine: ChatEngine,
        *,
        active: str | None = None,
        weights: WeightStore | None = None,
        lora_idle_s: float = 600.0,
        max_loras: int = 4,
        max_lora_rank: int = 64,
    ) -> None:
        self._engine = engine
        self._versions: dict[str, LoadedVersion] = {}
        self._ids = itertools.count(1)
        self._lock = asyncio.Lock()
        self._active = active
        self._base = LoadedVersion(engine.model_name, None, None, int(time.time()))
        self._layer: OpenAILayer | None = None
        self._weights = weights
        self._live: str | None = None  # the version merged into the engine's weights (None: base)
        # What the engine applies for each version that is not live: its LoRA (a delta over live).
        self._served: dict[str, AdapterSpec] = {}
        self._unmergeable: set[str | None] = set()
        self.gate = VersionGate()
        self._build_layer: LayerBuilder | None = None
        self._lora_idle_s = lora_idle_s
        self._max_loras = max_loras
        self._max_lora_rank = max_lora_rank
        # On demand: the versions whose adapters the engine holds, the running experiment's
        # versions, and when each version was last requested.
        self._fitted: frozenset[str] = frozenset()
        self._routed: frozenset[str] = frozenset()
        self._requested: dict[str, float] = {}
        # Answers in flight per version served as LoRA: wanted while they run.
        self._in_use: Counter[str] = Counter()
        self._admitted_at: dict[str, float] = {}
        # The build of an engine without LoRA while the room is given back (cancelled when an
        # adapter is asked for meanwhile).
        self._giving_back: asyncio.Future[ChatEngine] | None = None
        # Where the live weights are read from (the base model folder, or the merged version's).
        self._live_weights = engine.model_path
        self._fitting = asyncio.Lock()
        self._fit_failed_at: float | None = None
        self._retiring: set[asyncio.Task[None]] = set()

    def attach(self, layer: OpenAILayer, rebuild: LayerBuilder | None = None) -> None:
        """Serve through `layer`, vLLM's OpenAI layer over the engine: every loaded adapter (and
        every one loaded later) becomes a model it accepts by name. `rebuild` makes the same
        layer over another engine client (for an engine switch)."""
        self._layer, self._build_layer = layer, rebuild
        self._register(layer)

    def _register(self, layer: OpenAILayer) -> None:
        layer.serve_weights_as(self.live.name)
        for spec in self._served.values():
            layer.register_adapter(spec)

    @property
    def layer(self) -> OpenAILayer:
        if self._layer is None:
            raise EngineNotReady("the model is still loading")
        return self._layer

    @property
    def base(self) -> LoadedVersion:
        return self._base

    @property
    def active(self) -> LoadedVersion:
        if self._active is None:
            return self._base
        return self.get(self._active)

    @property
    def live(self) -> LoadedVersion:
        """The version whose weights the engine holds (served without LoRA)."""
        return self._base if self._live is None else self.get(self._live)

    def versions(self) -> list[LoadedVersion]:
        return [self._base, *self._versions.values()]

    def get(self, name: str) -> LoadedVersion:
        if name == self._base.name:
            return self._base
        try:
            return self._versions[name]
        except KeyError:
            raise UnknownModelError(name) from None

    def resolve(self, requested: str | None) -> LoadedVersion:
        """The version that serves a request naming `requested` (None or the alias: active)."""
        if requested is None or requested == ALIAS_MODEL:
            return self.active
        return self.get(requested)

    async def admit(self, name: str, *, follows_alias: bool = False) -> Admission:
        """A pass for an answer of version `name` and the layer to serve it with; where the LoRA
        room follows demand and the engine has no room for `name` yet, after building it (an
        EngineError when that fails).

        `follows_alias`: `name` was chosen for the alias (the active version, an experiment's
        variant, a conversation's earlier version). Where the engine has no room for it (the
        version was the champion until a promotion while this request waited), the active
        version answers instead of building an engine for one answer; the Admission says which.
        """
        on_demand = self._engine.lora_on_demand
        for _ in range(3):
            if follows_alias and self._needs_room(name):
                name = self.active.name
            if on_demand and name in self._served:
                if name not in self._routed and name != self._active:
                    # Named by the request (the experiment's and the active version are wanted
                    # while they are so): kept in the engine until lora_idle_s after its last answer.
                    self._requested[name] = time.monotonic()
                if self._giving_back is not None:
                    self._giving_back.cancel()  # asked for again: the room is kept
                if name not in self._fitted:
                    await self.fit_lora()
            epoch = await self.gate.enter()
            # Read right after the pass (no await between): the layer of the pass's epoch.
            layer = self._layer
            if layer is None:
                self.gate.leave(epoch)
                raise EngineNotReady("the model is still loading")
            if not self._needs_room(name):
                self._in_use[name] += 1
                self._admitted_at[name] = time.monotonic()
                return Admission(layer, epoch, name)
            self.gate.leave(epoch)  # a promotion changed what the engine holds meanwhile
        raise EngineError(f"the engine has no LoRA room for {name!r} now; retry later")

    def _needs_room(self, name: str) -> bool:
        """`name` is served as a LoRA the engine has no room for (on demand: until fit_lora)."""
        return self._engine.lora_on_demand and name in self._served and name not in self._fitted

    def release(self, admission: Admission) -> None:
        self.gate.leave(admission.epoch)
        name = admission.version
        self._in_use[name] -= 1
        if self._in_use[name] <= 0:
            del self._in_use[name]
            self._admitted_at.pop(name, None)
        if name in self._requested and name in self._served:
            # Only answers given as a LoRA keep it wanted (not those of the version while live).
            self._requested[name] = time.monotonic()

    def serve_routed(self, names: Iterable[str]) -> None:
        """The versions the running experiment routes to (on demand: kept in the engine)."""
        self._routed = frozenset(names)

    def lora_wanted(self) -> frozenset[str]:
        """The versions served as LoRA that the engine should hold now, at most `max_loras`: the
        experiment's, the active one and those with answers in flight first, then the most
        recently used."""
        now = time.monotonic()
        # A pass a stream never hands back (its client left before the first byte) stops
        # counting after the drain timeout, as in VersionGate.
        running = {n for n in self._in_use if now - self._admitted_at.get(n, now) < DRAIN_S}
        needed = self._routed | {self.active.name} | running
        first = [n for n in sorted(needed) if n in self._served]
        recent = sorted(
            (n for n, at in self._requested.items() if now - at < self._lora_idle_s and n in self._served),
            key=lambda n: -self._requested[n],
        )
        wanted = list(dict.fromkeys([*first, *recent]))
        return frozenset(wanted[: self._max_loras])

    async def fit_lora(self) -> None:
        """On demand: give the engine room for the adapters wanted now, or none when none is
        (a replacement engine is built and swapped in); a no-op where the room is fixed or
        already fits. Raises EngineError when the switch fails (retried after LORA_RETRY_S)."""
        if not self._engine.lora_on_demand or self._build_layer is None:
            return
        async with self._fitting:
            wanted = self.lora_wanted()
            has_lora = self._engine.lora is not None
            if (wanted and wanted <= self._fitted) or (not wanted and not has_lora):
                return
            failed = self._fit_failed_at
            if failed is not None and time.monotonic() - failed < LORA_RETRY_S:
                raise EngineError(
                    f"the engine could not be rebuilt with LoRA; tried again {LORA_RETRY_S:.0f} s after "
                    "the failure"
                )
            try:
                await self._switch_lora(wanted)
            except Exception as exc:
                self._fit_failed_at = time.monotonic()
                logger.exception("could not switch the engine's LoRA room to %s", sorted(wanted))
                raise EngineError(f"could not rebuild the engine for LoRA: {exc}") from exc
            self._fit_failed_at = None

    async def _switch_lora(self, wanted: frozenset[str]) -> None:
        """Builds an engine with room for exactly `wanted` beside the serving one, gives it the
        live weights and those adapters, then swaps it in between two requests; the old engine
        finishes the answers it started and stops."""
        build_layer = self._build_layer
        assert build_layer is not None
        ranks = {name: _rank(self._served[name].path) for name in wanted if name in self._served}
        # On demand runs on CPUs only, where the spare slot LoRACapacity.fitting explains is due.
        lora = LoRACapacity.fitting(list(ranks.values()), spare_slot=True) if ranks else None
        started = time.perf_counter()
        # Built without the lock: serving, promotions and adapter changes go on meanwhile.
        build = asyncio.ensure_future(self._engine.replacement(lora))
        if lora is None:
            self._giving_back = build
        try:
            await asyncio.wait({build})
        except BaseException:
            build.cancel()
            raise
        finally:
            self._giving_back = None
        if build.cancelled():
            logger.info("giving back the LoRA room cancelled: an adapter was asked for")
            return
        replacement = build.result()
        committed = False
        try:
            async with self._lock:
                if lora is None and self.lora_wanted():
                    logger.info("LoRA room kept: an adapter was asked for while it was given back")
                    await replacement.shutdown()
                    return
                # What is served may have changed while it was built (a promotion makes new
                # deltas): it gets the adapters wanted now that fit its room, the others get room
                # when next requested.
                specs = [
                    self._served[name]
                    for name in sorted(wanted)
                    if name in self._served
                    and lora is not None
                    and _rank(self._served[name].path) <= lora.max_rank
                ]
                if self._live is not None:
                    assert self._weights is not None
                    merged = await asyncio.to_thread(self._weights.merged, self._version(self._live))
                    await replacement.reload_weights(merged)
                for spec in specs:
                    await replacement.add_adapter(spec)
                layer = await build_layer(replacement.client)
                self._register(layer)
                # The swap: no await from here, so every request takes either the old engine
                # and layer (and an old epoch) or the new ones.
                self._engine.take_over(replacement)
                committed = True
                self._layer, self._fitted = layer, frozenset(s.name for s in specs)
                self._retire(replacement, self.gate.mark())
        except BaseException:
            if not committed:
                await replacement.shutdown()
            raise
        logger.info(
            "engine switched to %s for %s in %.1f s",
            f"LoRA {lora.slots} x rank {lora.max_rank}" if lora else "no LoRA",
            sorted(self._fitted) or "no adapter",
            time.perf_counter() - started,
        )

    def _retire(self, old: ChatEngine, mark: int) -> None:
        async def retire() -> None:
            try:
                if not await self.gate.drained(mark):
                    logger.warning("answers on the previous engine still running after 300 s; stopping it")
            finally:
                await old.shutdown()

        task = asyncio.create_task(retire(), name="engine-retire")
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def close(self) -> None:
        """Stops the engines still finishing answers after a switch."""
        for task in list(self._retiring):
            task.cancel()
        await asyncio.gather(*self._retiring, return_exceptions=True)

    def serving_state(self) -> dict[str, Any]:
        """What this process serves: the active version, the one whose weights the engine holds
        and their folder, the engine's LoRA room and the versions it holds as adapters."""
        lora = self._engine.lora
        held = self._fitted if self._engine.lora_on_demand else frozenset(self._served)
        return {
            "active_version": self.active.name,
            "live_version": self.live.name,
            "weights_path": str(self._live_weights),
            "lora_slots": lora.slots if lora else 0,
            "lora_max_rank": lora.max_rank if lora else 0,
            "lora_versions": sorted(held),
        }

    def _engine_adapters(self, served: dict[str, AdapterSpec]) -> list[AdapterSpec]:
        """Of these adapters, the ones the engine holds: all where its room is fixed; on demand
        those in use that fit its room (the others get room when next requested)."""
        if not self._engine.lora_on_demand:
            return list(served.values())
        lora = self._engine.lora
        if lora is None:
            return []
        return [s for name, s in served.items() if name in self._fitted and _rank(s.path) <= lora.max_rank]

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
            held = self._engine_adapters(served)
            async with self.gate.closed(), self._engine.paused():
                try:
                    await self._load_weights(merged, held)
                except Exception:
                    # Back to what served before, so the service goes on as it was.
                    logger.exception(
                        "switching the weights to %s failed; restoring %s", live[0], self.live.name
                    )
                    await self._load_weights(previous, self._engine_adapters(self._served))
                    raise
                if self._layer is not None:
                    for old in self._served:
                        self._layer.unregister_adapter(old)
                    self._layer.serve_weights_as(live[0])
                    for spec in served.values():
                        self._layer.register_adapter(spec)
                self._served, self._live, self._live_weights = served, name, merged
                # Live, it needs no LoRA room; once no longer live it is wanted when asked for anew.
                self._requested.pop(live[0], None)
                if self._engine.lora_on_demand:
                    self._fitted = frozenset(spec.name for spec in held)
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
    def _version_of(version: LoadedVersion) -> Version:
        return version.name, version.adapter.path if version.adapter is not None else None

    async def load(self, name: str, path: Path, *, parent: str | None = None) -> LoadedVersion:
        check_version_name(name, base_name=self._base.name)
        async with self._lock:
            if name in self._versions:
                raise AdapterConflictError(f"adapter {name!r} is already loaded")
            spec = AdapterSpec(name=name, path=path.expanduser().resolve(), engine_id=next(self._ids))
            version = LoadedVersion(name, spec, parent or self._base.name, int(time.time()))
            served = spec
            if self._weights is not None:
                # Over merged weights: the version's delta to them (over the base: its own adapter).
                live = self._version_of(self.live)
                delta = await asyncio.to_thread(self._weights.delta, self._version_of(version), live)
                served = AdapterSpec(name, delta or spec.path, spec.engine_id)
            if self._engine.lora_on_demand:
                # Loaded into the engine when it is used; checked now as the engine would.
                read_adapter_config(served.path, max_rank=self._max_lora_rank)
            else:
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
            self._requested.pop(name, None)
            if self._layer is not None:
                self._layer.unregister_adapter(name)
            if not self._engine.lora_on_demand or name in self._fitted:
                await self._engine.remove_adapter(served)
                self._fitted -= {name}


def _rank(adapter: Path) -> int:
    return int(read_adapter_config(adapter, require_weights=False).get("r", 8))
