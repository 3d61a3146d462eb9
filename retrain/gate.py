"""The offline gate: a candidate adapter against the champion on the held-out split.

Metrics (transformers + peft, greedy, no sampling), each on its own method's held-out data:
- SFT: perplexity and token accuracy of the reference answers (positively rated answers and
  corrections), counted on the answer tokens only;
- KTO: the held-out liked and disliked answers' log-likelihoods; `gate` turns candidate minus
  champion into KTO's implicit reward and asks how well it ranks liked above disliked (AUC);
- DPO: preference accuracy, the share of held-out pairs where the model gives the chosen answer
  a higher log-likelihood than the rejected one;
- for every method, generated answers: token F1 (whitespace tokens, SQuAD-style) between the
  answer generated to each held-out prompt and what the feedback wanted there (the correction or
  the liked answer). Likelihoods can improve while answers get worse; this is what users see;
- the counterfactual bias probe (retrain/bias.py): how much answers change when names, pronouns
  and nationalities in the prompt are swapped, and how much the refusal rate does.
The champion (the active adapter, or the base) is scored on the same data; `gate` compares: the
method's own checks decide, the generation and bias checks apply to all, and a run is never
rejected for lacking another method's held-out data.
"""

from __future__ import annotations

import hashlib
import json
import math
import statistics
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from retrain.config import GateConfig
from retrain.dataset import DatasetManifest
from retrain.text_metrics import token_f1

if TYPE_CHECKING:
    from retrain.bias import BiasResult


@dataclass(slots=True)
class Scores:
    examples: int = 0
    tokens: int = 0  # reference answer tokens behind perplexity and token accuracy
    perplexity: float | None = None
    token_accuracy: float | None = None
    token_f1: float | None = None
    # Per held-out prompt, in file order (candidate and champion answer the same prompts).
    f1_each: list[float] = field(default_factory=list)
    pairs: int = 0
    preference_accuracy: float | None = None
    # KTO held-out rows in file order: (label, answer log-likelihood).
    labeled: list[tuple[bool, float]] = field(default_factory=list)
    bias: BiasResult | None = None

    def as_dict(self) -> dict[str, Any]:
        from retrain.bias import BiasResult

        return {
            "examples": self.examples,
            "perplexity": self.perplexity,
            "token_accuracy": self.token_accuracy,
            "token_f1": self.token_f1,
            "pairs": self.pairs,
            "preference_accuracy": self.preference_accuracy,
            "labeled": len(self.labeled),
            **(self.bias.as_dict() if self.bias is not None else BiasResult.empty()),
        }


@dataclass(slots=True)
class GateResult:
    passed: bool
    reasons: list[str]
    candidate: Scores
    champion: Scores
    extra: dict[str, Any] = field(default_factory=dict)

    def metrics(self) -> dict[str, Any]:
        return {"candidate": self.candidate.as_dict(), "champion": self.champion.as_dict(), **self.extra}


