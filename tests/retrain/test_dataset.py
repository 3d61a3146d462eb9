"""Versioned datasets: formats, cleaning, stratified splits, content hash, KTO balance."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from feedback.clean import CleaningConfig
from retrain.dataset import build_dataset, kto_weights, split
from tests.utils.factories import log_completion, log_preference


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_dataset_files_splits_and_version(engine, tmp_path: Path) -> None:
    ids = set()
    for i in range(30):
        ids.add(log_completion(engine, f"question {i}", f"good answer {i}", thumb="up"))
    for i in range(10):
        ids.add(log_completion(engine, f"bad question {i}", f"bad answer {i}", thumb="down"))
    ids.add(
        log_completion(
            engine, "mail me", "write to bob@example.com", thumb="down", correction="Sure, I will."
        )
    )
    a = log_completion(engine, "pick", "answer A", version="v1")
    b = log_completion(engine, "pick", "answer B", version="v2")
    log_preference(engine, a, b)
    ids |= {a, b}
    ignored = log_completion(engine, "not selected", "an answer not selected", thumb="up")

    manifest = build_dataset(engine, ids, tmp_path)
    root = Path(manifest.path)
    assert root.name == manifest.version and manifest.version.startswith("ds-")
    # SFT: 30 positive + 1 correction; KTO: 30 up + 10 down + 1 down + 1 correction; DPO: pair + correction.
    assert sum(manifest.counts["sft"].values()) == 31
    assert sum(manifest.counts["kto"].values()) == 42
    assert sum(manifest.counts["dpo"].values()) == 2
    assert manifest.counts["kto"]["test"] >= 4 and manifest.counts["kto"]["validation"] >= 4
    kto_test = read(root / "kto.test.jsonl")
    assert {row["label"] for row in kto_test} == {True, False}  # stratified by label
    everything = "".join(
        (root / f).read_text() for f in ("sft.train.jsonl", "kto.train.jsonl", "dpo.train.jsonl")
    )
    assert "bob@example.com" not in everything and "not selected" not in everything
    for row in (
        read(root / "dpo.train.jsonl") + read(root / "dpo.test.jsonl") + read(root / "dpo.validation.jsonl")
    ):
        assert set(row) == {"prompt", "chosen", "rejected", "source"}
    on_disk = json.loads((root / "manifest.json").read_text())
    assert on_disk["version"] == manifest.version and on_disk["counts"] == manifest.counts

    # Same content, same version; new content, new version.
    assert build_dataset(engine, ids, tmp_path).version == manifest.version
    assert build_dataset(engine, ids | {ignored}, tmp_path).version != manifest.version


def test_duplicates_empty_short_and_long_answers_are_removed(engine, tmp_path: Path) -> None:
    ids = {log_completion(engine, "same", "same answer", thumb="up", user=f"u{i}") for i in range(3)}
    ids.add(log_completion(engine, "Same ", "same   ANSWER", thumb="up"))  # case and spacing only
    ids.add(log_completion(engine, "empty", "   ", thumb="up"))
    ids.add(log_completion(engine, "short", "k", thumb="up"))
    ids.add(log_completion(engine, "long", "word " * 2000, thumb="up"))
    ids.add(log_completion(engine, "x" * 9000, "an answer to a long question", thumb="up"))
    manifest = build_dataset(engine, ids, tmp_path, cleaning=CleaningConfig(max_chars=8000))
    assert sum(manifest.counts["sft"].values()) == 1
    assert manifest.removed["sft: duplicate"] == 3 and manifest.removed["sft: empty"] == 1
    assert manifest.removed["sft: too short"] == 1 and manifest.removed["sft: too long"] == 2
    # Off: the duplicates stay (a different content, a different version).
    loose = build_dataset(engine, ids, tmp_path, cleaning=CleaningConfig(dedup=False, min_chars=0))
    assert sum(loose.counts["sft"].values()) == 5 and loose.version != manifest.version


def test_split_is_deterministic_and_stratified() -> None:
    rows = [{"prompt": [{"role": "user", "content": str(i)}], "label": i % 4 == 0} for i in range(100)]
    first, again = split(rows, "kto", seed=1), split(list(reversed(rows)), "kto", seed=1)
    assert first == again
    assert [len(first[s]) for s in ("train", "validation", "test")] == [80, 10, 10]
    assert sum(r["label"] for r in first["test"]) == 2  # 25 true of 100: 10% of them held out
    assert split(rows, "kto", seed=2) != first


@pytest.mark.parametrize(("good", "bad"), [(10, 40), (40, 10), (12, 10), (0, 5)])
def test_kto_weights_follow_trls_balance_guidance(good: int, bad: int) -> None:
    rows = [{"label": True}] * good + [{"label": False}] * bad
    weights = kto_weights(rows)
    if good and bad:
        ratio = weights["desirable_weight"] * good / (weights["undesirable_weight"] * bad)
        assert 1 <= ratio <= 4 / 3 + 1e-6
    else:
        assert weights == {"desirable_weight": 1.0, "undesirable_weight": 1.0}


def test_evaluation_samples_held_out_rows_evenly_and_stably() -> None:
    from retrain.evaluate import _sample

    rows = [{"source": "rating", "i": i} for i in range(90)] + [
        {"source": "correction", "i": i} for i in range(10)
    ]
    picked = _sample(rows, 20)
    assert len(picked) == 20 and picked == _sample(list(reversed(rows)), 20)
    assert 0 < sum(r["source"] == "correction" for r in picked) < 10
    assert _sample(rows[:5], 20) == rows[:5]
