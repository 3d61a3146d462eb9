"""Hostile chat requests: a long prompt never holds up the event loop, one that cannot fit the
context is refused before it is tokenized, and every numeric field out of the engine's range is a
400 with the OpenAI error body, never a 500."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from loopchat.settings import Settings
from serving.app import create_app
from serving.chat_protocol import SEED_MAX, ChatCompletionRequest
from serving.errors import APIError
from tests.conftest import wait_ready
from tests.utils.fake_engine import FakeEngine

USER = [{"role": "user", "content": "hello there"}]


def app_client(settings: Settings, engine: FakeEngine) -> TestClient:
    return TestClient(create_app(settings, engine=engine, exit_on_engine_failure=False))


def assert_openai_400(response, param: str | None) -> dict:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["message"]
    if param is not None:
        assert error["param"] == param
    assert "Traceback" not in response.text and "/site-packages/" not in response.text
    return error


# -- tokenizing (vLLM's renderer, on the embedded model's tokenizer) ---------------------------


def max_chars_per_token() -> int:
    from tests.utils.fake_engine import _vllm_config

    _, renderer, _ = _vllm_config(8192)
    return renderer.tokenizer.max_chars_per_token


def test_a_prompt_that_cannot_fit_is_refused_before_generation(settings: Settings) -> None:
    engine = FakeEngine(max_model_len=64)
    with app_client(settings, engine) as client:
        wait_ready(client)
        bound = 64 * max_chars_per_token()
        too_long = [{"role": "user", "content": "x" * (bound + 1)}]
        started = time.perf_counter()
        response = client.post("/v1/chat/completions", json={"messages": too_long})
        assert time.perf_counter() - started < 1
        error = assert_openai_400(response, None)
        assert error["code"] == "context_length_exceeded" and "64 tokens" in error["message"]
        assert engine.requests == []
        fits = [{"role": "user", "content": "hi"}]
        assert (
            client.post("/v1/chat/completions", json={"messages": fits, "max_tokens": 2}).status_code == 200
        )


def test_the_character_bound_holds_for_the_embedded_tokenizer(base_model_path: Path) -> None:
    """No text takes fewer tokens than its characters over vLLM's bound (so nothing that fits is
    refused), and the bound still refuses a 1 MiB body in a 4096-token context."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_model_path)
    bound = max_chars_per_token()
    assert 4096 * bound < 2**20
    for text in (" " * 20_000, "=" * 20_000, "#" * 20_000, "\n" + " " * 19_999, "ab " * 7_000, "é" * 9_000):
        assert len(text) <= len(tokenizer.encode(text, add_special_tokens=False)) * bound


async def test_the_real_tokenizer_runs_off_the_loop(tmp_path: Path) -> None:
    """A prompt of tens of thousands of tokens, just under the character bound, is tokenized by
    vLLM's renderer while the event loop goes on, then refused as too long."""
    from tests.serving.test_chat_service import Log, service_on

    engine = FakeEngine(max_model_len=8192)
    service = await service_on(engine, Log(), tmp_path)
    chars = engine.max_model_len * max_chars_per_token() - 1000
    messages = [{"role": "user", "content": "hello world " * (chars // 12 // 12)}] * 12
    request = ChatCompletionRequest(messages=messages)
    gaps: list[float] = []

    async def tick() -> None:
        last = time.perf_counter()
        while True:
            await asyncio.sleep(0.005)
            gaps.append(time.perf_counter() - last)
            last = time.perf_counter()

    ticker = asyncio.create_task(tick())
    await asyncio.sleep(0.05)
    started = time.perf_counter()
    with pytest.raises(APIError) as refused:
        await service.respond(service.prepare(request, messages), request)
    tokenizing = time.perf_counter() - started
    ticker.cancel()
    assert refused.value.code == "context_length_exceeded" and "tokens" in refused.value.message
    assert engine.requests == []
    # Were it on the loop, the longest stall would be the whole tokenizing time.
    assert max(gaps) < tokenizing / 3, (max(gaps), tokenizing)


# -- numeric fields -----------------------------------------------------------------------------

# (field, value just inside the range, value just outside it)
BOUNDS = [
    ("temperature", 0.0, -1e-9),
    ("temperature", 2.0, 2.000001),
    ("top_p", 1e-9, 0.0),
    ("top_p", 1.0, 1.000001),
    ("seed", SEED_MAX, SEED_MAX + 1),
    ("seed", -SEED_MAX - 1, -SEED_MAX - 2),
    ("seed", 0, 2**64),
    ("seed", 1e18, 1e19),
    ("max_tokens", 1, 0),
    ("max_tokens", 50, 10**30),
    ("max_completion_tokens", 1, 0),
    ("max_completion_tokens", 50, 10**30),
    ("n", 16, 17),
    ("n", 1, 0),
    ("min_tokens", 0, -1),
]


@pytest.mark.parametrize(("field", "inside", "outside"), BOUNDS, ids=[f"{b[0]}={b[2]}" for b in BOUNDS])
def test_numeric_fields_just_inside_are_served_just_outside_are_400(
    client: TestClient, fake_engine: FakeEngine, field: str, inside, outside
) -> None:
    ok = client.post("/v1/chat/completions", json={"messages": USER, field: inside})
    assert ok.status_code == 200, ok.text
    _, params, _ = fake_engine.requests[-1]
    if field in ("temperature", "top_p", "seed"):
        assert getattr(params, field) == inside
    refused = client.post("/v1/chat/completions", json={"messages": USER, field: outside})
    # vLLM's own checks name max_tokens for either token field, and no field for some.
    error = assert_openai_400(refused, None)
    assert error["param"] in (field, "max_tokens", None)
    assert len(fake_engine.requests) == 1


def test_side_by_side_requests_have_the_same_bounds(client: TestClient) -> None:
    refused = client.post("/v1/chat/compare", json={"messages": USER, "seed": 2**64})
    assert_openai_400(refused, "seed")


@pytest.mark.parametrize(
    "body",
    [
        '{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}',
        '{"messages": [{"role": "user", "content": "hi"}], "top_p": Infinity}',
        '{"messages": [{"role": "user", "content": "hi"}], "temperature": -Infinity}',
        '{"messages": [{"role": "user", "content": "hi"}], "seed": ' + "9" * 5000 + "}",
    ],
    ids=["nan", "infinity", "minus-infinity", "5000-digit-seed"],
)
def test_numbers_json_cannot_hold_are_400(client: TestClient, fake_engine: FakeEngine, body: str) -> None:
    response = client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert_openai_400(response, None)
    assert fake_engine.requests == []


def test_min_tokens_beyond_max_tokens_is_400(client: TestClient, fake_engine: FakeEngine) -> None:
    # As vLLM's own server: refused with the OpenAI error body, never a 500.
    response = client.post(
        "/v1/chat/completions", json={"messages": USER, "max_tokens": 3, "min_tokens": 10**30}
    )
    assert_openai_400(response, None)
    assert fake_engine.requests == []