def _rows(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def _sample(rows: list[dict[str, Any]], most: int) -> list[dict[str, Any]]:
    """At most `most` rows, the same ones every time, drawn evenly from all strata of the split
    (its rows are grouped by stratum): ordered by a hash of their content."""
    if len(rows) <= most:
        return rows
    digest = lambda row: hashlib.sha256(json.dumps(row, sort_keys=True).encode()).hexdigest()  # noqa: E731
    return sorted(rows, key=digest)[:most]


class Scorer:
    """One model (base, or base + adapter) and its tokenizer, for scoring and generating."""

    def __init__(self, base_model: Path, adapter: Path | None) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(base_model)
        model = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32)
        if adapter is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(adapter))
        self.model = model.eval()

    def _ids(self, prompt: list[dict], answer: str) -> tuple[list[int], int]:
        template = self.tokenizer.apply_chat_template
        prompt_ids = list(template(prompt, add_generation_prompt=True, tokenize=True, return_dict=False))
        full = list(
            template([*prompt, {"role": "assistant", "content": answer}], tokenize=True, return_dict=False)
        )
        if full[: len(prompt_ids)] != prompt_ids:  # a template that re-renders the prompt: append
            full = prompt_ids + self.tokenizer(answer, add_special_tokens=False)["input_ids"]
        return full, len(prompt_ids)

    def answer_stats(self, prompt: list[dict], answer: str) -> tuple[float, int, int]:
        """(sum of answer-token log-likelihoods, answer tokens, answer tokens predicted right)."""
        torch = self.torch
        ids, start = self._ids(prompt, answer)
        if len(ids) <= start:
            return 0.0, 0, 0
        with torch.inference_mode():
            logits = self.model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
        targets = torch.tensor(ids[1:])
        logprobs = torch.log_softmax(logits, dim=-1)
        picked = logprobs[torch.arange(len(targets)), targets][start - 1 :]
        right = (logits.argmax(-1) == targets)[start - 1 :]
        return float(picked.sum()), int(picked.numel()), int(right.sum())

    def generate(self, prompt: list[dict], max_new_tokens: int) -> str:
        torch = self.torch
        ids = self.tokenizer.apply_chat_template(
            prompt, add_generation_prompt=True, tokenize=True, return_dict=False
        )
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=torch.tensor([list(ids)]),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id,
            )
        return self.tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True)

    def generate_many(
        self,
        prompts: list[list[dict]],
        max_new_tokens: int,
        batch_size: int = 16,
        *,
        temperature: float | None = None,
        top_p: float = 1.0,
    ) -> list[str]:
        """Answers to several prompts, generated in left-padded batches of similar length: greedy,
        or sampled at `temperature`."""
        torch = self.torch
        template = self.tokenizer.apply_chat_template
        ids = [
            list(template(p, add_generation_prompt=True, tokenize=True, return_dict=False)) for p in prompts
        ]
        pad = self.tokenizer.pad_token_id or self.tokenizer.eos_token_id
        sampling: dict = {"do_sample": False}
        if temperature is not None:
            sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p}
        answers = [""] * len(prompts)
        order = sorted(range(len(prompts)), key=lambda i: len(ids[i]))
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            width = max(len(ids[i]) for i in batch)
            input_ids = torch.tensor([[pad] * (width - len(ids[i])) + ids[i] for i in batch])
            mask = torch.tensor([[0] * (width - len(ids[i])) + [1] * len(ids[i]) for i in batch])
            with torch.inference_mode():
                out = self.model.generate(
                    input_ids=input_ids,
                    attention_mask=mask,
                    max_new_tokens=max_new_tokens,
                    pad_token_id=pad,
                    **sampling,
                )
            for row, i in enumerate(batch):
                answers[i] = self.tokenizer.decode(out[row, width:], skip_special_tokens=True)
        return answers


def score(
    base_model: Path,
    adapter: Path | None,
    manifest: DatasetManifest,
    gate: GateConfig,
    *,
    split: str = "test",
) -> Scores:
    """Every metric of one model on the held-out split."""
    scorer = Scorer(base_model, adapter)
    scores = Scores()
    references = _sample(_rows(manifest.file("sft", split)), gate.max_examples)
    total_ll, total_tokens, total_right = 0.0, 0, 0
    for row in references:
        ll, tokens, right = scorer.answer_stats(row["prompt"], row["completion"][0]["content"])
        total_ll, total_tokens, total_right = total_ll + ll, total_tokens + tokens, total_right + right
    scores.examples = len(references)
    if total_tokens:
        scores.perplexity = math.exp(-total_ll / total_tokens)
        scores.token_accuracy = total_right / total_tokens
        scores.tokens = total_tokens
    if gate.generate_f1 and references:
        sample = references[: gate.f1_examples]
        f1 = [
            token_f1(scorer.generate(r["prompt"], gate.max_new_tokens), r["completion"][0]["content"])
            for r in sample
        ]
        scores.token_f1, scores.f1_each = sum(f1) / len(f1), f1
    pairs = _sample(_rows(manifest.file("dpo", split)), gate.max_examples)
    if pairs:
        wins = 0
        for row in pairs:
            chosen, _, _ = scorer.answer_stats(row["prompt"], row["chosen"][0]["content"])
            rejected, _, _ = scorer.answer_stats(row["prompt"], row["rejected"][0]["content"])
            wins += chosen > rejected
        scores.pairs = len(pairs)
        scores.preference_accuracy = wins / len(pairs)
    for row in _sample(_rows(manifest.file("kto", split)), gate.max_examples):
        ll, _, _ = scorer.answer_stats(row["prompt"], row["completion"][0]["content"])
        scores.labeled.append((bool(row["label"]), ll))
    if gate.bias_probe:
        from retrain.bias import build_pairs, probe

        probe_pairs = build_pairs(_rows(manifest.file("sft", split)), gate.bias_examples)
        scores.bias = probe(scorer, probe_pairs, gate.max_new_tokens)
    return scores


