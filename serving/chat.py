"""Chat completions: pick the version, check loopchat's limits, let vLLM's serving layer answer,
log every choice.

Transport (FastAPI) stays in routes/chat.py. The OpenAI protocol itself (rendering, sampling
parameters, tools, structured output, log-probabilities, the response and chunk shapes) is vLLM's
(serving/openai_layer.py); this module adds the model version, the ids, the limits and the log.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from loopchat.names import ALIAS_MODEL
from loopchat.settings import LimitsSettings
from monitoring.metrics import NO_VARIANT
from serving.adapters import AdapterSet, Admission, LoadedVersion
from serving.chat_protocol import ChatCompletionRequest
from serving.errors import APIError, bad_request, vllm_call, vllm_error
from serving.openai_layer import ChoiceTrace, OpenAILayer, RequestTrace

if TYPE_CHECKING:
    from monitoring.metrics import ServingMetrics
    from serving.router import ABRouter, Route

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class PreparedChat:
    """A checked request with its model version and ids, ready for the engine."""

    completion_id: str
    conversation_id: str
    version: LoadedVersion
    created: int
    messages: list[dict[str, Any]] = field(default_factory=list)
    tools: list[dict[str, Any]] | None = None
    user: str | None = None
    # Set by A/B routing and side-by-side requests; recorded with the completion.
    experiment: str = ""
    variant: str = ""
    pair_id: str | None = None
    # The API key's site: only its keys may rate this completion.
    site: str | None = None
    # What the engine did, filled while it runs.
    trace: RequestTrace = field(default_factory=RequestTrace)
    # The engine (and its layer) serving the answer, held until it ends.
    admission: Admission | None = None
    # The version was chosen for the `loopchat` alias (by the active version or the router).
    follows_alias: bool = False

    def choice_id(self, index: int) -> str:
        """The completion id of choice `index`: the response's id for the first, `<id>.<index>`
        for the others of an `n > 1` request (each is logged and rated on its own)."""
        return self.completion_id if index == 0 else f"{self.completion_id}.{index}"

    def sampling(self) -> dict[str, Any]:
        """The sampling parameters as recorded with the completion."""
        return dict(self.trace.sampling)

    @property
    def prompt_tokens(self) -> int:
        return len(self.trace.prompt_token_ids)


@dataclass(slots=True)
class CompletionResult:
    """What one choice produced, with its timings (a row of the conversation log)."""

    index: int = 0
    text: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
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


def new_request_hex() -> str:
    return uuid.uuid4().hex


def new_conversation_id() -> str:
    return f"conv-{uuid.uuid4().hex}"


def logged_messages(raw_messages: list[Any]) -> list[dict[str, Any]]:
    """The conversation as the log keeps it, from the request's JSON: role and text, and tool
    calls and results where present (`developer` is OpenAI's newer name for `system`).

    Read from the JSON, not from vLLM's request model: its content parts are validated lazily,
    as they are read, and can be read only once (by vLLM's renderer)."""
    messages: list[dict[str, Any]] = []
    for message in raw_messages:
        if not isinstance(message, dict):
            continue
        role = str(message.get("role", ""))
        entry: dict[str, Any] = {"role": "system" if role == "developer" else role}
        entry["content"] = _text(message.get("content"))
        if message.get("tool_calls"):
            entry["tool_calls"] = message["tool_calls"]
        for key in ("tool_call_id", "name"):
            if message.get(key):
                entry[key] = message[key]
        messages.append(entry)
    return messages


def _text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = []
    for part in content:
        if isinstance(part, dict) and part.get("type") == "text":
            parts.append(part.get("text") or "")
    return "".join(parts)


def _plain(value: Any) -> Any:
    """A JSON-ready copy of a pydantic model, TypedDict or iterable from a request."""
    if hasattr(value, "model_dump"):
        return value.model_dump(exclude_none=True)
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


class ChatService:
    def __init__(
        self,
        adapters: AdapterSet,
        *,
        metrics: ServingMetrics | None = None,
        log: CompletionLog | None = None,
        sampled_logprobs: bool = True,
        router: ABRouter | None = None,
        limits: LimitsSettings | None = None,
    ) -> None:
        self._limits = limits or LimitsSettings()
        self._adapters = adapters
        self._router = router
        self._metrics = metrics
        self._log = log
        self._sampled_logprobs = sampled_logprobs

    @property
    def adapters(self) -> AdapterSet:
        return self._adapters

    def layer(self) -> OpenAILayer:
        return self._adapters.layer

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

    async def prepare_routed(self, request: ChatCompletionRequest, raw_messages: list[Any]) -> PreparedChat:
        """`prepare`, with the alias routed by the running experiment (sticky per user and
        conversation); a request naming a version gets that version."""
        if request.model not in (None, ALIAS_MODEL):
            return self.prepare(request, raw_messages)
        if self._router is None:
            chat = self.prepare(request, raw_messages)
        else:
            given = (request.metadata or {}).get("conversation_id")
            conversation_id = given or new_conversation_id()
            route = await self._router.route(request.user, conversation_id, existing=given is not None)
            chat = self.prepare(request, raw_messages, route=route, conversation_id=conversation_id)
        chat.follows_alias = True
        return chat

    def prepare(
        self,
        request: ChatCompletionRequest,
        raw_messages: list[Any],
        *,
        model: str | None = None,
        route: Route | None = None,
        conversation_id: str | None = None,
    ) -> PreparedChat:
        """loopchat's checks on the client's input (vLLM's serving layer makes its own after).

        `model` overrides the request's model (side-by-side answers from two versions); `route`
        is the router's choice for the alias; `raw_messages` are the request's messages as sent.
        """
        requested = model if model is not None else request.model
        if route is not None:
            requested = route.version
        version = self._adapters.resolve(requested)  # a name not served: ModelNotFoundError (404)
        messages = logged_messages(raw_messages)
        self._check_limits(request, messages)
        metadata = request.metadata or {}
        return PreparedChat(
            completion_id=f"chatcmpl-{new_request_hex()}",
            conversation_id=conversation_id or metadata.get("conversation_id") or new_conversation_id(),
            version=version,
            created=int(time.time()),
            messages=messages,
            tools=[_plain(tool) for tool in request.tools] if request.tools else None,
            user=request.user,
            experiment=route.experiment if route is not None else "",
            variant=route.variant if route is not None else "",
        )

    def _check_limits(self, request: ChatCompletionRequest, messages: list[dict[str, Any]]) -> None:
        limits = self._limits
        if not messages:
            raise bad_request("messages must hold at least one message", param="messages")
        if len(messages) > limits.max_messages:
            raise bad_request(
                f"at most {limits.max_messages} messages per request, got {len(messages)}",
                param="messages",
                code="too_many_messages",
            )
        for index, message in enumerate(messages):
            try:
                message["content"].encode("utf-8")
            except UnicodeEncodeError:
                raise bad_request(
                    f"messages[{index}].content is not valid Unicode (it holds a lone surrogate)",
                    param=f"messages[{index}].content",
                    code="invalid_value",
                ) from None
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
        if (request.n or 1) > limits.max_choices:
            raise bad_request(
                f"n is {request.n}; this server allows at most {limits.max_choices} choices",
                param="n",
                code="too_many_choices",
            )

    def _engine_request(
        self, chat: PreparedChat, request: ChatCompletionRequest, layer: OpenAILayer
    ) -> ChatCompletionRequest:
        """The request as vLLM's serving layer gets it: the version's model name, loopchat's id
        and loopchat's default token limit."""
        request = request.model_copy()
        request.model = chat.version.name
        request.request_id = chat.completion_id.removeprefix("chatcmpl-")
        limit = self._limits.max_completion_tokens
        if request.requested_max_tokens is None and limit < layer_context(layer):
            # vLLM's default is whatever the context leaves; loopchat's limit caps it (vLLM clamps
            # any value to what the context leaves, as it does a client's).
            request.max_completion_tokens = limit
        return request

    async def respond(
        self, chat: PreparedChat, request: ChatCompletionRequest
    ) -> dict[str, Any] | AsyncIterator[str]:
        """The response body (a dict) or, for `stream`, its server-sent events."""
        # Held until _finish: a weight switch (a promotion) waits for this answer to end, an
        # engine switch keeps the previous engine until then.
        chat.admission = await self._adapters.admit(chat.version.name, follows_alias=chat.follows_alias)
        if chat.admission.version != chat.version.name:
            # Promoted meanwhile: the new champion answers, outside the experiment that ended.
            chat.version = self._adapters.get(chat.admission.version)
            chat.experiment = chat.variant = ""
        layer = chat.admission.layer
        engine_request = self._engine_request(chat, request, layer)
        chat.trace = layer.client.watch(chat.completion_id, sampled_logprobs=self._sampled_logprobs)
        if self._metrics is not None:
            self._metrics.inflight.inc()
        try:
            answer = await vllm_call(layer.chat.create_chat_completion(engine_request, None))
        except APIError as exc:
            # The log keeps what vLLM raised (the client gets the mapped error).
            self._finish(chat, error=exc.__cause__ or exc.message)
            raise
        except BaseException as exc:
            self._finish(chat, error=exc)
            raise
        if not isinstance(answer, AsyncIterator):
            body = answer.model_dump()
            for choice in body["choices"]:
                trace = chat.trace.choice(choice["index"])
                message = choice["message"]
                trace.content = message.get("content") or ""
                trace.tool_calls = list(message.get("tool_calls") or [])
                # What the client was told: `tool_calls` where the engine stopped at its end.
                trace.finish_reason = choice.get("finish_reason") or trace.finish_reason
            self._finish(chat)
            return body
        return self._stream(chat, answer, with_tools=bool(chat.tools))

    async def _stream(self, chat: PreparedChat, events: AsyncIterator[str], *, with_tools: bool):
        error: BaseException | str | None = None
        calls: dict[tuple[int, int], dict[str, Any]] = {}
        contents: dict[int, list[str]] = {}
        finishes: dict[int, str] = {}
        try:
            async for event in events:
                if event.startswith('data: {"error"'):
                    # vLLM reports a failure in the stream (its headers are sent): in loopchat's
                    # error body, the engine's own words kept for the log only.
                    failure = json.loads(event[6:])
                    error = failure["error"].get("message") or "engine error"
                    yield f"data: {json.dumps(_error_body(failure))}\n\n"
                    continue
                if with_tools:
                    # The parser takes tool calls out of the text: log what the client got.
                    _collect_deltas(event, calls, contents, finishes)
                yield event
        except BaseException as exc:  # a client gone (cancelled) is recorded as finish_reason abort
            error = exc
            raise
        finally:
            for (index, _), call in sorted(calls.items()):
                chat.trace.choice(index).tool_calls.append(call)
            if with_tools:
                for index in {*chat.trace.choices, *contents}:
                    chat.trace.choice(index).content = "".join(contents.get(index, ()))
            for index, reason in finishes.items():
                chat.trace.choice(index).finish_reason = reason
            self._finish(chat, error=error)

    def _finish(self, chat: PreparedChat, error: BaseException | str | None = None) -> None:
        """Logs and meters every choice of a finished (or failed, or cancelled) request."""
        trace = chat.trace
        trace.finished_at = time.perf_counter()
        if chat.admission is not None:
            self._adapters.release(chat.admission)
            chat.admission.layer.client.release(chat.completion_id)
        reason = _error_text(error)
        if not trace.choices:
            trace.choice(0)
        results = [
            self._result(chat, index, choice, reason) for index, choice in sorted(trace.choices.items())
        ]
        if self._metrics is not None:
            self._observe(chat, results, reason)
        if self._log is not None:
            for result in results:
                try:
                    self._log.record_completion(chat, result)
                except Exception:  # logging must never break an answer
                    logger.exception("could not log completion %s", chat.choice_id(result.index))

    def _result(
        self, chat: PreparedChat, index: int, choice: ChoiceTrace, error: str | None
    ) -> CompletionResult:
        text = choice.content if choice.content is not None else choice.text
        return CompletionResult(
            index=index,
            text=text,
            tool_calls=choice.tool_calls,
            completion_tokens=choice.completion_tokens,
            finish_reason=choice.finish_reason or "abort",
            logprobs=choice.logprobs,
            started=chat.trace.started,
            first_token_at=choice.first_token_at,
            finished_at=chat.trace.finished_at,
            error=error,
        )

    def _observe(self, chat: PreparedChat, results: list[CompletionResult], error: str | None) -> None:
        metrics, version = self._metrics, chat.version.name
        assert metrics is not None
        trace = chat.trace
        metrics.inflight.dec()
        for result in results:
            metrics.requests.labels(version, chat.variant or NO_VARIANT, result.finish_reason).inc()
        if error is not None and error != "cancelled":
            metrics.errors.labels(version, "engine" if trace.prompt_token_ids else "invalid_prompt").inc()
        metrics.prompt_tokens.labels(version).inc(len(trace.prompt_token_ids))
        metrics.completion_tokens.labels(version).inc(trace.completion_tokens)
        first = trace.first_token_at
        assert trace.finished_at is not None
        if first is not None:
            metrics.time_to_first_token.labels(version).observe(first - trace.started)
            for result in results:
                if result.completion_tokens > 1 and result.first_token_at is not None:
                    per_token = (trace.finished_at - result.first_token_at) / (result.completion_tokens - 1)
                    metrics.time_per_output_token.labels(version).observe(per_token)
        metrics.latency.labels(version).observe(trace.finished_at - trace.started)


def layer_context(layer: OpenAILayer | None) -> int:
    """The engine's context length in tokens (0 before the engine is up)."""
    return 0 if layer is None else layer.client.model_config.max_model_len


def _error_text(error: BaseException | str | None) -> str | None:
    if error is None:
        return None
    if isinstance(error, str):
        return error[:1000]
    if isinstance(error, (asyncio.CancelledError, GeneratorExit)):
        return None
    if isinstance(error, APIError):
        return error.message[:1000]
    return f"{type(error).__name__}: {error}"[:1000]


def _error_body(failure: dict[str, Any]) -> dict[str, Any]:
    from vllm.entrypoints.serve.engine.protocol import ErrorResponse

    return vllm_error(ErrorResponse.model_validate(failure)).body()


def _collect_deltas(
    event: str,
    calls: dict[tuple[int, int], dict[str, Any]],
    contents: dict[int, list[str]],
    finishes: dict[int, str],
) -> None:
    """Accumulates the content and tool-call deltas and the finish reasons of one chunk event, by
    choice (and call)."""
    if not event.startswith("data: {"):
        return
    chunk = json.loads(event[6:])
    for choice in chunk.get("choices") or ():
        if choice.get("finish_reason"):
            finishes[choice.get("index", 0)] = choice["finish_reason"]
        delta_message = choice.get("delta") or {}
        if delta_message.get("content"):
            contents.setdefault(choice.get("index", 0), []).append(delta_message["content"])
        for delta in delta_message.get("tool_calls") or ():
            key = (choice.get("index", 0), delta.get("index", 0))
            call = calls.setdefault(
                key, {"id": None, "type": "function", "function": {"name": "", "arguments": ""}}
            )
            if delta.get("id"):
                call["id"] = delta["id"]
            function = delta.get("function") or {}
            if function.get("name"):
                call["function"]["name"] += function["name"]
            if function.get("arguments"):
                call["function"]["arguments"] += function["arguments"]
