"""`/v1/completions` and vLLM's `/tokenize` and `/detokenize`, answered by vLLM's serving layer.

Completions are raw text prompts, not conversations: they are served (on any model version, the
alias following the active one) and metered, but not written to the conversation log.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from vllm.entrypoints.openai.completion.protocol import CompletionResponse
from vllm.entrypoints.serve.tokenize.protocol import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
)

from loopchat.names import ALIAS_MODEL
from serving.adapters import AdapterSet, Admission
from serving.chat import new_request_hex
from serving.chat_protocol import CompletionRequest
from serving.deps import AdaptersDep, ChatServiceDep, ReadyDep
from serving.errors import EVENT_STREAM, error_responses, vllm_call

router = APIRouter(prefix="/v1", tags=["completions"])
tokenizer = APIRouter(tags=["tokenizer"])

_ERRORS = error_responses(400, 404, 503)


def _version_name(adapters, requested: str | None) -> str:
    return adapters.resolve(requested).name


async def _released(
    events: AsyncIterator[str], adapters: AdapterSet, admission: Admission
) -> AsyncIterator[str]:
    try:
        async for event in events:
            yield event
    finally:
        adapters.release(admission)


@router.post(
    "/completions",
    response_model=CompletionResponse,
    responses={**_ERRORS, **EVENT_STREAM},
    dependencies=[ReadyDep],
)
async def create_completion(body: CompletionRequest, chat_service: ChatServiceDep, adapters: AdaptersDep):
    """OpenAI's (legacy) text completion on a model version."""
    request = body.model_copy(
        update={"model": _version_name(adapters, body.model), "request_id": new_request_hex()}
    )
    # As for chats: a weight switch waits for this answer to end, an engine switch keeps the
    # previous engine until then.
    admission = await adapters.admit(request.model, follows_alias=body.model in (None, ALIAS_MODEL))
    request.model = admission.version  # the new champion where a promotion came first
    try:
        answer = await vllm_call(admission.layer.completion.create_completion(request, None))
    except BaseException:
        adapters.release(admission)
        raise
    if isinstance(answer, CompletionResponse):
        adapters.release(admission)
        return JSONResponse(answer.model_dump())
    return StreamingResponse(
        _released(answer, adapters, admission),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _tokenizer_call(method: str, body: Any, request: Request, chat_service, adapters) -> JSONResponse:
    body = body.model_copy(update={"model": _version_name(adapters, body.model)})
    handler = getattr(chat_service.layer().tokenization, method)
    return JSONResponse((await vllm_call(handler(body, request))).model_dump())


@tokenizer.post("/tokenize", response_model=TokenizeResponse, responses=_ERRORS, dependencies=[ReadyDep])
async def tokenize(
    body: TokenizeRequest, request: Request, chat_service: ChatServiceDep, adapters: AdaptersDep
):
    """Token ids of a prompt or of chat messages (with the chat template), as vLLM's server gives."""
    return await _tokenizer_call("create_tokenize", body, request, chat_service, adapters)


@tokenizer.post("/detokenize", response_model=DetokenizeResponse, responses=_ERRORS, dependencies=[ReadyDep])
async def detokenize(
    body: DetokenizeRequest, request: Request, chat_service: ChatServiceDep, adapters: AdaptersDep
):
    """The text of token ids."""
    return await _tokenizer_call("create_detokenize", body, request, chat_service, adapters)
