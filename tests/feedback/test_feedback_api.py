"""The conversation log and the feedback API on the fake engine, on SQLite and on PostgreSQL."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from feedback.redact import Redactor
from loopchat.settings import Settings
from tests.utils.db import wait_for_rows

CHAT = {"messages": [{"role": "user", "content": "hello there"}], "max_tokens": 4, "user": "alice"}


def chat(client: TestClient, **overrides) -> dict:
    response = client.post("/v1/chat/completions", json={**CHAT, **overrides})
    assert response.status_code == 200, response.text
    body = response.json()
    body["_conversation"] = response.headers["x-loopchat-conversation-id"]
    return body


def completion_row(url: str, completion_id: str) -> dict:
    rows = wait_for_rows(url, "SELECT * FROM completion WHERE id = :id", 1, id=completion_id)
    assert rows, f"completion {completion_id} was never written"
    return dict(rows[0])


def test_completion_is_logged_with_what_served_it(db_client: TestClient, db_settings: Settings):
    body = chat(db_client, temperature=0.5, seed=7, stop=["zzz"])
    row = completion_row(db_settings.db_url, body["id"])
    assert row["conversation_id"] == body["_conversation"]
    assert row["user_key"] == "alice"
    assert row["model_version"] == "fake-base"
    assert (row["experiment"], row["variant"], row["pair_id"]) == ("", "", None)
    messages = row["messages"] if isinstance(row["messages"], list) else json.loads(row["messages"])
    assert messages == [{"role": "user", "content": "hello there"}]
    # Stored as sent, but for PII the default policy replaces before storage.
    assert row["response"] == Redactor().redact(body["choices"][0]["message"]["content"])
    sampling = row["sampling"] if isinstance(row["sampling"], dict) else json.loads(row["sampling"])
    assert sampling["temperature"] == 0.5 and sampling["seed"] == 7 and sampling["stop"] == ["zzz"]
    assert sampling["max_tokens"] == 4
    assert row["prompt_tokens"] == body["usage"]["prompt_tokens"]
    assert row["completion_tokens"] == body["usage"]["completion_tokens"] == 4
    assert row["finish_reason"] == "length"
    assert row["latency_ms"] >= row["ttft_ms"] >= 0
    # The fake engine gives token i the log-probability -0.1 * i.
    assert row["logprob_mean"] == pytest.approx(-0.25)
    assert row["logprob_min"] == pytest.approx(-0.4)
    assert row["error"] is None
    conversation = wait_for_rows(
        db_settings.db_url, "SELECT * FROM conversation WHERE id = :id", 1, id=body["_conversation"]
    )
    assert conversation[0]["user_key"] == "alice"


def test_streamed_completion_is_logged(db_client: TestClient, db_settings: Settings):
    with db_client.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}) as response:
        completion_id = response.headers["x-loopchat-completion-id"]
        text = "".join(response.iter_text())
    assert "[DONE]" in text
    row = completion_row(db_settings.db_url, completion_id)
    assert row["finish_reason"] == "length" and row["completion_tokens"] == 4


def test_engine_fault_is_logged_with_its_error(db_client: TestClient, db_settings: Settings, fake_engine):
    fake_engine.fail_with = RuntimeError("device lost")
    # Same running app, but answer 500 instead of re-raising the fault in the test.
    client = TestClient(db_client.app, raise_server_exceptions=False)
    response = client.post("/v1/chat/completions", json=CHAT)
    assert response.status_code == 500
    assert response.json()["error"]["message"] == "internal server error"
    rows = wait_for_rows(db_settings.db_url, "SELECT * FROM completion", 1)
    assert rows[0]["error"] == "RuntimeError: device lost"
    # A whole (not streamed) answer reaches the log only at its end: no token of it was counted.
    assert rows[0]["finish_reason"] == "abort" and rows[0]["completion_tokens"] == 0


def test_conversation_continues_through_metadata(db_client: TestClient, db_settings: Settings):
    first = chat(db_client)
    second = chat(
        db_client,
        messages=[
            {"role": "user", "content": "hello there"},
            {"role": "assistant", "content": first["choices"][0]["message"]["content"]},
            {"role": "user", "content": "and again"},
        ],
        metadata={"conversation_id": first["_conversation"]},
    )
    assert second["_conversation"] == first["_conversation"]
    rows = wait_for_rows(
        db_settings.db_url,
        "SELECT id FROM completion WHERE conversation_id = :c",
        2,
        c=first["_conversation"],
    )
    assert {r["id"] for r in rows} == {first["id"], second["id"]}
    conversations = wait_for_rows(db_settings.db_url, "SELECT id FROM conversation", 1)
    assert len(conversations) == 1


def rate(client: TestClient, **body):
    return client.post("/v1/feedback", json=body)


def test_rating_is_stored_and_rerating_keeps_history(db_client: TestClient, db_settings: Settings):
    completion = chat(db_client)["id"]
    first = rate(db_client, completion_id=completion, rating="down", comment="too short", user="alice")
    assert first.status_code == 200, first.text
    assert first.json()["rating"] == "down" and first.json()["object"] == "feedback"
    # Stored on return: no polling needed for ratings.
    rows = wait_for_rows(db_settings.db_url, "SELECT * FROM rating", 1, timeout=0)
    assert rows[0]["thumb"] == "down" and rows[0]["comment"] == "too short"

    second = rate(
        db_client,
        completion_id=completion,
        rating="up",
        score=4,
        correction="A better answer.",
        tags=["helpful", "helpful", "tone"],
        user="alice",
    )
    assert second.status_code == 200, second.text
    rows = wait_for_rows(db_settings.db_url, "SELECT * FROM rating", 1, timeout=0)
    assert len(rows) == 1
    current = rows[0]
    assert (current["thumb"], current["score"], current["comment"]) == ("up", 4, None)
    assert current["correction"] == "A better answer."
    tags = current["tags"] if isinstance(current["tags"], list) else json.loads(current["tags"])
    assert tags == ["helpful", "tone"]
    history = wait_for_rows(
        db_settings.db_url, "SELECT thumb FROM rating_event ORDER BY created_at", 2, timeout=0
    )
    assert [h["thumb"] for h in history] == ["down", "up"]


def test_each_user_has_their_own_rating_of_an_anonymous_completion(db_client: TestClient, db_settings):
    completion = chat(db_client, user=None)["id"]
    assert rate(db_client, completion_id=completion, rating="up", user="bob").status_code == 200
    assert rate(db_client, completion_id=completion, rating="down").status_code == 200
    rows = wait_for_rows(db_settings.db_url, "SELECT user_key, thumb FROM rating ORDER BY user_key", 2)
    assert [(r["user_key"], r["thumb"]) for r in rows] == [("", "down"), ("bob", "up")]


def test_unknown_and_foreign_completions_are_404(db_client: TestClient, db_settings: Settings):
    completion = chat(db_client)["id"]  # alice's
    for body in (
        {"completion_id": "chatcmpl-doesnotexist", "rating": "up", "user": "alice"},
        {"completion_id": completion, "rating": "up", "user": "mallory"},
        {"completion_id": completion, "rating": "up"},
    ):
        response = rate(db_client, **body)
        assert response.status_code == 404, response.text
        error = response.json()["error"]
        assert error["code"] == "completion_not_found" and error["type"] == "not_found_error"
    assert wait_for_rows(db_settings.db_url, "SELECT * FROM rating", 1, timeout=0.3) == []


def test_rating_found_in_database_after_restart(db_settings: Settings, fake_engine):
    """A completion written by one process can be rated through another (no in-memory shortcut)."""
    from serving.app import create_app
    from tests.conftest import wait_ready

    with TestClient(create_app(db_settings, engine=fake_engine, exit_on_engine_failure=False)) as client:
        wait_ready(client)
        completion = chat(client)["id"]
    with TestClient(create_app(db_settings, engine=fake_engine, exit_on_engine_failure=False)) as client:
        wait_ready(client)
        assert rate(client, completion_id=completion, score=5, user="alice").status_code == 200
        assert rate(client, completion_id=completion, score=5, user="eve").status_code == 404


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"rating": "meh"}, "rating"),
        ({"score": 0}, "score"),
        ({"score": 6}, "score"),
        ({"score": 2.5}, "score"),
        ({}, None),
        ({"comment": "   "}, None),
        ({"rating": "up", "ratting": "up"}, "ratting"),
        ({"rating": "up", "tags": ["x" * 65]}, "tags[0]"),
        ({"rating": "up", "tags": [""]}, "tags[0]"),
        ({"rating": "up", "user": "u" * 257}, "user"),
        ({"comment": "c" * 2001}, "comment"),
        ({"correction": "c" * 8001}, "correction"),
        ({"rating": "up", "tags": [f"t{i}" for i in range(17)]}, "tags"),
    ],
)
def test_bad_feedback_is_400_and_stores_nothing(db_client: TestClient, db_settings, body, param):
    completion = chat(db_client)["id"]
    response = rate(db_client, **{"completion_id": completion, "user": "alice", **body})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert wait_for_rows(db_settings.db_url, "SELECT * FROM rating", 1, timeout=0.2) == []


@pytest.mark.parametrize("payload", ["not json", "[]", '{"completion_id": 5, "rating": "up"}'])
def test_malformed_feedback_bodies(db_client: TestClient, payload: str):
    response = db_client.post("/v1/feedback", content=payload, headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_side_by_side_and_preference(db_client: TestClient, db_settings: Settings, tmp_path, admin_headers):
    from tests.utils.adapters import make_adapter_dir

    loaded = db_client.post(
        "/admin/adapters",
        json={"name": "v2", "path": str(make_adapter_dir(tmp_path / "v2"))},
        headers=admin_headers,
    )
    assert loaded.status_code == 201, loaded.text
    response = db_client.post("/v1/chat/compare", json=CHAT)
    assert response.status_code == 200, response.text
    pair = response.json()
    assert pair["object"] == "chat.comparison"
    first, second = pair["completions"]
    assert {first["model"], second["model"]} == {"fake-base", "v2"}
    rows = wait_for_rows(db_settings.db_url, "SELECT id, pair_id, conversation_id FROM completion", 2)
    assert {r["pair_id"] for r in rows} == {pair["id"]}
    assert {r["conversation_id"] for r in rows} == {pair["conversation_id"]}

    chosen = db_client.post(
        "/v1/feedback/preference",
        json={"chosen_completion_id": second["id"], "rejected_completion_id": first["id"], "user": "alice"},
    )
    assert chosen.status_code == 200, chosen.text
    # Changing one's mind updates the one current choice for the pair.
    again = db_client.post(
        "/v1/feedback/preference",
        json={"chosen_completion_id": first["id"], "rejected_completion_id": second["id"], "user": "alice"},
    )
    assert again.status_code == 200
    prefs = wait_for_rows(db_settings.db_url, "SELECT * FROM preference", 1, timeout=0)
    assert len(prefs) == 1
    assert (prefs[0]["chosen_completion_id"], prefs[0]["rejected_completion_id"]) == (
        first["id"],
        second["id"],
    )


def test_preference_errors(db_client: TestClient):
    one = chat(db_client)["id"]
    other = chat(db_client, messages=[{"role": "user", "content": "something else"}])["id"]
    cases = [
        ({"chosen_completion_id": one, "rejected_completion_id": one}, 400),
        ({"chosen_completion_id": one, "rejected_completion_id": other}, 400),
        ({"chosen_completion_id": one, "rejected_completion_id": "chatcmpl-nope"}, 404),
        ({"chosen_completion_id": one}, 400),
    ]
    for body, status in cases:
        response = db_client.post("/v1/feedback/preference", json={**body, "user": "alice"})
        assert response.status_code == status, (body, response.text)
        assert "error" in response.json()


def test_compare_validates_like_chat(db_client: TestClient):
    assert db_client.post("/v1/chat/compare", json={**CHAT, "stream": True}).status_code == 400
    missing = db_client.post("/v1/chat/compare", json={**CHAT, "models": ["fake-base", "nope"]})
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "model"
    assert db_client.post("/v1/chat/compare", json={**CHAT, "models": ["fake-base"]}).status_code == 400


def test_feedback_metrics(db_client: TestClient):
    completion = chat(db_client)["id"]
    rate(db_client, completion_id=completion, rating="down", comment="meh", user="alice")
    rate(db_client, completion_id=completion, score=4, user="alice")
    text = db_client.get("/metrics/").text
    # By kind, with the rated answer's version and variant (none: no experiment ran).
    for kind in ("down", "comment", "score"):
        labels = f'kind="{kind}",model_version="fake-base",variant="none"'
        assert f"loopchat_feedback_ratings_total{{{labels}}} 1.0" in text
    assert 'loopchat_feedback_stars_bucket{le="3.0",model_version="fake-base"} 0.0' in text
    assert 'loopchat_feedback_stars_bucket{le="4.0",model_version="fake-base"} 1.0' in text
    assert "loopchat_feedback_database_up 1.0" in text
    assert "loopchat_feedback_spool_records 0.0" in text


def test_markup_in_a_comment_is_stored_and_returned_as_text(db_client: TestClient, db_settings: Settings):
    """Nothing is stripped or escaped on the way in (it is data); everything that shows it
    (the widget, the demo page) puts it in through textContent (tests/feedback/test_widget_e2e.py)."""
    hostile = '<script>alert(1)</script><img src=x onerror="alert(2)">'
    completion = chat(db_client)["id"]
    stored = rate(
        db_client, completion_id=completion, rating="down", comment=hostile, correction=hostile, user="alice"
    )
    assert stored.status_code == 200 and stored.headers["content-type"] == "application/json"
    assert stored.json()["comment"] == hostile
    rows = wait_for_rows(db_settings.db_url, "SELECT comment, correction FROM rating", 1)
    assert (rows[0]["comment"], rows[0]["correction"]) == (hostile, hostile)


def test_chat_and_ratings_go_on_while_the_database_is_down(settings: Settings, fake_engine, tmp_path):
    """The app on PostgreSQL behind a proxy that is cut mid-run: chats and ratings keep being
    answered (records wait in the spool), and once the database is back every one is a row."""
    from sqlalchemy.engine import make_url

    from loopchat.settings import FeedbackSettings
    from serving.app import create_app
    from tests.conftest import wait_ready
    from tests.utils.db import postgres_schema_url, skip_or_fail_without_postgres
    from tests.utils.tcp_proxy import TCPProxy

    skip_or_fail_without_postgres()
    url, drop = postgres_schema_url()
    parsed = make_url(url)
    proxy = TCPProxy(parsed.host or "127.0.0.1", parsed.port or 5432)
    proxied = parsed.set(host="127.0.0.1", port=proxy.port).update_query_dict({"connect_timeout": "2"})
    app_settings = settings.model_copy(
        update={
            "database_url": proxied.render_as_string(hide_password=False),
            "feedback": FeedbackSettings(retry_interval_s=0.5),
        }
    )
    try:
        with TestClient(create_app(app_settings, engine=fake_engine, exit_on_engine_failure=False)) as client:
            wait_ready(client)
            before = [chat(client, user=f"u{i}")["id"] for i in range(5)]
            proxy.cut()
            during = [chat(client, user=f"v{i}")["id"] for i in range(20)]
            for i, completion in enumerate(during):
                rated = rate(client, completion_id=completion, rating="up", user=f"v{i}")
                assert rated.status_code == 200, rated.text  # acknowledged from the spool
            assert client.get("/metrics").text.count("loopchat_feedback_database_up 0.0") == 1
            proxy.restore()
            rows = wait_for_rows(url, "SELECT id FROM completion", 25, timeout=60)
            ratings = wait_for_rows(url, "SELECT id FROM rating_event", 20, timeout=60)
        assert {r["id"] for r in rows} == set(before + during)
        assert len(ratings) == 20
    finally:
        proxy.close()
        drop()


def test_each_choice_of_n_is_logged_rated_and_preferred(db_client: TestClient, db_settings: Settings):
    body = chat(db_client, n=3)
    ids = [body["id"], f"{body['id']}.1", f"{body['id']}.2"]
    assert [choice["index"] for choice in body["choices"]] == [0, 1, 2]
    rows = wait_for_rows(db_settings.db_url, "SELECT id, response, completion_tokens FROM completion", 3)
    assert sorted(r["id"] for r in rows) == sorted(ids)
    assert all(r["completion_tokens"] == 4 for r in rows)
    assert rate(db_client, completion_id=ids[2], rating="up", user="alice").status_code == 200
    # The user's pick among the choices is a side-by-side choice: it needs no second request.
    picked = db_client.post(
        "/v1/feedback/preference",
        json={"chosen_completion_id": ids[1], "rejected_completion_id": ids[0], "user": "alice"},
    )
    assert picked.status_code == 200, picked.text


LOOKUP = {
    "type": "function",
    "function": {
        "name": "lookup_order",
        "description": "Find an order by its id",
        "parameters": {"type": "object", "properties": {"order_id": {"type": "string"}}},
    },
}


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_tool_calls_are_logged_and_exported_in_trl_format(db_settings: Settings, tmp_path, stream: bool):
    from serving.app import create_app
    from tests.conftest import wait_ready
    from tests.utils.fake_engine import FakeEngine

    # The chat template puts the tools' signatures in the prompt: a context that holds them.
    engine = FakeEngine(
        max_model_len=1024,
        answer='<tool_call>\n{"name": "lookup_order", "arguments": {"order_id": "42"}}\n</tool_call>',
    )
    with TestClient(create_app(db_settings, engine=engine, exit_on_engine_failure=False)) as db_client:
        wait_ready(db_client)
        _call_a_tool_log_and_export(db_client, db_settings, tmp_path, stream)


def _call_a_tool_log_and_export(db_client: TestClient, db_settings: Settings, tmp_path, stream: bool) -> None:
    from feedback.db import make_engine
    from feedback.export import export_jsonl

    request = {**CHAT, "max_tokens": 40, "tools": [LOOKUP], "tool_choice": "auto"}
    if stream:
        with db_client.stream("POST", "/v1/chat/completions", json={**request, "stream": True}) as response:
            completion_id = response.headers["x-loopchat-completion-id"]
            events = [line for line in response.iter_lines() if line.startswith("data: {")]
        deltas = [json.loads(e[6:])["choices"][0]["delta"] for e in events if json.loads(e[6:])["choices"]]
        assert any(d.get("tool_calls") for d in deltas)
    else:
        body = db_client.post("/v1/chat/completions", json=request).json()
        completion_id = body["id"]
        [call] = body["choices"][0]["message"]["tool_calls"]
        assert call["function"]["name"] == "lookup_order"
        assert json.loads(call["function"]["arguments"]) == {"order_id": "42"}
        assert body["choices"][0]["finish_reason"] == "tool_calls"
    row = completion_row(db_settings.db_url, completion_id)
    calls = row["tool_calls"] if isinstance(row["tool_calls"], list) else json.loads(row["tool_calls"])
    tools = row["tools"] if isinstance(row["tools"], list) else json.loads(row["tools"])
    assert [c["function"]["name"] for c in calls] == ["lookup_order"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"order_id": "42"}
    assert tools[0]["function"]["name"] == "lookup_order"
    assert "<tool_call>" not in row["response"]

    assert rate(db_client, completion_id=completion_id, rating="up", user="alice").status_code == 200
    wait_for_rows(db_settings.db_url, "SELECT * FROM rating", 1)
    engine = make_engine(db_settings.db_url)
    try:
        assert export_jsonl(engine, "sft", tmp_path / "sft.jsonl", Redactor()) == 1
    finally:
        engine.dispose()
    [example] = [json.loads(line) for line in (tmp_path / "sft.jsonl").read_text().splitlines()]
    assert example["tools"][0]["function"]["name"] == "lookup_order"
    [answer] = example["completion"]
    assert answer["role"] == "assistant"
    assert answer["tool_calls"][0]["function"]["name"] == "lookup_order"


def test_an_engine_fault_mid_stream_is_reported_in_band_and_logged(
    db_client: TestClient, db_settings: Settings, fake_engine
):
    fake_engine.fail_with = RuntimeError("device lost")
    with db_client.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}) as response:
        assert response.status_code == 200  # the headers were sent before the fault
        completion_id = response.headers["x-loopchat-completion-id"]
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    failure = json.loads(events[-2])["error"]
    assert failure == {
        "message": "internal server error",
        "type": "server_error",
        "param": None,
        "code": "internal_error",
    }
    row = completion_row(db_settings.db_url, completion_id)
    assert row["error"] == "device lost" and row["finish_reason"] == "abort"
    assert row["completion_tokens"] == 1
