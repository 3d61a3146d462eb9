"""API keys: required outside development, hashed at rest, scoped to a site; public keys only
rate, from their origins; per-key rate and concurrency limits; CORS for the keys' origins."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text

from feedback.db import make_engine
from loopchat.settings import AccessSettings, Settings
from serving.access import ANONYMOUS, KeyStore, create_key, hash_key, revoke_key
from serving.app import create_app
from tests.conftest import ADMIN_TOKEN, wait_ready
from tests.utils.db import wait_for_rows
from tests.utils.fake_engine import FakeEngine

ASK = {"messages": [{"role": "user", "content": "hello there"}], "max_tokens": 3, "user": "alice"}
SHOP = "https://shop.example"


@pytest.fixture
def production(db_settings: Settings, fake_engine: FakeEngine) -> Iterator[TestClient]:
    settings = db_settings.model_copy(
        update={"environment": "production", "access": AccessSettings(key_cache_s=0.2)}
    )
    with TestClient(create_app(settings, engine=fake_engine, exit_on_engine_failure=False)) as client:
        wait_ready(client)
        client.database = make_engine(settings.db_url)
        yield client
        client.database.dispose()


def auth(token: str, origin: str | None = None) -> dict[str, str]:
    headers = {"Authorization": f"Bearer {token}"}
    return {**headers, "Origin": origin} if origin else headers


def test_keys_are_required_outside_development(production: TestClient) -> None:
    for headers in ({}, auth("lc-sk-not-a-key"), {"Authorization": "Basic abc"}):
        response = production.post("/v1/chat/completions", json=ASK, headers=headers)
        assert response.status_code == 401, headers
        assert response.json()["error"]["type"] == "authentication_error"
        assert response.headers["www-authenticate"] == "Bearer"
    # Refused before routing, and still counted under their route.
    metrics = production.get("/metrics").text
    assert 'method="POST",model_version="",route="/v1/chat/completions",status="401"' in metrics
    # Probes and metrics stay open; the admin API keeps its own token.
    assert production.get("/healthz").status_code == 200
    _, token = create_key(production.database, "shop")
    assert production.get("/admin/adapters", headers=auth(token)).status_code == 403
    assert production.get("/admin/adapters", headers=auth(ADMIN_TOKEN)).status_code == 200
    assert production.get("/v1/models", headers=auth(token)).status_code == 200


def test_keys_are_stored_hashed_and_revocation_takes_effect(production: TestClient) -> None:
    row, token = create_key(production.database, "shop")
    with production.database.connect() as connection:
        stored = connection.execute(text("SELECT hash, prefix FROM api_key")).one()
    assert stored.hash == hash_key(token) and token not in stored and stored.prefix == token[:12]
    assert production.post("/v1/chat/completions", json=ASK, headers=auth(token)).status_code == 200
    revoke_key(production.database, row.id)
    time.sleep(0.3)  # the key cache (access.key_cache_s)
    response = production.post("/v1/chat/completions", json=ASK, headers=auth(token))
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"


def test_a_site_rates_only_its_own_conversations(production: TestClient, db_settings: Settings) -> None:
    shop, shop_token = create_key(production.database, "shop")
    _, other_token = create_key(production.database, "other")
    _, widget_token = create_key(production.database, "widget", site=shop.site, kind="public", origins=[SHOP])
    answer = production.post("/v1/chat/completions", json=ASK, headers=auth(shop_token)).json()
    row = wait_for_rows(db_settings.db_url, "SELECT site FROM completion WHERE id = :id", 1, id=answer["id"])
    assert row[0]["site"] == shop.site
    rating = {"completion_id": answer["id"], "user": "alice", "rating": "up"}
    # Another site's key, and no key at all, find nothing to rate.
    other = production.post("/v1/feedback", json=rating, headers=auth(other_token))
    assert other.status_code == 404 and other.json()["error"]["code"] == "completion_not_found"
    # Another user of the same site neither.
    mallory = production.post("/v1/feedback", json={**rating, "user": "mallory"}, headers=auth(shop_token))
    assert mallory.status_code == 404
    # The site's public key rates from the site's pages, and only rates.
    assert production.post("/v1/feedback", json=rating, headers=auth(widget_token, SHOP)).status_code == 200
    elsewhere = production.post(
        "/v1/feedback", json=rating, headers=auth(widget_token, "https://evil.example")
    )
    assert elsewhere.status_code == 403 and elsewhere.json()["error"]["code"] == "origin_not_allowed"
    chat = production.post("/v1/chat/completions", json=ASK, headers=auth(widget_token, SHOP))
    assert chat.status_code == 403 and chat.json()["error"]["code"] == "public_key_not_allowed"
    assert production.post("/v1/feedback", json=rating, headers=auth(shop_token)).status_code == 200
    with production.database.connect() as connection:
        assert connection.execute(text("SELECT count(*) FROM rating_event")).scalar() == 2


def test_public_keys_need_an_existing_site_and_origins(production: TestClient) -> None:
    with pytest.raises(ValueError, match="--site"):
        create_key(production.database, "widget", kind="public", origins=[SHOP])
    with pytest.raises(ValueError, match="no key belongs to site"):
        create_key(production.database, "widget", site="nope", kind="public", origins=[SHOP])
    shop, _ = create_key(production.database, "shop")
    with pytest.raises(ValueError, match="origins"):
        create_key(production.database, "widget", site=shop.site, kind="public")
    with pytest.raises(ValueError, match="scheme and host"):
        create_key(production.database, "widget", site=shop.site, kind="public", origins=["shop.example/x"])


def test_cors_allows_the_public_keys_origins(production: TestClient) -> None:
    shop, _ = create_key(production.database, "shop")
    create_key(production.database, "widget", site=shop.site, kind="public", origins=[SHOP])
    time.sleep(0.5)  # the allowlist refresh (access.key_cache_s)
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
    allowed = production.options("/v1/feedback", headers={"Origin": SHOP, **preflight})
    assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == SHOP
    refused = production.options("/v1/feedback", headers={"Origin": "https://evil.example", **preflight})
    assert refused.status_code == 400 and "access-control-allow-origin" not in refused.headers


def test_rate_limit_answers_429_with_retry_after(production: TestClient) -> None:
    _, token = create_key(production.database, "tight", requests_per_minute=8)
    codes = [production.get("/v1/models", headers=auth(token)).status_code for _ in range(4)]
    assert codes[:2] == [200, 200] and codes[-1] == 429  # a burst of a quarter minute's rate
    limited = production.get("/v1/models", headers=auth(token))
    assert limited.status_code == 429 and limited.json()["error"]["type"] == "rate_limit_error"
    assert 1 <= int(limited.headers["retry-after"]) <= 8
    # Other keys are not affected.
    _, other = create_key(production.database, "other")
    assert production.get("/v1/models", headers=auth(other)).status_code == 200


def test_concurrency_limit_holds_a_slot_for_a_whole_stream(production: TestClient, fake_engine) -> None:
    _, token = create_key(production.database, "one-at-a-time", max_concurrent=1)
    fake_engine.token_delay = 0.05
    streaming = threading.Event()
    done = threading.Event()

    def stream() -> None:
        body = {**ASK, "max_tokens": 30, "stream": True, "ignore_eos": True}
        with production.stream("POST", "/v1/chat/completions", json=body, headers=auth(token)) as response:
            for _ in response.iter_lines():
                streaming.set()
        done.set()

    worker = threading.Thread(target=stream)
    worker.start()
    assert streaming.wait(10)
    busy = production.post("/v1/chat/completions", json=ASK, headers=auth(token))
    assert busy.status_code == 429 and busy.json()["error"]["code"] == "rate_limit_exceeded"
    worker.join(30)
    assert done.is_set()
    assert production.post("/v1/chat/completions", json=ASK, headers=auth(token)).status_code == 200


def test_development_mode_needs_no_key_but_checks_a_loopchat_one(db_client: TestClient) -> None:
    assert db_client.post("/v1/chat/completions", json=ASK).status_code == 200
    # OpenAI clients must send something: a key that is not a loopchat key is not checked here.
    assert db_client.post("/v1/chat/completions", json=ASK, headers=auth("unused")).status_code == 200
    assert db_client.post("/v1/chat/completions", json=ASK, headers=auth("lc-sk-wrong")).status_code == 401


def test_keys_command_line(tmp_path: Path) -> None:
    env = {**os.environ, "LOOPCHAT_DATA_DIR": str(tmp_path)}

    def loopchat(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "loopchat.cli", "keys", *args],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
        )

    created = loopchat("create", "shop", "--rpm", "100")
    assert created.returncode == 0, created.stderr
    key_id, token = created.stdout.split(" ")[0], created.stdout.strip().split(": ")[-1]
    assert token.startswith("lc-sk-") and "cannot be shown again" in created.stderr
    public = loopchat("create", "widget", "--public", "--site", key_id, "--origin", SHOP)
    assert public.returncode == 0 and "lc-pk-" in public.stdout
    listed = loopchat("list").stdout
    assert key_id in listed and token not in listed and SHOP in listed
    assert loopchat("revoke", key_id).returncode == 0
    missing = loopchat("revoke", "key_nope")
    assert missing.returncode == 1 and "no key 'key_nope'" in missing.stderr
    bad = loopchat("create", "widget", "--public")
    assert bad.returncode == 1 and "--origin" in bad.stderr and "Traceback" not in bad.stderr


def test_a_key_reads_only_its_sites_and_users_conversations(
    production: TestClient, db_settings: Settings
) -> None:
    shop, token = create_key(production.database, "shop")
    _, other = create_key(production.database, "other")
    _, widget = create_key(production.database, "widget", site=shop.site, kind="public", origins=[SHOP])
    first = production.post("/v1/chat/completions", json=ASK, headers=auth(token))
    conversation = first.headers["x-loopchat-conversation-id"]
    follow_up = {**ASK, "metadata": {"conversation_id": conversation}}
    assert production.post("/v1/chat/completions", json=follow_up, headers=auth(token)).status_code == 200
    rating = {"completion_id": first.json()["id"], "user": "alice", "rating": "up", "comment": "<b>ok</b>"}
    assert production.post("/v1/feedback", json=rating, headers=auth(token)).status_code == 200
    wait_for_rows(db_settings.db_url, "SELECT id FROM rating", 1)
    wait_for_rows(db_settings.db_url, "SELECT id FROM completion", 2)

    path = f"/v1/conversations/{conversation}"
    read = production.get(path, params={"user": "alice"}, headers=auth(token))
    assert read.status_code == 200, read.text
    turns = read.json()["completions"]
    assert [t["id"] for t in turns][0] == first.json()["id"] and len(turns) == 2
    assert (turns[0]["rating"], turns[0]["comment"], turns[1]["rating"]) == ("up", "<b>ok</b>", None)
    # Another site, another user, a public key, no key: nothing to see.
    assert production.get(path, params={"user": "alice"}, headers=auth(other)).status_code == 404
    assert production.get(path, params={"user": "mallory"}, headers=auth(token)).status_code == 404
    assert production.get(path, params={"user": "alice"}, headers=auth(widget, SHOP)).status_code == 403
    assert production.get(path, params={"user": "alice"}).status_code == 401


@pytest.fixture
def lookups(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The key hashes looked up in the database, in order."""
    digests: list[str] = []
    lookup = KeyStore._lookup

    def counted(self: KeyStore, digest: str):
        digests.append(digest)
        return lookup(self, digest)

    monkeypatch.setattr(KeyStore, "_lookup", counted)
    return digests


