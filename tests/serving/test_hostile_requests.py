"""Hostile chat requests: a long prompt never holds up the event loop, one that cannot fit the
context is refused before it is tokenized, and every numeric field out of the engine's range is a
400 with the OpenAI error body, never a 500."""

from __future__ import annotations

import asyncio
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from serving.adapters import AdapterSet
from serving.app import create_app
from serving.chat import ChatService
from serving.engine.vllm_engine import VLLMEngine, longest_token_chars
from serving.errors import APIError
from serving.protocol import SEED_MAX, SEED_MIN, ChatCompletionRequest
from serving.settings import Settings
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


# -- tokenizing ---------------------------------------------------------------------------------


def test_tokenizing_a_prompt_leaves_the_event_loop_free(settings: Settings) -> None:
    engine = FakeEngine(render_seconds=1.5)  # a slow tokenizer, spinning on the CPU
    with app_client(settings, engine) as client, ThreadPoolExecutor(1) as pool:
        wait_ready(client)
        chat = pool.submit(client.post, "/v1/chat/completions", json={"messages": USER, "max_tokens": 2})
        assert engine.rendering.wait(10)
        started = time.perf_counter()
        assert client.get("/healthz").status_code == 200
        # Were tokenizing on the loop, the probe would wait for the whole render (1.5 s).
        assert time.perf_counter() - started < 0.5
        assert chat.result(30).status_code == 200


def test_a_prompt_that_cannot_fit_is_refused_before_tokenizing(settings: Settings) -> None:
    # 64 tokens of at most 16 characters: 1024 characters at most. The fake engine would take
    # one long word as a single token, so only the character bound refuses it.
    engine = FakeEngine(max_model_len=64, max_token_chars=16, render_seconds=5.0)
    with app_client(settings, engine) as client:
        wait_ready(client)
        too_long = [{"role": "system", "content": "s" * 24}, {"role": "user", "content": "x" * 1001}]
        started = time.perf_counter()
        response = client.post("/v1/chat/completions", json={"messages": too_long})
        assert time.perf_counter() - started < 1
        error = assert_openai_400(response, "messages")
        assert error["code"] == "context_length_exceeded"
        assert "64 tokens" in error["message"] and "1025 characters" in error["message"]
        assert engine.renders == 0 and engine.requests == []

        engine.render_seconds = 0
        fits = [{"role": "system", "content": "s" * 24}, {"role": "user", "content": "x" * 1000}]
        response = client.post("/v1/chat/completions", json={"messages": fits, "max_tokens": 2})
        assert response.status_code == 200, response.text
        assert engine.renders == 1


def test_the_character_bound_holds_for_the_embedded_tokenizer(base_model_path: Path) -> None:
    """No text takes fewer tokens than its characters over the bound (so nothing that fits is
    refused), and the bound still refuses a 1 MiB body in a 4096-token context."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_model_path)
    bound = longest_token_chars(tokenizer)
    assert bound is not None and 4096 * bound < 2**20
    for text in (" " * 20_000, "=" * 20_000, "#" * 20_000, "\n" + " " * 19_999, "ab " * 7_000, "é" * 9_000):
        assert len(text) <= len(tokenizer.encode(text, add_special_tokens=False)) * bound


async def test_the_real_tokenizer_runs_off_the_loop(base_model_path: Path, tmp_path: Path) -> None:
    """The vLLM engine's render_chat on the embedded model's tokenizer (vLLM not started), for a
    prompt just under the character bound, tokenized while the loop goes on."""
    from transformers import AutoTokenizer

    engine = VLLMEngine(Settings(data_dir=tmp_path, base_model=base_model_path))
    engine._tokenizer = AutoTokenizer.from_pretrained(base_model_path)
    engine._max_token_chars = longest_token_chars(engine._tokenizer)
    service = ChatService(engine, AdapterSet(engine))
    chars = engine.max_model_len * engine.max_token_chars - 1000
    messages = [{"role": "user", "content": "hello world " * (chars // 6 // 12)}] * 6
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
    with pytest.raises(APIError) as refused:  # ~70k tokens: tokenized, then refused
        await service.prepare(ChatCompletionRequest(messages=messages))
    tokenizing = time.perf_counter() - started
    ticker.cancel()
    assert refused.value.code == "context_length_exceeded" and "tokens" in refused.value.message
    # Were it on the loop, the longest stall would be the whole tokenizing time (~0.2 s here).
    assert max(gaps) < tokenizing / 3, (max(gaps), tokenizing)


def test_longest_token_chars_reads_the_vocabulary() -> None:
    class Vocabulary:
        def __init__(self, vocab: dict[str, int] | None) -> None:
            self.vocab = vocab

        def get_vocab(self) -> dict[str, int]:
            if self.vocab is None:
                raise NotImplementedError
            return self.vocab

    assert longest_token_chars(Vocabulary({"a": 0, "Ġhello": 1, "<|im_start|>": 2})) == 12
    assert longest_token_chars(Vocabulary({})) is None
    assert longest_token_chars(Vocabulary(None)) is None


# -- numeric fields -----------------------------------------------------------------------------

# (field, value just inside the range, value just outside it)
BOUNDS = [
    ("temperature", 0.0, -1e-9),
    ("temperature", 2.0, 2.000001),
    ("top_p", 1e-9, 0.0),
    ("top_p", 1.0, 1.000001),
    ("seed", SEED_MAX, SEED_MAX + 1),
    ("seed", SEED_MIN, SEED_MIN - 1),
    ("seed", 0, 2**64),
    ("seed", 1e18, 1e19),
    ("max_tokens", 1, 0),
    ("max_tokens", 50, 10**30),
    ("max_completion_tokens", 1, 0),
    ("max_completion_tokens", 50, 10**30),
    ("n", 1, 2),
    ("n", 1, 0),
    ("min_tokens", 0, -1),
]


@pytest.mark.parametrize(("field", "inside", "outside"), BOUNDS, ids=[f"{b[0]}={b[2]}" for b in BOUNDS])
def test_numeric_fields_just_inside_are_served_just_outside_are_400(
    client: TestClient, fake_engine: FakeEngine, field: str, inside, outside
) -> None:
    ok = client.post("/v1/chat/completions", json={"messages": USER, field: inside})
    assert ok.status_code == 200, ok.text
    _, options, _ = fake_engine.requests[-1]
    if field in ("temperature", "top_p", "seed"):
        assert getattr(options, field) == inside
    refused = client.post("/v1/chat/completions", json={"messages": USER, field: outside})
    assert_openai_400(refused, field)
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


def test_min_tokens_beyond_max_tokens_is_cut_to_it(client: TestClient, fake_engine: FakeEngine) -> None:
    # vLLM refuses min_tokens > max_tokens; the service cuts it rather than fail in the engine.
    response = client.post(
        "/v1/chat/completions", json={"messages": USER, "max_tokens": 3, "min_tokens": 10**30}
    )
    assert response.status_code == 200, response.text
    _, options, _ = fake_engine.requests[-1]
    assert (options.max_tokens, options.min_tokens) == (3, 3)
    assert json.loads(response.text)["usage"]["completion_tokens"] <= 3
