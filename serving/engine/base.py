"""The engine interface the HTTP layer talks to, independent of vLLM's own types.

`VLLMEngine` implements it on vLLM's async engine; tests also run a fake that honours it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol


class EngineError(RuntimeError):
    """The engine failed; the request cannot be served (a 5xx, not the client's fault)."""


class EngineNotReady(EngineError):
    pass


class InvalidPromptError(ValueError):
    """The request cannot be rendered or tokenized (the client's fault, a 400)."""


class AdapterLoadError(ValueError):
    """An adapter folder is missing, malformed or incompatible with the engine."""


@dataclass(frozen=True, slots=True)
class SamplingOptions:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    # Log-probabilities of the sampled tokens, for the conversation log's confidence statistics.
    sampled_logprobs: bool = False


@dataclass(frozen=True, slots=True)
class AdapterSpec:
    """A LoRA adapter as the engine needs it: `engine_id` is unique for the engine's lifetime."""

    name: str
    path: Path
    engine_id: int


@dataclass(slots=True)
class GenerationChunk:
    """New output since the previous chunk of one request."""

    text: str
    token_ids: Sequence[int]
    # Log-probability of each token in `token_ids` when SamplingOptions.sampled_logprobs is set.
    logprobs: Sequence[float] = ()
    finish_reason: str | None = None
    stop_reason: str | int | None = None


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
    def max_model_len(self) -> int: ...

    @property
    def max_token_chars(self) -> int | None:
        """The most characters one token stands for (None: no bound known). A prompt of more than
        max_model_len times as many characters cannot fit, so it is refused without tokenizing."""

    @property
    def ready(self) -> bool: ...

    async def start(self) -> None:
        """Load the model; returns once requests can be served."""

    async def shutdown(self) -> None: ...

    def render_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Apply the chat template and tokenize; raises InvalidPromptError. Blocking and CPU-bound
        (a long prompt takes a good part of a second): called on a worker thread, never on the
        event loop."""

    def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        options: SamplingOptions,
        adapter: AdapterSpec | None = None,
    ) -> AsyncIterator[GenerationChunk]:
        """Stream the completion; cancelling the iteration aborts the request in the engine."""

    async def abort(self, request_id: str) -> None: ...

    async def add_adapter(self, adapter: AdapterSpec) -> None:
        """Load an adapter so later requests can use it; raises AdapterLoadError."""

    async def remove_adapter(self, adapter: AdapterSpec) -> None: ...

    def stats(self) -> EngineStats: ...
