"""ChatService without HTTP: cancellation reaches the engine."""

from __future__ import annotations

import asyncio

from serving.adapters import AdapterSet
from serving.chat import ChatService, CompletionResult
from serving.protocol import ChatCompletionRequest
from tests.utils.fake_engine import FakeEngine


async def test_cancelling_a_stream_aborts_the_engine_request() -> None:
    engine = FakeEngine(max_model_len=10_000, token_delay=0.01)
    await engine.start()
    service = ChatService(engine, AdapterSet(engine))
    chat = await service.prepare(
        ChatCompletionRequest(messages=[{"role": "user", "content": "go"}], max_tokens=4000, ignore_eos=True)
    )
    result = CompletionResult()
    received: list[str] = []

    async def consume() -> None:
        async for event in service.stream(chat, result):
            received.append(event)

    task = asyncio.create_task(consume())
    while len(received) < 3:
        await asyncio.sleep(0.01)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert chat.completion_id in engine.aborted
    assert engine.running == set()
    assert result.finish_reason == "abort"
    assert 0 < result.completion_tokens < 4000
