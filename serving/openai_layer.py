"""vLLM's own OpenAI serving layer (chat, completions, tokenize, models) over an engine client.

loopchat does not reimplement the OpenAI protocol: requests are vLLM's request models and are
answered by vLLM's serving classes, wired by vLLM's `init_app_state` from the same arguments
`vllm serve` takes. What loopchat adds sits around them (routing, ids, the log, access, errors).

To log what the engine produced (per choice: tokens, sampled log-probabilities, finish reason,
timings), the serving classes are given a `TappedEngineClient`: it forwards everything to the real
client and copies the outputs of the requests loopchat watches into a `RequestTrace`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from argparse import Namespace

    from vllm.engine.protocol import EngineClient
    from vllm.entrypoints.openai.chat_completion.serving import OpenAIServingChat
    from vllm.entrypoints.openai.completion.serving import OpenAIServingCompletion
    from vllm.entrypoints.openai.models.serving import OpenAIServingModels
    from vllm.entrypoints.serve.tokenize.serving import ServingTokenization

    from loopchat.settings import Settings
    from serving.engine.base import AdapterSpec

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class ChoiceTrace:
    """What the engine produced for one choice of a request."""

    text: str = ""
    completion_tokens: int = 0
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str | None = None
    first_token_at: float | None = None
    # Filled by the route from the response: what the tool-call parser found in `text`.
    content: str | None = None
    tool_calls: list[dict[str, Any]] = field(default_factory=list)


@dataclass(slots=True)
class RequestTrace:
    """One watched request: its prompt, sampling parameters and each choice's output."""

    sampled_logprobs: bool = False
    started: float = field(default_factory=time.perf_counter)
    prompt_token_ids: list[int] = field(default_factory=list)
    sampling: dict[str, Any] = field(default_factory=dict)
    choices: dict[int, ChoiceTrace] = field(default_factory=dict)
    finished_at: float | None = None
    error: str | None = None

    def choice(self, index: int) -> ChoiceTrace:
        trace = self.choices.get(index)
        if trace is None:
            trace = self.choices[index] = ChoiceTrace()
        return trace

    @property
    def completion_tokens(self) -> int:
        return sum(c.completion_tokens for c in self.choices.values())

    @property
    def first_token_at(self) -> float | None:
        firsts = [c.first_token_at for c in self.choices.values() if c.first_token_at is not None]
        return min(firsts, default=None)


def _recorded_sampling(params: Any) -> dict[str, Any]:
    """The sampling parameters kept with a logged completion."""
    return {
        "n": params.n,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "top_k": params.top_k,
        "max_tokens": params.max_tokens,
        "min_tokens": params.min_tokens,
        "seed": params.seed,
        "stop": list(params.stop or ()),
        "stop_token_ids": list(params.stop_token_ids or ()),
        "ignore_eos": params.ignore_eos,
        "presence_penalty": params.presence_penalty,
        "frequency_penalty": params.frequency_penalty,
        "repetition_penalty": params.repetition_penalty,
        "logit_bias": dict(params.logit_bias) if params.logit_bias else None,
        "logprobs": params.logprobs,
        "structured_output": params.structured_outputs is not None,
    }


