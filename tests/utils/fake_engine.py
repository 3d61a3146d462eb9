"""A ChatEngine that needs no model weights: vLLM's serving layer over a fake engine client.

Requests go through vLLM's real OpenAI serving classes, renderer and tokenizer (the embedded
model's config and tokenizer, never its weights); only generation is fake: the answer is
"echo" followed by the prompt's last token ids, one word per token.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from functools import lru_cache
from pathlib import Path
from typing import Any

from loopchat.errors import AdapterLoadError
from serving.engine.base import AdapterSpec, EngineNotReady, EngineStats, LoRACapacity
from tests.utils.model import embedded_model_path


@lru_cache(maxsize=8)
def _vllm_config(max_model_len: int) -> tuple[Any, Any, Any]:
    """vLLM's config, renderer and input processor for the embedded model (built once per length:
    the first takes about two seconds)."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.renderers import renderer_from_config
    from vllm.v1.engine.input_processor import InputProcessor

    path = embedded_model_path()
    config = AsyncEngineArgs(
        model=str(path),
        enable_lora=True,
        max_model_len=max_model_len,
        dtype="float32",
        enforce_eager=True,
    ).create_engine_config()
    renderer = renderer_from_config(config)
    return config, renderer, InputProcessor(config, renderer)


class FakeEngineClient:
    """The part of vLLM's EngineClient its serving classes use, with fake generation."""

    def __init__(self, engine: FakeEngine, max_model_len: int) -> None:
        self._engine = engine
        self.vllm_config, self.renderer, self.input_processor = _vllm_config(max_model_len)
        self.model_config = self.vllm_config.model_config
        self.dead_error = RuntimeError("the fake engine stopped")

    @property
    def errored(self) -> bool:
        return not self._engine.ready

    @property
    def is_running(self) -> bool:
        return self._engine.ready

    def check_admission(self, *args: Any, **kwargs: Any) -> None:
        return None

    async def is_tracing_enabled(self) -> bool:
        return False

    async def get_supported_tasks(self) -> tuple[str, ...]:
        return ("generate",)

    async def add_lora(self, lora_request: Any) -> bool:
        return True

    async def abort(self, request_id: Any) -> None:
        self._engine.aborted.append(request_id)

    async def generate(self, prompt: Any, sampling_params: Any, request_id: str, **kwargs: Any):
        async for output in self._engine.fake_generate(prompt, sampling_params, request_id, **kwargs):
            yield output


