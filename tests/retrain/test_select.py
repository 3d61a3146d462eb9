"""Active-learning selection on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pytest

from feedback.models import TrainingRun, TrainingSample
from retrain.config import SelectionConfig
from retrain.select import select_samples
from tests.utils.factories import log_completion, log_preference


def test_signals_rank_the_samples_and_reasons_are_kept(engine) -> None:
    corrected = log_completion(engine, "capital of France?", "Lyon", thumb="down", correction="Paris")
    wrong = log_completion(engine, "2+2?", "5", thumb="down")
    good = log_completion(engine, "hello", "Hi! How can I help?", thumb="up")
    unsure = log_completion(engine, "tell me a fact", "Owls are birds", thumb="up", logprob_mean=-2.0)
    meh = log_completion(engine, "weather?", "It is sunny", score=3)
    unrated = log_completion(engine, "no feedback", "none")
    a = log_completion(engine, "pick one", "answer A", version="v1")
    b = log_completion(engine, "pick one", "answer B", version="v2")
    log_preference(engine, a, b)

    selection = select_samples(engine, SelectionConfig(budget=10, embed=False, novelty_weight=0.0))
    order = [c.completion_id for c in selection.picked]
    reasons = {c.completion_id: c.reasons for c in selection.picked}
    assert unrated not in order and meh in order  # a 3-star rating alone is weak but still a signal
    assert order[0] == corrected and set(reasons[corrected]) >= {"correction", "negative rating"}
    assert order.index(wrong) < order.index(unsure) < order.index(good)
    assert any(r.startswith("low confidence") for r in reasons[unsure])
    assert {"side-by-side choice", "versions disagree"} <= set(reasons[a]) and "versions disagree" in reasons[
        b
    ]
    assert selection.candidates == 7


def test_budget_duplicates_and_samples_used_before(engine) -> None:
    for i in range(5):
        log_completion(engine, "same question", "same answer", thumb="down", user=f"u{i}")
    distinct = [log_completion(engine, f"question {i}", f"answer {i}", thumb="down") for i in range(5)]
    selection = select_samples(engine, SelectionConfig(budget=4, embed=False))
    assert len(selection.picked) == 4
    texts = [c.text for c in selection.picked]
    # All ten carry the same signal, so which four win is a tie; a duplicate never appears twice.
    assert len(set(texts)) == 4 and texts.count("same question\nsame answer") <= 1
    everything = select_samples(engine, SelectionConfig(budget=100, embed=False))
    assert len(everything.picked) == 6 and everything.duplicates == 4
    # The repeats stay out of the budget but come along: five people said the same.
    assert len(everything.completion_ids) == 10
    assert all("repeats a pick" in " ".join(c.reasons) for c in everything.riders)

    # Samples a run already trained on are not candidates again.
    run = {
        "id": "r1",
        "status": "registered",
        "trigger": "manual",
        "config": {},
        "metrics": {},
        "durations": {},
        "started_at": datetime(2026, 1, 1, tzinfo=UTC),
    }
    used = [{"run_id": "r1", "completion_id": cid, "score": 1.0, "reasons": []} for cid in distinct]
    with engine.begin() as connection:
        connection.execute(TrainingRun.__table__.insert(), run)
        connection.execute(TrainingSample.__table__.insert(), used)
    remaining = select_samples(engine, SelectionConfig(budget=100, embed=False))
    assert {c.completion_id for c in remaining.picked}.isdisjoint(distinct)
    # What the run held out to judge its candidate is not spent: a later run may teach it.
    with engine.begin() as connection:
        connection.execute(
            TrainingSample.__table__.update()
            .where(TrainingSample.__table__.c.completion_id == distinct[0])
            .values(split="held_out")
        )
    rotated = select_samples(engine, SelectionConfig(budget=100, embed=False))
    assert distinct[0] in {c.completion_id for c in rotated.picked}
    assert {c.completion_id for c in rotated.picked}.isdisjoint(distinct[1:])
    # A run that did not register a version spends nothing.
    with engine.begin() as connection:
        connection.execute(TrainingRun.__table__.update().values(status="rejected"))
    again = select_samples(engine, SelectionConfig(budget=100, embed=False))
    assert set(distinct) <= {c.completion_id for c in again.picked}


def test_novelty_prefers_a_diverse_selection(engine) -> None:
    """With equal signals, the second pick is the one farthest from the first."""
    ids = [log_completion(engine, f"q{i}", f"a{i}", thumb="down") for i in range(3)]
    vectors = {0: [1.0, 0.0], 1: [0.99, 0.141], 2: [0.0, 1.0]}

    def embedder(texts):
        return np.array([vectors[int(t.split("\n")[0][1:])] for t in texts], dtype=np.float32)

    picked = select_samples(engine, SelectionConfig(budget=2, near_duplicate=0.999), embedder=embedder).picked
    first, second = (c.completion_id for c in picked)
    assert {first, second} in ({ids[0], ids[2]}, {ids[1], ids[2]})
    assert picked[1].reasons[-1].startswith("novelty")


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_minilm_embeddings_load_offline_and_group_paraphrases(engine) -> None:
    from retrain.embed import embed

    vectors = embed(
        [
            "How do I reset my password?",
            "I forgot my password, how can I reset it?",
            "What is the capital of France?",
        ]
    )
    assert vectors.shape == (3, 384)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert vectors[0] @ vectors[1] > 0.7 > vectors[0] @ vectors[2]


def test_only_completions_since_a_time_are_candidates(engine) -> None:
    earlier = log_completion(engine, "old question", "old answer", thumb="down")
    since = datetime.now(UTC)
    later = log_completion(engine, "new question", "new answer", thumb="down")
    picked = select_samples(engine, SelectionConfig(budget=10, embed=False, since=since)).completion_ids
    assert picked == {later}
    assert select_samples(engine, SelectionConfig(budget=10, embed=False)).completion_ids == {earlier, later}
