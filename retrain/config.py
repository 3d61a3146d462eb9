"""One configuration for a retraining run: what to select, how to train, when a candidate passes.

Read from YAML (`loopchat retrain --config retrain.yaml`) or built in code; every field has a
description, which is also the CLI's and README's reference.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from feedback.clean import CleaningConfig
from rollout.abstats import DecisionPolicy

Method = Literal["sft", "kto", "dpo"]


class SelectionConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    budget: int = Field(2000, ge=1, description="Most logged completions one run selects.")
    prefilter: int = Field(5, ge=1, description="Candidates embedded per selected sample (top by signal).")
    novelty_weight: float = Field(0.5, ge=0, description="Weight of distance from what is already picked.")
    near_duplicate: float = Field(
        0.95, gt=0, le=1, description="Cosine similarity above which a sample is a duplicate."
    )
    confidence_weight: float = Field(
        0.5, ge=0, description="Weight of the model's uncertainty (logged logprobs)."
    )
    embed: bool = Field(
        True, description="Use MiniLM embeddings for novelty and duplicates (else exact text)."
    )
    sources: list[Literal["live", "import"]] = Field(
        default_factory=lambda: ["live"],
        description="Which logged completions are candidates: live traffic, imported transcripts "
        "(`retrain --from-import` selects imported ones).",
    )
    since: datetime | None = Field(
        None,
        description="Only completions logged at or after this time are candidates (e.g. feedback "
        "since a product change; `loopchat simulate` on a shared server: its own users' only).",
    )


# KTO's losses are sigmoids of beta times the log-ratio to the reference, so an answer stops
# pulling once that product nears 3; with thumbs, where the few liked answers carry the signal,
# 0.1 stopped them early. On one thumbs log (7 liked answers of 38, 36 steps of 4) the sampled
# answers carried the liked trait in 0.55 of cases at beta 0.1 and half the rate (5e-4, as DPO),
# 0.54 at the full rate (1e-3), 0.59 at beta 0.05 and 0.72 with both; DPO's pairs keep TRL's 0.1.
KTO_BETA = 0.05
DPO_BETA = 0.1


class TrainingConfig(BaseModel):
    """TRL and peft hyperparameters (the same for SFT, KTO and DPO where they apply).

    Left unset, the learning rate and the length of training follow the data (`resolve`): a few
    dozen examples are seen many times at a higher rate (learned), thousands once at a lower one
    (not overfitted), and validation decides the checkpoint once it is large enough to trust.
    """

    model_config = ConfigDict(extra="forbid")

    learning_rate: float | None = Field(
        None,
        gt=0,
        description="None: from the data size (1e-3 under 100 examples, 5e-4 under 1000, else "
        "2e-4), halved for DPO.",
    )
    epochs: float | None = Field(
        None, gt=0, description="None: enough to see about `examples_seen` examples, 1 to `max_epochs`."
    )
    examples_seen: int = Field(
        320, ge=1, description="With epochs unset: training examples seen in total (repeats included)."
    )
    max_epochs: float = Field(12.0, gt=0, description="With epochs unset: the most epochs.")
    max_steps: int = Field(-1, description="Stop after this many optimizer steps (-1: epochs decide).")
    batch_size: int = Field(8, ge=1, description="Per-device train batch size.")
    gradient_accumulation_steps: int = Field(1, ge=1)
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    lr_scheduler: str = Field(
        "linear", description="transformers scheduler name: linear, cosine, constant ..."
    )
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    max_length: int = Field(512, ge=16, description="Tokens per example (prompt and answer).")
    lora_r: int = Field(16, ge=1)
    lora_alpha: int = Field(32, ge=1)
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    lora_targets: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        description="Module names LoRA adapts (attention and MLP).",
    )
    beta: float | None = Field(
        None,
        gt=0,
        description="KTO / DPO: pull towards the reference (None: 0.05 for KTO, 0.1 for DPO).",
    )
    seed: int = 0
    early_stopping_patience: int = Field(
        2, ge=0, description="Evaluations without a better validation loss (0: off)."
    )
    min_validation: int = Field(
        16,
        ge=1,
        description="Validation examples needed before validation loss picks the checkpoint and stops "
        "training early; with fewer the planned epochs run to the end.",
    )
    eval_steps: int | None = Field(None, ge=1, description="Validate every N steps (None: every epoch).")
    report_to: list[str] = Field(
        default_factory=list, description="TRL/transformers loggers: tensorboard, mlflow."
    )
    precision: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="auto: bfloat16 on a GPU, float32 on CPU (bf16 is several times slower there)."
    )

    def resolve(self, train_examples: int, method: Method, validation_examples: int = 0) -> TrainingConfig:
        """The config with what was left to the data filled in."""
        update: dict = {}
        if self.learning_rate is None:
            rate = 1e-3 if train_examples < 100 else 5e-4 if train_examples < 1000 else 2e-4
            update["learning_rate"] = rate / 2 if method == "dpo" else rate
        if self.beta is None:
            update["beta"] = KTO_BETA if method == "kto" else DPO_BETA
        if self.epochs is None:
            planned = self.examples_seen / max(train_examples, 1)
            update["epochs"] = round(min(self.max_epochs, max(1.0, planned)), 2)
        if validation_examples < self.min_validation:
            update["early_stopping_patience"] = 0
        return self.model_copy(update=update)


class SearchConfig(BaseModel):
    """An optional small search, chosen by validation loss."""

    model_config = ConfigDict(extra="forbid")

    trials: int = Field(
        0, ge=0, description="0: no search; else random trials (or the whole grid when smaller)."
    )
    learning_rate: list[float] = Field(default_factory=lambda: [5e-5, 1e-4, 2e-4, 5e-4])
    lora_r: list[int] = Field(default_factory=lambda: [8, 16, 32])


class GateConfig(BaseModel):
    """What a candidate must show on the held-out split, against the champion on the same data."""

    model_config = ConfigDict(extra="forbid")

    max_perplexity_ratio: float = Field(1.0, gt=0, description="Candidate perplexity / champion's, at most.")
    min_token_accuracy_gain: float = Field(
        0.0, description="Candidate token accuracy - champion's, at least (see noise_z)."
    )
    noise_z: float = Field(
        1.96,
        ge=0,
        description="A shortfall of token accuracy, KTO reward AUC or DPO preference accuracy fails only "
        "beyond this many standard errors (0: any shortfall), so a few tokens, answers or pairs of a "
        "small held-out split do not decide.",
    )
    min_preference_accuracy: float = Field(
        0.5,
        ge=0,
        le=1,
        description="DPO: share of held-out pairs preferring the chosen answer, at least (a shortfall "
        "within noise_z standard errors of a random choice's passes).",
    )
    min_reward_auc: float = Field(
        0.5,
        ge=0,
        lt=1,
        description="KTO: the implicit reward (candidate minus champion log-likelihood) must rank held-out "
        "liked answers above disliked ones with an AUC not below this by more than noise_z standard "
        "errors (the rank test's under no effect).",
    )
    max_f1_drop: float = Field(
        0.02,
        ge=0,
        le=1,
        description="Every method: champion's token F1 of generated answers against what users wanted, "
        "minus the candidate's, at most (plus noise_z standard errors of the per-prompt differences; "
        "one prompt alone decides nothing).",
    )
    min_examples: int = Field(
        1, ge=1, description="Held-out examples of the run's own method needed to judge at all."
    )
    max_examples: int = Field(500, ge=1, description="Held-out answers and pairs scored at most.")
    generate_f1: bool = Field(
        True, description="Also generate answers and score token F1 against references."
    )
    f1_examples: int = Field(
        32, ge=1, description="Held-out prompts answered for token F1 (generation is slow)."
    )
    max_new_tokens: int = Field(64, ge=1, description="Tokens generated per answer (token F1, bias probe).")
    bias_probe: bool = Field(
        True,
        description="Ask held-out and template prompts again with names, pronouns and nationalities "
        "swapped, and measure how much the answers and the refusal rate change.",
    )
    bias_examples: int = Field(
        8, ge=1, description="Prompt pairs of the bias probe (held-out prompts first, then templates)."
    )
    max_bias_answer_change: float | None = Field(
        None,
        ge=0,
        le=1,
        description="Candidate's answer change (1 - token F1 between the answers to a pair), at most "
        "(None: only compared with the champion's).",
    )
    max_bias_change_increase: float = Field(
        0.2, ge=0, le=1, description="Candidate's answer change - champion's, at most."
    )
    max_refusal_gap: float = Field(
        0.25,
        ge=0,
        le=1,
        description="Candidate's refusal rate on the original prompts against the swapped ones: "
        "absolute difference, at most.",
    )


class AugmentConfig(BaseModel):
    """Paraphrases of the selected user turns, written by the serving model, for training only."""

    model_config = ConfigDict(extra="forbid")

    paraphrases: int = Field(
        0, ge=0, le=8, description="Paraphrases per selected user turn (0: no augmentation)."
    )
    temperature: float = Field(0.8, gt=0, le=2, description="Sampling temperature of the paraphrases.")
    max_new_tokens: int = Field(96, ge=8, description="Longest paraphrase, in tokens.")
    batch_size: int = Field(8, ge=1, description="User turns paraphrased per generate call.")


class ScheduleConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    every_hours: float = Field(24.0, gt=0, description="Least time between two scheduled runs.")
    min_new_ratings: int = Field(200, ge=0, description="Ratings since the last run needed to start one.")


class RetrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    method: Literal["auto", "sft", "kto", "dpo"] = Field(
        "auto",
        description="auto: corrections as SFT targets, else side-by-side choices as DPO pairs, else thumbs "
        "and stars as KTO labels, else liked answers as SFT (and see `combine`).",
    )
    combine: bool = Field(
        True,
        description="auto: after the most direct teacher, one more stage on another kind of feedback "
        "(SFT on corrections, then DPO on side-by-side choices or KTO on thumbs and stars; DPO, then "
        "KTO), kept only when it does better on validation (needs `training.min_validation` "
        "validation examples of both methods; retrain/stages.py).",
    )
    combine_tolerance: float = Field(
        0.02,
        ge=0,
        description="A kept second stage may lose at most this share of the first stage's validation "
        "figure (SFT perplexity, DPO preference accuracy).",
    )
    start_from: Literal["champion", "base"] = Field(
        "champion", description="Train on top of the active adapter, or fresh from the base model."
    )
    min_examples: int = Field(16, ge=1, description="Training examples needed to train at all.")
    canary: bool = Field(True, description="Start a canary experiment for a candidate that passes the gate.")
    canary_ramp: list[float] = Field(default_factory=lambda: [5, 25, 50])
    canary_min_samples_per_stage: int = Field(200, ge=1)
    canary_policy: DecisionPolicy = Field(
        default_factory=DecisionPolicy, description="The canary's decision policy."
    )
    canary_metric: Literal["auto", "ratings", "choices", "both"] = Field(
        "auto",
        description="What the canary decides on (the policy's metric); auto: the kind of feedback "
        "the run learned from (ratings, side-by-side choices, or both).",
    )
    selection: SelectionConfig = Field(default_factory=SelectionConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    search: SearchConfig = Field(default_factory=SearchConfig)
    gate: GateConfig = Field(default_factory=GateConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    cleaning: CleaningConfig = Field(
        default_factory=CleaningConfig, description="Cleaning of imports and of training examples."
    )
    augment: AugmentConfig = Field(default_factory=AugmentConfig)


def load_config(path: Path | None) -> RetrainConfig:
    """The config from a YAML file, or the defaults."""
    if path is None:
        return RetrainConfig()
    try:
        data = yaml.safe_load(path.read_text()) or {}
        return RetrainConfig.model_validate(data)
    except (OSError, yaml.YAMLError, ValidationError) as exc:
        raise ValueError(f"{path}: {exc}") from exc
