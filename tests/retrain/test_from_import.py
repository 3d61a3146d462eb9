"""The first adapter from imported transcripts (`retrain --from-import`), paraphrase augmentation,
and how augmented data is kept out of evaluation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlmodel import Session

from feedback.db import make_engine, migrate
from feedback.importer import import_file
from feedback.models import Completion, Experiment, ModelVersionRecord, Rating, TrainingSample
from feedback.redact import Redactor
from loopchat.settings import Settings
from retrain.augment import augment, judge, model_generator, tidy
from retrain.config import AugmentConfig, GateConfig, RetrainConfig, SelectionConfig, TrainingConfig
from retrain.dataset import SPLITS, build_dataset
from retrain.pipeline import RetrainRunner, new_ratings_since
from tests.utils.factories import log_completion

LENIENT = GateConfig(
    max_perplexity_ratio=100.0,
    min_token_accuracy_gain=-1.0,
    min_preference_accuracy=0.0,
    f1_examples=2,
    max_new_tokens=4,
    bias_examples=2,
)
TINY = TrainingConfig(
    max_steps=2, batch_size=4, max_length=96, lora_r=4, lora_alpha=8, early_stopping_patience=0
)


def write_transcripts(path: Path, good: int = 24, bad: int = 12) -> Path:
    """Support chats: approved answers, rejected ones, planted e-mail addresses."""
    with open(path, "w") as handle:
        for i in range(good):
            messages = [
                {"role": "user", "content": f"How do I fix problem {i}? Reply to user{i}@example.com"},
                {
                    "role": "assistant",
                    "content": f"To fix problem {i}, restart the app and sign in again.",
                    "approved": True,
                },
            ]
            handle.write(json.dumps({"messages": messages}) + "\n")
        for i in range(bad):
            messages = [
                {"role": "user", "content": f"Where is parcel {i}?"},
                {"role": "assistant", "content": f"Parcel {i}? No idea, ask someone else."},
            ]
            handle.write(json.dumps({"messages": messages, "rating": 1}) + "\n")
    return path


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


# -- paraphrases ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("paraphrase", "reason"),
    [
        ("How can I repair issue 3? Write to <EMAIL>", None),
        ("how do I fix   problem 3? Reply to <EMAIL>", "same as the original"),
        ("", "empty"),
        ("Fix?", "length far from the original"),
        ("How do I repair problem 3? Reply to me.", "lost a placeholder"),
        ("Bananas are yellow and grow in bunches on <EMAIL> trees", "drifted from the original"),
    ],
)
def test_paraphrases_are_judged(paraphrase: str, reason: str | None) -> None:
    assert judge("How do I fix problem 3? Reply to <EMAIL>", paraphrase) == reason


def test_generated_text_is_tidied() -> None:
    assert tidy('Rewritten message: "Where is my parcel?"') == "Where is my parcel?"
    assert tidy("  Paraphrase: where is it  ") == "where is it"
    assert tidy("Where is it?") == "Where is it?"


class FakeModel:
    """Rewords by a fixed rule, and sometimes badly (as a small model does)."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    def __call__(self, texts: Sequence[str]) -> list[str]:
        self.asked += texts
        out = []
        for n, text in enumerate(texts):
            if n % 3 == 2:
                out.append(text)  # the same again: refused
            else:
                out.append("Paraphrase: " + text.replace("How do I fix", f"How can I repair ({n % 3})"))
        return out


def test_augmentation_keeps_good_paraphrases_with_their_labels(engine, tmp_path: Path) -> None:
    import_file(engine, write_transcripts(tmp_path / "chats.jsonl", good=6, bad=0))
    with engine.connect() as connection:
        originals = connection.execute(select(Completion.id)).scalars().all()
    model = FakeModel()
    report = augment(engine, originals, AugmentConfig(paraphrases=2), model, Redactor())
    assert report == {"asked": 12, "kept": 8, "refused: same as the original": 4}
    with Session(engine) as session:
        made = session.exec(select(Completion).where(Completion.source == "paraphrase")).scalars().all()
        assert len(made) == 8 and {c.origin_id for c in made} <= set(originals)
        for completion in made:
            original = session.get(Completion, completion.origin_id)
            assert completion.response == original.response
            assert completion.messages[-1]["content"].startswith("How can I repair")
            assert "<EMAIL>" in completion.messages[-1]["content"]
            rating = session.exec(select(Rating).where(Rating.completion_id == completion.id)).scalars().one()
            assert rating.thumb == "up" and "paraphrase" in rating.tags
    # Asked again: only the originals short of two paraphrases are reworded.
    again = augment(engine, originals, AugmentConfig(paraphrases=2), FakeModel(), Redactor())
    assert again["asked"] == 4


