from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import uuid
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionResponse

from loopchat.errors import LoopchatError
from serving.chat import PreparedChat, new_conversation_id
from serving.chat_protocol import SEED_MAX, ChatCompareRequest, ChatCompletionRequest
from serving.deps import ChatServiceDep, PrincipalDep, ReadyDep
from serving.errors import EVENT_STREAM, APIError, domain_error, error_responses
from serving.protocol import ChatComparison, error_body

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/v1", tags=["chat"])

_ERRORS = error_responses(400, 404, 503)


def _headers(chat: PreparedChat) -> dict[str, str]:
    headers = {
        "x-loopchat-model-version": chat.version.name,
        "x-loopchat-conversation-id": chat.conversation_id,
        "x-loopchat-completion-id": chat.completion_id,
    }
    if chat.experiment:
        headers["x-loopchat-experiment"] = chat.experiment
        headers["x-loopchat-variant"] = chat.variant
    return headers


@router.post(
    "/chat/completions",
    response_model=ChatCompletionResponse,
    responses={**_ERRORS, **EVENT_STREAM},
    dependencies=[ReadyDep],
)
async def create_chat_completion(
    body: ChatCompletionRequest, request: Request, chat_service: ChatServiceDep, principal: PrincipalDep
):
    """OpenAI-compatible chat completion, answered by vLLM's serving layer; `model` may be the
    base, an adapter or `loopchat`. With `n > 1`, choice i is logged (and rated) as `<id>.<i>`."""
    chat = await chat_service.prepare_routed(body, await _raw_messages(request))
    chat.site = principal.site
    if body.stream:
        events = await chat_service.respond(chat, body)
        return StreamingResponse(
            _sse(chat, events),
            media_type="text/event-stream",
            headers={**_headers(chat), "Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    response = await _unless_disconnected(request, chat_service.respond(chat, body))
    return JSONResponse(response, headers=_headers(chat))


@router.post("/chat/compare", response_model=ChatComparison, responses=_ERRORS, dependencies=[ReadyDep])
async def compare_chat_completions(
    body: ChatCompareRequest, request: Request, chat_service: ChatServiceDep, principal: PrincipalDep
):
    """Two answers to one prompt, from two model versions, for a side-by-side choice.

    Both are logged with one pair id; the order is shuffled so position says nothing about
    the model. Send the choice to POST /v1/feedback/preference. A `seed` makes the pair
    reproducible (the second answer takes the next seed). Without `models`, while an
    experiment runs, the pair is its control and a candidate, and the choice counts in it.
    """
    pair_id = f"cmp-{uuid.uuid4().hex}"
    conversation_id = (body.metadata or {}).get("conversation_id") or new_conversation_id()
    raw_messages = await _raw_messages(request)
    routes = None if body.models else chat_service.comparison_routes(body.user, conversation_id)
    if routes is not None:
        chats = [
            chat_service.prepare(body, raw_messages, route=r, conversation_id=conversation_id) for r in routes
        ]
    else:
        names = body.models or chat_service.comparison_models()
        chats = [
            chat_service.prepare(body, raw_messages, model=n, conversation_id=conversation_id) for n in names
        ]
    requests = []
    for index, chat in enumerate(chats):
        chat.pair_id = pair_id
        chat.site = principal.site
        one = body
        if body.seed is not None:
            # One seed for both would give one version's two answers alike: the second answer
            # takes the next seed (the previous one at the top of the range).
            seed = body.seed + index if body.seed < SEED_MAX else body.seed - index
            one = body.model_copy(update={"seed": seed})
        requests.append(one)
    order = list(range(len(chats)))
    random.shuffle(order)
    answers = asyncio.gather(*(chat_service.respond(chats[i], requests[i]) for i in order))
    done = await _unless_disconnected(request, answers)
    return JSONResponse(
        {
            "object": "chat.comparison",
            "id": pair_id,
            "conversation_id": chats[0].conversation_id,
            "completions": done,
        },
        headers={"x-loopchat-conversation-id": chats[0].conversation_id},
    )


async def _raw_messages(request: Request) -> list:
    """The messages as sent (the body is already read and valid: Starlette keeps it)."""
    return (await request.json()).get("messages") or []


async def _sse(chat: PreparedChat, events: AsyncIterator[str]) -> AsyncIterator[str]:
    # A client disconnect cancels this generator (Starlette), which aborts the engine request.
    try:
        async for event in events:
            yield event
    except (APIError, LoopchatError) as exc:
        # Headers are already sent: report the error in-band, as OpenAI-compatible servers do.
        error = exc if isinstance(exc, APIError) else domain_error(exc)
        yield f"data: {json.dumps(error.body())}\n\n"
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
