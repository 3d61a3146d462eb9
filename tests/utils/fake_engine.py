"""A ChatEngine that needs no model: words are tokens, answers echo the last user message."""

from __future__ import annotations

import asyncio
import threading
import time
import zlib
from collections.abc import AsyncIterator

from serving.engine.base import (
    AdapterLoadError,
    AdapterSpec,
    EngineNotReady,
    EngineStats,
    GenerationChunk,
    InvalidPromptError,
    SamplingOptions,
)


class FakeEngine:
    def __init__(
        self,
        *,
        model_name: str = "fake-base",
        max_model_len: int = 64,
        token_delay: float = 0.0,
        start_delay: float = 0.0,
        max_token_chars: int | None = None,
        render_seconds: float = 0.0,
    ) -> None:
        self._model_name = model_name
        self._max_model_len = max_model_len
        # Words are tokens, of any length: no bound unless a test sets one.
        self._max_token_chars = max_token_chars
        self.token_delay = token_delay
        self.start_delay = start_delay
        # CPU time each render_chat spins for, holding the GIL as a tokenizer's Python code does.
        self.render_seconds = render_seconds
        self.rendering = threading.Event()  # set once a render_chat has begun
        self.renders = 0
        # When set, generation raises it after the first token (an engine fault mid-answer).
        self.fail_with: Exception | None = None
        # Adapters (by name) whose answers fail the same way: a broken model version.
        self.failing_adapters: set[str] = set()
        # Adapters (by name) this engine refuses to load (storage missing on this replica).
        self.unloadable_adapters: set[str] = set()
        self._ready = False
        self.adapters: dict[int, AdapterSpec] = {}
        self.running: set[str] = set()
        self.aborted: list[str] = []
        self.requests: list[tuple[str, SamplingOptions, AdapterSpec | None]] = []

    @property
    def model_name(self) -> str:
        return self._model_name

    @property
    def max_model_len(self) -> int:
        return self._max_model_len

    @property
    def max_token_chars(self) -> int | None:
        return self._max_token_chars

    @property
    def ready(self) -> bool:
        return self._ready

    async def start(self) -> None:
        await asyncio.sleep(self.start_delay)
        self._ready = True

    async def shutdown(self) -> None:
        self._ready = False

    def crash(self) -> None:
        """The engine dies after start (as vLLM's engine core killed or a device lost)."""
        self._ready = False

    def render_chat(self, messages: list[dict[str, str]]) -> list[int]:
        if not self._ready:
            raise EngineNotReady("not ready")
        self.renders += 1
        self.rendering.set()
        deadline = time.perf_counter() + self.render_seconds
        while time.perf_counter() < deadline:
            pass
        words: list[str] = []
        for message in messages:
            if message["role"] not in ("system", "user", "assistant"):
                raise InvalidPromptError(f"unknown role {message['role']}")
            words += [f"<{message['role']}>", *message["content"].split()]
        # crc32, not hash(): the same prompt gives the same tokens in every process.
        return [zlib.crc32(w.encode()) % 1000 for w in words] + [0]

    async def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        options: SamplingOptions,
        adapter: AdapterSpec | None = None,
    ) -> AsyncIterator[GenerationChunk]:
        self.requests.append((request_id, options, adapter))
        self.running.add(request_id)
        prefix = f"[{adapter.name}] " if adapter else ""
        words = (prefix + "echo " + " ".join(str(t) for t in prompt_token_ids)).split()
        try:
            produced = 0
            while produced < options.max_tokens:
                if produced >= len(words) and not options.ignore_eos:
                    yield GenerationChunk(text="", token_ids=[], finish_reason="stop")
                    return
                await asyncio.sleep(self.token_delay)
                word = words[produced % len(words)]
                text = word if produced == 0 else " " + word
                for stop in options.stop:
                    if stop in text:
                        yield GenerationChunk(
                            text="", token_ids=[1], logprobs=[-0.5], finish_reason="stop", stop_reason=stop
                        )
                        return
                if produced == 1 and self.fail_with is not None:
                    raise self.fail_with
                if produced == 1 and adapter is not None and adapter.name in self.failing_adapters:
                    raise RuntimeError(f"injected fault in {adapter.name}")
                produced += 1
                done = produced >= options.max_tokens
                yield GenerationChunk(
                    text=text,
                    token_ids=[produced],
                    # Distinct values, so the logged mean and minimum can be checked.
                    logprobs=[-0.1 * produced],
                    finish_reason="length" if done else None,
                )
        except (asyncio.CancelledError, GeneratorExit):
            self.aborted.append(request_id)
            raise
        finally:
            self.running.discard(request_id)

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    async def add_adapter(self, adapter: AdapterSpec) -> None:
        if adapter.name in self.unloadable_adapters:
            raise AdapterLoadError(f"{adapter.path} is not readable here")
        if not (adapter.path / "adapter_config.json").is_file():
            raise AdapterLoadError(f"{adapter.path} has no adapter_config.json")
        self.adapters[adapter.engine_id] = adapter

    async def remove_adapter(self, adapter: AdapterSpec) -> None:
        self.adapters.pop(adapter.engine_id, None)

    def stats(self) -> EngineStats:
        return EngineStats(
            running_requests=len(self.running),
            unfinished_requests=len(self.running),
            loaded_adapters=len(self.adapters),
        )
