"""`loopchat retrain` and `loopchat runs` as an operator runs them (subprocess, SQLite)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from sqlmodel import Session

from feedback.db import make_engine, migrate
from feedback.models import TrainingRun
from tests.utils.factories import log_completion


def run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "LOOPCHAT_DATA_DIR": str(tmp_path),
        "LOOPCHAT_BASE_MODEL": str(tmp_path / "no-model"),
        "LOOPCHAT_DATABASE_URL": f"sqlite:///{tmp_path / 'loopchat.db'}",
    }
    return subprocess.run(
        [sys.executable, "-m", "loopchat.cli", *args], cwd=tmp_path, env=env, capture_output=True, text=True
    )


def test_a_run_without_enough_data_is_recorded_as_skipped(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'loopchat.db'}"
    migrate(url)
    engine = make_engine(url)
    for i in range(3):
        log_completion(engine, f"q{i}", f"a{i}", thumb="down", correction=f"better {i}")
    engine.dispose()
    config = tmp_path / "retrain.yaml"
    config.write_text("min_examples: 100\nselection: {embed: false}\n")
    done = run(tmp_path, "retrain", "--config", str(config))
    assert done.returncode == 0, done.stderr
    assert ": skipped: not enough training examples" in done.stdout
    run_id = done.stdout.split(":")[0].strip()
    assert run_id in run(tmp_path, "runs", "list").stdout
    shown = json.loads(run(tmp_path, "runs", "show", run_id).stdout)
    assert shown["status"] == "skipped" and len(shown["samples"]) == 3
    assert {"correction", "negative rating"} <= set(shown["samples"][0]["reasons"])
    assert shown["metrics"]["dataset"]["counts"]["sft"]["train"] >= 1


def test_cli_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("training: {learning_rate: -1}\n")
    failed = run(tmp_path, "retrain", "--config", str(bad))
    assert failed.returncode == 1 and "learning_rate" in failed.stderr and "Traceback" not in failed.stderr
    unknown = run(tmp_path, "runs", "show", "run-nope")
    assert unknown.returncode == 1 and "no run 'run-nope'" in unknown.stderr


def test_the_example_retraining_config_is_valid() -> None:
    from retrain.config import load_config

    config = load_config(Path(__file__).resolve().parents[2] / "deploy" / "retrain.example.yaml")
    assert config.training.lr_scheduler == "cosine" and config.canary_policy.max_latency_p95_ratio == 3.0
    assert config.selection.budget == 2000 and config.schedule.min_new_ratings == 200


def test_if_due_runs_at_most_once_per_schedule(tmp_path: Path) -> None:
    """`loopchat retrain --if-due`, as a Kubernetes CronJob runs it."""
    url = f"sqlite:///{tmp_path / 'loopchat.db'}"
    migrate(url)
    engine = make_engine(url)
    for i in range(3):
        log_completion(engine, f"q{i}", f"a{i}", thumb="up")
    engine.dispose()
    config = tmp_path / "retrain.yaml"
    config.write_text(
        "min_examples: 100\nselection: {embed: false}\nschedule: {every_hours: 24, min_new_ratings: 5}\n"
    )
    waiting = run(tmp_path, "retrain", "--config", str(config), "--if-due")
    assert waiting.returncode == 0 and "not due: 3 new ratings (< 5)" in waiting.stdout
    assert "run-" not in run(tmp_path, "runs", "list").stdout
    config.write_text(
        "min_examples: 100\nselection: {embed: false}\nschedule: {every_hours: 24, min_new_ratings: 3}\n"
    )
    done = run(tmp_path, "retrain", "--config", str(config), "--if-due")
    assert done.returncode == 0 and ": skipped: not enough training examples" in done.stdout
    # A skipped run does not restart the clock (data keeps coming); a trained one does.
    engine = make_engine(url)
    with Session(engine) as session:
        session.add(TrainingRun(id="run-trained", status="rejected"))
        session.commit()
    engine.dispose()
    again = run(tmp_path, "retrain", "--config", str(config), "--if-due")
    assert again.returncode == 0 and "not due: last run" in again.stdout
