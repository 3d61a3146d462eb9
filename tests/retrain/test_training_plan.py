"""What the training config leaves open follows the data: small sets are learned, large ones not
overfitted, and validation decides only when it is large enough to trust."""

from __future__ import annotations

from retrain.config import RetrainConfig, TrainingConfig
from retrain.dataset import DatasetManifest
from retrain.gate import Scores
from retrain.pipeline import canary_metric
from retrain.stages import choose_method, choose_stages, follow_up


def test_a_handful_of_examples_is_seen_many_times_at_a_higher_rate() -> None:
    plan = TrainingConfig().resolve(9, "sft", validation_examples=0)
    assert plan.epochs == 12 and plan.learning_rate == 1e-3 and plan.early_stopping_patience == 0


def test_thousands_of_examples_are_seen_once_at_a_lower_rate_with_early_stopping() -> None:
    plan = TrainingConfig().resolve(5000, "sft", validation_examples=600)
    assert plan.epochs == 1 and plan.learning_rate == 2e-4 and plan.early_stopping_patience == 2


def test_dpo_takes_half_the_rate_kto_a_looser_beta_and_set_values_are_kept() -> None:
    dpo, kto = TrainingConfig().resolve(40, "dpo"), TrainingConfig().resolve(40, "kto")
    assert (dpo.learning_rate, dpo.beta) == (5e-4, 0.1)
    assert (kto.learning_rate, kto.beta) == (1e-3, 0.05)
    assert TrainingConfig(beta=0.2).resolve(40, "kto").beta == 0.2
    assert TrainingConfig().resolve(40, "sft").epochs == 8
    fixed = TrainingConfig(learning_rate=3e-5, epochs=2).resolve(40, "kto", validation_examples=100)
    assert (fixed.learning_rate, fixed.epochs, fixed.early_stopping_patience) == (3e-5, 2, 2)


def test_lora_adapts_attention_and_mlp_by_default() -> None:
    assert {"q_proj", "v_proj", "gate_proj", "down_proj"} <= set(TrainingConfig().lora_targets)


def manifest(validation: int = 0, **sources: dict[str, int]) -> DatasetManifest:
    counts = {fmt: {"train": sum(n.values()), "validation": validation} for fmt, n in sources.items()}
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
        "ratings",
        "choices",
        "ratings",
        "both",
    ]
    # A configured metric is kept.
    assert canary_metric(chosen, RetrainConfig(canary_metric="ratings")) == "ratings"


def test_auto_adds_a_second_stage_on_another_kind_of_feedback_only_when_validation_can_choose() -> None:
    auto = RetrainConfig()
    corrected_and_chosen = dict(
        sft={"correction": 20}, dpo={"correction": 20, "preference": 30}, kto={"correction": 20, "rating": 40}
    )
    assert follow_up(manifest(validation=16, **corrected_and_chosen), auto, "sft") == "dpo"
    corrected_and_rated = dict(
        sft={"correction": 20}, dpo={"correction": 20}, kto={"correction": 20, "rating": 40}
    )
    assert follow_up(manifest(validation=16, **corrected_and_rated), auto, "sft") == "kto"
    chosen_and_rated = dict(dpo={"preference": 30}, kto={"preference": 60, "rating": 40})
    assert follow_up(manifest(validation=16, **chosen_and_rated), auto, "dpo") == "kto"
    # Corrections alone: their pairs and labels repeat them, no second stage.
    corrections = dict(sft={"correction": 20}, dpo={"correction": 20}, kto={"correction": 20})
    assert follow_up(manifest(validation=16, **corrections), auto, "sft") is None
    # Too little validation to choose by, a fixed method, or combining off: one stage.
    assert follow_up(manifest(validation=15, **corrected_and_chosen), auto, "sft") is None
    assert (
        follow_up(manifest(validation=16, **corrected_and_chosen), RetrainConfig(method="sft"), "sft") is None
    )
    assert (
        follow_up(manifest(validation=16, **corrected_and_chosen), RetrainConfig(combine=False), "sft")
        is None
    )
    assert follow_up(manifest(validation=16, kto={"rating": 90}), auto, "kto") is None


def test_a_second_stage_is_kept_only_for_a_validation_gain_without_losing_the_first() -> None:
    sft = Scores(perplexity=4.0, preference_accuracy=0.6)
    gained = choose_stages(sft, Scores(perplexity=4.05, preference_accuracy=0.8), "sft", "dpo", 0.02)
    assert gained.keep and gained.figures["dpo_after"] == 0.8
    forgot = choose_stages(sft, Scores(perplexity=4.5, preference_accuracy=0.9), "sft", "dpo", 0.02)
    assert not forgot.keep and "lost on sft validation" in forgot.reason
    flat = choose_stages(sft, Scores(perplexity=4.0, preference_accuracy=0.6), "sft", "dpo", 0.02)
    assert not flat.keep and "gained nothing" in flat.reason
    # KTO: the second stage's implicit reward over the first's must rank liked above disliked.
    first = Scores(perplexity=4.0, labeled=[(True, -10.0), (False, -10.0), (False, -12.0)])
    apart = Scores(perplexity=4.0, labeled=[(True, -9.0), (False, -11.0), (False, -13.0)])
    together = Scores(perplexity=4.0, labeled=[(True, -11.0), (False, -9.0), (False, -11.0)])
    assert choose_stages(first, apart, "sft", "kto", 0.02).keep
    assert not choose_stages(first, together, "sft", "kto", 0.02).keep


def test_preference_checkpoints_are_chosen_by_the_validation_reward_margin() -> None:
    from datasets import Dataset

    from retrain.train import KTO_MARGIN_BATCH, checkpoint_metric

    def labels(*values: bool) -> Dataset:
        return Dataset.from_list([{"label": v} for v in values])

    assert checkpoint_metric("sft", labels(True, True)) == ("eval_loss", False, None)
    assert checkpoint_metric("dpo", None) == ("eval_loss", False, None)
    pairs = Dataset.from_list([{"chosen": "a", "rejected": "b"}])
    assert checkpoint_metric("dpo", pairs) == ("eval_rewards/margins", True, None)
    # KTO reports a margin only for a batch with both labels: the whole split is one batch.
    assert checkpoint_metric("kto", labels(True, False, False)) == ("eval_rewards/margins", True, 3)
    assert checkpoint_metric("kto", labels(False, False))[0] == "eval_loss"
    assert checkpoint_metric("kto", labels(True, *[False] * KTO_MARGIN_BATCH))[0] == "eval_loss"
