"""An engine whose LoRA room follows demand (fake engine): no LoRA until a version needs it, a
replacement engine built and swapped in without failing an answer, dropped again when unused."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from loopchat.settings import Settings
from serving.adapters import AdapterSet, Admission
from serving.app import create_app
from serving.chat import ChatService
from serving.chat_protocol import ChatCompletionRequest
from serving.engine.base import EngineError, LoRACapacity
from serving.openai_layer import build_openai_layer, serve_arguments
from serving.weights import WeightStore
from tests.conftest import ADMIN_TOKEN, wait_ready
from tests.utils.adapters import make_lora_adapter
from tests.utils.fake_engine import FakeEngine

USER = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def trained(base_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("versions")
    return {
        name: make_lora_adapter(base_model_path, root / name, rank=rank, seed=seed)
        for name, rank, seed in (("a", 4, 1), ("b", 16, 2))
    }


async def _attached(engine: FakeEngine, tmp_path: Path, **options) -> AdapterSet:
    await engine.start()
    adapters = AdapterSet(engine, **options)
    args = serve_arguments(Settings(data_dir=tmp_path), model_path=engine.model_path, served_name="base")
    layer = await build_openai_layer(engine.client, args)
    adapters.attach(layer, rebuild=lambda client: build_openai_layer(client, args))
    return adapters


async def _with_versions(
    engine: FakeEngine, tmp_path: Path, base_model_path: Path, trained: dict[str, Path], **options
) -> AdapterSet:
    """An AdapterSet that merges the active version, with every trained version loaded."""
    store = WeightStore(tmp_path / "weights", base_model_path)
    adapters = await _attached(engine, tmp_path, weights=store, **options)
    for name, path in trained.items():
        await adapters.load(name, path)
    return adapters


async def _answer(adapters: AdapterSet, admission: Admission, model: str) -> str:
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

    request = ChatCompletionRequest(model=model, messages=USER, max_tokens=2)
    try:
        response = await admission.layer.chat.create_chat_completion(request, None)
    finally:
        adapters.release(admission)
    return response.choices[0].message.content


def test_lora_is_built_for_the_versions_in_use_and_dropped_when_unused(
    trained: dict[str, Path], tmp_path: Path
) -> None:
    async def scenario() -> None:
        engine = FakeEngine(model_name="base", lora_on_demand=True)
        adapters = await _attached(engine, tmp_path, lora_idle_s=0.2)
        for name, path in trained.items():
            await adapters.load(name, path)
        # Registered versions cost nothing until one is used.
        assert engine.lora is None and engine.builds == []
        assert (await _answer(adapters, await adapters.admit("base"), "base")).startswith("echo")
        assert engine.builds == []

        # A request for `a` waits for an engine with room for `a` alone (+ the spare slot).
        assert (await _answer(adapters, await adapters.admit("a"), "a")).startswith("[a]")
        assert engine.builds == [LoRACapacity(2, 8)] and engine.lora == LoRACapacity(2, 8)
        assert {spec.name for spec in engine.adapters.values()} == {"a"}

        # An experiment over both: room for two, up to the larger rank.
        adapters.serve_routed(["a", "b"])
        await adapters.fit_lora()
        assert engine.lora == LoRACapacity(3, 16)
        assert (await _answer(adapters, await adapters.admit("b"), "b")).startswith("[b]")
        assert len(engine.builds) == 2

        # The experiment ends and no one asks for an adapter for lora_idle_s: back to no LoRA.
        adapters.serve_routed([])
        await asyncio.sleep(0.3)
        await adapters.fit_lora()
        assert engine.lora is None and engine.builds[-1] is None and engine.adapters == {}
        await asyncio.sleep(0.05)
        assert all(not old.ready for old in engine.retired)  # the replaced engines were stopped
        await adapters.close()

    asyncio.run(scenario())


def test_answers_in_flight_finish_on_the_engine_they_started_on(
    trained: dict[str, Path], tmp_path: Path
) -> None:
    async def scenario() -> None:
        engine = FakeEngine(model_name="base", lora_on_demand=True, token_delay=0.01)
        adapters = await _attached(engine, tmp_path)
        await adapters.load("a", trained["a"])
        running = await adapters.admit("base")
        first = running.layer.client
        answer = asyncio.create_task(_answer(adapters, running, "base"))
        # The switch to a LoRA engine happens while that answer runs ...
        await adapters.fit_lora()  # nothing wanted yet: no switch
        assert engine.builds == []
        switched = await adapters.admit("a")
        assert switched.layer.client is not first and engine.lora is not None
        # ... and the engine it started on stays until it ends.
        old = engine.retired[0]
        await asyncio.sleep(0.02)
        assert old.ready
        assert (await answer).startswith("echo")
        assert (await _answer(adapters, switched, "a")).startswith("[a]")
        await asyncio.sleep(0.05)
        assert not old.ready
        await adapters.close()

    asyncio.run(scenario())


def test_a_failed_switch_refuses_lora_requests_for_a_while_and_keeps_serving_the_rest(
    trained: dict[str, Path], tmp_path: Path
) -> None:
    async def scenario() -> None:
        engine = FakeEngine(model_name="base", lora_on_demand=True)
        adapters = await _attached(engine, tmp_path)
        await adapters.load("a", trained["a"])
        engine.fail_builds = MemoryError("no room for a second engine")
        for _ in range(2):
            with pytest.raises(EngineError, match="LoRA"):
                await adapters.admit("a")
        assert len(engine.builds) == 1  # not rebuilt on every request
        assert (await _answer(adapters, await adapters.admit("base"), "base")).startswith("echo")
        assert engine.lora is None

    asyncio.run(scenario())


def test_a_merged_champion_stays_merged_in_the_replacement_engine(
    base_model_path: Path, trained: dict[str, Path], tmp_path: Path
) -> None:
    async def scenario() -> None:
        engine = FakeEngine(model_name="base", lora_on_demand=True)
        store = WeightStore(tmp_path / "weights", base_model_path)
        adapters = await _attached(engine, tmp_path, weights=store)
        await adapters.load("a", trained["a"])
        await adapters.set_active("a")
        merged = engine.weights[-1]
        assert adapters.live.name == "a" and engine.lora is None  # the champion needs no LoRA
        # The base model is now a delta over the champion: asking for it builds LoRA room ...
        assert (await _answer(adapters, await adapters.admit("base"), "base")).startswith("[base]")
        # ... on an engine given the champion's merged weights before it serves.
        assert engine.weights == [merged] and engine.lora == LoRACapacity(2, 8)
        assert (await _answer(adapters, await adapters.admit("a"), "a")).startswith("echo")
        await adapters.close()

    asyncio.run(scenario())


def test_a_request_for_the_alias_held_by_a_promotion_is_answered_by_the_new_champion(
    base_model_path: Path, trained: dict[str, Path], tmp_path: Path
) -> None:
    async def scenario() -> None:
        engine = FakeEngine(model_name="base", lora_on_demand=True)
        adapters = await _with_versions(engine, tmp_path, base_model_path, trained)
        await adapters.set_active("a")
        in_flight = await adapters.admit("a", follows_alias=True)
        # A chat for the alias, routed to `a` by an experiment the promotion ends, is prepared ...
        service = ChatService(adapters)
        request = ChatCompletionRequest(messages=USER, max_tokens=2)
        chat = await service.prepare_routed(request, USER)
        assert chat.version.name == "a" and chat.follows_alias
        chat.experiment, chat.variant = "a-vs-b", "control"
        promotion = asyncio.create_task(adapters.set_active("b"))
        while not adapters.gate.switching:
            await asyncio.sleep(0.01)
        # ... and waits at the gate with a request naming `a`, while the switch waits for `in_flight`.
        for_alias = asyncio.create_task(service.respond(chat, request))
        by_name = asyncio.create_task(adapters.admit("a"))
        await asyncio.sleep(0.05)
        assert not for_alias.done() and not by_name.done()
        adapters.release(in_flight)
        await promotion
        # The alias gets the new champion, merged, outside the ended experiment ...
        body = await for_alias
        assert body["model"] == "b" and body["choices"][0]["message"]["content"].startswith("echo")
        assert chat.version.name == "b" and (chat.experiment, chat.variant) == ("", "")
        assert adapters.live.name == "b"
        # ... while the request naming `a` gets `a`, now a delta that needs LoRA room: the one
        # engine built (the delta of `a` over `b` has rank 4 + 16, rounded up to vLLM's 32).
        admission = await by_name
        assert admission.version == "a" and engine.builds == [LoRACapacity(2, 32)]
        assert (await _answer(adapters, admission, "a")).startswith("[a]")
        await adapters.close()

    asyncio.run(scenario())


def test_a_version_asked_for_by_name_then_promoted_and_replaced_is_not_kept_in_the_room(
    base_model_path: Path, trained: dict[str, Path], tmp_path: Path
) -> None:
    async def scenario() -> None:
        engine = FakeEngine(model_name="base", lora_on_demand=True)
        adapters = await _with_versions(engine, tmp_path, base_model_path, trained, lora_idle_s=60)
        await _answer(adapters, await adapters.admit("a"), "a")  # asked for by name, as a LoRA
        assert adapters.lora_wanted() == {"a"}
        await adapters.set_active("a")  # promoted: merged, needs no room ...
        await _answer(adapters, await adapters.admit("a", follows_alias=True), "a")
        assert adapters.lora_wanted() == frozenset()
        # ... and once `b` replaces it, its answers as the champion do not make it wanted.
        await adapters.set_active("b")
        assert adapters.lora_wanted() == frozenset()
        await adapters.fit_lora()
        assert engine.lora is None
        await adapters.close()

    asyncio.run(scenario())


def test_a_failed_switch_answers_503_with_retry_after(trained: dict[str, Path], tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, admin_token=ADMIN_TOKEN)
    engine = FakeEngine(lora_on_demand=True)
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    with TestClient(create_app(settings, engine=engine, exit_on_engine_failure=False)) as client:
        wait_ready(client)

        def register(name: str) -> None:
            payload = {"name": name, "path": str(trained[name])}
            loaded = client.post("/admin/adapters", json=payload, headers=headers)
            assert loaded.status_code == 201, loaded.text

        def chat(**fields):
            return client.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 3, **fields})

        register("a")
        assert engine.lora is None
        answer = chat(model="a")
        assert answer.status_code == 200
        assert answer.json()["choices"][0]["message"]["content"].startswith("[a]")
        assert engine.lora == LoRACapacity(2, 8)
        assert "loopchat_engine_lora_slots 2.0" in client.get("/metrics").text

        assert client.delete("/admin/adapters/a", headers=headers).status_code == 204
        register("b")
        engine.fail_builds = MemoryError("no room for a second engine")
        refused = chat(model="b")
        assert refused.status_code == 503 and refused.headers["retry-after"]
        assert refused.json()["error"]["code"] == "engine_unavailable"
        assert chat().status_code == 200


def test_the_room_is_kept_until_lora_idle_s_after_the_last_answer_and_a_request_stops_giving_it_back(
    trained: dict[str, Path], tmp_path: Path
) -> None:
    async def scenario() -> None:
        engine = FakeEngine(model_name="base", lora_on_demand=True, token_delay=0.05, build_delay=0.3)
        adapters = await _attached(engine, tmp_path, lora_idle_s=0.4)
        await adapters.load("a", trained["a"])
        # An answer that outlasts lora_idle_s: the room is kept from its end, not its start.
        admission = await adapters.admit("a")
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

        request = ChatCompletionRequest(model="a", messages=USER, max_tokens=12, ignore_eos=True)
        answer = asyncio.create_task(admission.layer.chat.create_chat_completion(request, None))
        await asyncio.sleep(0.45)
        assert adapters.lora_wanted() == {"a"}  # its answer still runs
        try:
            await answer
        finally:
            adapters.release(admission)
        await adapters.fit_lora()
        assert engine.lora == LoRACapacity(2, 8) and len(engine.builds) == 1

        # Unused for lora_idle_s: the room is being given back (an engine without LoRA builds) ...
        await asyncio.sleep(0.5)
        giving_back = asyncio.create_task(adapters.fit_lora())
        await asyncio.sleep(0.1)
        assert engine.builds[-1] is None
        # ... when `a` is asked for again: that build is dropped and the room kept.
        assert (await _answer(adapters, await adapters.admit("a"), "a")).startswith("[a]")
        await giving_back
        assert engine.lora == LoRACapacity(2, 8) and engine.builds == [LoRACapacity(2, 8), None]
        await adapters.close()

    asyncio.run(scenario())
