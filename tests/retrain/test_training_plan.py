"""What the training config leaves open follows the data: small sets are learned, large ones not
overfitted, and validation decides only when it is large enough to trust."""

from __future__ import annotations

from retrain.config import RetrainConfig, TrainingConfig
from retrain.dataset import DatasetManifest
from retrain.pipeline import canary_metric, choose_method


def test_a_handful_of_examples_is_seen_many_times_at_a_higher_rate() -> None:
    plan = TrainingConfig().resolve(9, "sft", validation_examples=0)
    assert plan.epochs == 12 and plan.learning_rate == 1e-3 and plan.early_stopping_patience == 0


def test_thousands_of_examples_are_seen_once_at_a_lower_rate_with_early_stopping() -> None:
    plan = TrainingConfig().resolve(5000, "sft", validation_examples=600)
    assert plan.epochs == 1 and plan.learning_rate == 2e-4 and plan.early_stopping_patience == 2


def test_preference_objectives_take_half_the_rate_and_set_values_are_kept() -> None:
    assert TrainingConfig().resolve(40, "dpo").learning_rate == 5e-4
    assert TrainingConfig().resolve(40, "sft").epochs == 8
    fixed = TrainingConfig(learning_rate=3e-5, epochs=2).resolve(40, "kto", validation_examples=100)
    assert (fixed.learning_rate, fixed.epochs, fixed.early_stopping_patience) == (3e-5, 2, 2)


def test_lora_adapts_attention_and_mlp_by_default() -> None:
    assert {"q_proj", "v_proj", "gate_proj", "down_proj"} <= set(TrainingConfig().lora_targets)


def manifest(**sources: dict[str, int]) -> DatasetManifest:
    counts = {fmt: {"train": sum(n.values())} for fmt, n in sources.items()}
    return DatasetManifest(version="v", path="/nowhere", counts=counts, train_sources=sources)


def test_auto_takes_the_most_direct_teacher_and_the_canary_decides_on_what_users_gave() -> None:
    auto = RetrainConfig()
    corrected = manifest(sft={"correction": 20, "rating": 5}, kto={"rating": 40})
    chosen = manifest(dpo={"preference": 30}, kto={"preference": 60})
    thumbs = manifest(kto={"rating": 96})
    mixed = manifest(dpo={"preference": 30}, kto={"rating": 50, "preference": 60})
    assert [choose_method(m, auto) for m in (corrected, chosen, thumbs)] == ["sft", "dpo", "kto"]
    assert choose_method(manifest(kto={"rating": 3}), auto) is None
    assert [canary_metric(m, auto) for m in (corrected, chosen, thumbs, mixed)] == [
        "ratings", "choices", "ratings", "both"
    ]  # fmt: skip
    # A configured metric is kept.
    assert canary_metric(chosen, RetrainConfig(canary_metric="ratings")) == "ratings"
