"""The chat API on a fake engine: wire format, headers, model resolution, every error case."""

from __future__ import annotations

import json
import time

import pytest
from fastapi.testclient import TestClient

from loopchat.settings import LimitsSettings
from serving.app import create_app
from tests.conftest import wait_ready
from tests.utils.fake_engine import FakeEngine

USER = [{"role": "user", "content": "hello there"}]


def sse_events(response) -> list[str]:
    return [line[len("data: ") :] for line in response.iter_lines() if line.startswith("data: ")]


def test_non_streaming_completion_shape_and_headers(client: TestClient) -> None:
    response = client.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 5})
    assert response.status_code == 200
    body = response.json()
    assert body["id"].startswith("chatcmpl-")
    assert body["object"] == "chat.completion"
    assert body["model"] == "fake-base"
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"].startswith("echo")
    assert choice["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 5
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + 5
    assert response.headers["x-loopchat-model-version"] == "fake-base"
    assert response.headers["x-loopchat-conversation-id"].startswith("conv-")
    assert response.headers["x-loopchat-completion-id"] == body["id"]


def test_completion_ids_are_unique(client: TestClient) -> None:
    ids = {
        client.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 1}).json()["id"]
        for _ in range(5)
    }
    assert len(ids) == 5


def test_conversation_continues_through_metadata(client: TestClient) -> None:
    response = client.post(
        "/v1/chat/completions",
        json={"messages": USER, "max_tokens": 2, "metadata": {"conversation_id": "conv-abc.1"}},
    )
    assert response.status_code == 200
    assert response.headers["x-loopchat-conversation-id"] == "conv-abc.1"


def test_streaming_matches_non_streaming(client: TestClient) -> None:
    request = {"messages": USER, "max_completion_tokens": 4, "temperature": 0}
    whole = client.post("/v1/chat/completions", json=request).json()
    with client.stream(
        "POST",
        "/v1/chat/completions",
        json={**request, "stream": True, "stream_options": {"include_usage": True}},
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["x-loopchat-model-version"] == "fake-base"
        events = sse_events(response)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == whole["choices"][0]["message"]["content"]
    finals = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert finals[-1]["choices"][0]["finish_reason"] == "length"
    usage_chunk = chunks[-1]
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"]["completion_tokens"] == 4
    assert all(c.get("usage") is None for c in chunks[:-1])


def test_streaming_without_usage_has_no_usage_field(client: TestClient) -> None:
    with client.stream(
        "POST", "/v1/chat/completions", json={"messages": USER, "max_tokens": 2, "stream": True}
    ) as response:
        events = sse_events(response)
    chunks = [json.loads(e) for e in events[:-1]]
    assert all("usage" not in c for c in chunks)


def test_sampling_parameters_reach_the_engine(client: TestClient, fake_engine: FakeEngine) -> None:
    client.post(
        "/v1/chat/completions",
        json={
            "messages": USER,
            "max_tokens": 7,
            "temperature": 0.3,
            "top_p": 0.9,
            "stop": "END",
            "seed": 42,
            "ignore_eos": True,
            "min_tokens": 2,
            "user": "u1",
        },
    )
    _, params, adapter = fake_engine.requests[-1]
    assert (params.max_tokens, params.temperature, params.top_p) == (7, 0.3, 0.9)
    assert params.stop == ["END"] and params.seed == 42
    assert params.ignore_eos and params.min_tokens == 2
    assert adapter is None


def test_every_vllm_sampling_parameter_reaches_the_engine(
    client: TestClient, fake_engine: FakeEngine
) -> None:
    response = client.post(
        "/v1/chat/completions",
        json={
            "messages": USER,
            "max_tokens": 3,
            "n": 2,
            "presence_penalty": 0.5,
            "frequency_penalty": 0.25,
            "repetition_penalty": 1.1,
            "logit_bias": {"42": 5.0},
            "stop_token_ids": [7],
            "top_k": 5,
            "logprobs": True,
            "top_logprobs": 2,
            "response_format": {"type": "json_object"},
        },
    )
    assert response.status_code == 200, response.text
    _, params, _ = fake_engine.requests[-1]
    assert params.n == 2 and params.top_k == 5
    assert (params.presence_penalty, params.frequency_penalty, params.repetition_penalty) == (0.5, 0.25, 1.1)
    assert params.logit_bias == {42: 5.0} and params.stop_token_ids == [7]
    assert params.logprobs == 2
    assert params.structured_outputs is not None and params.structured_outputs.json_object
    assert [c["index"] for c in response.json()["choices"]] == [0, 1]


def test_default_max_tokens_fills_the_context(client: TestClient, fake_engine: FakeEngine) -> None:
    body = client.post("/v1/chat/completions", json={"messages": USER}).json()
    _, params, _ = fake_engine.requests[-1]
    assert params.max_tokens == fake_engine.max_model_len - body["usage"]["prompt_tokens"]


def test_default_max_tokens_is_capped_by_the_limit(settings) -> None:
    settings = settings.model_copy(update={"limits": LimitsSettings(max_completion_tokens=5)})
    engine = FakeEngine()
    with TestClient(create_app(settings, engine=engine, exit_on_engine_failure=False)) as client:
        wait_ready(client)
        body = client.post("/v1/chat/completions", json={"messages": USER}).json()
    assert engine.requests[-1][1].max_tokens == 5 and body["usage"]["completion_tokens"] == 5


def test_developer_role_and_content_parts(client: TestClient) -> None:
    response = client.post(
        "/v1/chat/completions",
        json={
            "messages": [
                {"role": "developer", "content": "be brief"},
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "hi"}, {"type": "text", "text": "you"}],
                },
            ],
            "max_tokens": 3,
        },
    )
    assert response.status_code == 200


