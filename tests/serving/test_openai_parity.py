"""loopchat against vLLM's own OpenAI server on the embedded model, side by side, under greedy
decoding: every chat and completion parameter gives the same answer (same text, same tool call,
same log-probabilities within float tolerance), through the official `openai` client, streamed
and whole.

vLLM's server is started as its users start it for these features: the model folder (whose chat
template renders tools), the tool-call parser (`--enable-auto-tool-choice --tool-call-parser
hermes`), and float32 as loopchat runs on CPUs; everything else is vLLM's default.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from loopchat.local_server import ServerProcess, free_port
from tests.conftest import LiveServer

pytestmark = pytest.mark.engine

ORDER = [{"role": "user", "content": "Where is my order 42?"}]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "lookup_order",
            "description": "Find an order by its id",
            "parameters": {
                "type": "object",
                "properties": {"order_id": {"type": "string"}},
                "required": ["order_id"],
            },
        },
    }
]
SCHEMA = {
    "type": "object",
    "properties": {"order_id": {"type": "string"}, "urgent": {"type": "boolean"}},
    "required": ["order_id", "urgent"],
    "additionalProperties": False,
}
TOOL_TURN = [
    *ORDER,
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call-1",
                "type": "function",
                "function": {"name": "lookup_order", "arguments": '{"order_id": "42"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call-1", "content": "Shipped on Monday, arriving Thursday."},
]

# name -> chat request parameters (each also gets temperature 0 and a token limit)
CHAT_CASES: dict[str, dict[str, Any]] = {
    "plain": {"messages": ORDER},
    # vLLM refuses n > 1 under greedy decoding: seeded sampling gives both servers the same draws.
    "n": {"messages": ORDER, "n": 2, "temperature": 0.8, "seed": 7},
    "logprobs": {"messages": ORDER, "logprobs": True, "top_logprobs": 2},
    "penalties": {"messages": ORDER, "frequency_penalty": 1.5, "presence_penalty": 1.0},
    "logit_bias": {"messages": ORDER, "logit_bias": {"57": -100, "504": 5}},
    "stop_token_ids": {"messages": ORDER, "extra_body": {"stop_token_ids": [30]}},
    "json_object": {"messages": ORDER, "response_format": {"type": "json_object"}},
    "json_schema": {
        "messages": ORDER,
        "response_format": {"type": "json_schema", "json_schema": {"name": "order", "schema": SCHEMA}},
    },
    "tools_none": {"messages": ORDER, "tools": TOOLS, "tool_choice": "none"},
    "tools_auto": {"messages": ORDER, "tools": TOOLS, "tool_choice": "auto"},
    # The embedded model writes long arguments: room for the whole call.
    "tools_required": {"messages": ORDER, "tools": TOOLS, "tool_choice": "required", "max_tokens": 200},
    "tools_named": {
        "max_tokens": 200,
        "messages": ORDER,
        "tools": TOOLS,
        "tool_choice": {"type": "function", "function": {"name": "lookup_order"}},
    },
    "tool_result": {"messages": TOOL_TURN, "tools": TOOLS},
}


@pytest.fixture(scope="module")
def vllm_server(base_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    log = tmp_path_factory.mktemp("vllm-server") / "vllm.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOOPCHAT_")}  # vLLM as users run it
    env.update(VLLM_CPU_KVCACHE_SPACE="1", HF_HUB_OFFLINE="1", VLLM_NO_USAGE_STATS="1")
    command = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(base_model_path),
        "--served-model-name",
        "loopchat",
        "--enable-auto-tool-choice",
        "--tool-call-parser",
        "hermes",
        "--dtype",
        "float32",
        "--enforce-eager",  # the engine loopchat runs in the suite (conftest)
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    server = ServerProcess(command, log_path=log, env=env, name="vllm").start()
    try:
        server.wait_ready(f"http://127.0.0.1:{port}/health", timeout=400)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


def _whole(client: openai.OpenAI, params: dict[str, Any]) -> list[dict[str, Any]]:
    response = client.chat.completions.create(
        **{"model": "loopchat", "temperature": 0, "max_tokens": 48, **params}
    )
    return [
        _normal(choice.message.content, choice.message.tool_calls, choice.logprobs)
        for choice in response.choices
    ]


def _streamed(client: openai.OpenAI, params: dict[str, Any]) -> list[dict[str, Any]]:
    stream = client.chat.completions.create(
        **{"model": "loopchat", "temperature": 0, "max_tokens": 48, "stream": True, **params}
    )
    content: dict[int, str] = {}
    calls: dict[int, dict[int, dict[str, str]]] = {}
    logprobs: dict[int, list[Any]] = {}
    for chunk in stream:
        for choice in chunk.choices:
            delta = choice.delta
            if delta.content:
                content[choice.index] = content.get(choice.index, "") + delta.content
            for call in delta.tool_calls or ():
                entry = calls.setdefault(choice.index, {}).setdefault(
                    call.index, {"name": "", "arguments": ""}
                )
                if call.function and call.function.name:
                    entry["name"] += call.function.name
                if call.function and call.function.arguments:
                    entry["arguments"] += call.function.arguments
            if choice.logprobs and choice.logprobs.content:
                logprobs.setdefault(choice.index, []).extend(choice.logprobs.content)
    indexes = sorted(set(content) | set(calls) | set(logprobs))
    return [
        {
            "content": content.get(i) or None,
            "tool_calls": [calls[i][k] for k in sorted(calls.get(i, {}))],
            "logprobs": [
                (t.token, t.logprob, [(x.token, x.logprob) for x in t.top_logprobs])
                for t in logprobs.get(i, [])
            ],
        }
        for i in indexes
    ]


def _normal(content: str | None, tool_calls: Any, logprobs: Any) -> dict[str, Any]:
    return {
        "content": content or None,
        "tool_calls": [
            {"name": c.function.name, "arguments": c.function.arguments} for c in tool_calls or ()
        ],
        "logprobs": [
            (t.token, t.logprob, [(x.token, x.logprob) for x in t.top_logprobs])
            for t in (logprobs.content if logprobs and logprobs.content else [])
        ],
    }


def _assert_same(ours: list[dict[str, Any]], theirs: list[dict[str, Any]], case: str) -> None:
    assert len(ours) == len(theirs), case
    for mine, peer in zip(ours, theirs, strict=True):
        assert mine["content"] == peer["content"], case
        assert mine["tool_calls"] == peer["tool_calls"], case
        assert len(mine["logprobs"]) == len(peer["logprobs"]), case
        for (token, value, top), (peer_token, peer_value, peer_top) in zip(
            mine["logprobs"], peer["logprobs"], strict=True
        ):
            assert token == peer_token and abs(value - peer_value) < 1e-3, case
            assert [t for t, _ in top] == [t for t, _ in peer_top], case


@pytest.mark.parametrize("case", list(CHAT_CASES))
def test_chat_parameters_answer_as_vllms_own_server(
    case: str, live_server: LiveServer, vllm_server: str
) -> None:
    params = CHAT_CASES[case]
    ours, theirs = _client(live_server.url), _client(vllm_server)
    expected = _whole(theirs, params)
    whole = _whole(ours, params)
    _assert_same(whole, expected, case)
    streamed = _streamed(ours, params)
    _assert_same(streamed, _streamed(theirs, params), f"{case} (streamed)")
    if case == "n":
        assert len(whole) == 2
    if case == "logprobs":
        assert whole[0]["logprobs"] and all(len(top) == 2 for _, _, top in whole[0]["logprobs"])
    if case == "json_schema":
        answer = json.loads(whole[0]["content"])
        assert set(answer) == {"order_id", "urgent"} and isinstance(answer["urgent"], bool)
    if case in ("tools_required", "tools_named"):
        [call] = whole[0]["tool_calls"]
        assert call["name"] == "lookup_order" and isinstance(json.loads(call["arguments"]), dict)


def test_completions_and_tokenizer_routes_answer_as_vllms_own_server(
    live_server: LiveServer, vllm_server: str
) -> None:
    texts = []
    for url in (live_server.url, vllm_server):
        completion = _client(url).completions.create(
            model="loopchat", prompt="The capital of France is", max_tokens=12, temperature=0, logprobs=2
        )
        texts.append((completion.choices[0].text, completion.choices[0].logprobs.tokens))
    assert texts[0] == texts[1] and texts[0][0]

    answers = []
    for url in (live_server.url, vllm_server):
        tokens = httpx.post(
            f"{url}/tokenize", json={"model": "loopchat", "messages": ORDER}, timeout=30
        ).json()
        text = httpx.post(
            f"{url}/detokenize", json={"model": "loopchat", "tokens": tokens["tokens"]}, timeout=30
        )
        answers.append((tokens["tokens"], tokens["count"], text.json()["prompt"]))
    assert answers[0] == answers[1] and "order 42" in answers[0][2]
