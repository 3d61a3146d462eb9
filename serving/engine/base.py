"""The engine interface the serving layer talks to.

`VLLMEngine` implements it on vLLM's async engine; tests also run a fake that honours it. Requests
reach the engine through `client`, vLLM's `EngineClient`, which vLLM's OpenAI serving classes
call (see serving/openai_layer.py); the rest is the engine's life cycle and its adapters.
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from vllm.engine.protocol import EngineClient


class EngineError(RuntimeError):
    """The engine failed; the request cannot be served (a 5xx, not the client's fault)."""


class EngineNotReady(EngineError):
    pass


@dataclass(frozen=True, slots=True)
class AdapterSpec:
    """A LoRA adapter as the engine needs it: `engine_id` is unique for the engine's lifetime."""

    name: str
    path: Path
    engine_id: int


# The ranks vLLM accepts for `max_lora_rank`.
LORA_RANK_SLOTS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


@dataclass(frozen=True, slots=True)
class LoRACapacity:
    """An engine's LoRA room: `slots` adapters resident at once (vLLM's max_loras), of rank up
    to `max_rank`. vLLM's CPU LoRA path costs in proportion to slots x max_rank on every batch,
    so the room is sized to what is served."""

    slots: int
    max_rank: int

    @classmethod
    def fitting(cls, ranks: list[int], *, spare_slot: bool) -> LoRACapacity:
        """Room for adapters of these ranks. `spare_slot`: one slot more than adapters, left
        empty; vLLM's CPU kernels read the last slot for tokens without an adapter (index -1),
        so that slot must never hold one."""
        largest = max(ranks, default=1)
        rank = next((slot for slot in LORA_RANK_SLOTS if slot >= largest), largest)
        return cls(slots=max(1, len(ranks)) + int(spare_slot), max_rank=rank)


@dataclass(slots=True)
class EngineStats:
    running_requests: int = 0
    waiting_requests: int = 0
    # Requests the engine still holds: scheduled, queued, or with output not yet consumed.
    unfinished_requests: int = 0
    kv_cache_usage: float = 0.0
    loaded_adapters: int = 0
    # The engine's LoRA room (0: built without LoRA).
    lora_slots: int = 0
    lora_max_rank: int = 0


class ChatEngine(Protocol):
    """What serving needs from a generation engine."""

    @property
    def model_name(self) -> str: ...

    @property
    def model_path(self) -> Path:
        """The model folder (its tokenizer and chat template serve the OpenAI layer)."""

    @property
    def max_model_len(self) -> int: ...

    @property
    def ready(self) -> bool: ...

    @property
    def lora(self) -> LoRACapacity | None:
        """The LoRA room the engine was built with; None: built without LoRA (no adapter can be
        served, none costs anything)."""

    @property
    def lora_on_demand(self) -> bool:
        """Whether the LoRA room follows what is served (`replacement`), or is fixed."""

    @property
    def client(self) -> EngineClient:
        """vLLM's engine client for this engine; valid once `start` returned."""

    async def start(self) -> None:
        """Load the model; returns once requests can be served."""

    async def shutdown(self) -> None: ...

    async def add_adapter(self, adapter: AdapterSpec) -> None:
        """Load an adapter so later requests can use it; raises AdapterLoadError."""

    async def remove_adapter(self, adapter: AdapterSpec) -> None: ...

    def paused(self) -> AbstractAsyncContextManager[None]:
        """While inside: no new step starts; on entry the requests in flight have finished (new
        ones wait, none fails) and the KV cache is cleared, so weights can change under it."""

    async def reload_weights(self, model_dir: Path) -> None:
        """Replace the model's weights in place with those of `model_dir` (same architecture);
        call inside `paused()`. Loaded adapters must be loaded again afterwards."""

    async def replacement(self, lora: LoRACapacity | None) -> ChatEngine:
        """A second engine of the same model with this LoRA room, started beside this one
        (at low CPU priority while it builds) and ready; nothing is served by it yet."""

    def take_over(self, replacement: ChatEngine) -> None:
        """This engine becomes `replacement`'s (its client, room and adapters) and `replacement`
        keeps this one's previous engine, to shut down once its answers are done."""

    def stats(self) -> EngineStats: ...