NOT_KEYS = [
    "lc-sk-wrong",
    "lc-sk-" + "a" * 42,
    "lc-sk-" + "a" * 44,
    "lc-pk-" + "a" * 42 + "=",
    "lc-sk-" + "a" * 21 + " " + "a" * 21,
    "lc-xk-" + "a" * 43,
    "LC-SK-" + "a" * 43,
    "sk-proj-" + "a" * 41,
    "x" * 8000,
]


def test_a_bearer_that_cannot_be_a_key_is_refused_without_a_lookup(
    production: TestClient, lookups: list[str]
) -> None:
    for token in NOT_KEYS:
        response = production.post("/v1/chat/completions", json=ASK, headers=auth(token))
        assert response.status_code == 401, token
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert (error["type"], error["code"]) == ("authentication_error", "invalid_api_key")
        assert token not in response.text and response.headers["www-authenticate"] == "Bearer"
    assert lookups == []
    # A key of the right shape is looked up (and refused: no such key).
    unknown = "lc-sk-" + "A" * 43
    assert production.post("/v1/chat/completions", json=ASK, headers=auth(unknown)).status_code == 401
    assert lookups == [hash_key(unknown)]


def test_development_ignores_foreign_keys_and_refuses_malformed_loopchat_ones_unseen(
    db_client: TestClient, lookups: list[str]
) -> None:
    for token in ("unused", "sk-" + "a" * 48, "x" * 8000):
        assert db_client.post("/v1/chat/completions", json=ASK, headers=auth(token)).status_code == 200
    for token in NOT_KEYS[:5]:
        assert db_client.post("/v1/chat/completions", json=ASK, headers=auth(token)).status_code == 401
    assert lookups == []


async def test_the_key_cache_evicts_the_least_recently_used(monkeypatch: pytest.MonkeyPatch) -> None:
    lookups: list[str] = []
    monkeypatch.setattr(KeyStore, "_lookup", lambda self, digest: lookups.append(digest) or ANONYMOUS)
    store = KeyStore(database=None, ttl=60, max_cached=3)  # type: ignore[arg-type]
    first, second, third, fourth = (f"lc-sk-{letter * 43}" for letter in "abcd")
    for token in (first, second, third, first, fourth):  # `first` used again: `second` is the oldest
        assert await store.resolve(token) is ANONYMOUS
    assert lookups == [hash_key(t) for t in (first, second, third, fourth)]
    for token in (first, third, fourth):  # still cached
        await store.resolve(token)
    assert len(lookups) == 4
    await store.resolve(second)  # evicted, so looked up again (and `first` now goes)
    assert lookups[-1] == hash_key(second) and len(lookups) == 5
    await store.resolve(first)
    assert lookups[-1] == hash_key(first) and len(lookups) == 6
