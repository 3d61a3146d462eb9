"""Registry and A/B experiments through the admin API, on the fake engine, on SQLite and PostgreSQL."""

from __future__ import annotations

import re
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text
from sqlmodel import Session

from feedback.db import make_engine
from feedback.models import Completion, Conversation, Rating
from loopchat.settings import ABSettings, MonitoringSettings, Settings
from rollout.experiments import ExperimentService
from rollout.registry import bump_revision, register_version
from serving.app import create_app
from tests.conftest import wait_ready
from tests.utils.adapters import make_adapter_dir
from tests.utils.fake_engine import FakeEngine

USER = [{"role": "user", "content": "hello"}]


@contextmanager
def app_client(settings: Settings, engine: FakeEngine | None = None) -> Iterator[TestClient]:
    app = create_app(settings, engine=engine or FakeEngine(), exit_on_engine_failure=False)
    # Engine faults come back as 500 bodies, as a client sees them.
    with TestClient(app, raise_server_exceptions=False) as client:
        wait_ready(client)
        yield client


@pytest.fixture
def ab_settings(db_settings: Settings) -> Settings:
    # Fast polling; the scheduled evaluation is off unless a test turns it on.
    return db_settings.model_copy(update={"ab": ABSettings(poll_interval_s=0.1, evaluate=False)})


def register(client: TestClient, headers, name: str, folder: Path) -> None:
    response = client.post(
        "/admin/adapters", json={"name": name, "path": str(make_adapter_dir(folder))}, headers=headers
    )
    assert response.status_code == 201, response.text


def start(client: TestClient, headers, **spec) -> dict:
    body = {"name": "exp1", "variants": [{"name": "cand", "version": "v1", "weight": 50}], **spec}
    response = client.post("/admin/experiments", json=body, headers=headers)
    assert response.status_code == 201, response.text
    return response.json()


def chat(client: TestClient, user: str | None = None, **extra) -> dict[str, str]:
    body = {"messages": USER, "max_tokens": 3, **extra}
    if user is not None:
        body["user"] = user
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    return dict(response.headers)


