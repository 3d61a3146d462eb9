"""Train a LoRA adapter with TRL: SFTTrainer, KTOTrainer or DPOTrainer on a versioned dataset.

float32 on CPU and bf16 on a GPU are chosen automatically (bf16 is several times slower on
these CPUs); training starts from the champion adapter (its LoRA keeps training) or from a
fresh LoRA on the base. What the config leaves open (learning rate, epochs) follows the data
size (`TrainingConfig.resolve`); with enough validation examples, validation loss drives early
stopping and the best checkpoint is kept.
Several GPUs: run the same entry point under `accelerate launch` (see the README); TRL and
transformers handle data parallelism.
"""

from __future__ import annotations

import logging
import random
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from retrain.config import Method, TrainingConfig
from retrain.dataset import DatasetManifest

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class TrainResult:
    adapter_dir: Path
    method: Method
    hyperparameters: dict[str, Any]
    metrics: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    tokens: int = 0

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def use_bf16(config: TrainingConfig) -> bool:
    import torch

    if config.precision == "auto":
        return torch.cuda.is_available()
    return config.precision == "bfloat16"


def _load_split(manifest: DatasetManifest, method: Method, split: str):
    from datasets import load_dataset

    path = manifest.file(method, split)
    if manifest.size(method, split) == 0:
        return None
    dataset = load_dataset("json", data_files=str(path), split="train")
    # Provenance stays in the files; the trainers see only their own columns.
    return dataset.remove_columns([c for c in dataset.column_names if c == "source"])


# KTO reports a validation reward margin only for an evaluation batch that holds both labels.
KTO_MARGIN_BATCH = 32


def checkpoint_metric(method: Method, validation=None) -> tuple[str, bool, int | None]:
    """What picks the checkpoint and stops training early: (metric, greater is better, evaluation
    batch size or None for the training one). SFT: validation loss. DPO and KTO: the validation
    reward margin (chosen or liked over rejected or disliked), what the gate judges: their loss
    rises as the policy grows confident while the margin still grows (KTO on thumbs: loss 1.52 to
    1.63 while the margin went 0.43 to 0.82). KTO's margin needs both labels in one batch, so it
    is used when the whole split fits one batch; else the loss (also without validation)."""
    if validation is None:
        return "eval_loss", False, None
    if method == "dpo":
        return "eval_rewards/margins", True, None
    if method == "kto" and len(validation) <= KTO_MARGIN_BATCH and len(set(validation["label"])) == 2:
        return "eval_rewards/margins", True, len(validation)
    return "eval_loss", False, None


def trl_args(
    method: Method,
    config: TrainingConfig,
    output_dir: Path,
    *,
    validation,
    bf16: bool,
    manifest,
):
    """The TRL config object for `method` (SFTConfig, KTOConfig or DPOConfig); `validation` (the
    split, or None) decides whether and by what checkpoints are chosen."""
    from trl import DPOConfig, KTOConfig, SFTConfig

    evaluating = "steps" if config.eval_steps else "epoch"
    has_eval = validation is not None
    best, greater, eval_batch = checkpoint_metric(method, validation)
    common: dict[str, Any] = dict(
        output_dir=str(output_dir),
        num_train_epochs=config.epochs,
        max_steps=config.max_steps,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=eval_batch or config.batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_scheduler,
        warmup_steps=config.warmup_ratio,
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
        max_length=config.max_length,
        seed=config.seed,
        bf16=bf16,
        report_to=config.report_to or "none",
        logging_steps=1,
        include_num_input_tokens_seen="non_padding",
        eval_strategy=evaluating if has_eval else "no",
        eval_steps=config.eval_steps,
        save_strategy=evaluating if has_eval else "no",
        save_steps=config.eval_steps,
        save_total_limit=1,
        load_best_model_at_end=has_eval,
        metric_for_best_model=best,
        greater_is_better=greater,
        dataloader_num_workers=0,
    )
    if method == "sft":
        return SFTConfig(**common, completion_only_loss=True)
    # The reference model is fixed (the LoRA's base), so its log-probabilities are computed once
    # per example instead of once per epoch: a third fewer forward passes per step.
    if method == "kto":
        return KTOConfig(**common, beta=config.beta, precompute_ref_log_probs=True, **manifest.kto_weights)
    return DPOConfig(**common, beta=config.beta, precompute_ref_log_probs=True)


