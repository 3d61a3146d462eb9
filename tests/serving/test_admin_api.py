"""Adapter management over the admin API (fake engine): auth, load, serve, unload, activate."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from loopchat.settings import Settings
from serving.app import create_app
from tests.conftest import wait_ready
from tests.utils.fake_engine import FakeEngine

USER = [{"role": "user", "content": "hi"}]


@pytest.fixture
def adapter_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "adapter-v1"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    return folder


def test_admin_routes_are_off_without_a_token(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, base_model=tmp_path / "m")
    with TestClient(create_app(settings, engine=FakeEngine(), exit_on_engine_failure=False)) as client:
        wait_ready(client)
        response = client.post("/admin/adapters", json={"name": "a", "path": "/tmp"})
        assert response.status_code == 404


def test_admin_needs_the_right_bearer_token(client: TestClient, adapter_dir: Path) -> None:
    payload = {"name": "v1", "path": str(adapter_dir)}
    missing = client.post("/admin/adapters", json=payload)
    assert missing.status_code == 401 and missing.json()["error"]["type"] == "authentication_error"
    wrong = client.post("/admin/adapters", json=payload, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 403 and wrong.json()["error"]["type"] == "permission_error"


def test_load_serve_and_unload_an_adapter(
    client: TestClient, admin_headers, adapter_dir: Path, fake_engine: FakeEngine
) -> None:
    loaded = client.post(
        "/admin/adapters", json={"name": "v1", "path": str(adapter_dir)}, headers=admin_headers
    )
    assert loaded.status_code == 201, loaded.text
    assert loaded.json()["parent"] == "fake-base"

    models = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    assert models["v1"]["parent"] == "fake-base"
    assert models["v1"]["root"] == str(adapter_dir.resolve())

    response = client.post("/v1/chat/completions", json={"messages": USER, "model": "v1", "max_tokens": 3})
    assert response.status_code == 200
    assert response.headers["x-loopchat-model-version"] == "v1"
    assert response.json()["choices"][0]["message"]["content"].startswith("[v1]")
    assert fake_engine.requests[-1][2] == "v1"

    deleted = client.delete("/admin/adapters/v1", headers=admin_headers)
    assert deleted.status_code == 204
    assert fake_engine.adapters == {}
    assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["fake-base"]
    gone = client.post("/v1/chat/completions", json={"messages": USER, "model": "v1"})
    assert gone.status_code == 404


def test_adapter_parent_is_recorded(client: TestClient, admin_headers, adapter_dir: Path) -> None:
    client.post("/admin/adapters", json={"name": "v1", "path": str(adapter_dir)}, headers=admin_headers)
    loaded = client.post(
        "/admin/adapters",
        json={"name": "v2", "path": str(adapter_dir), "parent": "v1"},
        headers=admin_headers,
    )
    assert loaded.json()["parent"] == "v1"


@pytest.mark.parametrize(
    ("payload", "status"),
    [
        ({"name": "v1", "path": "/does/not/exist"}, 400),
        ({"name": "bad name!", "path": "/tmp"}, 400),
        ({"name": "loopchat", "path": "ADAPTER"}, 409),
        ({"name": "fake-base", "path": "ADAPTER"}, 409),
        ({"name": "v1"}, 400),
        ({"name": "v1", "path": "ADAPTER", "extra": 1}, 400),
    ],
)
def test_bad_adapter_requests(client: TestClient, admin_headers, adapter_dir: Path, payload, status) -> None:
    payload = {k: (str(adapter_dir) if v == "ADAPTER" else v) for k, v in payload.items()}
    response = client.post("/admin/adapters", json=payload, headers=admin_headers)
    assert response.status_code == status, response.text
    assert "error" in response.json()


def test_folder_without_adapter_config_is_refused(client: TestClient, admin_headers, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    response = client.post("/admin/adapters", json={"name": "v1", "path": str(empty)}, headers=admin_headers)
    assert response.status_code == 400
    assert "adapter_config.json" in response.json()["error"]["message"]
    assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["fake-base"]


def test_duplicate_adapter_conflicts(client: TestClient, admin_headers, adapter_dir: Path) -> None:
    payload = {"name": "v1", "path": str(adapter_dir)}
    assert client.post("/admin/adapters", json=payload, headers=admin_headers).status_code == 201
    assert client.post("/admin/adapters", json=payload, headers=admin_headers).status_code == 409


def test_unload_unknown_adapter(client: TestClient, admin_headers) -> None:
    assert client.delete("/admin/adapters/nope", headers=admin_headers).status_code == 404


def test_alias_follows_the_active_version(client: TestClient, admin_headers, adapter_dir: Path) -> None:
    client.post("/admin/adapters", json={"name": "v1", "path": str(adapter_dir)}, headers=admin_headers)
    answer = client.put("/admin/active", json={"name": "v1"}, headers=admin_headers).json()
    # The fake engine's adapters have no weights to merge: the base weights stay live.
    assert answer == {"active": "v1", "live": "fake-base"}
    response = client.post(
        "/v1/chat/completions", json={"messages": USER, "model": "loopchat", "max_tokens": 2}
    )
    assert response.headers["x-loopchat-model-version"] == "v1"
    # The active version cannot be unloaded from under the alias.
    assert client.delete("/admin/adapters/v1", headers=admin_headers).status_code == 409
    client.put("/admin/active", json={"name": "fake-base"}, headers=admin_headers)
    response = client.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 2})
    assert response.headers["x-loopchat-model-version"] == "fake-base"
    assert client.put("/admin/active", json={"name": "zzz"}, headers=admin_headers).status_code == 404


def test_adapters_from_settings_load_at_start(tmp_path: Path, adapter_dir: Path) -> None:
    settings = Settings(
        data_dir=tmp_path, base_model=tmp_path / "m", adapters={"v1": adapter_dir}, active_model="v1"
    )
    with TestClient(create_app(settings, engine=FakeEngine(), exit_on_engine_failure=False)) as client:
        wait_ready(client)
        for _ in range(100):
            if len(client.get("/v1/models").json()["data"]) == 2:
                break
        response = client.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 2})
        assert response.headers["x-loopchat-model-version"] == "v1"


def test_each_replica_reports_its_live_weights_and_lora_room(tmp_path: Path, base_model_path: Path) -> None:
    from tests.conftest import ADMIN_TOKEN
    from tests.utils.adapters import make_lora_adapter

    settings = Settings(
        data_dir=tmp_path,
        admin_token=ADMIN_TOKEN,
        base_model=base_model_path,  # what the adapter names as its base
        ab={"poll_interval_s": 0.1, "evaluate": False},
    )
    adapter = make_lora_adapter(base_model_path, tmp_path / "v1", rank=4, seed=1)
    engine = FakeEngine(lora_on_demand=True)
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    with TestClient(create_app(settings, engine=engine, exit_on_engine_failure=False)) as client:
        wait_ready(client)

        def replica(**expected) -> dict:
            deadline = time.monotonic() + 10
            while True:
                [row] = client.get("/admin/replicas", headers=headers).json()["data"]
                if all(row[k] == v for k, v in expected.items()) or time.monotonic() > deadline:
                    return row

        row = replica()
        assert row["live_version"] == row["active_version"] == "fake-base"
        assert row["weights_path"] == str(engine.model_path)
        assert (row["lora_slots"], row["lora_versions"]) == (0, [])
        assert row["this_process"] and not row["stale"]

        loaded = client.post("/admin/adapters", json={"name": "v1", "path": str(adapter)}, headers=headers)
        assert loaded.status_code == 201, loaded.text
        assert client.put("/admin/active", json={"name": "v1"}, headers=headers).json()["live"] == "v1"
        row = replica(live_version="v1")
        assert row["live_version"] == row["active_version"] == "v1"
        assert Path(row["weights_path"]).parent == tmp_path / "weights" / "merged"

        # The base model is now a LoRA delta over v1: asking for it builds the engine's LoRA room.
        answer = client.post("/v1/chat/completions", json={"messages": USER, "model": "fake-base"})
        assert answer.json()["choices"][0]["message"]["content"].startswith("[fake-base]")
        row = replica(lora_slots=2)
        assert (row["lora_slots"], row["lora_max_rank"], row["lora_versions"]) == (2, 8, ["fake-base"])
