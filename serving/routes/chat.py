from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from serving.chat import ChatService, CompletionResult, PreparedChat
from serving.deps import ChatServiceDep, ReadyDep
from serving.errors import APIError
from serving.protocol import ChatCompletion, ChatCompletionRequest, ErrorResponse, error_body

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/v1", tags=["chat"])

_ERRORS = {code: {"model": ErrorResponse} for code in (400, 404, 503)}


def _headers(chat: PreparedChat) -> dict[str, str]:
    return {
        "x-loopchat-model-version": chat.version.name,
        "x-loopchat-conversation-id": chat.conversation_id,
        "x-loopchat-completion-id": chat.completion_id,
    }


@router.post(
    "/chat/completions",
    response_model=ChatCompletion,
    responses={**_ERRORS, 200: {"content": {"text/event-stream": {}}}},
    dependencies=[ReadyDep],
)
async def create_chat_completion(body: ChatCompletionRequest, request: Request, chat_service: ChatServiceDep):
    """OpenAI-compatible chat completion; `model` may be the base, an adapter or `loopchat`."""
    chat = chat_service.prepare(body)
    if body.stream:
        return StreamingResponse(
            _sse(chat_service, chat),
            media_type="text/event-stream",
            headers={**_headers(chat), "Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    response, _ = await _unless_disconnected(request, chat_service.complete(chat))
    return JSONResponse(response, headers=_headers(chat))


async def _sse(service: ChatService, chat: PreparedChat) -> AsyncIterator[str]:
    # A client disconnect cancels this generator (Starlette), which aborts the engine request.
    result = CompletionResult()
    try:
        async for event in service.stream(chat, result):
            yield event
    except APIError as exc:
        # Headers are already sent: report the error in-band, as OpenAI-compatible servers do.
        yield f"data: {json.dumps(error_body(exc.message, exc.type, exc.param, exc.code))}\n\n"
        yield "data: [DONE]\n\n"
    except Exception:
        logger.exception("stream %s failed", chat.completion_id)
        body = error_body("internal server error", "server_error", code="internal_error")
        yield f"data: {json.dumps(body)}\n\n"
        yield "data: [DONE]\n\n"


async def _unless_disconnected(request: Request, work):
    """Run `work`, cancelling it (and so the engine request) if the client goes away first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if task not in done:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        raise APIError(499, "client closed the request", code="client_closed_request")
    return task.result()


async def _wait_for_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
