"""ChatService without HTTP: cancellation reaches the engine, and the log sees each choice."""

from __future__ import annotations

import asyncio

from loopchat.settings import Settings
from serving.adapters import AdapterSet
from serving.chat import ChatService, CompletionResult, PreparedChat
from serving.chat_protocol import ChatCompletionRequest
from serving.openai_layer import build_openai_layer, serve_arguments
from tests.utils.fake_engine import FakeEngine


class Log:
    def __init__(self) -> None:
        self.rows: list[tuple[str, CompletionResult]] = []

    def record_completion(self, chat: PreparedChat, result: CompletionResult) -> None:
        self.rows.append((chat.choice_id(result.index), result))


async def service_on(engine: FakeEngine, log: Log, tmp_path) -> ChatService:
    await engine.start()
    adapters = AdapterSet(engine)
    service = ChatService(adapters, log=log)
    args = serve_arguments(Settings(data_dir=tmp_path), model_path=engine.model_path, served_name="fake-base")
    adapters.attach(await build_openai_layer(engine.client, args))
    return service


async def test_cancelling_a_stream_aborts_the_engine_request(tmp_path) -> None:
    engine = FakeEngine(max_model_len=8192, token_delay=0.01)
    log = Log()
    service = await service_on(engine, log, tmp_path)
    messages = [{"role": "user", "content": "go"}]
    request = ChatCompletionRequest(messages=messages, max_tokens=4000, ignore_eos=True, stream=True)
    chat = service.prepare(request, messages)
    events = await service.respond(chat, request)
    received: list[str] = []

    async def consume() -> None:
        async for event in events:
            received.append(event)

    task = asyncio.create_task(consume())
    while len(received) < 3:
        await asyncio.sleep(0.01)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await asyncio.sleep(0.05)
    assert engine.running == set()
    [(completion_id, result)] = log.rows
    assert completion_id == chat.completion_id
    assert result.finish_reason == "abort"
    assert 0 < result.completion_tokens < 4000


async def test_each_choice_is_logged_with_its_own_id(tmp_path) -> None:
    engine = FakeEngine(max_model_len=256)
    log = Log()
    service = await service_on(engine, log, tmp_path)
    messages = [{"role": "user", "content": "two answers"}]
    for stream in (False, True):
        log.rows.clear()
        request = ChatCompletionRequest(messages=messages, max_tokens=3, n=3, stream=stream)
        chat = service.prepare(request, messages)
        answer = await service.respond(chat, request)
        if stream:
            async for _ in answer:
                pass
        ids = [completion_id for completion_id, _ in log.rows]
        assert ids == [chat.completion_id, f"{chat.completion_id}.1", f"{chat.completion_id}.2"]
        for _, result in log.rows:
            assert result.completion_tokens == 3 and result.finish_reason == "length"
            assert result.text.startswith("echo") and len(result.logprobs) == 3
