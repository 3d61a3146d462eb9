"""The `loopchat` command line as a user runs it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from loopchat.embedded_model import DONE_MARKER
from loopchat.local_server import free_port
from tests.conftest import REPO


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "loopchat.cli", *args],
        cwd=REPO,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_help_lists_the_commands() -> None:
    result = run_cli("--help")
    assert result.returncode == 0
    assert "serve" in result.stdout and "model" in result.stdout


def test_model_prepare_is_idempotent(base_model_path: Path) -> None:
    marker = base_model_path / DONE_MARKER
    before = marker.stat().st_mtime
    started = time.monotonic()
    result = run_cli("model", "prepare", env={"LOOPCHAT_DATA_DIR": str(base_model_path.parents[1])})
    assert result.returncode == 0, result.stderr
    assert "model ready" in result.stdout
    assert marker.stat().st_mtime == before
    assert time.monotonic() - started < 30
    for name in ("model.safetensors", "config.json", "tokenizer.json", "chat_template.jinja"):
        assert (base_model_path / name).is_file(), name


def test_serve_exits_nonzero_when_the_model_is_missing(tmp_path: Path) -> None:
    result = run_cli(
        "serve",
        "--port",
        str(free_port()),
        env={"LOOPCHAT_DATA_DIR": str(tmp_path), "LOOPCHAT_BASE_MODEL": str(tmp_path / "absent")},
        timeout=180,
    )
    assert result.returncode != 0
    assert "no model at" in result.stderr + result.stdout
