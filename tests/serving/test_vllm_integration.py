"""The real vLLM engine on the embedded model, through `loopchat serve` (one server per session)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import LiveServer
from tests.utils.adapters import make_lora_adapter

pytestmark = pytest.mark.engine

PROMPT = [{"role": "user", "content": "Name three colors of the rainbow."}]


@pytest.fixture(scope="module")
def client(live_server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live_server.url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def lora_adapter(base_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_lora_adapter(base_model_path, tmp_path_factory.mktemp("lora") / "v1", rank=8, seed=1)


def _stream_text(client: openai.OpenAI, **kwargs) -> tuple[str, object]:
    stream = client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs)
    text, usage = "", None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
        if chunk.usage is not None:
            usage = chunk.usage
    return text, usage


def test_openai_client_streamed_equals_whole_under_greedy(client: openai.OpenAI) -> None:
    kwargs = dict(model="loopchat", messages=PROMPT, temperature=0, max_tokens=40)
    whole = client.chat.completions.create(**kwargs)
    assert whole.id.startswith("chatcmpl-")
    assert whole.choices[0].finish_reason in ("stop", "length")
    text = whole.choices[0].message.content
    assert text and len(text.split()) >= 2
    assert whole.usage.completion_tokens > 0 and whole.usage.prompt_tokens > 0

    streamed, usage = _stream_text(client, **kwargs)
    assert streamed == text
    assert usage.completion_tokens == whole.usage.completion_tokens


def test_headers_name_the_version_and_conversation(live_server: LiveServer) -> None:
    response = httpx.post(
        f"{live_server.url}/v1/chat/completions",
        json={"messages": PROMPT, "max_tokens": 4, "metadata": {"conversation_id": "conv-test-1"}},
        timeout=60,
    )
    assert response.status_code == 200
    assert response.headers["x-loopchat-model-version"] == "SmolLM2-135M-Instruct"
    assert response.headers["x-loopchat-conversation-id"] == "conv-test-1"
    assert response.headers["x-loopchat-completion-id"] == response.json()["id"]


def test_stop_sequence_and_length_finish(client: openai.OpenAI) -> None:
    capped = client.chat.completions.create(model="loopchat", messages=PROMPT, temperature=0, max_tokens=3)
    assert capped.choices[0].finish_reason == "length"
    assert capped.usage.completion_tokens == 3
    whole = client.chat.completions.create(model="loopchat", messages=PROMPT, temperature=0, max_tokens=40)
    words = whole.choices[0].message.content.split()
    stopped = client.chat.completions.create(
        model="loopchat", messages=PROMPT, temperature=0, max_tokens=40, stop=[words[1]]
    )
    assert stopped.choices[0].finish_reason == "stop"
    assert words[1] not in stopped.choices[0].message.content


def test_seeded_sampling_is_reproducible(client: openai.OpenAI) -> None:
    kwargs = dict(model="loopchat", messages=PROMPT, temperature=1.0, max_tokens=24, seed=1234)
    first = client.chat.completions.create(**kwargs).choices[0].message.content
    second = client.chat.completions.create(**kwargs).choices[0].message.content
    assert first == second


def test_models_list_on_real_engine(client: openai.OpenAI) -> None:
    models = client.models.list().data
    assert models[0].id == "SmolLM2-135M-Instruct"


def test_errors_from_the_real_engine(client: openai.OpenAI, live_server: LiveServer) -> None:
    with pytest.raises(openai.NotFoundError) as not_found:
        client.chat.completions.create(model="no-such-version", messages=PROMPT)
    assert not_found.value.body["code"] == "model_not_found"

    too_long = [{"role": "user", "content": "hello " * 3000}]
    with pytest.raises(openai.BadRequestError) as long_prompt:
        client.chat.completions.create(model="loopchat", messages=too_long, max_tokens=5)
    assert long_prompt.value.body["code"] == "context_length_exceeded"

    with pytest.raises(openai.BadRequestError) as too_many:
        client.chat.completions.create(model="loopchat", messages=PROMPT, max_tokens=5000)
    assert too_many.value.body["param"] == "max_tokens"

    # (A role of the client's own, such as "wizard", vLLM's server passes to the chat template.)
    for bad in ([], [{"role": "user", "content": 3}], [{"role": "user", "content": [{"type": "nope"}]}]):
        response = httpx.post(f"{live_server.url}/v1/chat/completions", json={"messages": bad}, timeout=30)
        assert response.status_code == 400
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    # The engine still serves after all of that.
    assert client.chat.completions.create(model="loopchat", messages=PROMPT, max_tokens=2).choices


def _hf_peft_greedy(base_model_path: Path, adapter: Path | None, prompt_ids: list[int], n: int) -> list[int]:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_model_path, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=n, do_sample=False, pad_token_id=2)
    return out[0, len(prompt_ids) :].tolist()


def _register(server: LiveServer, name: str, path: Path) -> httpx.Response:
    """POST /admin/adapters: the adapter registered and loaded as version `name`."""
    return httpx.post(
        f"{server.url}/admin/adapters",
        json={"name": name, "path": str(path)},
        headers=server.admin_headers,
        timeout=120,
    )


def _lora_slots(server: LiveServer) -> int:
    metrics = httpx.get(f"{server.url}/metrics", timeout=30).text
    line = next(line for line in metrics.splitlines() if line.startswith("loopchat_engine_lora_slots"))
    return int(float(line.split()[-1]))


def test_lora_adapter_load_changes_output_and_matches_peft(
    live_server: LiveServer, client: openai.OpenAI, lora_adapter: Path, base_model_path: Path
) -> None:
    from transformers import AutoTokenizer

    loaded = _register(live_server, "lora-v1", lora_adapter)
    assert loaded.status_code == 201, loaded.text
    listed = {m.id: m for m in client.models.list().data}
    assert listed["lora-v1"].model_extra["parent"] == "SmolLM2-135M-Instruct"

    n = 24
    kwargs = dict(messages=PROMPT, temperature=0, max_tokens=n)
    base = client.chat.completions.create(model="SmolLM2-135M-Instruct", **kwargs)
    # Registered, not yet used: the engine still runs without LoRA.
    assert _lora_slots(live_server) == 0
    # A long answer of the base model runs while the first request for the adapter has an engine
    # with LoRA built beside this one and swapped in: it ends on the engine it started on.
    long_answer: list[openai.types.chat.ChatCompletion] = []
    streaming = threading.Thread(
        target=lambda: long_answer.append(
            client.chat.completions.create(
                model="SmolLM2-135M-Instruct",
                messages=PROMPT,
                temperature=0,
                max_tokens=400,
                extra_body={"ignore_eos": True},
            )
        )
    )
    streaming.start()
    time.sleep(0.5)
    adapted = client.chat.completions.create(model="lora-v1", **kwargs)
    streaming.join(timeout=300)
    assert long_answer and long_answer[0].usage.completion_tokens == 400
    assert long_answer[0].choices[0].finish_reason == "length"
    assert _lora_slots(live_server) == 2  # the adapter and the spare slot
    # With loopchat's grouped CPU LoRA ops (serving/engine/cpu_lora.py), checked against peft below.
    assert "Using GroupedPunicaWrapperCPU" in live_server.log.read_text()
    base_text, lora_text = base.choices[0].message.content, adapted.choices[0].message.content
    assert lora_text != base_text
    # The base model answers the same on the new engine.
    again_base = client.chat.completions.create(model="SmolLM2-135M-Instruct", **kwargs)
    assert again_base.choices[0].message.content == base_text

    tokenizer = AutoTokenizer.from_pretrained(base_model_path)
    prompt_ids = tokenizer.apply_chat_template(
        PROMPT, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    expected = _hf_peft_greedy(base_model_path, lora_adapter, list(prompt_ids), n)
    assert lora_text == tokenizer.decode(expected, skip_special_tokens=True)

    # Unload at runtime: the version disappears and requests for it get 404.
    assert (
        httpx.delete(
            f"{live_server.url}/admin/adapters/lora-v1", headers=live_server.admin_headers, timeout=60
        ).status_code
        == 204
    )
    assert "lora-v1" not in {m.id for m in client.models.list().data}
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="lora-v1", **kwargs)
    # ...and loading it again serves the same output.
    assert _register(live_server, "lora-v1", lora_adapter).status_code == 201
    again = client.chat.completions.create(model="lora-v1", **kwargs)
    assert again.choices[0].message.content == lora_text


def test_bad_adapter_is_refused_and_nothing_changes(live_server: LiveServer, tmp_path: Path) -> None:
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 8}')
    assert _register(live_server, "broken", tmp_path).status_code == 400
    names = [m["id"] for m in httpx.get(f"{live_server.url}/v1/models").json()["data"]]
    assert "broken" not in names


def _wait_engine_idle(live_server: LiveServer, timeout: float = 15.0) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if live_server.metric("loopchat_engine_unfinished_requests") == 0:
            return live_server.metric("loopchat_chat_inflight_requests")
        time.sleep(0.2)
    raise AssertionError("engine still holds the request after the client left")


def test_client_disconnect_mid_stream_aborts_engine_request(live_server: LiveServer) -> None:
    body = {"messages": PROMPT, "max_tokens": 1500, "ignore_eos": True, "stream": True}
    with (
        httpx.Client(timeout=60) as http,
        http.stream("POST", f"{live_server.url}/v1/chat/completions", json=body) as response,
    ):
        chunks = 0
        lines = response.iter_lines()
        for line in lines:
            chunks += line.startswith("data: ")
            if chunks >= 4:
                break
        assert live_server.metric("loopchat_engine_unfinished_requests") >= 1
        # Closing the response drops the connection mid-stream.
        lines.close()
    # 1500 tokens take minutes on this CPU; an abort frees the engine within seconds.
    assert _wait_engine_idle(live_server) == 0
    before = live_server.metric(
        'loopchat_chat_requests_total{finish_reason="abort",model_version="SmolLM2-135M-Instruct",variant="none"}'
    )
    assert before >= 1


def test_client_disconnect_while_waiting_for_whole_answer(live_server: LiveServer) -> None:
    body = {"messages": PROMPT, "max_tokens": 1500, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{live_server.url}/v1/chat/completions", json=body, timeout=httpx.Timeout(60, read=3))
    assert _wait_engine_idle(live_server) == 0


def test_ab_experiment_on_the_real_engine(
    live_server: LiveServer, base_model_path: Path, tmp_path: Path
) -> None:
    """A version registered at runtime joins a 50/50 experiment: users split, answers differ by
    variant, each answer is logged with what served it; the rollback sends everyone back."""
    import sqlalchemy

    # Larger weights than peft would train: the two variants must answer visibly apart.
    adapter = make_lora_adapter(base_model_path, tmp_path / "ab-v2", rank=8, seed=2, std=0.08)
    admin, url = live_server.admin_headers, live_server.url
    body = {"name": "ab-v2", "path": str(adapter)}
    registered = httpx.post(f"{url}/admin/adapters", json=body, headers=admin, timeout=120)
    assert registered.status_code == 201, registered.text
    spec = {
        "name": "real-ab",
        "variants": [{"name": "cand", "version": "ab-v2", "weight": 50}],
        "auto": False,
    }
    assert httpx.post(f"{url}/admin/experiments", json=spec, headers=admin, timeout=30).status_code == 201
    try:
        answers: dict[str, set[str]] = {"control": set(), "cand": set()}
        served: dict[str, str] = {}
        for i in range(16):
            response = httpx.post(
                f"{url}/v1/chat/completions",
                json={"messages": PROMPT, "max_tokens": 12, "temperature": 0, "user": f"real-user-{i}"},
                timeout=120,
            )
            assert response.status_code == 200, response.text
            variant = response.headers["x-loopchat-variant"]
            assert response.headers["x-loopchat-model-version"] == (
                "ab-v2" if variant == "cand" else "SmolLM2-135M-Instruct"
            )
            answers[variant].add(response.json()["choices"][0]["message"]["content"])
            served[response.headers["x-loopchat-completion-id"]] = variant
        # Greedy decoding: one answer per variant, and the two variants answer differently.
        assert len(answers["control"]) == 1 and len(answers["cand"]) == 1
        assert answers["control"] != answers["cand"]
        engine = sqlalchemy.create_engine(live_server.database_url)
        deadline = time.monotonic() + 10
        while True:
            with engine.connect() as connection:
                logged = dict(
                    connection.execute(
                        sqlalchemy.text("SELECT id, variant FROM completion WHERE experiment = 'real-ab'")
                    ).all()
                )
            if len(logged) >= len(served) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        engine.dispose()
        assert {k: logged.get(k) for k in served} == served
    finally:
        rolled = httpx.post(f"{url}/admin/experiments/real-ab/rollback", json={}, headers=admin, timeout=30)
        assert rolled.status_code == 200
    body = {"messages": PROMPT, "max_tokens": 2, "user": "real-user-0"}
    after = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
    assert after.headers["x-loopchat-model-version"] == "SmolLM2-135M-Instruct"
    assert "ab-v2" not in {m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]}


def test_promotion_merges_the_version_and_every_version_answers_as_peft(
    live_server: LiveServer, base_model_path: Path, tmp_path: Path
) -> None:
    """Activating a version folds it into the engine's weights while streams are in flight (none
    fails); then the promoted version, the base and another version each answer, greedily, what
    transformers+peft answer for that version on the base weights."""
    import concurrent.futures

    from transformers import AutoTokenizer

    url, admin = live_server.url, live_server.admin_headers
    adapters = {
        name: make_lora_adapter(base_model_path, tmp_path / name, rank=8, seed=seed, std=0.05)
        for name, seed in (("merge-a", 3), ("merge-b", 4))
    }
    for name, path in adapters.items():
        body = {"name": name, "path": str(path)}
        assert httpx.post(f"{url}/admin/adapters", json=body, headers=admin, timeout=120).status_code == 201
    tokenizer = AutoTokenizer.from_pretrained(base_model_path)
    prompt_ids = list(
        tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=True, return_dict=False)
    )
    n = 16
    expected = {
        name: tokenizer.decode(
            _hf_peft_greedy(base_model_path, path, prompt_ids, n), skip_special_tokens=True
        )
        for name, path in {"SmolLM2-135M-Instruct": None, **adapters}.items()
    }

    def answer(model: str, max_tokens: int = n) -> tuple[str, str]:
        body = {"model": model, "messages": PROMPT, "temperature": 0, "max_tokens": max_tokens}
        response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=300)
        assert response.status_code == 200, response.text
        return response.headers["x-loopchat-model-version"], response.json()["choices"][0]["message"][
            "content"
        ]

    def stream(i: int) -> int:
        body = {
            "messages": PROMPT,
            "max_tokens": 48,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
            "user": f"merge-user-{i}",
        }
        tokens = 0
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=300) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    chunk = json.loads(line[6:])
                    assert "error" not in chunk, chunk
                    tokens = (chunk.get("usage") or {}).get("completion_tokens", tokens)
        return tokens

    try:
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            streams = [pool.submit(stream, i) for i in range(6)]
            time.sleep(1.0)
            switched = httpx.put(f"{url}/admin/active", json={"name": "merge-a"}, headers=admin, timeout=600)
            assert switched.status_code == 200, switched.text
            assert switched.json()["live"] == "merge-a"
            assert [future.result() for future in streams] == [48] * 6
        for name, text in expected.items():
            assert answer(name) == (name, text)
        assert answer("loopchat") == ("merge-a", expected["merge-a"])
    finally:
        back = httpx.put(
            f"{url}/admin/active", json={"name": "SmolLM2-135M-Instruct"}, headers=admin, timeout=600
        )
        assert back.status_code == 200 and back.json()["live"] == "SmolLM2-135M-Instruct"
        for name in adapters:
            httpx.delete(f"{url}/admin/adapters/{name}", headers=admin, timeout=60)
    assert answer("loopchat") == ("SmolLM2-135M-Instruct", expected["SmolLM2-135M-Instruct"])


def test_a_compiled_engine_serves_an_adapter_as_peft_does(
    base_model_path: Path, lora_adapter: Path, tmp_path: Path
) -> None:
    """As `make run` serves on CPU: compiled, also with LoRA (the grouped ops are custom ops the
    trace keeps as calls), and restarted from torch's inductor cache instead of compiling again."""
    from transformers import AutoTokenizer

    from tests.conftest import start_server

    server = start_server(tmp_path, base_model_path, LOOPCHAT_ENGINE__ENFORCE_EAGER="false")
    try:
        loaded = _register(server, "lora-v1", lora_adapter)
        assert loaded.status_code == 201, loaded.text
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=600)
        n = 24
        adapted = client.chat.completions.create(
            model="lora-v1", messages=PROMPT, temperature=0, max_tokens=n
        )
        assert _lora_slots(server) == 2
        log = server.log.read_text()
    finally:
        server.stop()
    # loopchat's own log line: what vLLM's engine processes log depends on its logging settings.
    engines = [line for line in log.splitlines() if "engine ready:" in line]
    assert len(engines) == 2 and all("compilation DYNAMO_TRACE_ONCE" in line for line in engines)
    assert "LoRA 2 x rank 8" in engines[1]
    tokenizer = AutoTokenizer.from_pretrained(base_model_path)
    prompt_ids = tokenizer.apply_chat_template(
        PROMPT, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    expected = _hf_peft_greedy(base_model_path, lora_adapter, list(prompt_ids), n)
    assert adapted.choices[0].message.content == tokenizer.decode(expected, skip_special_tokens=True)
