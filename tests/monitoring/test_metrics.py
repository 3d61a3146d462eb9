"""The service's own metrics: retraining runs read from the database, multiprocess mode."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from sqlmodel import Session

from feedback.db import make_engine, migrate
from feedback.models import TrainingRun
from loopchat.settings import MonitoringSettings, Settings
from monitoring.loop_stats import LoopMetrics, read_snapshot
from monitoring.metrics import ExperimentMetrics
from serving.app import create_app
from tests.conftest import wait_ready
from tests.utils.fake_engine import FakeEngine

REPO = Path(__file__).resolve().parents[2]


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def add_run(url: str, run_id: str, status: str, finished_minutes_ago: float | None, **fields) -> None:
    now = datetime.now(UTC)
    finished = None if finished_minutes_ago is None else now - timedelta(minutes=finished_minutes_ago)
    engine = make_engine(url)
    with Session(engine) as session:
        session.add(TrainingRun(id=run_id, status=status, finished_at=finished, **fields))
        session.commit()
    engine.dispose()


def evaluation(candidate_ppl: float, champion_ppl: float) -> dict:
    return {
        "evaluation": {
            "candidate": {
                "perplexity": candidate_ppl,
                "token_f1": 0.5,
                "preference_accuracy": None,
                "bias_answer_change": 0.3,
                "bias_refusal_gap": 0.125,
                "bias_pairs": 8,
            },
            "champion": {
                "perplexity": champion_ppl,
                "token_f1": 0.4,
                "bias_answer_change": 0.25,
                "bias_refusal_gap": None,
            },
        }
    }


def test_retrain_runs_read_from_the_database(database_url: str) -> None:
    migrate(database_url)
    registry = CollectorRegistry()
    metrics = LoopMetrics(registry)
    engine = make_engine(database_url)
    empty = read_snapshot(engine)
    # Every status is reported from the start, so `delta()` sees the first failure.
    assert empty.runs == {"running": 0, "registered": 0, "rejected": 0, "skipped": 0, "failed": 0}
    assert empty.last_gate_passed is None and not empty.last_evaluation

    durations = {"select": 1.5, "dataset": 0.2, "train": 40.0, "evaluate": 12.0}
    add_run(database_url, "r1", "registered", 60, durations=durations, metrics=evaluation(9.0, 10.0))
    add_run(database_url, "r2", "rejected", 30, durations=durations, metrics=evaluation(12.0, 10.0))
    add_run(database_url, "r3", "failed", 10, durations={"select": 2.0, "dataset": 0.5})
    add_run(database_url, "r4", "running", None)
    snapshot = read_snapshot(engine)
    engine.dispose()

    assert snapshot.runs == {"running": 1, "registered": 1, "rejected": 1, "skipped": 0, "failed": 1}
    # The newest finished run (the failure) gives the stage durations...
    assert snapshot.last_stage_seconds == {"select": 2.0, "dataset": 0.5}
    # ...and the newest gated run (the rejection) the evaluation.
    assert snapshot.last_gate_passed == 0.0
    assert snapshot.last_evaluation[("candidate", "perplexity")] == 12.0
    assert snapshot.last_evaluation[("champion", "token_f1")] == 0.4
    assert ("candidate", "preference_accuracy") not in snapshot.last_evaluation
    # The bias probe's answer change and refusal gap, beside the other scores.
    assert snapshot.last_evaluation[("candidate", "bias_refusal_gap")] == 0.125
    assert snapshot.last_evaluation[("champion", "bias_answer_change")] == 0.25
    assert ("champion", "bias_refusal_gap") not in snapshot.last_evaluation
    assert snapshot.last_finished["failed"] > snapshot.last_finished["registered"]
    assert abs(snapshot.last_finished["failed"] - (time.time() - 600)) < 60

    metrics.apply(snapshot)
    values = samples(generate_latest(registry).decode())
    assert values[("loopchat_retrain_runs", (("status", "failed"),))] == 1
    assert values[("loopchat_retrain_last_stage_seconds", (("stage", "select"),))] == 2.0
    key = ("loopchat_retrain_last_evaluation", (("metric", "perplexity"), ("model", "candidate")))
    assert values[key] == 12.0
    key = ("loopchat_retrain_last_evaluation", (("metric", "bias_answer_change"), ("model", "candidate")))
    assert values[key] == 0.3


def test_service_reports_retrain_runs(db_settings: Settings) -> None:
    settings = db_settings.model_copy(update={"monitoring": MonitoringSettings(database_refresh_s=0.1)})
    with TestClient(create_app(settings, engine=FakeEngine(), exit_on_engine_failure=False)) as client:
        wait_ready(client)
        add_run(settings.db_url, "r1", "registered", 1, metrics=evaluation(9.0, 10.0))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            values = samples(client.get("/metrics").text)
            if values.get(("loopchat_retrain_runs", (("status", "registered"),))) == 1:
                break
            time.sleep(0.1)
        assert values[("loopchat_retrain_runs", (("status", "registered"),))] == 1
        assert values[("loopchat_retrain_last_gate_passed", ())] == 1
        assert values[("loopchat_loop_stats_up", ())] == 1


WORKER = textwrap.dedent(
    """
    import sys, time
    from fastapi.testclient import TestClient
    from serving.app import create_app
    from loopchat.settings import Settings
    from tests.utils.fake_engine import FakeEngine

    folder, chats, wait = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "wait"
    settings = Settings(data_dir=folder, base_model=folder + "/fake-base")
    with TestClient(create_app(settings, engine=FakeEngine(), exit_on_engine_failure=False)) as client:
        while client.get("/readyz").status_code != 200:
            time.sleep(0.01)
        for _ in range(chats):
            chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
            assert client.post("/v1/chat/completions", json=chat).status_code == 200
        if wait:
            print("served", flush=True)
            sys.stdin.readline()
            print(client.get("/metrics").text, flush=True)
    """
)

COLLECT = textwrap.dedent(
    """
    from prometheus_client import CollectorRegistry, generate_latest, multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    print(generate_latest(registry).decode())
    """
)


def test_multiprocess_mode_reports_every_worker(tmp_path: Path) -> None:
    """Two worker processes sharing PROMETHEUS_MULTIPROC_DIR: whichever answers /metrics reports
    both, counters summed, live gauges from the live workers only."""
    shared = tmp_path / "prometheus"
    shared.mkdir()
    # vLLM would log to standard output, which the test reads.
    env = {
        **os.environ,
        "PROMETHEUS_MULTIPROC_DIR": str(shared),
        "PYTHONPATH": str(REPO),
        "VLLM_CONFIGURE_LOGGING": "0",
    }
    worker = [sys.executable, "-c", WORKER]
    first = subprocess.Popen(
        [*worker, str(tmp_path / "a"), "3", "wait"],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert first.stdout.readline().strip() == "served"
        # The second worker serves 2 chats and exits (and is marked dead); its counters stay.
        second = subprocess.run(
            [*worker, str(tmp_path / "b"), "2", "exit"], env=env, capture_output=True, text=True, timeout=120
        )
        assert second.returncode == 0, second.stderr
        output, _ = first.communicate("\n", timeout=60)
    finally:
        first.kill()
    chat = (("finish_reason", "length"), ("model_version", "fake-base"), ("variant", "none"))
    values = samples(output)
    assert values[("loopchat_chat_requests_total", chat)] == 5
    assert values[("loopchat_completion_tokens_total", (("model_version", "fake-base"),))] == 10
    assert values[("loopchat_engine_ready", ())] == 1  # livemin over the live worker
    assert values[("loopchat_chat_inflight_requests", ())] == 0

    # After both exited: counters remain, no live gauge does.
    collect = subprocess.run(
        [sys.executable, "-c", COLLECT], env=env, capture_output=True, text=True, timeout=60
    )
    totals = samples(collect.stdout)
    assert totals[("loopchat_chat_requests_total", chat)] == 5
    assert ("loopchat_engine_ready", ()) not in totals


def test_an_ended_experiments_last_numbers_stay_until_the_next_starts() -> None:
    registry = CollectorRegistry()
    metrics = ExperimentMetrics(registry)
    numbers = {"variants": {"cand": {"p_value": 0.01}}, "outcomes": {"control": {"positive_rate": 0.5}}}
    metrics.observe_evaluation("exp1", numbers)
    metrics.weight.labels("exp1", "cand", "v1").set(50)
    metrics.on_experiment(None)  # exp1 ended: why it ended stays visible, its weights go
    values = samples(generate_latest(registry).decode())
    assert values[("loopchat_experiment_p_value", (("experiment", "exp1"), ("variant", "cand")))] == 0.01
    assert not any(name == "loopchat_experiment_weight_percent" for name, _ in values)
    metrics.on_experiment("exp2")
    values = samples(generate_latest(registry).decode())
    assert not any(dict(labels).get("experiment") == "exp1" for _, labels in values)