def wait_until(predicate, timeout: float = 10.0, step: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(step)


def routing_revision(client: TestClient) -> float | None:
    """The registry revision a process routes by, as its metrics report it."""
    found = re.search(r"^loopchat_registry_revision (\S+)$", client.get("/metrics/").text, re.MULTILINE)
    return float(found.group(1)) if found else None


def rows(url: str, sql: str, **params) -> list[dict]:
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            return [dict(r) for r in connection.execute(text(sql), params).mappings()]
    finally:
        engine.dispose()


def insert_outcomes(
    url: str,
    experiment: str,
    variant: str,
    version: str,
    *,
    n: int,
    positive: int = 0,
    rated: int = 0,
    errors: int = 0,
    latency_ms: float = 100.0,
    ttft_ms: float | None = None,
    tokens: int = 0,
) -> None:
    """Completions (and their ratings) as the conversation log would have written them."""
    engine = make_engine(url)
    now = datetime.now(UTC)
    conversations, completions, ratings = [], [], []
    for i in range(n):
        cid, conv = f"chatcmpl-{uuid.uuid4().hex}", f"conv-{uuid.uuid4().hex}"
        conversations.append({"id": conv, "user_key": f"u{i}", "created_at": now, "last_active_at": now})
        completions.append(
            {
                "id": cid,
                "conversation_id": conv,
                "user_key": f"u{i}",
                "created_at": now,
                "model_version": version,
                "experiment": experiment,
                "variant": variant,
                "messages": USER,
                "prompt_hash": "h",
                "response": "r",
                "sampling": {},
                "latency_ms": latency_ms,
                "ttft_ms": ttft_ms,
                "completion_tokens": tokens,
                "error": "boom" if i < errors else None,
                "redacted": True,
            }
        )
        if i < rated:
            thumb = "up" if i < positive else "down"
            ratings.append(
                {
                    "completion_id": cid,
                    "user_key": f"u{i}",
                    "thumb": thumb,
                    "tags": [],
                    "created_at": now,
                    "updated_at": now,
                }
            )
    with engine.begin() as connection:
        connection.execute(Conversation.__table__.insert(), conversations)
        connection.execute(Completion.__table__.insert(), completions)
        if ratings:
            connection.execute(Rating.__table__.insert(), ratings)
    engine.dispose()


# -- registry ----------------------------------------------------------------------------------


def test_a_registered_version_is_hot_loaded_by_every_replica(
    ab_settings: Settings, admin_headers, tmp_path: Path
):
    engine_a, engine_b = FakeEngine(), FakeEngine()
    with app_client(ab_settings, engine_a) as a, app_client(ab_settings, engine_b) as b:
        register(a, admin_headers, "v1", tmp_path / "v1")
        assert wait_until(lambda: "v1" in {m["id"] for m in b.get("/v1/models").json()["data"]})
        assert [spec.name for spec in engine_b.adapters.values()] == ["v1"]
        listed = b.get("/admin/adapters", headers=admin_headers).json()
        assert (
            listed["count"] == 1
            and listed["data"][0]["status"] == "candidate"
            and listed["data"][0]["loaded"]
        )
        assert listed["data"][0]["parent"] == "fake-base"

        # Activated on one replica, the alias moves on both.
        assert a.put("/admin/active", json={"name": "v1"}, headers=admin_headers).status_code == 200
        assert wait_until(lambda: chat(b)["x-loopchat-model-version"] == "v1")

        # Retired on one replica (after the alias moved back), unloaded on both.
        a.put("/admin/active", json={"name": "fake-base"}, headers=admin_headers)
        assert a.delete("/admin/adapters/v1", headers=admin_headers).status_code == 204
        assert wait_until(lambda: not engine_b.adapters)
        assert "v1" not in {m["id"] for m in a.get("/v1/models").json()["data"]}
    # The registry outlives the processes.
    with app_client(ab_settings) as again:
        data = again.get("/admin/adapters", headers=admin_headers).json()["data"]
        assert [(v["name"], v["status"], v["loaded"]) for v in data] == [("v1", "retired", False)]


def test_an_adapter_for_another_base_is_refused_and_nothing_is_stored(
    ab_settings: Settings, admin_headers, tmp_path: Path
):
    folder = make_adapter_dir(tmp_path / "other")
    (folder / "adapter_config.json").write_text(
        '{"peft_type": "LORA", "r": 8, "base_model_name_or_path": "gpt2"}'
    )
    with app_client(ab_settings) as client:
        response = client.post(
            "/admin/adapters", json={"name": "x", "path": str(folder)}, headers=admin_headers
        )
        assert response.status_code == 400 and "trained on 'gpt2'" in response.json()["error"]["message"]
        assert client.get("/admin/adapters", headers=admin_headers).json()["count"] == 0
        assert "x" not in {m["id"] for m in client.get("/v1/models").json()["data"]}


def test_a_version_registered_while_the_registry_changes_elsewhere_stays_loaded(
    ab_settings: Settings, admin_headers, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    # The registration is held after v1 is loaded here and before it is recorded.
    recording, release = threading.Event(), threading.Event()

    def held(**kwargs):
        recording.set()
        release.wait(10)
        return register_version(**kwargs)

    monkeypatch.setattr("serving.registry_sync.register_version", held)
    engine = FakeEngine()
    with app_client(ab_settings, engine) as client, ThreadPoolExecutor(1) as pool:
        registering = pool.submit(register, client, admin_headers, "v1", tmp_path / "v1")
        assert recording.wait(10)
        # Another replica changes the registry meanwhile; this one's polls must not take v1,
        # loaded but not yet recorded, for a version the registry took out of service.
        other = make_engine(ab_settings.db_url)
        with Session(other) as session:
            bump_revision(session)
            session.commit()
        other.dispose()
        time.sleep(5 * ab_settings.ab.poll_interval_s)
        release.set()
        registering.result(timeout=10)
        listed = client.get("/admin/adapters", headers=admin_headers).json()["data"]
        assert [(v["name"], v["loaded"]) for v in listed] == [("v1", True)]
        assert [spec.name for spec in engine.adapters.values()] == ["v1"]
        assert "v1" in {m["id"] for m in client.get("/v1/models").json()["data"]}


# -- experiments -------------------------------------------------------------------------------


def test_users_are_split_sticky_and_every_answer_says_what_served_it(
    ab_settings: Settings, admin_headers, tmp_path: Path
):
    with app_client(ab_settings) as client:
        register(client, admin_headers, "v1", tmp_path / "v1")
        started = start(client, admin_headers)
        assert started["control"] == "fake-base" and started["status"] == "running"
        seen = {}
        for i in range(60):
            headers = chat(client, f"user-{i}")
            assert headers["x-loopchat-experiment"] == "exp1"
            expected = "v1" if headers["x-loopchat-variant"] == "cand" else "fake-base"
            assert headers["x-loopchat-model-version"] == expected
            seen[f"user-{i}"] = headers["x-loopchat-variant"]
        assert set(seen.values()) == {"control", "cand"}
        # Sticky: the same user gets the same variant on a new conversation.
        for user, variant in list(seen.items())[:20]:
            assert chat(client, user)["x-loopchat-variant"] == variant
        # Logged with the completion.
        completion_id = chat(client, "user-0")["x-loopchat-completion-id"]
        row = wait_until(
            lambda: rows(ab_settings.db_url, "SELECT * FROM completion WHERE id = :id", id=completion_id)
        )
        assert (row[0]["experiment"], row[0]["variant"]) == ("exp1", seen["user-0"])

        # A conversation never changes version midway, even when the weights do.
        on_candidate = next(u for u, v in seen.items() if v == "cand")
        headers = chat(client, on_candidate)
        conversation = headers["x-loopchat-conversation-id"]
        weights = client.put(
            "/admin/experiments/exp1/weights", json={"weights": {"cand": 0}}, headers=admin_headers
        )
        assert weights.status_code == 200 and weights.json()["variants"][1]["weight"] == 0
        again = chat(client, on_candidate, metadata={"conversation_id": conversation})
        assert (again["x-loopchat-variant"], again["x-loopchat-model-version"]) == ("cand", "v1")
        assert chat(client, on_candidate)["x-loopchat-variant"] == "control"

        metrics = client.get("/metrics/").text
        labels = 'experiment="exp1",model_version="fake-base",variant="control"'
        assert f"loopchat_experiment_weight_percent{{{labels}}} 100.0" in metrics

    # The same users land on the same variants in another process (restart or replica).
    with app_client(ab_settings) as replica:
        replica.put("/admin/experiments/exp1/weights", json={"weights": {"cand": 50}}, headers=admin_headers)
        for user, variant in list(seen.items())[:30]:
            assert chat(replica, user)["x-loopchat-variant"] == variant


def test_a_guardrail_breach_is_rolled_back_within_one_evaluation_interval(
    ab_settings: Settings, admin_headers, tmp_path: Path
):
    interval = 1.0
    settings = ab_settings.model_copy(
        update={
            "ab": ABSettings(poll_interval_s=0.1, evaluation_interval_s=interval),
            "monitoring": MonitoringSettings(database_refresh_s=0.2),
        }
    )
    minimum = 20
    engine = FakeEngine()
    engine.failing_adapters.add("v1")
    with app_client(settings, engine) as client:
        register(client, admin_headers, "v1", tmp_path / "v1")
        start(client, admin_headers, policy={"guardrail_min_requests": minimum, "max_error_rate": 0.05})
        # No evaluation can roll the candidate back before it has served the guardrail's minimum,
        # so every answer up to the breach is routed by the running experiment.
        on_candidate = 0
        for i in range(400):
            response = client.post(
                "/v1/chat/completions", json={"messages": USER, "max_tokens": 3, "user": f"u{i}"}
            )
            # Only the candidate's version fails; control answers come back whole.
            if response.status_code == 500:
                assert response.json()["error"]["message"] == "internal server error"
                on_candidate += 1
            else:
                assert response.headers["x-loopchat-variant"] == "control"
            if on_candidate == minimum:
                break
        assert on_candidate == minimum
        breached_at = time.monotonic()
        status = wait_until(
            lambda: (
                client.get("/admin/experiments/exp1", headers=admin_headers).json()["experiment"]["status"]
                == "rolled_back"
            ),
            timeout=10,
        )
        elapsed = time.monotonic() - breached_at
        assert status, "not rolled back"
        # Within one evaluation interval (plus the log writer's flush and the request itself).
        assert elapsed <= interval + 1.0, elapsed
        report = client.get("/admin/experiments/exp1", headers=admin_headers).json()
        last = report["decisions"][-1]
        assert (last["action"], last["actor"], last["variant"]) == ("rollback", "auto", "cand")
        assert "error rate" in last["reason"] and last["numbers"]["outcomes"]["cand"]["errors"] >= minimum
        assert last["weights_after"] == {"control": 100.0, "cand": 0.0}
        versions = client.get("/admin/adapters", headers=admin_headers).json()["data"]
        assert versions[0]["status"] == "rejected"
        # Everyone is back on the control, and the engine no longer holds the rejected version.
        assert {chat(client, f"u{i}")["x-loopchat-model-version"] for i in range(30)} == {"fake-base"}
        assert not engine.adapters
        # Decisions as metrics come from the database: the same on every replica.
        assert wait_until(
            lambda: 'loopchat_ab_decisions{action="rollback",by="auto"} 1.0' in client.get("/metrics").text,
            timeout=5,
        )
        assert 'loopchat_ab_decisions{action="start",by="operator"} 1.0' in client.get("/metrics").text


def test_a_better_candidate_is_promoted_and_takes_the_alias(
    ab_settings: Settings, admin_headers, tmp_path: Path
):
    with app_client(ab_settings) as client:
        register(client, admin_headers, "v1", tmp_path / "v1")
        start(client, admin_headers)
        insert_outcomes(ab_settings.db_url, "exp1", "control", "fake-base", n=150, rated=150, positive=75)
        insert_outcomes(ab_settings.db_url, "exp1", "cand", "v1", n=150, rated=150, positive=128)
        status = client.get("/admin/experiments/exp1", headers=admin_headers).json()
        assert status["outcomes"]["cand"]["positive_rate"] == pytest.approx(128 / 150)
        assert status["tests"]["cand"]["p_value"] < 0.05
        decision = client.post("/admin/experiments/exp1/evaluate", headers=admin_headers).json()
        assert decision["action"] == "promote" and decision["variant"] == "cand"
        assert decision["numbers"]["variants"]["cand"]["p_value"] < 0.05
        status = client.get("/admin/experiments/exp1", headers=admin_headers).json()
        assert status["experiment"]["status"] == "promoted"
        assert [d["action"] for d in status["decisions"]] == ["start", "promote"]
        headers = chat(client, "anyone")
        assert headers["x-loopchat-model-version"] == "v1" and "x-loopchat-experiment" not in headers
        versions = {
            v["name"]: v["status"]
            for v in client.get("/admin/adapters", headers=admin_headers).json()["data"]
        }
        assert versions == {"v1": "active"}


def test_side_by_side_choices_during_an_experiment_count_in_it(
    ab_settings: Settings, admin_headers, tmp_path: Path
):
    with app_client(ab_settings) as client:
        register(client, admin_headers, "v1", tmp_path / "v1")
        # A 5 % canary that decides on choices: every side-by-side user sees its answer.
        policy = {"metric": "choices", "min_ratings_per_variant": 12}
        start(client, admin_headers, variants=[{"name": "cand", "version": "v1", "weight": 5}], policy=policy)
        ask = {"messages": USER, "max_tokens": 3}
        for i in range(12):
            pair = client.post("/v1/chat/compare", json={**ask, "user": f"user-{i}"}).json()
            by_model = {c["model"]: c["id"] for c in pair["completions"]}
            assert set(by_model) == {"fake-base", "v1"}
            choice = {
                "chosen_completion_id": by_model["v1"],
                "rejected_completion_id": by_model["fake-base"],
                "user": f"user-{i}",
            }
            assert client.post("/v1/feedback/preference", json=choice).status_code in (200, 201)
        # Naming the versions compares them outside the experiment: not counted.
        named = client.post("/v1/chat/compare", json={**ask, "models": ["fake-base", "v1"]}).json()
        logged = wait_until(
            lambda: rows(
                ab_settings.db_url,
                "SELECT id, experiment, variant FROM completion WHERE pair_id = :p",
                p=named["id"],
            )
        )
        assert len(logged) == 2 and {r["experiment"] for r in logged} == {""}

        def status():
            return client.get("/admin/experiments/exp1", headers=admin_headers).json()

        counted = wait_until(lambda: status()["outcomes"]["cand"]["pairwise_wins"] == 12)
        assert counted, status()["outcomes"]
        current = status()
        assert current["metric"] == "choices" and current["outcomes"]["control"]["pairwise_losses"] == 12
        assert current["choice_tests"]["cand"]["candidate_rate"] == 1.0
        decision = client.post("/admin/experiments/exp1/evaluate", headers=admin_headers).json()
        assert decision["action"] == "promote", decision
        assert "share of side-by-side choices 1.000" in decision["reason"]


def test_the_ramp_advances_after_the_minimum_samples(ab_settings: Settings, admin_headers, tmp_path: Path):
    with app_client(ab_settings) as client:
        register(client, admin_headers, "v1", tmp_path / "v1")
        started = start(
            client,
            admin_headers,
            ramp=[5, 25, 50],
            min_samples_per_stage=10,
            variants=[{"name": "cand", "version": "v1"}],
        )
        assert [v["weight"] for v in started["variants"]] == [95, 5]
        insert_outcomes(ab_settings.db_url, "exp1", "cand", "v1", n=9)
        assert (
            client.post("/admin/experiments/exp1/evaluate", headers=admin_headers).json()["action"] == "hold"
        )
        insert_outcomes(ab_settings.db_url, "exp1", "cand", "v1", n=1)
        assert (
            client.post("/admin/experiments/exp1/evaluate", headers=admin_headers).json()["action"] == "ramp"
        )
        experiment = client.get("/admin/experiments/exp1", headers=admin_headers).json()["experiment"]
        assert experiment["stage"] == 1 and [v["weight"] for v in experiment["variants"]] == [75, 25]
        # The next stage counts only requests served at this one.
        assert (
            client.post("/admin/experiments/exp1/evaluate", headers=admin_headers).json()["action"] == "hold"
        )


def test_concurrent_evaluators_apply_a_decision_once(ab_settings: Settings, admin_headers, tmp_path: Path):
    with app_client(ab_settings) as client:
        register(client, admin_headers, "v1", tmp_path / "v1")
        start(client, admin_headers)
        insert_outcomes(ab_settings.db_url, "exp1", "control", "fake-base", n=150, rated=150, positive=60)
        insert_outcomes(ab_settings.db_url, "exp1", "cand", "v1", n=150, rated=150, positive=130)
    engines = [make_engine(ab_settings.db_url) for _ in range(4)]
    services = [ExperimentService(engine, base_name="fake-base") for engine in engines]
    actions: list[str] = []
    barrier = threading.Barrier(len(services))

    def evaluate(service: ExperimentService) -> None:
        barrier.wait()
        actions.append(service.evaluate("exp1").action)

    threads = [threading.Thread(target=evaluate, args=(s,)) for s in services]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for engine in engines:
        engine.dispose()
    decisions = rows(
        ab_settings.db_url, "SELECT action FROM ab_decision WHERE experiment = 'exp1' ORDER BY id"
    )
    assert [d["action"] for d in decisions] == ["start", "promote"]
    assert len(actions) == 4


@pytest.mark.parametrize(
    ("spec", "status", "fragment"),
    [
        ({"variants": [{"name": "cand", "version": "nope", "weight": 10}]}, 404, "nope"),
        ({"variants": [{"name": "control", "version": "v1", "weight": 10}]}, 400, "unique"),
        ({"variants": [{"name": "cand", "version": "v1", "weight": 101}]}, 400, "100"),
        ({"variants": [{"name": "cand", "version": "v1"}]}, 400, "weights or a ramp"),
        ({"ramp": [25, 5]}, 400, "rise"),
        ({"control": "v1"}, 400, "different model version"),
        ({"policy": {"alpha": 0.9}}, 400, "alpha"),
        ({"surprise": 1}, 400, "surprise"),
    ],
)
def test_bad_experiments_are_refused_and_nothing_starts(
    ab_settings: Settings, admin_headers, tmp_path: Path, spec, status, fragment
):
    with app_client(ab_settings) as client:
        register(client, admin_headers, "v1", tmp_path / "v1")
        body = {"name": "exp1", "variants": [{"name": "cand", "version": "v1", "weight": 50}], **spec}
        response = client.post("/admin/experiments", json=body, headers=admin_headers)
        assert response.status_code == status, response.text
        assert fragment in response.json()["error"]["message"]
        assert client.get("/admin/experiments", headers=admin_headers).json()["count"] == 0
        assert client.get("/admin/adapters", headers=admin_headers).json()["data"][0]["status"] == "candidate"


def test_experiment_state_errors(ab_settings: Settings, admin_headers, tmp_path: Path):
    with app_client(ab_settings) as client:
        register(client, admin_headers, "v1", tmp_path / "v1")
        register(client, admin_headers, "v2", tmp_path / "v2")
        start(client, admin_headers)
        second = {"name": "exp2", "variants": [{"name": "b", "version": "v2", "weight": 5}]}
        assert client.post("/admin/experiments", json=second, headers=admin_headers).status_code == 409
        duplicate = client.post("/admin/experiments", json={**second, "name": "exp1"}, headers=admin_headers)
        assert duplicate.status_code == 409
        assert client.get("/admin/experiments/zzz", headers=admin_headers).status_code == 404
        bad = client.put(
            "/admin/experiments/exp1/weights", json={"weights": {"cand": 150}}, headers=admin_headers
        )
        assert bad.status_code == 400
        unknown = client.put(
            "/admin/experiments/exp1/weights", json={"weights": {"zz": 1}}, headers=admin_headers
        )
        assert unknown.status_code == 400 and "unknown variants" in unknown.json()["error"]["message"]
        # A canary cannot be retired from under the experiment.
        assert client.delete("/admin/adapters/v1", headers=admin_headers).status_code == 409
        rolled = client.post(
            "/admin/experiments/exp1/rollback", json={"reason": "looks off"}, headers=admin_headers
        )
        assert rolled.status_code == 200 and rolled.json()["status"] == "rolled_back"
        again = client.post("/admin/experiments/exp1/promote", json={}, headers=admin_headers)
        assert again.status_code == 400 and "rolled_back" in again.json()["error"]["message"]
        # A rejected version cannot be activated or put in a new experiment.
        assert client.put("/admin/active", json={"name": "v1"}, headers=admin_headers).status_code == 409
        retry = {"name": "exp3", "variants": [{"name": "c", "version": "v1", "weight": 5}]}
        assert client.post("/admin/experiments", json=retry, headers=admin_headers).status_code == 400
        # The log of decisions is complete.
        decisions = client.get("/admin/experiments/exp1", headers=admin_headers).json()["decisions"]
        assert [(d["action"], d["actor"], d["reason"]) for d in decisions] == [
            ("start", "operator", "control fake-base; cand=v1"),
            ("rollback", "operator", "looks off"),
        ]


def test_a_version_a_replica_cannot_load_goes_to_control_there_and_loads_when_it_can(
    ab_settings: Settings, admin_headers, tmp_path: Path
):
    engine_a, engine_b = FakeEngine(), FakeEngine()
    engine_b.unloadable_adapters.add("v1")
    with app_client(ab_settings, engine_a) as a, app_client(ab_settings, engine_b) as b:
        b.app.state.watcher.retry_failed_s = 0.2
        register(a, admin_headers, "v1", tmp_path / "v1")
        start(a, admin_headers, variants=[{"name": "cand", "version": "v1", "weight": 100}])
        assert chat(a, "alice")["x-loopchat-model-version"] == "v1"
        # B may have polled between the registration and the start (v1 failed to load, no
        # experiment yet): it routes by the experiment once it has applied A's revision.
        assert wait_until(lambda: routing_revision(b) == routing_revision(a))

        # Replica B could not load v1: its requests go to the control, and it says so.
        listed = b.get("/admin/adapters", headers=admin_headers).json()["data"][0]
        assert not listed["loaded"] and "not readable here" in listed["load_error"]
        headers = chat(b, "alice")
        assert (headers["x-loopchat-model-version"], headers["x-loopchat-variant"]) == (
            "fake-base",
            "control",
        )
        assert 'loopchat_adapter_load_failed{model_version="v1"} 1.0' in b.get("/metrics/").text
        # Once the adapter is readable there, B loads it without any registry change.
        engine_b.unloadable_adapters.clear()
        assert wait_until(lambda: chat(b, "bob")["x-loopchat-model-version"] == "v1")
        assert 'loopchat_adapter_load_failed{model_version="v1"} 0.0' in b.get("/metrics/").text


def test_an_experiment_gets_lora_room_before_its_traffic_and_gives_it_back_after(
    ab_settings: Settings, admin_headers, tmp_path: Path
) -> None:
    """With the LoRA room following demand: the experiment's start returns once the engine has
    room for its candidate (no request of it waits for an engine), and its end gives it back."""
    engine = FakeEngine(lora_on_demand=True)
    with app_client(ab_settings, engine) as client:
        folder = make_adapter_dir(tmp_path / "v1")
        (folder / "adapter_model.safetensors").touch()  # the fake engine reads no weights
        register(client, admin_headers, "v1", folder)
        assert engine.lora is None and engine.builds == []
        start(client, admin_headers)
        assert engine.lora is not None and engine.lora.slots == 2
        versions = {chat(client, user=f"user-{i}")["x-loopchat-model-version"] for i in range(24)}
        assert versions == {"fake-base", "v1"}
        assert len(engine.builds) == 1
        assert client.post("/admin/experiments/exp1/stop", headers=admin_headers).status_code == 200
        assert wait_until(lambda: engine.lora is None)
        assert chat(client, user="user-1")["x-loopchat-model-version"] == "fake-base"