class FakeEngine:
    def __init__(
        self,
        *,
        model_name: str = "fake-base",
        max_model_len: int = 64,
        token_delay: float = 0.0,
        start_delay: float = 0.0,
        answer: str | None = None,
        lora_on_demand: bool = False,
        build_delay: float = 0.0,
    ) -> None:
        self._model_name = model_name
        self._max_model_len = max_model_len
        self.token_delay = token_delay
        self.start_delay = start_delay
        # When set, every answer is this text (a word per token) instead of the echo.
        self.answer = answer
        # When set, generation raises it after the first token (an engine fault mid-answer).
        self.fail_with: Exception | None = None
        # Adapters (by name) whose answers fail the same way: a broken model version.
        self.failing_adapters: set[str] = set()
        # Adapters (by name) this engine refuses to load (storage missing on this replica).
        self.unloadable_adapters: set[str] = set()
        self._ready = False
        self._client: FakeEngineClient | None = None
        self.adapters: dict[int, AdapterSpec] = {}
        self.running: set[str] = set()
        self.aborted: list[str] = []
        # (request id, vLLM SamplingParams, adapter name or None) of every generation.
        self.requests: list[tuple[str, Any, str | None]] = []
        # Weights reloaded in place (model folders, in order) and how often generation paused.
        self.weights: list[Path] = []
        self.pauses = 0
        # LoRA room: fixed (4 x 64), or following demand (none to start with): `replacement`
        # builds a sibling after `build_delay` s, unless `fail_builds` is set.
        self._lora_on_demand = lora_on_demand
        self._lora: LoRACapacity | None = None if lora_on_demand else LoRACapacity(4, 64)
        self.build_delay = build_delay
        self.fail_builds: Exception | None = None
        self.builds: list[LoRACapacity | None] = []
        self.retired: list[FakeEngine] = []

    @property
    def lora(self) -> LoRACapacity | None:
        return self._lora

    @property
    def lora_on_demand(self) -> bool:
        return self._lora_on_demand

    async def replacement(self, lora: LoRACapacity | None) -> FakeEngine:
        self.builds.append(lora)
        await asyncio.sleep(self.build_delay)
        if self.fail_builds is not None:
            raise self.fail_builds
        sibling = FakeEngine(
            model_name=self._model_name,
            max_model_len=self._max_model_len,
            token_delay=self.token_delay,
            answer=self.answer,
            lora_on_demand=self._lora_on_demand,
        )
        sibling._lora = lora
        sibling.failing_adapters = self.failing_adapters
        sibling.unloadable_adapters = self.unloadable_adapters
        await sibling.start()
        return sibling

    def take_over(self, replacement: FakeEngine) -> None:  # type: ignore[override]
        for name in ("_client", "_lora", "adapters", "weights"):
            mine, theirs = getattr(self, name), getattr(replacement, name)
            setattr(self, name, theirs)
            setattr(replacement, name, mine)
        # Each client generates for the engine that now holds it.
        self.client._engine, replacement.client._engine = self, replacement
        self.retired.append(replacement)

    @property
    def model_name(self) -> str:
        return self._model_name

    @property
    def model_path(self) -> Path:
        return embedded_model_path()

    @property
    def max_model_len(self) -> int:
        return self._max_model_len

    @property
    def ready(self) -> bool:
        return self._ready

    @property
    def client(self) -> FakeEngineClient:
        if self._client is None:
            raise EngineNotReady("not started")
        return self._client

    async def start(self) -> None:
        await asyncio.sleep(self.start_delay)
        self._client = await asyncio.to_thread(FakeEngineClient, self, self._max_model_len)
        self._ready = True

    async def shutdown(self) -> None:
        self._ready = False

    def crash(self) -> None:
        """The engine dies after start (as vLLM's engine core killed or a device lost)."""
        self._ready = False

    async def fake_generate(
        self, prompt: Any, params: Any, request_id: str, lora_request: Any = None, **_: Any
    ):
        from vllm.sampling_params import RequestOutputKind

        adapter = lora_request.lora_name if lora_request is not None else None
        if lora_request is not None and lora_request.lora_int_id not in self.adapters:
            # Stricter than vLLM (which loads an adapter it is asked for where it has LoRA room):
            # the adapters a request needs must have been given to this engine.
            raise ValueError(f"adapter {adapter!r} is not loaded in this engine")
        self.requests.append((request_id, params, adapter))
        self.running.add(request_id)
        prompt_ids = list(prompt.get("prompt_token_ids") or [])
        prefix = f"[{adapter}] " if adapter else ""
        text = (
            self.answer if self.answer is not None else "echo " + " ".join(str(t) for t in prompt_ids[-24:])
        )
        words = (prefix + text).split()
        delta = params.output_kind == RequestOutputKind.DELTA
        n = params.n
        texts = [""] * n
        tokens: list[list[int]] = [[] for _ in range(n)]
        logprobs: list[list[dict]] = [[] for _ in range(n)]
        try:
            produced = 0
            finish: str | None = None
            while finish is None:
                if produced >= params.max_tokens:
                    finish = "length"
                    break
                if produced >= len(words) and not params.ignore_eos:
                    finish = "stop"
                    break
                await asyncio.sleep(self.token_delay)
                if produced == 1 and self.fail_with is not None:
                    raise self.fail_with
                if produced == 1 and adapter is not None and adapter in self.failing_adapters:
                    raise RuntimeError(f"injected fault in {adapter}")
                word = words[produced % len(words)]
                piece = word if produced == 0 else " " + word
                if any(stop in piece for stop in params.stop or ()):
                    finish = "stop"
                    break
                produced += 1
                step = []
                for index in range(n):
                    token = 100 + produced + index
                    texts[index] += piece
                    tokens[index].append(token)
                    # Distinct values, so the logged mean and minimum can be checked.
                    entry = _logprob_entry(token, -0.1 * produced) if params.logprobs is not None else None
                    if entry is not None:
                        logprobs[index].append(entry)
                    step.append((index, piece, token, entry))
                if delta:
                    done = produced >= params.max_tokens
                    yield _output(
                        request_id,
                        prompt_ids,
                        [
                            (index, piece_text, [token], [entry] if entry is not None else None)
                            for index, piece_text, token, entry in step
                        ],
                        "length" if done else None,
                    )
                    if done:
                        return
            if delta:  # the last delta: no new text, the finish reason
                yield _output(request_id, prompt_ids, [(i, "", [], None) for i in range(n)], finish)
            else:
                with_logprobs = params.logprobs is not None
                choices = [(i, texts[i], tokens[i], logprobs[i] if with_logprobs else None) for i in range(n)]
                yield _output(request_id, prompt_ids, choices, finish)
        except (asyncio.CancelledError, GeneratorExit):
            self.aborted.append(request_id)
            raise
        finally:
            self.running.discard(request_id)

    async def add_adapter(self, adapter: AdapterSpec) -> None:
        if self._lora is None:
            raise AdapterLoadError("this engine was built without LoRA")
        if adapter.name in self.unloadable_adapters:
            raise AdapterLoadError(f"{adapter.path} is not readable here")
        if not (adapter.path / "adapter_config.json").is_file():
            raise AdapterLoadError(f"{adapter.path} has no adapter_config.json")
        self.adapters[adapter.engine_id] = adapter

    async def remove_adapter(self, adapter: AdapterSpec) -> None:
        self.adapters.pop(adapter.engine_id, None)

    @contextlib.asynccontextmanager
    async def paused(self) -> AsyncIterator[None]:
        self.pauses += 1
        yield

    async def reload_weights(self, model_dir: Path) -> None:
        self.weights.append(model_dir)
        self.adapters.clear()

    def stats(self) -> EngineStats:
        return EngineStats(
            running_requests=len(self.running),
            unfinished_requests=len(self.running),
            loaded_adapters=len(self.adapters),
            lora_slots=self._lora.slots if self._lora else 0,
            lora_max_rank=self._lora.max_rank if self._lora else 0,
        )


def _logprob_entry(token: int, value: float) -> dict:
    from vllm.logprobs import Logprob

    return {token: Logprob(logprob=value, rank=1, decoded_token=None)}


def _output(request_id: str, prompt_ids: list[int], choices: list[tuple], finish: str | None) -> Any:
    """vLLM's RequestOutput: for each choice (index, text, token ids, logprobs or None)."""
    from vllm.outputs import CompletionOutput, RequestOutput

    return RequestOutput(
        request_id=request_id,
        prompt=None,
        prompt_token_ids=prompt_ids,
        prompt_logprobs=None,
        outputs=[
            CompletionOutput(
                index=index,
                text=text,
                token_ids=list(token_ids),
                cumulative_logprob=None,
                logprobs=list(logprobs) if logprobs is not None else None,
                finish_reason=finish,
            )
            for index, text, token_ids, logprobs in choices
        ],
        finished=finish is not None,
    )
