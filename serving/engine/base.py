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


class AdapterLoadError(ValueError):
    """An adapter folder is missing, malformed or incompatible with the engine."""


@dataclass(frozen=True, slots=True)
class AdapterSpec:
    """A LoRA adapter as the engine needs it: `engine_id` is unique for the engine's lifetime."""

    name: str
    path: Path
    engine_id: int


@dataclass(slots=True)
class EngineStats:
    running_requests: int = 0
    waiting_requests: int = 0
    # Requests the engine still holds: scheduled, queued, or with output not yet consumed.
    unfinished_requests: int = 0
    kv_cache_usage: float = 0.0
    loaded_adapters: int = 0


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

    def stats(self) -> EngineStats: ...
