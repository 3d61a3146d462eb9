"""Chat completions: validate against the model, pick the version, run the engine, shape output.

Transport (FastAPI) stays in routes/chat.py; this module holds the logic and the OpenAI wire
format of results, streamed (SSE chunks) or whole.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from monitoring.metrics import NO_VARIANT
from serving.adapters import AdapterSet, ModelVersion, UnknownModelError
from serving.engine.base import ChatEngine, InvalidPromptError, SamplingOptions
from serving.errors import APIError, bad_request
from serving.protocol import ChatCompletionRequest
from serving.settings import ALIAS_MODEL, LimitsSettings

if TYPE_CHECKING:
    from monitoring.metrics import ServingMetrics
    from serving.router import ABRouter, Route

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class PreparedChat:
    """A validated request, ready for the engine."""

    completion_id: str
    conversation_id: str
    version: ModelVersion
    prompt_token_ids: list[int]
    options: SamplingOptions
    created: int
    messages: list[dict[str, str]] = field(default_factory=list)
    user: str | None = None
    include_usage: bool = False
    # Set by A/B routing and side-by-side requests; recorded with the completion.
    experiment: str = ""
    variant: str = ""
    pair_id: str | None = None
    # The API key's site: only its keys may rate this completion.
    site: str | None = None

    def sampling(self) -> dict[str, Any]:
        """The sampling parameters as recorded with the completion."""
        options = self.options
        return {
            "temperature": options.temperature,
            "top_p": options.top_p,
            "max_tokens": options.max_tokens,
            "seed": options.seed,
            "stop": list(options.stop),
            "ignore_eos": options.ignore_eos,
            "min_tokens": options.min_tokens,
        }


@dataclass(slots=True)
class CompletionResult:
    """What a finished (or cancelled) completion produced, with its timings."""

    text: str = ""
    completion_tokens: int = 0
    finish_reason: str | None = None
    logprobs: list[float] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    finished_at: float | None = None
    error: str | None = None


class CompletionLog(Protocol):
    """Where finished completions are recorded (the feedback package's conversation log)."""

    def record_completion(self, chat: PreparedChat, result: CompletionResult) -> None: ...


def new_completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def new_conversation_id() -> str:
    return f"conv-{uuid.uuid4().hex}"


class ChatService:
    def __init__(
        self,
        engine: ChatEngine,
        adapters: AdapterSet,
        *,
        metrics: ServingMetrics | None = None,
        log: CompletionLog | None = None,
        sampled_logprobs: bool = True,
        router: ABRouter | None = None,
        limits: LimitsSettings | None = None,
    ) -> None:
        self._limits = limits or LimitsSettings()
        self._engine = engine
        self._adapters = adapters
        self._router = router
        self._metrics = metrics
        self._log = log
        self._sampled_logprobs = sampled_logprobs
        # Tokenizing takes up to a good part of a second: never on the event loop. One thread, as
        # vLLM's own renderer has: a Hugging Face tokenizer is not safe to call from several at once.
        self._tokenizer_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loopchat-tokenize")

    @property
    def adapters(self) -> AdapterSet:
        return self._adapters

    def comparison_models(self) -> tuple[str, str]:
        """Default side-by-side pair: the active version against the newest other one."""
        active = self._adapters.active
        others = [v for v in self._adapters.versions() if v.name != active.name]
        if not others:
            return active.name, active.name
        newest = max(others, key=lambda v: (v.created, v.adapter.engine_id if v.adapter else 0))
        return active.name, newest.name

    def comparison_routes(self, user: str | None, conversation_id: str) -> tuple[Route, Route] | None:
        """The running experiment's side-by-side pair for this user (see ABRouter.pair)."""
        return None if self._router is None else self._router.pair(user or conversation_id)

    async def prepare_routed(self, request: ChatCompletionRequest) -> PreparedChat:
        """`prepare`, with the alias routed by the running experiment (sticky per user and
        conversation); a request naming a version gets that version."""
        if self._router is None or request.model not in (None, ALIAS_MODEL):
            return await self.prepare(request)
        given = (request.metadata or {}).get("conversation_id")
        conversation_id = given or new_conversation_id()
        route = await self._router.route(request.user, conversation_id, existing=given is not None)
        return await self.prepare(request, route=route, conversation_id=conversation_id)

    async def prepare(
        self,
        request: ChatCompletionRequest,
        *,
        model: str | None = None,
        route: Route | None = None,
        conversation_id: str | None = None,
    ) -> PreparedChat:
        """Every check that can fail on the client's input, before the engine sees it.

        `model` overrides the request's model (side-by-side answers from two versions); `route`
        is the router's choice for the alias.
        """
        requested = model if model is not None else request.model
        if route is not None:
            requested = route.version
        try:
            version = self._adapters.resolve(requested)
        except UnknownModelError:
            raise APIError(
                404,
                f"The model `{requested}` does not exist.",
                param="model",
                code="model_not_found",
            ) from None

        messages = [{"role": m.template_role(), "content": m.text()} for m in request.messages]
        self._check_limits(request, messages)
        context = self._engine.max_model_len
        self._check_characters(messages, context)
        loop = asyncio.get_running_loop()
        try:
            prompt_ids = await loop.run_in_executor(
                self._tokenizer_thread, self._engine.render_chat, messages
            )
        except InvalidPromptError as exc:
            raise bad_request(str(exc), param="messages") from exc

        prompt_len = len(prompt_ids)
        if prompt_len >= context:
            raise bad_request(
                f"This model's maximum context length is {context} tokens, but the messages "
                f"take {prompt_len} tokens. Shorten the conversation.",
                param="messages",
                code="context_length_exceeded",
            )
        requested = request.requested_max_tokens
        if requested is not None and prompt_len + requested > context:
            param = request.max_tokens_param
            raise bad_request(
                f"This model's maximum context length is {context} tokens. The messages take "
                f"{prompt_len} tokens and {param} asks for {requested}; at most "
                f"{context - prompt_len} completion tokens fit.",
                param=param,
                code="context_length_exceeded",
            )
        max_tokens = (
            requested
            if requested is not None
            else min(context - prompt_len, self._limits.max_completion_tokens)
        )
        options = SamplingOptions(
            max_tokens=max_tokens,
            temperature=request.temperature,
            top_p=request.top_p,
            stop=tuple(request.stop or ()),
            seed=request.seed,
            ignore_eos=request.ignore_eos,
            min_tokens=min(request.min_tokens, max_tokens),
            sampled_logprobs=self._sampled_logprobs,
        )
        metadata = request.metadata or {}
        return PreparedChat(
            completion_id=new_completion_id(),
            conversation_id=conversation_id or metadata.get("conversation_id") or new_conversation_id(),
            version=version,
            prompt_token_ids=prompt_ids,
            options=options,
            created=int(time.time()),
            messages=messages,
            user=request.user,
            include_usage=bool(request.stream_options and request.stream_options.include_usage),
            experiment=route.experiment if route is not None else "",
            variant=route.variant if route is not None else "",
        )

    def _check_characters(self, messages: list[dict[str, str]], context: int) -> None:
        """Refuses, before tokenizing, messages that cannot fit the context whatever their tokens:
        more characters than `context` tokens of the vocabulary's longest (e.g. 81 characters
        for SmolLM2: a 4096-token context holds at most ~330k characters)."""
        per_token = self._engine.max_token_chars
        if per_token is None:
            return
        chars = sum(len(m["content"]) for m in messages)
        if chars > context * per_token:
            raise bad_request(
                f"This model's maximum context length is {context} tokens, and {chars} characters "
                f"of messages take more than that (no token is longer than {per_token} characters). "
                "Shorten the conversation.",
                param="messages",
                code="context_length_exceeded",
            )

    def _check_limits(self, request: ChatCompletionRequest, messages: list[dict[str, str]]) -> None:
        limits = self._limits
        if len(messages) > limits.max_messages:
            raise bad_request(
                f"at most {limits.max_messages} messages per request, got {len(messages)}",
                param="messages",
                code="too_many_messages",
            )
        for index, message in enumerate(messages):
            if len(message["content"]) > limits.max_message_chars:
                raise bad_request(
                    f"messages[{index}] is longer than {limits.max_message_chars} characters",
                    param=f"messages[{index}].content",
                    code="string_too_long",
                )
        requested = request.requested_max_tokens
        if requested is not None and requested > limits.max_completion_tokens:
            param = request.max_tokens_param
            raise bad_request(
                f"{param} is {requested}; this server allows at most {limits.max_completion_tokens}",
                param=param,
                code="max_tokens_too_large",
            )

    async def _run(self, chat: PreparedChat, result: CompletionResult) -> AsyncIterator[str]:
        """Engine output as text deltas, filling `result` as it goes."""
        stream = self._engine.generate(
            chat.completion_id, chat.prompt_token_ids, chat.options, chat.version.adapter
        )
        if self._metrics is not None:
            self._metrics.inflight.inc()
        try:
            async for chunk in stream:
                if chunk.token_ids and result.first_token_at is None:
                    result.first_token_at = time.perf_counter()
                result.completion_tokens += len(chunk.token_ids)
                result.logprobs.extend(chunk.logprobs)
                if chunk.finish_reason is not None:
                    result.finish_reason = chunk.finish_reason
                if chunk.text:
                    result.text += chunk.text
                    yield chunk.text
        except InvalidPromptError as exc:
            result.error = f"invalid prompt: {exc}"
            raise bad_request(str(exc)) from exc
        except Exception as exc:
            # Cancellation (client gone) is not an error: the row says finish_reason=abort.
            result.error = f"{type(exc).__name__}: {exc}"[:1000]
            raise
        finally:
            result.finished_at = time.perf_counter()
            if result.finish_reason is None:
                result.finish_reason = "abort"
            if self._metrics is not None:
                self._observe(chat, result)
            if self._log is not None:
                try:
                    self._log.record_completion(chat, result)
                except Exception:  # logging must never break an answer
                    logger.exception("could not log completion %s", chat.completion_id)

    def _observe(self, chat: PreparedChat, result: CompletionResult) -> None:
        metrics, version = self._metrics, chat.version.name
        assert metrics is not None and result.finished_at is not None
        metrics.inflight.dec()
        metrics.requests.labels(version, chat.variant or NO_VARIANT, result.finish_reason).inc()
        if result.error is not None:
            reason = "invalid_prompt" if result.error.startswith("invalid prompt") else "engine"
            metrics.errors.labels(version, reason).inc()
        metrics.prompt_tokens.labels(version).inc(len(chat.prompt_token_ids))
        metrics.completion_tokens.labels(version).inc(result.completion_tokens)
        if result.first_token_at is not None:
            metrics.time_to_first_token.labels(version).observe(result.first_token_at - result.started)
            if result.completion_tokens > 1:
                per_token = (result.finished_at - result.first_token_at) / (result.completion_tokens - 1)
                metrics.time_per_output_token.labels(version).observe(per_token)
        metrics.latency.labels(version).observe(result.finished_at - result.started)

    async def complete(self, chat: PreparedChat) -> tuple[dict, CompletionResult]:
        result = CompletionResult()
        async for _ in self._run(chat, result):
            pass
        body = {
            "id": chat.completion_id,
            "object": "chat.completion",
            "created": chat.created,
            "model": chat.version.name,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": result.text},
                    "logprobs": None,
                    "finish_reason": result.finish_reason,
                }
            ],
            "usage": _usage(chat, result),
            "system_fingerprint": None,
        }
        return body, result

    async def stream(self, chat: PreparedChat, result: CompletionResult) -> AsyncIterator[str]:
        """Server-sent events in OpenAI's chunk format, ending with `data: [DONE]`."""
        usage_field = ',"usage":null' if chat.include_usage else ""
        # id, created and model never change within a stream: format that part once.
        head = (
            f'data: {{"id":"{chat.completion_id}","object":"chat.completion.chunk",'
            f'"created":{chat.created},"model":{json.dumps(chat.version.name)},'
            f'"system_fingerprint":null,"choices":[{{"index":0,"delta":'
        )
        tail = f',"logprobs":null,"finish_reason":null}}]{usage_field}}}\n\n'
        yield f'{head}{{"role":"assistant","content":""}}{tail}'
        async for text in self._run(chat, result):
            yield f'{head}{{"content":{json.dumps(text)}}}{tail}'
        finish = json.dumps(result.finish_reason)
        yield (f'{head}{{}},"logprobs":null,"finish_reason":{finish}}}]{usage_field}}}\n\n')
        if chat.include_usage:
            usage = json.dumps(_usage(chat, result), separators=(",", ":"))
            yield (
                f'data: {{"id":"{chat.completion_id}","object":"chat.completion.chunk",'
                f'"created":{chat.created},"model":{json.dumps(chat.version.name)},'
                f'"system_fingerprint":null,"choices":[],"usage":{usage}}}\n\n'
            )
        yield "data: [DONE]\n\n"


def _usage(chat: PreparedChat, result: CompletionResult) -> dict[str, int]:
    prompt = len(chat.prompt_token_ids)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": result.completion_tokens,
        "total_tokens": prompt + result.completion_tokens,
    }