def test_unknown_fields_are_ignored(client: TestClient) -> None:
    response = client.post(
        "/v1/chat/completions", json={"messages": USER, "max_tokens": 1, "frequency_penalty": 0}
    )
    assert response.status_code == 200


LONG = " ".join(["word"] * 80)

BAD_REQUESTS = [
    ("empty messages", {"messages": []}, "messages"),
    ("messages not a list", {"messages": "hi"}, "messages"),
    ("missing messages", {"model": "loopchat"}, "messages"),
    ("message not an object", {"messages": ["hi"]}, "messages[0]"),
    ("content wrong type", {"messages": [{"role": "user", "content": 5}]}, "messages[0]"),
    (
        "image part",
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
        None,
    ),
    ("temperature wrong type", {"messages": USER, "temperature": "hot"}, "temperature"),
    ("temperature too high", {"messages": USER, "temperature": 3}, "temperature"),
    ("top_p zero", {"messages": USER, "top_p": 0}, "top_p"),
    ("max_tokens zero", {"messages": USER, "max_tokens": 0}, "max_tokens"),
    ("max_tokens negative", {"messages": USER, "max_tokens": -5}, "max_tokens"),
    ("max_tokens float", {"messages": USER, "max_tokens": 2.5}, "max_tokens"),
    # vLLM names the parameter max_tokens whichever field carried it.
    ("max_completion_tokens zero", {"messages": USER, "max_completion_tokens": 0}, "max_tokens"),
    ("max_tokens beyond context", {"messages": USER, "max_tokens": 1000}, "max_tokens"),
    (
        "max_completion_tokens beyond context",
        {"messages": USER, "max_completion_tokens": 65},
        "max_completion_tokens",
    ),
    ("prompt beyond context", {"messages": [{"role": "user", "content": LONG}]}, None),
    ("n above the limit", {"messages": USER, "n": 17}, "n"),
    ("stream wrong type", {"messages": USER, "stream": "maybe"}, "stream"),
    ("too many stops", {"messages": USER, "stop": ["x"] * 17}, "stop"),
    ("empty stop", {"messages": USER, "stop": [""]}, None),
    ("metadata value too long", {"messages": USER, "metadata": {"k": "v" * 600}}, "metadata"),
    ("bad conversation id", {"messages": USER, "metadata": {"conversation_id": "a b/../c"}}, "metadata"),
    ("user too long", {"messages": USER, "user": "u" * 300}, "user"),
]


@pytest.mark.parametrize(("case", "payload", "param"), BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_requests_get_400_with_openai_error(client: TestClient, case, payload, param) -> None:
    response = client.post("/v1/chat/completions", json=payload)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["message"]
    if param is not None:
        assert error["param"] is not None and error["param"].startswith(param)
    assert "Traceback" not in response.text and "/site-packages/" not in response.text


def test_context_errors_carry_a_code(client: TestClient) -> None:
    response = client.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 1000})
    assert response.json()["error"]["code"] == "context_length_exceeded"