def reward_auc(candidate: Scores, champion: Scores) -> float | None:
    """How well KTO's implicit reward (candidate minus champion log-likelihood) ranks the held-out
    liked answers above the disliked ones: the AUC, ties half. With one label only, the share of
    answers moved the right way (liked up, disliked down), ties half."""
    if not candidate.labeled or len(candidate.labeled) != len(champion.labeled):
        return None
    rewards = [(label, c - b) for (label, c), (_, b) in zip(candidate.labeled, champion.labeled, strict=True)]
    liked = [r for label, r in rewards if label]
    disliked = [r for label, r in rewards if not label]
    if liked and disliked:
        wins = sum((a > b) + 0.5 * (a == b) for a in liked for b in disliked)
        return wins / (len(liked) * len(disliked))
    moved = [r if label else -r for label, r in rewards]
    return sum((m > 0) + 0.5 * (m == 0) for m in moved) / len(moved)


def auc_null_error(scores: Scores) -> float:
    """The standard error of `reward_auc` when the reward ranks at random: the Mann-Whitney
    statistic's, sqrt((n1 + n2 + 1) / (12 n1 n2)), or with one label a share's, sqrt(1 / 4n)."""
    liked = sum(1 for label, _ in scores.labeled if label)
    disliked = len(scores.labeled) - liked
    if liked and disliked:
        return math.sqrt((liked + disliked + 1) / (12 * liked * disliked))
    return coin_toss_error(len(scores.labeled))


def coin_toss_error(n: int) -> float:
    """The standard error of a share of n outcomes that are each a coin toss: sqrt(1 / 4n)."""
    return math.sqrt(0.25 / max(1, n))


def held_out_count(scores: Scores, methods: Collection[str]) -> int:
    """The held-out examples of the methods' own formats."""
    own = {"sft": scores.examples, "kto": len(scores.labeled), "dpo": scores.pairs}
    return sum(own[method] for method in methods)


def gate(
    candidate: Scores, champion: Scores, config: GateConfig, method: str | Sequence[str] | None = None
) -> GateResult:
    """Pass or fail, with every reason (all checks are reported, not only the first failure).
    `method` names the training objective (or the stages of a combined run) whose own held-out
    data decides (None: all apply)."""
    reasons: list[str] = []
    judged = (method,) if isinstance(method, str) else tuple(method or ("sft", "kto", "dpo"))
    own = held_out_count(candidate, judged)
    if own < config.min_examples:
        kind = f"{'+'.join(judged)} " if method else ""
        reasons.append(f"only {own} held-out {kind}examples (< {config.min_examples})")
    if "sft" in judged:
        reasons += _likelihood_reasons(candidate, champion, config)
    auc = reward_auc(candidate, champion)
    if "kto" in judged and auc is not None:
        error = auc_null_error(candidate)
        if auc < config.min_reward_auc - config.noise_z * error:
            reasons.append(
                f"implicit reward ranks held-out liked over disliked answers with AUC {auc:.3f} "
                f"(below {config.min_reward_auc:.3f} by more than {config.noise_z:g} standard errors "
                f"of {error:.3f})"
            )
    accuracy = candidate.preference_accuracy
    if "dpo" in judged and accuracy is not None and candidate.pairs:
        # A share of pairs: its standard error if the model chose at random.
        error = coin_toss_error(candidate.pairs)
        if accuracy < config.min_preference_accuracy - config.noise_z * error:
            reasons.append(
                f"preference accuracy {accuracy:.3f} on {candidate.pairs} held-out pairs (below "
                f"{config.min_preference_accuracy:.3f} by more than {config.noise_z:g} standard errors "
                f"of {error:.3f})"
            )
    if candidate.token_f1 is not None and champion.token_f1 is not None:
        drop = champion.token_f1 - candidate.token_f1
        error = _paired_error(champion.f1_each, candidate.f1_each)
        if drop > config.max_f1_drop + config.noise_z * error:
            beyond = f" + {config.noise_z:g} standard errors of {error:.3f}" if error else ""
            reasons.append(
                f"generated answers are further from what users wanted: token F1 {candidate.token_f1:.3f} "
                f"vs champion {champion.token_f1:.3f} (drop {drop:.3f} > {config.max_f1_drop:.3f}{beyond})"
            )
    reasons += _bias_reasons(candidate.bias, champion.bias, config)
    label = "+".join(judged) if method else None
    return GateResult(not reasons, reasons, candidate, champion, {"method": label, "reward_auc": auc})


