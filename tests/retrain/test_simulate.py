"""`loopchat simulate`'s traffic and turns against the fake-engine app, with a stand-in retraining run.

The fake engine answers "[<adapter>] echo ..." from an adapter and "echo ..." from the base, so a
population that likes answers opening with "[" has a taste only a candidate meets: its canary
must be promoted. The run itself (training, the gate) is tests/retrain/test_pipeline.py's and
tests/test_loop.py's.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from feedback.models import TrainingRun
from loopchat.settings import ABSettings, Settings
from retrain import simulate
from retrain.populations import FAQS, Facts, Population, SideBySide
from retrain.sim_report import MARKDOWN_HEADER, SimulationReport
from retrain.sim_traffic import run_phase
from serving.app import create_app
from tests.conftest import wait_ready
from tests.utils.adapters import make_adapter_dir
from tests.utils.db import wait_for_rows
from tests.utils.fake_engine import FakeEngine


class LikesAdapters(Population):
    name, description = "likes-adapters", "answers from an adapter"
    prompts = ["hello there", "tell me a joke", "what is new"]

    def trait(self, prompt: str, answer: str) -> bool:
        return answer.startswith("[")


class AlwaysFirst(LikesAdapters):
    name, mode = "always-first", "compare"

    def choose(self, prompt: str, answer_a: str, answer_b: str) -> int:
        return 0


@pytest.fixture
def app_client(settings: Settings) -> Iterator[TestClient]:
    # The experiment is evaluated by the simulation's calls only.
    quiet = settings.model_copy(update={"ab": ABSettings(poll_interval_s=0.1, evaluate=False)})
    app = create_app(quiet, engine=FakeEngine(max_model_len=256), exit_on_engine_failure=False)
    with TestClient(app) as client:
        wait_ready(client)
        yield client


class StandInRunner:
    """What RetrainRunner does for the simulation: register a candidate and start its canary."""

    def __init__(self, client: TestClient, headers: dict[str, str], folder: Path) -> None:
        self.client, self.headers, self.folder, self.configs = client, headers, folder, []

    def __call__(self, config):
        self.configs.append(config)
        return self

    def policy(self) -> dict:
        config = self.configs[-1]
        metric = "ratings" if config.canary_metric == "auto" else config.canary_metric
        return {**config.canary_policy.model_dump(), "metric": metric}

    def run(self, *, trigger: str) -> TrainingRun:
        name = f"cand{len(self.configs)}"
        adapter = {"name": name, "path": str(make_adapter_dir(self.folder / name))}
        assert self.client.post("/admin/adapters", json=adapter, headers=self.headers).status_code == 201
        spec = {
            "name": f"canary-{name}",
            "variants": [{"name": "candidate", "version": name}],
            "ramp": self.configs[-1].canary_ramp,
            "min_samples_per_stage": 1,
            "policy": self.policy(),
        }
        started = self.client.post("/admin/experiments", json=spec, headers=self.headers)
        assert started.status_code == 201, started.text
        counts = {"dataset": {"counts": {"sft": {"train": 9}}}}
        return TrainingRun(
            id=f"run-{name}",
            status="registered",
            trigger=trigger,
            method="sft",
            candidate=name,
            dataset_version="ds-1",
            metrics=counts,
        )


def test_turns_measure_the_trait_per_arm_decide_the_canary_and_report(
    app_client: TestClient, admin_headers: dict[str, str], tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setattr(simulate, "SETTLE_S", 0.0)
    monkeypatch.setattr(simulate, "FLUSH_S", 0.2)
    monkeypatch.setattr(simulate, "MAX_AFTER_ROUNDS", 2)
    runner = StandInRunner(app_client, admin_headers, tmp_path)
    reports = simulate.run_turns(
        app_client,
        LikesAdapters(),
        runner,
        admin_headers,
        turns=2,
        config=simulate.simulation_config(),
        users=24,
        max_ratings=10,
    )
    first, second = reports
    assert [c.start_from for c in runner.configs] == ["base", "champion"]
    assert runner.configs[0].method == "auto" and runner.configs[0].training.max_steps == -1

    # Turn 1: the base never has the trait; at most 10 of its 24 answers are rated.
    assert first.before.answers == 24 and first.before.rate() == 0.0
    assert first.before.feedback == {"down": 10, "capped": 14}
    # After: the canary splits the users; only the candidate has the trait, and it is promoted.
    served = first.after.by_variant
    assert served["candidate"] >= 10 and served["control"] >= 10
    assert first.after.rate("candidate") == 1.0 and first.after.rate("control") == 0.0
    assert first.decision["action"] == "promote" and first.decision["status"] == "promoted"
    test = first.test()
    assert test.difference == 1.0 and test.interval[0] > 0 and test.p_value < 0.05
    assert first.run["counts"] == {"sft": {"train": 9}} and first.run["candidate"] == "cand1"
    assert first.ratings["up"] == served["candidate"] and first.ratings["down"] == 10 + served["control"]

    # Turn 2: the champion (cand1) has the trait already; no difference, so no decision, and
    # the last turn leaves its experiment running.
    assert second.before.rate() == 1.0
    assert second.after.rate("candidate") == second.after.rate("control") == 1.0
    assert second.decision["action"] == "hold" and second.decision["status"] == "running"
    assert second.decision["rounds"] == simulate.MAX_AFTER_ROUNDS

    report = SimulationReport("likes-adapters", LikesAdapters.description, reports)
    text = "\n".join(report.lines())
    assert "turn 1, before: 0.00 of 24 answers had the trait; feedback: capped 14, down 10" in text
    assert "after: candidate 1.00 of" in text and "always-valid interval [+" in text
    assert "A/B decision: promote" in text
    assert json.loads(json.dumps(report.as_dict()))["turns"][0]["interval"][0] > 0
    rows = report.markdown_row().splitlines()
    assert len(rows) == 2 and rows[0].startswith("| likes-adapters | 1 | 0.00 (24) | 1.00 (")
    assert rows[0].count("|") == MARKDOWN_HEADER.splitlines()[0].count("|")


def test_an_undecided_canary_is_stopped_before_the_next_turn(
    app_client: TestClient, admin_headers: dict[str, str], tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setattr(simulate, "SETTLE_S", 0.0)
    monkeypatch.setattr(simulate, "FLUSH_S", 0.0)
    monkeypatch.setattr(simulate, "MAX_AFTER_ROUNDS", 1)
    runner = StandInRunner(app_client, admin_headers, tmp_path)
    # Users who always choose the first answer (the order is shuffled) give no evidence either
    # way: the canary stays undecided.
    reports = simulate.run_turns(
        app_client,
        AlwaysFirst(),
        runner,
        admin_headers,
        turns=2,
        config=simulate.simulation_config(),
        users=4,
        max_ratings=None,
    )
    first, second = reports
    assert first.before.answers == 8 and first.before.feedback == {"choice": 4}
    # Side by side after: one candidate and one control answer per user.
    assert first.after.by_variant == {"candidate": 4, "control": 4, "all": 8}
    assert first.after.rate("candidate") == 1.0 and first.after.rate("control") == 0.0
    assert first.decision["status"] == "stopped" and first.decision["action"] == "hold"
    assert second.decision["experiment"] == "canary-cand2" and second.decision["status"] == "running"


class ChoosesAdapters(LikesAdapters):
    name, mode = "chooses-adapters", "compare"


def test_side_by_side_choices_decide_a_canary_on_choices(
    app_client: TestClient, admin_headers: dict[str, str], tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setattr(simulate, "SETTLE_S", 0.0)
    monkeypatch.setattr(simulate, "FLUSH_S", 0.2)
    runner = StandInRunner(app_client, admin_headers, tmp_path)
    config = simulate.simulation_config().model_copy(update={"canary_metric": "choices"})
    (report,) = simulate.run_turns(
        app_client,
        ChoosesAdapters(),
        runner,
        admin_headers,
        turns=1,
        config=config,
        users=16,
        max_ratings=None,
    )
    # Every user sees the control next to the candidate and chooses the candidate's answer.
    assert report.after.by_variant["candidate"] == report.after.by_variant["control"] >= 10
    assert report.after.feedback == {"choice": report.after.by_variant["candidate"]}
    assert report.decision["action"] == "promote" and report.decision["status"] == "promoted"
    assert "share of side-by-side choices 1.000" in report.decision["reason"]


def test_a_phase_posts_feedback_the_api_stores_and_stops_at_max_ratings(
    client: TestClient, settings: Settings
) -> None:
    # The fake engine echoes the question, which has no fact: every answer is corrected.
    phase = run_phase(client, Facts(), 8, round_name="t1-before", max_ratings=5, concurrency=1)
    assert phase.answers == 8 and phase.rate() == 0.0
    assert phase.feedback == {"down": 5, "correction": 5, "capped": 3}
    rows = wait_for_rows(settings.db_url, "SELECT thumb, correction FROM rating", 5)
    assert len(rows) == 5 and {r["thumb"] for r in rows} == {"down"}
    assert {r["correction"] for r in rows} <= {faq.answer for faq in FAQS}


def test_a_compare_phase_posts_choices(client: TestClient, settings: Settings) -> None:
    phase = run_phase(client, AlwaysFirst(), 3, round_name="t1-before", concurrency=1)
    assert phase.answers == 6 and phase.feedback == {"choice": 3}
    assert len(wait_for_rows(settings.db_url, "SELECT * FROM preference", 3)) == 3
    # Users who see no difference choose nothing.
    assert run_phase(client, SideBySide(), 2, round_name="t1-x", concurrency=1).feedback == {"none": 2}