def test_malformed_json_gets_400(client: TestClient) -> None:
    response = client.post(
        "/v1/chat/completions", content=b'{"messages": [', headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    assert response.json()["error"]["message"] == "request body is not valid JSON"


def test_unknown_model_gets_404(client: TestClient) -> None:
    response = client.post("/v1/chat/completions", json={"messages": USER, "model": "gpt-9"})
    assert response.status_code == 404
    error = response.json()["error"]
    assert error["code"] == "model_not_found" and error["param"] == "model"
    assert "gpt-9" in error["message"]


def test_unknown_route_gets_openai_error(client: TestClient) -> None:
    response = client.get("/v1/nothing")
    assert response.status_code == 404
    assert "error" in response.json()


def test_models_list_base(client: TestClient) -> None:
    body = client.get("/v1/models").json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == ["fake-base"]
    assert body["data"][0]["parent"] is None
    assert client.get("/v1/models/fake-base").json()["id"] == "fake-base"
    assert client.get("/v1/models/nope").status_code == 404


def test_not_ready_gives_503(settings) -> None:
    engine = FakeEngine(start_delay=60)
    app = create_app(settings, engine=engine, exit_on_engine_failure=False)
    with TestClient(app) as client:
        assert client.get("/healthz").status_code == 200
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["status"] == "loading"
        response = client.post("/v1/chat/completions", json={"messages": USER})
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "engine_not_ready"
        assert response.headers["retry-after"]


def test_engine_start_failure_reported_on_readyz(settings) -> None:
    class BrokenEngine(FakeEngine):
        async def start(self) -> None:
            raise RuntimeError("no model here")

    app = create_app(settings, engine=BrokenEngine(), exit_on_engine_failure=False)
    with TestClient(app) as client:
        for _ in range(100):
            body = client.get("/readyz").json()
            if body["status"] == "failed":
                break
        assert body["status"] == "failed" and "no model here" in body["detail"]
        assert client.post("/v1/chat/completions", json={"messages": USER}).status_code == 503


def test_metrics_count_completions(client: TestClient) -> None:
    client.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 3})
    client.post("/v1/chat/completions", json={"messages": []})
    client.get("/v1/nothing-here")
    text = client.get("/metrics").text
    chat = 'finish_reason="length",model_version="fake-base",variant="none"'
    assert f"loopchat_chat_requests_total{{{chat}}} 1.0" in text
    assert 'loopchat_completion_tokens_total{model_version="fake-base"} 3.0' in text
    assert 'loopchat_time_per_output_token_seconds_count{model_version="fake-base"} 1.0' in text
    assert "loopchat_engine_ready 1.0" in text
    assert "loopchat_chat_inflight_requests 0.0" in text
    # Every HTTP request by route template and status; unknown paths share one label value.
    route = 'route="/v1/chat/completions"'
    ok = f'method="POST",model_version="fake-base",{route},status="200",variant="none"'
    assert f"loopchat_http_requests_total{{{ok}}} 1.0" in text
    bad = f'method="POST",model_version="",{route},status="400",variant=""'
    assert f"loopchat_http_requests_total{{{bad}}} 1.0" in text
    assert 'method="GET",model_version="",route="none",status="404"' in text
    assert "/v1/nothing-here" not in text and 'route="/metrics"' not in text
    assert f'loopchat_http_request_duration_seconds_count{{method="POST",{route}}} 2.0' in text
    assert "_created" not in text
    assert client.get("/metrics/").text.startswith("# HELP")


def test_metrics_count_engine_errors(settings) -> None:
    engine = FakeEngine()
    engine.fail_with = RuntimeError("device lost")
    app = create_app(settings, engine=engine, exit_on_engine_failure=False)
    with TestClient(app, raise_server_exceptions=False) as c:
        wait_ready(c)
        assert c.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 4}).status_code == 500
        text = c.get("/metrics").text
    assert 'loopchat_chat_errors_total{model_version="fake-base",reason="engine"} 1.0' in text
    assert 'status="500"' in text


def test_client_error_leaves_server_serving(client: TestClient) -> None:
    client.post("/v1/chat/completions", json={"messages": []})
    assert client.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 1}).status_code == 200


def test_ready_app_with_fresh_client(settings, fake_engine) -> None:
    # Two apps in one process keep separate metric registries.
    for _ in range(2):
        with TestClient(create_app(settings, engine=FakeEngine(), exit_on_engine_failure=False)) as c:
            wait_ready(c)
            assert c.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 1}).status_code == 200


