"""Experiment outcomes read from the conversation log: the serving speed of each variant."""

from __future__ import annotations

from pathlib import Path

import pytest

from feedback.db import make_engine, migrate
from rollout.outcomes import experiment_outcomes
from tests.serving.test_experiments_api import insert_outcomes


def test_speed_is_read_apart_from_answer_length(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'log.db'}"
    migrate(url)
    # Same speed (40 ms to the first token, 10 ms per later token); the candidate answers at
    # twice the length, so its whole latency is about twice the control's.
    insert_outcomes(url, "exp", "control", "a", n=30, latency_ms=40 + 10 * 31, ttft_ms=40, tokens=32)
    insert_outcomes(url, "exp", "cand", "b", n=30, latency_ms=40 + 10 * 63, ttft_ms=40, tokens=64)
    engine = make_engine(url)
    try:
        outcomes = experiment_outcomes(engine, "exp", {"control": "a", "cand": "b"})
    finally:
        engine.dispose()
    control, candidate = outcomes["control"], outcomes["cand"]
    assert candidate.latency_p95_ms == pytest.approx(1.91 * control.latency_p95_ms, rel=0.01)
    for outcome in (control, candidate):
        assert outcome.ttft_p95_ms == pytest.approx(40)
        assert outcome.token_latency_p95_ms == pytest.approx(10)
