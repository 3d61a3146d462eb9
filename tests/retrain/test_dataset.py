"""Versioned datasets: formats, cleaning, stratified splits, content hash, KTO balance."""

from __future__ import annotations

import json
import math
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


def test_empty_short_and_long_answers_are_removed_and_repeats_weigh_by_raters(engine, tmp_path: Path) -> None:
    ids = {log_completion(engine, "same", "same answer", thumb="up", user=f"u{i}") for i in range(3)}
    ids.add(log_completion(engine, "Same ", "same   ANSWER", thumb="up"))  # case and spacing only
    ids.add(log_completion(engine, "empty", "   ", thumb="up"))
    ids.add(log_completion(engine, "short", "k", thumb="up"))
    ids.add(log_completion(engine, "long", "word " * 2000, thumb="up"))
    ids.add(log_completion(engine, "x" * 9000, "an answer to a long question", thumb="up"))
    manifest = build_dataset(engine, ids, tmp_path, cleaning=CleaningConfig(max_chars=8000))
    # Four people gave the same example: one example, 1 + log2(4) = 3 training copies.
    assert manifest.counts["sft"]["train"] == 3 and manifest.repeats["sft"] == {"merged": 3, "copies": 2}
    assert manifest.removed["sft: empty"] == 1
    assert manifest.removed["sft: too short"] == 1 and manifest.removed["sft: too long"] == 2
    # Off: the repeats stay separate examples, one copy each.
    loose = build_dataset(engine, ids, tmp_path, cleaning=CleaningConfig(dedup=False, min_chars=0))
    assert sum(loose.counts["sft"].values()) == 5 and loose.version != manifest.version


def test_one_persons_repetitions_count_once_and_strong_stars_count_double(engine, tmp_path: Path) -> None:
    fix = "The reset code is 4-7-1-9."
    # One user corrects the same answer ten times; ten users give the same correction once each.
    ids = {
        log_completion(engine, "reset code?", "no idea", thumb="down", correction=fix, user="pat")
        for _ in range(10)
    }
    solo = build_dataset(engine, ids, tmp_path / "solo")
    assert solo.source_size("sft", "correction") == 1 and solo.counts["sft"]["train"] == 1
    crowd = {
        log_completion(engine, "reset code?", "no idea", thumb="down", correction=fix, user=f"u{i}")
        for i in range(10)
    }
    many = build_dataset(engine, crowd, tmp_path / "crowd")
    assert many.counts["sft"]["train"] == round(1 + math.log2(10))
    five = {log_completion(engine, "tea?", "Brew it four minutes.", score=5, user="ann")}
    four = {log_completion(engine, "coffee?", "Grind it fresh.", score=4, user="bob")}
    starred = build_dataset(engine, five | four, tmp_path / "stars")
    rows = read(Path(starred.path) / "kto.train.jsonl")
    assert sum(r["completion"][0]["content"] == "Brew it four minutes." for r in rows) == 2
    assert sum(r["completion"][0]["content"] == "Grind it fresh." for r in rows) == 1


def test_split_is_by_prompt_in_every_format_and_rotates_with_the_salt(engine, tmp_path: Path) -> None:
    ids = set()
    for i in range(30):
        for user in ("a", "b"):  # two answers to each prompt, one liked, one corrected
            ids.add(log_completion(engine, f"question {i}", f"fine answer {i}", thumb="up", user=user))
        ids.add(
            log_completion(
                engine,
                f"question {i}",
                f"poor answer {i}",
                thumb="down",
                correction=f"better answer {i}",
                user="c",
            )
        )
    first = build_dataset(engine, ids, tmp_path, salt="0")
    root = Path(first.path)

    def prompts(fmt: str, name: str) -> set[str]:
        return {r["prompt"][-1]["content"] for r in read(root / f"{fmt}.{name}.jsonl")}

    trained = set().union(*(prompts(fmt, "train") for fmt in ("sft", "kto", "dpo")))
    held = set().union(
        *(prompts(fmt, name) for fmt in ("sft", "kto", "dpo") for name in ("validation", "test"))
    )
    assert held and trained.isdisjoint(held)
    assert len(prompts("sft", "test")) == 3 and len(prompts("sft", "validation")) == 3
    assert len(first.held_out) == 6 * 3  # every completion of a held-out prompt, listed unspent
    second = build_dataset(engine, ids, tmp_path, salt="1")
    root = Path(second.path)
    assert prompts("sft", "test") != {
        r["prompt"][-1]["content"] for r in read(Path(first.path) / "sft.test.jsonl")
    }


def test_a_handful_of_prompts_keeps_one_for_the_test_and_none_for_validation(engine, tmp_path: Path) -> None:
    ids = {
        log_completion(engine, f"q{i}", f"the answer {i}", thumb="down", correction=f"fixed {i}")
        for i in range(6)
    }
    manifest = build_dataset(engine, ids, tmp_path)
    assert manifest.counts["sft"] == {"train": 5, "validation": 0, "test": 1}


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
    from retrain.gate import _sample

    rows = [{"source": "rating", "i": i} for i in range(90)] + [
        {"source": "correction", "i": i} for i in range(10)
    ]
    picked = _sample(rows, 20)
    assert len(picked) == 20 and picked == _sample(list(reversed(rows)), 20)
    assert 0 < sum(r["source"] == "correction" for r in picked) < 10
    assert _sample(rows[:5], 20) == rows[:5]
