"""The conversation log behind the real server: vLLM log-probabilities, aborts, ratings, pairs."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.conftest import LiveServer
from tests.utils.db import wait_for_rows

pytestmark = pytest.mark.engine

PROMPT = [{"role": "user", "content": "What is the capital of France?"}]


def test_completion_row_carries_engine_confidence(live_server: LiveServer) -> None:
    client = openai.OpenAI(base_url=f"{live_server.url}/v1", api_key="unused", max_retries=0)
    reply = client.chat.completions.create(
        model="loopchat", messages=PROMPT, temperature=0, max_tokens=12, user="integration-user"
    )
    rows = wait_for_rows(live_server.database_url, "SELECT * FROM completion WHERE id = :i", 1, i=reply.id)
    row = rows[0]
    assert row["response"] == reply.choices[0].message.content
    assert row["completion_tokens"] == reply.usage.completion_tokens
    assert row["prompt_tokens"] == reply.usage.prompt_tokens
    # Log-probabilities of the sampled tokens, from vLLM: negative, the minimum below the mean.
    assert row["logprob_mean"] is not None and row["logprob_mean"] <= 0
    assert row["logprob_min"] <= row["logprob_mean"]
    assert 0 < row["ttft_ms"] <= row["latency_ms"]
    assert row["user_key"] == "integration-user"

    rated = httpx.post(
        f"{live_server.url}/v1/feedback",
        json={"completion_id": reply.id, "rating": "up", "user": "integration-user"},
        timeout=30,
    )
    assert rated.status_code == 200, rated.text
    stored = wait_for_rows(
        live_server.database_url,
        "SELECT thumb FROM rating WHERE completion_id = :i",
        1,
        timeout=0,
        i=reply.id,
    )
    assert stored[0]["thumb"] == "up"


def test_disconnected_stream_is_logged_as_aborted(live_server: LiveServer) -> None:
    body = {"messages": PROMPT, "max_tokens": 1500, "ignore_eos": True, "stream": True}
    with (
        httpx.Client(timeout=60) as http,
        http.stream("POST", f"{live_server.url}/v1/chat/completions", json=body) as response,
    ):
        completion_id = response.headers["x-loopchat-completion-id"]
        lines = response.iter_lines()
        chunks = 0
        for line in lines:
            chunks += line.startswith("data: ")
            if chunks >= 4:
                break
        lines.close()
    rows = wait_for_rows(
        live_server.database_url, "SELECT * FROM completion WHERE id = :i", 1, timeout=30, i=completion_id
    )
    assert rows, "the aborted completion was not logged"
    assert rows[0]["finish_reason"] == "abort"
    assert 0 < rows[0]["completion_tokens"] < 1500
    assert rows[0]["error"] is None


def test_side_by_side_on_the_real_engine(live_server: LiveServer) -> None:
    pair = httpx.post(
        f"{live_server.url}/v1/chat/compare",
        json={"messages": PROMPT, "max_tokens": 8, "temperature": 1.0, "user": "pair-user"},
        timeout=120,
    )
    assert pair.status_code == 200, pair.text
    first, second = pair.json()["completions"]
    chosen = httpx.post(
        f"{live_server.url}/v1/feedback/preference",
        json={
            "chosen_completion_id": first["id"],
            "rejected_completion_id": second["id"],
            "user": "pair-user",
        },
        timeout=30,
    )
    assert chosen.status_code == 200, chosen.text
    rows = wait_for_rows(
        live_server.database_url,
        "SELECT pair_id FROM completion WHERE id IN (:a, :b)",
        2,
        a=first["id"],
        b=second["id"],
    )
    assert {r["pair_id"] for r in rows} == {pair.json()["id"]}


def test_a_seeded_side_by_side_pair_is_reproducible_and_its_answers_differ(live_server: LiveServer) -> None:
    base = "SmolLM2-135M-Instruct"
    ask = {"messages": PROMPT, "max_tokens": 12, "temperature": 1.0, "models": [base, base], "seed": 7}

    def answers() -> list[str]:
        pair = httpx.post(f"{live_server.url}/v1/chat/compare", json=ask, timeout=120)
        assert pair.status_code == 200, pair.text
        return sorted(c["choices"][0]["message"]["content"] for c in pair.json()["completions"])

    first = answers()
    # One version, two seeds: two answers; the same seed again: the same two.
    assert first[0] != first[1] and answers() == first
