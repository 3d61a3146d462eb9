"""The loop learns: a reduced `loopchat demo` against the test server (real engine, real training)."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from retrain.demo import run_demo
from tests.conftest import LiveServer

pytestmark = pytest.mark.engine

# Before the loop the base model practically never opens with "Sure!"; after one turn the
# candidate must do so in a clearly larger share of its answers.
MARGIN = 0.3


def test_one_turn_of_the_loop_moves_answers_towards_the_users_taste(
    live_server: LiveServer, base_model_path: Path, tmp_path: Path
) -> None:
    report = run_demo(
        tmp_path,
        users=32,
        train_steps=30,
        server_url=live_server.url,
        admin_token=live_server.admin_token,
        database_url=live_server.database_url,
        base_model=base_model_path,
    )
    for line in report.lines():
        print(line)
    try:
        assert report.run["status"] == "registered", report.run["reason"]
        before, after = report.before.rate(), report.after.rate("candidate")
        assert report.after.by_variant.get("candidate", 0) >= 8
        assert after - before >= MARGIN, (before, after)
        assert report.decision["action"] == "promote" and report.decision["status"] == "promoted"
    finally:
        # Leave the shared test server as it was: the base model active, no experiment running.
        headers = live_server.admin_headers
        experiment = report.decision.get("experiment")
        if experiment:
            httpx.post(f"{live_server.url}/admin/experiments/{experiment}/stop", headers=headers, timeout=30)
        httpx.put(f"{live_server.url}/admin/active", json={"name": "SmolLM2-135M-Instruct"}, headers=headers,
                  timeout=30)  # fmt: skip
        if report.run.get("candidate"):
            httpx.delete(
                f"{live_server.url}/admin/adapters/{report.run['candidate']}", headers=headers, timeout=30
            )