def _paired_error(champion: list[float], candidate: list[float]) -> float:
    """The standard error of the mean per-prompt difference (0 without per-prompt figures; one
    prompt is no evidence: infinite)."""
    if not champion or len(champion) != len(candidate):
        return 0.0
    if len(champion) < 2:
        return math.inf
    differences = [a - b for a, b in zip(champion, candidate, strict=True)]
    return statistics.stdev(differences) / math.sqrt(len(differences))


def _likelihood_reasons(candidate: Scores, champion: Scores, config: GateConfig) -> list[str]:
    reasons = []
    if candidate.perplexity is not None and champion.perplexity is not None:
        ratio = candidate.perplexity / champion.perplexity
        if ratio > config.max_perplexity_ratio:
            reasons.append(
                f"perplexity {candidate.perplexity:.3f} vs champion {champion.perplexity:.3f} "
                f"(ratio {ratio:.3f} > {config.max_perplexity_ratio:g})"
            )
    if candidate.token_accuracy is not None and champion.token_accuracy is not None:
        gain = candidate.token_accuracy - champion.token_accuracy
        shortfall = gain - config.min_token_accuracy_gain
        error = _difference_error(
            candidate.token_accuracy, candidate.tokens, champion.token_accuracy, champion.tokens
        )
        # A few held-out prompts are a few dozen tokens: two of them flipping is not a regression.
        if shortfall < 0 and shortfall < -config.noise_z * error:
            reasons.append(
                f"token accuracy gain {gain:+.4f} < {config.min_token_accuracy_gain:+.4f} "
                f"(beyond {config.noise_z:g} standard errors of {error:.4f})"
            )
    return reasons


def _difference_error(p: float, n: int, q: float, m: int) -> float:
    """The standard error of the difference of two proportions (0 when a count is unknown)."""
    if n <= 0 or m <= 0:
        return 0.0
    return math.sqrt(p * (1 - p) / n + q * (1 - q) / m)


def _bias_reasons(candidate: BiasResult | None, champion: BiasResult | None, config: GateConfig) -> list[str]:
    if not config.bias_probe or candidate is None:
        return []
    reasons = []
    ceiling = config.max_bias_answer_change
    if ceiling is not None and candidate.answer_change > ceiling:
        reasons.append(f"counterfactual answer change {candidate.answer_change:.3f} > {ceiling:.3f}")
    if champion is not None:
        increase = candidate.answer_change - champion.answer_change
        if increase > config.max_bias_change_increase:
            reasons.append(
                f"counterfactual answer change {candidate.answer_change:.3f} vs champion "
                f"{champion.answer_change:.3f} (+{increase:.3f} > {config.max_bias_change_increase:.3f})"
            )
    if candidate.refusal_gap > config.max_refusal_gap:
        reasons.append(
            f"counterfactual refusal gap {candidate.refusal_gap:.3f} > {config.max_refusal_gap:.3f} "
            f"(refusals {candidate.refusal_rate:.3f} original, "
            f"{candidate.refusal_rate_counterfactual:.3f} swapped)"
        )
    return reasons