@pytest.fixture
def capped(settings, fake_engine):
    limits = LimitsSettings(
        max_body_bytes=2048, max_messages=3, max_message_chars=50, max_completion_tokens=8
    )
    app = create_app(
        settings.model_copy(update={"limits": limits}), engine=fake_engine, exit_on_engine_failure=False
    )
    with TestClient(app) as test_client:
        wait_ready(test_client)
        yield test_client


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ({"messages": USER * 4}, "messages", "too_many_messages"),
        ({"messages": [{"role": "user", "content": "x" * 51}]}, "messages[0].content", "string_too_long"),
        ({"messages": USER, "max_tokens": 9}, "max_tokens", "max_tokens_too_large"),
        ({"messages": USER, "max_completion_tokens": 9}, "max_completion_tokens", "max_tokens_too_large"),
    ],
)
def test_request_caps_are_refused_before_the_engine(
    capped: TestClient, fake_engine, body, param, code
) -> None:
    response = capped.post("/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["param"], error["code"], error["type"]) == (param, code, "invalid_request_error")
    assert fake_engine.requests == []


def test_default_max_tokens_is_the_cap(capped: TestClient, fake_engine) -> None:
    body = {"messages": USER, "ignore_eos": True}
    assert capped.post("/v1/chat/completions", json=body).json()["usage"]["completion_tokens"] == 8


def test_oversized_bodies_get_413(capped: TestClient, fake_engine) -> None:
    big = json.dumps({"messages": [{"role": "user", "content": "x" * 4000}]})
    declared = capped.post("/v1/chat/completions", content=big, headers={"content-type": "application/json"})
    assert declared.status_code == 413
    assert declared.json()["error"]["code"] == "request_too_large"

    def chunks():  # no Content-Length: the cap applies to the bytes read
        for _ in range(10):
            yield b" " * 300

    chunked = capped.post("/v1/feedback", content=chunks(), headers={"content-type": "application/json"})
    assert chunked.status_code == 413 and chunked.json()["error"]["type"] == "invalid_request_error"
    small = json.dumps({"messages": USER, "max_tokens": 2}).encode()
    ok = capped.post(
        "/v1/chat/completions",
        content=iter([small[:10], small[10:]]),
        headers={"content-type": "application/json"},
    )
    assert ok.status_code == 200, ok.text
    assert len(fake_engine.requests) == 1


def test_an_engine_that_dies_after_start_turns_readiness_off(settings) -> None:
    engine = FakeEngine()
    with TestClient(create_app(settings, engine=engine, exit_on_engine_failure=False)) as client:
        wait_ready(client)
        engine.crash()
        deadline = time.monotonic() + 5
        while client.get("/readyz").json()["status"] != "failed" and time.monotonic() < deadline:
            time.sleep(0.05)
        ready = client.get("/readyz")
        assert ready.status_code == 503 and "stopped serving" in ready.json()["detail"]
        chat = client.post("/v1/chat/completions", json={"messages": USER})
        assert chat.status_code == 503 and chat.json()["error"]["code"] == "engine_not_ready"


def test_text_completions_and_the_tokenizer_routes(client: TestClient, fake_engine: FakeEngine) -> None:
    completion = client.post("/v1/completions", json={"prompt": "The capital of France is", "max_tokens": 3})
    assert completion.status_code == 200, completion.text
    body = completion.json()
    assert body["object"] == "text_completion" and body["model"] == "fake-base"
    assert body["choices"][0]["text"].startswith("echo") and body["usage"]["completion_tokens"] == 3

    tokens = client.post("/tokenize", json={"prompt": "hello world"}).json()
    assert tokens["count"] == len(tokens["tokens"]) == 2
    assert client.post("/detokenize", json={"tokens": tokens["tokens"]}).json()["prompt"] == "hello world"
    chat = client.post("/tokenize", json={"messages": USER}).json()
    # The chat template around the message: more tokens than the text alone.
    assert chat["count"] > 2
    assert client.post("/tokenize", json={"prompt": "x", "model": "nope"}).status_code == 404


def test_response_fields_follow_openai(client: TestClient) -> None:
    body = client.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 2}).json()
    message = body["choices"][0]["message"]
    assert message["refusal"] is None and message["role"] == "assistant"
    assert body["choices"][0]["logprobs"] is None
    error = client.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 10**6}).json()["error"]
    assert isinstance(error["code"], str)
