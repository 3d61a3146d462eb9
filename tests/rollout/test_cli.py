"""`loopchat adapters` and `loopchat ab` as an operator runs them (subprocess, SQLite)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rollout.experiment_spec import load_specs
from tests.serving.test_experiments_api import insert_outcomes, rows
from tests.utils.adapters import make_adapter_dir

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def cli(tmp_path: Path):
    env = {
        **os.environ,
        "LOOPCHAT_DATA_DIR": str(tmp_path),
        "LOOPCHAT_BASE_MODEL": str(tmp_path / "fake-base"),
        "LOOPCHAT_DATABASE_URL": f"sqlite:///{tmp_path / 'loopchat.db'}",
    }

    def run(*args: str, ok: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run(
            [sys.executable, "-m", "loopchat.cli", *args],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
        )
        if ok:
            assert result.returncode == 0, result.stderr + result.stdout
        else:
            assert result.returncode == 1, result.stdout
            assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr
        return result

    run.url = env["LOOPCHAT_DATABASE_URL"]
    return run


def adapter(tmp_path: Path, name: str) -> Path:
    folder = make_adapter_dir(tmp_path / name)
    (folder / "adapter_model.safetensors").write_bytes(b"")
    return folder


def test_register_start_report_and_roll_back(cli, tmp_path: Path) -> None:
    out = cli(
        "adapters",
        "register",
        "v1",
        str(adapter(tmp_path, "v1")),
        "--dataset-version",
        "ds-1",
        "--metrics",
        '{"perplexity": 3.2}',
    ).stdout
    assert "registered v1 (candidate)" in out
    listed = cli("adapters", "list").stdout
    assert "fake-base" in listed and "v1" in listed and "candidate" in listed and "ds-1" in listed

    spec = tmp_path / "exp.yaml"
    spec.write_text(
        yaml.safe_dump({"name": "exp1", "ramp": [5, 25], "variants": [{"name": "cand", "version": "v1"}]})
    )
    assert "control=fake-base 95%, cand=v1 5%" in cli("ab", "start", str(spec)).stdout
    insert_outcomes(cli.url, "exp1", "control", "fake-base", n=40, rated=40, positive=20)
    insert_outcomes(cli.url, "exp1", "cand", "v1", n=40, rated=40, positive=30)

    status = cli("ab", "status").stdout
    assert "exp1 (running, ramp stage 1/2)" in status and "0.750" in status and "0.500" in status
    assert "cand=v1 30%" in cli("ab", "weights", "exp1", "cand=30").stdout

    chart = tmp_path / "charts" / "exp1.png"
    report = cli("ab", "report", "exp1", "--png", str(chart)).stdout
    assert "weights" in report and "start" in report
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and chart.stat().st_size > 10_000

    assert "rolled back (rolled_back)" in cli("ab", "rollback", "exp1", "--reason", "manual check").stdout
    assert "rejected" in cli("adapters", "list").stdout
    decisions = rows(cli.url, "SELECT action, actor, reason FROM ab_decision ORDER BY id")
    assert [(d["action"], d["reason"]) for d in decisions][-1] == ("rollback", "manual check")


def test_cli_errors_are_clear_and_change_nothing(cli, tmp_path: Path) -> None:
    assert "not a folder" in cli("adapters", "register", "v1", str(tmp_path / "missing"), ok=False).stderr
    no_weights = make_adapter_dir(tmp_path / "no-weights")
    assert "no adapter weights" in cli("adapters", "register", "v1", str(no_weights), ok=False).stderr
    assert "reserved" in cli("adapters", "register", "loopchat", str(adapter(tmp_path, "a")), ok=False).stderr
    assert (
        "JSON"
        in cli("adapters", "register", "v1", str(adapter(tmp_path, "b")), "--metrics", "{", ok=False).stderr
    )
    cli("adapters", "register", "v1", str(adapter(tmp_path, "c")))
    assert "already exists" in cli("adapters", "register", "v1", str(adapter(tmp_path, "d")), ok=False).stderr
    assert "no model version" in cli("adapters", "retire", "zzz", ok=False).stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nvariants: []\n")
    assert "bad.yaml" in cli("ab", "start", str(bad), ok=False).stderr
    assert "no experiment is running" in cli("ab", "status", ok=False).stderr
    assert "VARIANT=PERCENT" in cli("ab", "weights", "exp1", "cand", ok=False).stderr
    assert "no experiment" in cli("ab", "promote", "zzz", ok=False).stderr
    assert rows(cli.url, "SELECT name, status FROM model_version") == [{"name": "v1", "status": "candidate"}]
    assert rows(cli.url, "SELECT count(*) AS n FROM experiment") == [{"n": 0}]


def test_the_example_experiments_file_is_valid() -> None:
    specs = load_specs(REPO / "deploy" / "experiments.example.yaml")
    assert [s.name for s in specs] == ["smollm-v2-canary", "two-candidates"]
    assert specs[0].ramp == [5, 25, 50] and specs[1].variants[1].weight == 10