def train_adapter(
    method: Method,
    manifest: DatasetManifest,
    base_model: Path,
    out_dir: Path,
    config: TrainingConfig,
    *,
    start_adapter: Path | None = None,
) -> TrainResult:
    """Train and save the adapter into `out_dir` (which must not exist yet)."""
    import torch
    from peft import LoraConfig, PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, EarlyStoppingCallback, set_seed
    from trl import DPOTrainer, KTOTrainer, SFTTrainer

    train = _load_split(manifest, method, "train")
    if train is None:
        raise ValueError(f"the dataset has no {method} training examples")
    validation = _load_split(manifest, method, "validation")
    config = config.resolve(len(train), method, len(validation) if validation is not None else 0)
    if validation is not None and len(validation) < config.min_validation:
        validation = None  # too few to pick a checkpoint by: the planned epochs run to the end
    set_seed(config.seed)
    random.seed(config.seed)
    bf16 = use_bf16(config)
    tokenizer = AutoTokenizer.from_pretrained(base_model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.bfloat16 if bf16 else torch.float32)
    peft_config = None
    if start_adapter is not None:
        model = PeftModel.from_pretrained(model, str(start_adapter), is_trainable=True)
    else:
        peft_config = LoraConfig(
            r=config.lora_r,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules=list(config.lora_targets),
            task_type="CAUSAL_LM",
        )
    trainer_cls = {"sft": SFTTrainer, "kto": KTOTrainer, "dpo": DPOTrainer}[method]
    with tempfile.TemporaryDirectory(prefix="loopchat-train-") as scratch:
        args = trl_args(
            method,
            config,
            Path(scratch),
            validation=validation,
            bf16=bf16,
            manifest=manifest,
        )
        callbacks = []
        if validation is not None and config.early_stopping_patience:
            callbacks.append(EarlyStoppingCallback(early_stopping_patience=config.early_stopping_patience))
        trainer = trainer_cls(
            model=model,
            args=args,
            train_dataset=train,
            eval_dataset=validation,
            processing_class=tokenizer,
            peft_config=peft_config,
            callbacks=callbacks,
        )
        started = time.perf_counter()
        output = trainer.train()
        seconds = time.perf_counter() - started
        metrics = {k: float(v) for k, v in output.metrics.items() if isinstance(v, int | float)}
        if validation is not None:
            metrics.update({k: float(v) for k, v in trainer.evaluate().items() if isinstance(v, int | float)})
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        # Only the trained adapter: KTO and DPO add a frozen copy of a start adapter ("ref", their
        # reference model: the champion or the first stage), which is not part of the version.
        trainer.model.save_pretrained(str(out_dir), selected_adapters=["default"])
        tokens = int(trainer.state.num_input_tokens_seen or 0)
    hyper = config.model_dump(mode="json")
    hyper.update(method=method, bf16=bf16, start_adapter=str(start_adapter) if start_adapter else None)
    logger.info("trained %s adapter in %.1f s (%d tokens)", method, seconds, tokens)
    return TrainResult(out_dir, method, hyper, metrics, seconds, tokens)


def search_trials(config: TrainingConfig, search, rng: random.Random) -> list[TrainingConfig]:
    """The configs of a small random (or, when smaller, full grid) search."""
    grid = [(lr, r) for lr in search.learning_rate for r in search.lora_r]
    chosen = grid if len(grid) <= search.trials else rng.sample(grid, search.trials)
    return [
        config.model_copy(update={"learning_rate": lr, "lora_r": r, "lora_alpha": 2 * r}) for lr, r in chosen
    ]
