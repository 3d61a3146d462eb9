"""Which training objectives a run uses, and whether a second one earned its place.

`method: auto` starts from the most direct teacher the log holds (corrections as SFT targets,
then side-by-side choices as DPO pairs, then thumbs and stars as KTO labels). When the log also
holds another kind of feedback, a second stage continues the first stage's adapter on it (SFT
then DPO or KTO; DPO then KTO), the way chat models are usually tuned: first imitate what was
asked for, then prefer what was liked. The second stage is kept only when validation says so:
it must do better on its own validation data than the first stage's adapter alone, without
losing more than `combine_tolerance` on the first stage's. Without enough validation data for
both (`training.min_validation` each) nothing could choose, and the second stage is not tried.
"""

from __future__ import annotations

from dataclasses import dataclass

from retrain.config import Method, RetrainConfig
from retrain.dataset import DatasetManifest
from retrain.gate import Scores, reward_auc

# A second stage teaches what the first did not: side-by-side choices, or thumbs and stars
# (`source` of the examples). Correction pairs and correction labels repeat the corrections.
_FOLLOW_UPS: dict[Method, tuple[tuple[Method, str], ...]] = {
    "sft": (("dpo", "preference"), ("kto", "rating")),
    "dpo": (("kto", "rating"),),
    "kto": (),
}


def choose_method(manifest: DatasetManifest, config: RetrainConfig) -> Method | None:
    """The configured method, or for `auto` the most direct teacher with enough examples:
    corrections (the answer users wanted: SFT targets), then side-by-side choices (DPO pairs),
    then judged answers, however skewed (KTO labels, stars weighted by strength), then liked
    answers alone (SFT). Correction pairs alone never choose DPO: a correction teaches best as
    the target itself (a DPO run on them learned the fact less than the base knew it)."""
    enough = config.min_examples
    if config.method != "auto":
        return config.method if manifest.size(config.method) >= enough else None
    if manifest.source_size("sft", "correction") >= enough:
        return "sft"
    if manifest.source_size("dpo", "preference") >= enough:
        return "dpo"
    if manifest.size("kto") >= enough:
        return "kto"
    if manifest.size("sft") >= enough:
        return "sft"
    return None


def follow_up(manifest: DatasetManifest, config: RetrainConfig, first: Method) -> Method | None:
    """The second stage `auto` tries after `first`, or None: another kind of feedback with enough
    training examples, and validation data for both stages to choose by."""
    if config.method != "auto" or not config.combine:
        return None
    least = config.training.min_validation
    if manifest.size(first, "validation") < least:
        return None
    for method, source in _FOLLOW_UPS[first]:
        if (
            manifest.source_size(method, source) >= config.min_examples
            and manifest.size(method, "validation") >= least
        ):
            return method
    return None


@dataclass(slots=True)
class StageChoice:
    keep: bool
    reason: str
    figures: dict[str, float | None]


def objective(scores: Scores, method: Method) -> float | None:
    """One method's validation figure, higher is better: SFT the negative perplexity of the
    references, DPO the preference accuracy (KTO is judged relative to another model)."""
    if method == "sft":
        return None if scores.perplexity is None else -scores.perplexity
    if method == "dpo":
        return scores.preference_accuracy
    return None


def choose_stages(
    first: Scores, both: Scores, first_method: Method, second_method: Method, tolerance: float
) -> StageChoice:
    """Keep the second stage when, on validation, it gained on its own objective and lost at most
    `tolerance` (relative) on the first stage's."""
    figures: dict[str, float | None] = {}
    before, after = objective(first, first_method), objective(both, first_method)
    figures[f"{first_method}_before"], figures[f"{first_method}_after"] = before, after
    if before is not None and after is not None and after < before - tolerance * abs(before):
        return StageChoice(
            False, f"{second_method} lost on {first_method} validation ({after:.3f} < {before:.3f})", figures
        )
    if second_method == "kto":
        # The second stage's implicit reward against the first's adapter: does it rank the
        # validation answers users liked above those they disliked?
        gain = reward_auc(both, first)
        figures["kto_reward_auc"] = gain
        if gain is None or gain <= 0.5:
            return StageChoice(False, f"kto did not separate validation answers (AUC {gain})", figures)
        return StageChoice(True, f"kto ranks validation answers with AUC {gain:.3f}", figures)
    before, after = objective(first, second_method), objective(both, second_method)
    figures[f"{second_method}_before"], figures[f"{second_method}_after"] = before, after
    if before is None or after is None or after <= before:
        return StageChoice(
            False, f"{second_method} gained nothing on validation ({before} -> {after})", figures
        )
    return StageChoice(True, f"{second_method} validation {before:.3f} -> {after:.3f}", figures)
