"""Retraining runs end to end with real TRL training on the embedded model (a few steps each)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import update
from sqlmodel import Session, select

from feedback.db import make_engine, migrate
from feedback.models import Experiment, ModelVersionRecord, RetrainLock, TrainingRun, TrainingSample
from loopchat.settings import Settings
from retrain.config import GateConfig, RetrainConfig, ScheduleConfig, SelectionConfig, TrainingConfig
from retrain.pipeline import RetrainBusyError, RetrainRunner, due, retrain_lock
from tests.utils.factories import log_completion, log_preference

LENIENT = GateConfig(
    max_perplexity_ratio=100.0,
    min_token_accuracy_gain=-1.0,
    min_preference_accuracy=0.0,
    min_reward_auc=0.0,
    max_f1_drop=1.0,
    f1_examples=2,
    max_new_tokens=4,
    bias_examples=2,
)
TINY = TrainingConfig(
    max_steps=2,
    learning_rate=2e-4,
    batch_size=4,
    max_length=96,
    lora_r=4,
    lora_alpha=8,
    early_stopping_patience=0,
)


def config(**overrides) -> RetrainConfig:
    values = dict(
        min_examples=4,
        canary_ramp=[5, 25],
        selection=SelectionConfig(budget=500, embed=False),
        training=TINY,
        gate=LENIENT,
    )
    return RetrainConfig(**{**values, **overrides})


@pytest.fixture
def world(database_url: str, tmp_path: Path, base_model_path: Path):
    migrate(database_url)
    engine = make_engine(database_url)
    settings = Settings(data_dir=tmp_path, base_model=base_model_path, database_url=database_url)
    for i in range(16):
        log_completion(
            engine, f"Tell me about topic {i}.", f"Topic {i} is a fine subject to learn about.", thumb="up"
        )
    for i in range(8):
        log_completion(engine, f"Explain item {i}.", f"No. {i}", thumb="down")
    for i in range(6):
        chosen = log_completion(engine, f"Greet user {i}.", f"Hello user {i}, nice to meet you!", version="a")
        rejected = log_completion(engine, f"Greet user {i}.", "Go away.", version="b")
        log_preference(engine, chosen, rejected)
    yield settings, engine
    engine.dispose()


def test_a_run_selects_trains_gates_registers_and_starts_a_canary(world) -> None:
    settings, engine = world
    run = RetrainRunner(settings, engine, config(method="sft")).run()
    assert run.status == "registered", run.reason
    assert run.method == "sft" and run.champion == "SmolLM2-135M-Instruct"
    assert set(run.durations) == {"select", "dataset", "train", "evaluate"}
    evaluation = run.metrics["evaluation"]
    assert evaluation["candidate"]["perplexity"] > 1 and evaluation["champion"]["perplexity"] > 1
    assert 0 <= evaluation["candidate"]["token_f1"] <= 1
    assert evaluation["candidate"]["preference_accuracy"] is not None
    for model in ("candidate", "champion"):
        assert evaluation[model]["bias_pairs"] == 2 and 0 <= evaluation[model]["bias_answer_change"] <= 1
        assert evaluation[model]["bias_refusal_gap"] is not None
    assert run.metrics["training"]["tokens"] > 0
    with Session(engine) as session:
        version = session.get(ModelVersionRecord, run.candidate)
        assert version is not None and version.status == "canary"
        assert (version.training_run, version.dataset_version, version.parent) == (
            run.id,
            run.dataset_version,
            "SmolLM2-135M-Instruct",
        )
        experiment = session.exec(select(Experiment).where(Experiment.status == "running")).one()
        assert experiment.variants[1]["version"] == run.candidate and experiment.ramp == [5, 25]
        samples = session.exec(select(TrainingSample).where(TrainingSample.run_id == run.id)).all()
        assert len(samples) == run.metrics["selection"]["picked"] == 36 and all(s.reasons for s in samples)
    folder = Path(version.adapter_path)
    assert (folder / "adapter_model.safetensors").is_file()
    sidecar = json.loads((folder / "loopchat.json").read_text())
    assert sidecar["dataset_version"] == run.dataset_version and sidecar["hyperparameters"]["lora_r"] == 4
    assert not list(folder.parent.glob(".*.partial"))


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_thumbs_alone_however_skewed_train_kto_judged_on_its_own_held_out_answers(
    database_url: str, tmp_path: Path, base_model_path: Path
) -> None:
    """1 liked answer among 24: no SFT held-out data, and still a candidate judged by KTO's own."""
    migrate(database_url)
    engine = make_engine(database_url)
    settings = Settings(data_dir=tmp_path, base_model=base_model_path, database_url=database_url)
    log_completion(engine, "Name a fruit.", "Apple, and a fine one too.", thumb="up")
    for i in range(23):
        log_completion(engine, f"Name thing {i}.", f"Thing {i} is a thing.", thumb="down")
    run = RetrainRunner(settings, engine, config(method="auto", canary=False)).run()
    engine.dispose()
    assert run.status == "registered", run.reason
    assert run.method == "kto"
    # TRL's KTO weights: the rare liked side may be weighted up, never the disliked one.
    kto = run.metrics["dataset"]["kto"]
    assert kto["desirable_weight"] >= 1 and kto["undesirable_weight"] == 1
    evaluation = run.metrics["evaluation"]
    assert evaluation["candidate"]["examples"] == 0 and evaluation["candidate"]["labeled"] >= 2
    assert evaluation["method"] == "kto" and evaluation["reward_auc"] is not None
    assert run.metrics["dataset"]["held_out"] >= 2
    with Session(engine) as session:
        samples = session.exec(select(TrainingSample).where(TrainingSample.run_id == run.id)).all()
    splits = [s.split for s in samples]
    assert splits.count("held_out") == run.metrics["dataset"]["held_out"] and "train" in splits


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_auto_with_corrections_and_choices_tries_a_dpo_stage_and_validation_decides(
    database_url: str, tmp_path: Path, base_model_path: Path
) -> None:
    """Corrections and side-by-side choices on a dozen prompts each: SFT on the corrections, then
    DPO from that adapter (its reference), kept or dropped by the validation figures; the name,
    the method and the gate follow what was kept."""
    migrate(database_url)
    engine = make_engine(database_url)
    settings = Settings(data_dir=tmp_path, base_model=base_model_path, database_url=database_url)
    for i in range(12):
        question, correction = f"What is the code of office {i}?", f"The code of office {i} is {100 + i}."
        log_completion(
            engine,
            question,
            f"I do not know office {i}.",
            thumb="down",
            correction=correction,
            user=f"rater-{i}",
        )
        chosen = log_completion(engine, f"Say hi to guest {i}.", f"Hello guest {i}, welcome!", version="a")
        rejected = log_completion(engine, f"Say hi to guest {i}.", "No.", version="b")
        log_preference(engine, chosen, rejected, user=f"chooser-{i}")
    tiny = TINY.model_copy(update={"min_validation": 1})
    run = RetrainRunner(settings, engine, config(method="auto", canary=False, training=tiny)).run()
    engine.dispose()
    assert run.status == "registered", run.reason
    second = run.metrics["training"]["second_stage"]
    assert second["method"] == "dpo" and second["reason"] and second["tokens"] > 0
    assert second["sft_before"] is not None and second["dpo_before"] is not None
    stages = "sft+dpo" if second["kept"] else "sft"
    assert run.method == stages and run.metrics["evaluation"]["method"] == stages
    assert run.candidate.endswith(stages.replace("+", "-"))
    folder = settings.data_dir / "adapters" / run.candidate
    assert (folder / "adapter_model.safetensors").is_file() and not (folder / "ref").exists()
    assert sorted(p.name for p in folder.parent.iterdir()) == [run.candidate]
    sidecar = json.loads((folder / "loopchat.json").read_text())
    kept = [stage["method"] for stage in sidecar["hyperparameters"].get("stages", [])]
    assert sidecar["method"] == stages and kept == (["sft", "dpo"] if second["kept"] else [])


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_failing_candidate_is_stored_as_rejected_with_its_reason(world) -> None:
    settings, engine = world
    strict = GateConfig(min_token_accuracy_gain=0.5, generate_f1=False, bias_probe=False)
    run = RetrainRunner(settings, engine, config(method="sft", gate=strict)).run()
    assert run.status == "rejected" and "token accuracy gain" in run.reason
    with Session(engine) as session:
        version = session.get(ModelVersionRecord, run.candidate)
        assert version.status == "rejected" and "token accuracy gain" in version.status_reason
        assert session.exec(select(Experiment)).first() is None


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_crash_midway_leaves_no_version_and_no_folder(world, monkeypatch) -> None:
    settings, engine = world

    def broken(*args, **kwargs):
        raise RuntimeError("evaluation machine fell over")

    monkeypatch.setattr("retrain.pipeline.score", broken)
    run = RetrainRunner(settings, engine, config(method="sft")).run()
    assert run.status == "failed" and "fell over" in run.reason
    with Session(engine) as session:
        assert session.exec(select(ModelVersionRecord)).first() is None
    assert not any((settings.data_dir / "adapters").iterdir())
    # The lock was released: the next run can start.
    assert RetrainRunner(settings, engine, config(min_examples=10_000)).run().status == "skipped"


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_runs_do_not_overlap_and_a_stale_lease_is_taken_over(world) -> None:
    settings, engine = world
    runner = RetrainRunner(settings, engine, config(min_examples=10_000))
    with retrain_lock(engine, "someone-else"), pytest.raises(RetrainBusyError):
        runner.run()
    with engine.begin() as connection:
        table = RetrainLock.__table__
        stale = datetime.now(UTC) - timedelta(minutes=1)
        connection.execute(update(table).values(owner="crashed-host", expires_at=stale))
    skipped = runner.run()
    assert skipped.status == "skipped" and "not enough training examples" in skipped.reason


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_the_schedule_needs_time_and_new_ratings(world) -> None:
    settings, engine = world
    schedule = config(schedule=ScheduleConfig(every_hours=1, min_new_ratings=20))
    assert due(engine, schedule)[0]  # 24 ratings, never trained
    with engine.begin() as connection:
        connection.execute(
            TrainingRun.__table__.insert(),
            {
                "id": "r0",
                "status": "registered",
                "trigger": "schedule",
                "config": {},
                "metrics": {},
                "durations": {},
                "started_at": datetime.now(UTC),
            },
        )
    ready, why = due(engine, schedule)
    assert not ready and "less than 1 h ago" in why
    later = datetime.now(UTC) + timedelta(hours=2)
    ready, why = due(engine, schedule, now=later)
    assert not ready and "0 new ratings" in why