def test_paraphrases_train_with_their_original_and_are_never_held_out(engine, tmp_path: Path) -> None:
    import_file(engine, write_transcripts(tmp_path / "chats.jsonl", good=30, bad=10))
    with engine.connect() as connection:
        originals = set(connection.execute(select(Completion.id)).scalars().all())
    augment(engine, sorted(originals), AugmentConfig(paraphrases=2), FakeModel(), Redactor())
    manifest = build_dataset(engine, originals, tmp_path / "datasets")
    for fmt in ("sft", "kto"):
        held_out = [r for split in ("validation", "test") for r in rows(manifest.file(fmt, split))]
        assert held_out and not [r for r in held_out if r["source"] == "paraphrase"]
        train = rows(manifest.file(fmt, "train"))
        paraphrased = [r for r in train if r["source"] == "paraphrase"]
        assert paraphrased
        # No held-out example comes back in other words: its paraphrases were dropped.
        held_answers = {r["completion"][0]["content"] for r in held_out}
        assert not [r for r in paraphrased if r["completion"][0]["content"] in held_answers]
        assert manifest.removed[f"{fmt}: paraphrase of a held-out example"] > 0
    assert manifest.sources["sft"]["paraphrase"] == len(
        [r for r in rows(manifest.file("sft", "train")) if r["source"] == "paraphrase"]
    )
    assert sum(manifest.size("sft", s) for s in SPLITS) == 30 + manifest.sources["sft"]["paraphrase"]


# -- the first adapter ------------------------------------------------------------------------------


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_the_first_adapter_from_imported_transcripts(
    database_url: str, tmp_path: Path, base_model_path: Path
) -> None:
    """Import, then `--from-import`: only imported answers are selected, paraphrased, trained with
    KTO (labels of both kinds, real TRL training), gated like any candidate, put on a canary. (The
    paraphrases come from the fake model here; the real one is tested on its own below.)"""
    migrate(database_url)
    engine = make_engine(database_url)
    settings = Settings(data_dir=tmp_path, base_model=base_model_path, database_url=database_url)
    import_file(engine, write_transcripts(tmp_path / "chats.jsonl", good=16, bad=8))
    live = {log_completion(engine, f"live question {i}", f"live answer {i}", thumb="up") for i in range(8)}
    assert new_ratings_since(engine, None) == 8  # imported labels are not new traffic for the schedule
    config = RetrainConfig(
        min_examples=4,
        canary_ramp=[5, 25],
        training=TINY,
        gate=LENIENT,
        selection=SelectionConfig(budget=500, embed=False, sources=["import"]),
        augment=AugmentConfig(paraphrases=1, max_new_tokens=24),
    )
    run = RetrainRunner(settings, engine, config, generator=FakeModel()).run(trigger="import")
    assert run.status == "registered", run.reason
    assert run.method == "kto" and run.trigger == "import"
    assert set(run.durations) == {"select", "augment", "dataset", "train", "evaluate"}
    assert run.metrics["augment"]["asked"] == 24 and 0 < run.metrics["augment"]["kept"] < 24
    with Session(engine) as session:
        picked = {s.completion_id for s in session.exec(select(TrainingSample)).scalars()}
        assert len(picked) == 24 and not picked & live and all(p.startswith("imp-") for p in picked)
        version = session.get(ModelVersionRecord, run.candidate)
        assert version is not None and version.status == "canary"
        assert session.exec(select(Experiment).where(Experiment.status == "running")).scalars().one()
    dataset = Path(settings.data_dir / "datasets" / run.dataset_version)
    everything = "".join(p.read_text() for p in dataset.glob("*.jsonl"))
    assert "@example.com" not in everything and "<EMAIL>" in everything
    for split in ("validation", "test"):
        assert not [r for r in rows(dataset / f"kto.{split}.jsonl") if r["source"] == "paraphrase"]
    engine.dispose()


def test_the_serving_model_writes_paraphrases(base_model_path: Path) -> None:
    generate = model_generator(base_model_path, None, AugmentConfig(max_new_tokens=24, batch_size=2), seed=0)
    out = generate(["Where is my parcel?", "How do I reset my password? I forgot it yesterday."])
    assert len(out) == 2 and all(isinstance(text, str) for text in out) and any(text.strip() for text in out)


def test_the_from_import_command(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'loopchat.db'}"
    migrate(url)
    engine = make_engine(url)
    import_file(engine, write_transcripts(tmp_path / "chats.jsonl", good=3, bad=2))
    log_completion(engine, "live question", "live answer", thumb="down")
    engine.dispose()
    (tmp_path / "retrain.yaml").write_text("min_examples: 1000\nselection: {embed: false}\n")
    env = {
        **os.environ,
        "LOOPCHAT_DATA_DIR": str(tmp_path),
        "LOOPCHAT_DATABASE_URL": url,
        "LOOPCHAT_BASE_MODEL": str(tmp_path / "no-model"),
    }

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "loopchat.cli", *args],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
        )

    done = cli("retrain", "--from-import", "--config", "retrain.yaml")
    assert done.returncode == 0 and ": skipped: not enough training examples" in done.stdout, done.stderr
    shown = json.loads(cli("runs", "show", done.stdout.split(":")[0].strip()).stdout)
    assert shown["trigger"] == "import" and len(shown["samples"]) == 5
    assert all(s["completion_id"].startswith("imp-") for s in shown["samples"])
    refused = cli("retrain", "--from-import", "--schedule")
    assert refused.returncode == 1 and "--from-import runs once" in refused.stderr