class TappedEngineClient:
    """An engine client that copies the outputs of watched requests into their traces.

    Everything but `generate` is the wrapped client's own (attribute access is forwarded).
    """

    def __init__(self, inner: EngineClient) -> None:
        self._inner = inner
        self._traces: dict[str, RequestTrace] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    @property
    def inner(self) -> EngineClient:
        return self._inner

    def watch(self, request_id: str, *, sampled_logprobs: bool) -> RequestTrace:
        trace = self._traces[request_id] = RequestTrace(sampled_logprobs=sampled_logprobs)
        return trace

    def release(self, request_id: str) -> None:
        self._traces.pop(request_id, None)

    async def generate(
        self, prompt: Any, sampling_params: Any, request_id: str, **kwargs: Any
    ) -> AsyncGenerator:
        trace = self._traces.get(request_id)
        if trace is None:
            async for output in self._inner.generate(prompt, sampling_params, request_id, **kwargs):
                yield output
            return
        from vllm.sampling_params import RequestOutputKind

        if trace.sampled_logprobs and sampling_params.logprobs is None:
            # The log keeps the sampled tokens' log-probabilities (a confidence signal); the
            # response shows them only when the client asked (vLLM checks the request, not this).
            sampling_params.logprobs = 0
        trace.prompt_token_ids = list(_prompt_token_ids(prompt))
        trace.sampling = _recorded_sampling(sampling_params)
        delta = sampling_params.output_kind == RequestOutputKind.DELTA
        async for output in self._inner.generate(prompt, sampling_params, request_id, **kwargs):
            now = time.perf_counter()
            for completion in output.outputs:
                choice = trace.choice(completion.index)
                if completion.token_ids and choice.first_token_at is None:
                    choice.first_token_at = now
                sampled = _sampled_logprobs(completion)
                if delta:
                    choice.text += completion.text
                    choice.completion_tokens += len(completion.token_ids)
                    choice.logprobs.extend(sampled)
                else:
                    choice.text = completion.text
                    choice.completion_tokens = len(completion.token_ids)
                    choice.logprobs = sampled
                if completion.finish_reason is not None:
                    choice.finish_reason = completion.finish_reason
            yield output


def _prompt_token_ids(prompt: Any) -> list[int]:
    if isinstance(prompt, dict):
        return prompt.get("prompt_token_ids") or []
    return getattr(prompt, "prompt_token_ids", None) or []


def _sampled_logprobs(completion: Any) -> list[float]:
    if not completion.logprobs:
        return []
    return [
        entry[token].logprob
        for token, entry in zip(completion.token_ids, completion.logprobs, strict=False)
        if token in entry
    ]


def serve_arguments(settings: Settings, *, model_path: Path, served_name: str) -> Namespace:
    """The arguments `vllm serve` would get for these settings, parsed by vLLM's own parser."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    options = settings.openai
    argv = ["--model", str(model_path), "--served-model-name", served_name, "--enable-lora"]
    if options.chat_template is not None:
        argv += ["--chat-template", str(options.chat_template)]
    if options.tool_call_parser:
        argv += ["--tool-call-parser", options.tool_call_parser, "--enable-auto-tool-choice"]
    argv += list(options.vllm_args)
    args = make_arg_parser(FlexibleArgumentParser()).parse_args(argv)
    validate_parsed_serve_args(args)
    return args


@dataclass(slots=True)
class OpenAILayer:
    """vLLM's serving objects for one engine, as `vllm serve` builds them."""

    client: TappedEngineClient
    chat: OpenAIServingChat
    completion: OpenAIServingCompletion
    models: OpenAIServingModels
    tokenization: ServingTokenization

    def register_adapter(self, adapter: AdapterSpec) -> None:
        """Make `adapter.name` a model the serving classes accept (already loaded in the engine)."""
        from vllm.lora.request import LoRARequest

        self.models.lora_requests[adapter.name] = LoRARequest(
            adapter.name, adapter.engine_id, str(adapter.path)
        )

    def unregister_adapter(self, name: str) -> None:
        self.models.lora_requests.pop(name, None)

    def serve_weights_as(self, name: str) -> None:
        """Answer requests naming `name` with the engine's own weights, no LoRA (the version
        merged into them): vLLM's serving classes take its first base model name as that."""
        self.models.base_model_paths[0].name = name


async def build_openai_layer(engine_client: EngineClient, args: Namespace) -> OpenAILayer:
    """vLLM's `init_app_state` over a tapped `engine_client`: what its API server would serve."""
    from starlette.datastructures import State
    from vllm.entrypoints.launchers.api_server.app_state import init_app_state

    client = TappedEngineClient(engine_client)
    state = State()
    await init_app_state(client, state, args, ("generate",))  # type: ignore[arg-type]
    return OpenAILayer(
        client=client,
        chat=state.openai_serving_chat,
        completion=state.openai_serving_completion,
        models=state.openai_serving_models,
        tokenization=state.serving_tokenization,
    )
