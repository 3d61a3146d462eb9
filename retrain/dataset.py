"""Versioned training datasets from the selected completions.

The examples are the export's (feedback/export.py: TRL conversational formats, always
redacted): SFT from positively rated answers and corrections, KTO from every judged rating and
corrections, DPO from side-by-side choices and correction pairs. Here they are restricted to the
selected completions, cleaned (feedback/clean.py: empty, too short or too long answers removed,
each counted), split by prompt and written under `<root>/<version>/` where the version is a hash
of the content: the same data is the same version. `manifest.json` records counts, sources,
what cleaning removed, how often feedback repeated, KTO weights and the hash.

Repeated feedback is signal: the same example (prompt and answer, up to case and spacing) from
several people becomes one example whose weight grows with the number of distinct raters (and
with 1 or 5 stars), as 1 + log2(weight) copies in the training split, at most `max_copies`;
one person's repetitions count once. Held-out splits keep one copy.

The split is by prompt: every example of a prompt lands in the same split, in every format, so
no held-out prompt was taught in other words or another format. Prompts are ranked by a hash
salted with the run (`salt`), so a prompt held out by one run is likely taught by the next (the
pipeline leaves held-out samples unspent); about 10% of prompts are the test split (at least one
when there are three), 10% validation (only from ten prompts on: a handful of examples is too
few to choose a checkpoint by), stratified by whether a prompt has a liked answer.

Paraphrases of a selected completion (augmentation) come along with it but never take part in
the split: they join the training split when their original is in it and are dropped otherwise,
so no held-out prompt leaks into training in other words and evaluation never scores one.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Engine

from feedback.clean import Cleaner, CleaningConfig, dedup_key
from feedback.export import FORMATS, examples
from feedback.redact import Redactor

SPLITS = ("train", "validation", "test")
_IDS = ("completion_id", "chosen_completion_id", "rejected_completion_id")
_META = (*_IDS, "model_version", "origin_id", "rater", "strength")
MAX_COPIES = 8


@dataclass(slots=True)
class DatasetManifest:
    version: str
    path: str
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    sources: dict[str, dict[str, int]] = field(default_factory=dict)
    removed: dict[str, int] = field(default_factory=dict)
    # Per format: rows merged into an example given before, and training copies they added.
    repeats: dict[str, dict[str, int]] = field(default_factory=dict)
    kto_weights: dict[str, float] = field(default_factory=dict)
    kto_labels: dict[str, int] = field(default_factory=dict)
    # Completions whose prompt was held out: not spent, a later run may teach them.
    held_out: list[str] = field(default_factory=list)
    train_sources: dict[str, dict[str, int]] = field(default_factory=dict)
    created_at: str = ""

    def size(self, fmt: str, split: str = "train") -> int:
        return self.counts.get(fmt, {}).get(split, 0)

    def file(self, fmt: str, split: str) -> Path:
        return Path(self.path) / f"{fmt}.{split}.jsonl"

    def source_size(self, fmt: str, source: str) -> int:
        """Distinct training examples of one kind of signal (no repeat copies)."""
        return self.train_sources.get(fmt, {}).get(source, 0)


@dataclass(slots=True)
class _Example:
    row: dict[str, Any]
    completions: set[str]
    raters: dict[str, int]  # rater -> strongest strength they gave

    def copies(self, most: int) -> int:
        weight = sum(self.raters.values()) or 1
        return max(1, min(most, round(1 + math.log2(weight))))


def _canonical(row: dict[str, Any]) -> str:
    return json.dumps(row, ensure_ascii=False, sort_keys=True, separators=(",", ":"))


def _answer(fmt: str, row: dict[str, Any]) -> tuple[str, Any]:
    """The answer the filters judge, and what else makes the example distinct."""
    if fmt == "dpo":
        return row["chosen"][0]["content"], row["rejected"][0]["content"]
    return row["completion"][0]["content"], row.get("label", "")


def _stratum(fmt: str, row: dict[str, Any]) -> str:
    return str(row["label"]) if fmt == "kto" else row.get("source", "")


def prompt_key(prompt: list[dict[str, Any]]) -> str:
    """The identity of a prompt for the split (case- and space-insensitive)."""
    return dedup_key(*(m.get("content", "") for m in prompt))


def _held_counts(strata: dict[str, list[str]], total: int, held_total: int) -> dict[str, int]:
    """`held_total` shared over the strata by size, largest remainders first."""
    shares = {key: len(members) * held_total / total for key, members in strata.items()} if total else {}
    held = {key: int(share) for key, share in shares.items()}
    for key in sorted(shares, key=lambda k: (held[k] - shares[k], k))[: held_total - sum(held.values())]:
        held[key] += 1
    return held


def assign_groups(strata_of: dict[str, str], salt: str) -> dict[str, str]:
    """Each prompt group's split, stratified, ordered within a stratum by a salted hash (the same
    whatever the input order)."""
    strata: dict[str, list[str]] = defaultdict(list)
    for key, stratum in strata_of.items():
        strata[stratum].append(key)
    total = len(strata_of)
    tests = _held_counts(strata, total, max(round(total / 10), 1 if total >= 3 else 0))
    validations = _held_counts(strata, total, round(total / 10) if total >= 10 else 0)
    out: dict[str, str] = {}
    for stratum, keys in sorted(strata.items()):
        keys.sort(key=lambda k: hashlib.sha256(f"{salt}:{k}".encode()).hexdigest())
        test, validation = tests[stratum], validations[stratum]
        for index, key in enumerate(keys):
            out[key] = "test" if index < test else "validation" if index < test + validation else "train"
    return out


def _hold_out_some(assignment: dict[str, str], keys: set[str], salt: str) -> None:
    """Move one of `keys` into the test split (from three prompts on) and one into validation
    (from ten) when the stratified assignment gave them none there."""
    for name, least in (("test", 3), ("validation", 10)):
        if len(keys) < least or any(assignment[k] == name for k in keys):
            continue
        training = sorted(
            (k for k in keys if assignment[k] == "train"),
            key=lambda k: hashlib.sha256(f"{salt}:{k}".encode()).hexdigest(),
        )
        if len(training) > 1:
            assignment[training[0]] = name


def split(rows: list[dict[str, Any]], fmt: str, seed: int) -> dict[str, list[dict[str, Any]]]:
    """One format's rows split by prompt group (see the module docstring), each group in the
    stratum of its first row; rows within a split ordered by a seeded hash."""
    strata_of: dict[str, str] = {}
    for row in sorted(rows, key=_canonical):
        strata_of.setdefault(prompt_key(row["prompt"]), _stratum(fmt, row))
    assignment = assign_groups(strata_of, str(seed))
    out: dict[str, list[dict[str, Any]]] = {name: [] for name in SPLITS}
    for row in rows:
        out[assignment[prompt_key(row["prompt"])]].append(row)
    for name in SPLITS:
        _order(out[name], seed)
    return out


def _order(rows: list[dict[str, Any]], seed: int) -> None:
    """A stable order whatever the input order (evaluation samples the first rows)."""
    rows.sort(key=lambda r: hashlib.sha256(f"{seed}:{_canonical(r)}".encode()).hexdigest())


def kto_weights(rows: Iterable[dict[str, Any]]) -> dict[str, float]:
    """TRL's KTO guidance: desirable_weight * n_desirable / (undesirable_weight * n_undesirable)
    should lie in [1, 4/3]; the rarer side is weighted up to bring it there."""
    labels = Counter(bool(r["label"]) for r in rows)
    good, bad = labels[True], labels[False]
    weights = {"desirable_weight": 1.0, "undesirable_weight": 1.0}
    if good and bad:
        ratio = good / bad
        if ratio < 1:
            weights["desirable_weight"] = round(1 / ratio, 4)
        elif ratio > 4 / 3:
            weights["undesirable_weight"] = round(ratio / (4 / 3), 4)
    return weights


def build_dataset(
    engine: Engine,
    completion_ids: set[str],
    root: Path,
    *,
    redactor: Redactor | None = None,
    cleaning: CleaningConfig | None = None,
    seed: int = 0,
    salt: str = "",
    max_copies: int = MAX_COPIES,
) -> DatasetManifest:
    """Write the dataset of the selected completions (all formats) and return its manifest."""
    redactor = redactor or Redactor()
    cleaning = cleaning or CleaningConfig()
    merge = cleaning.dedup
    # Identical examples are merged here (and weighted), not dropped by the cleaner.
    filters = cleaning.model_copy(update={"dedup": False})
    removed: Counter[str] = Counter()
    gathered: dict[str, list[_Example]] = {}
    paraphrases: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    repeats: dict[str, dict[str, int]] = {}
    for fmt in FORMATS:
        cleaner = Cleaner(filters, redactor)
        merged: dict[str, _Example] = {}
        gathered[fmt], paraphrases[fmt] = [], []
        repeated = 0
        for row in examples(engine, fmt, redactor, metadata=True):
            origin = row.get("origin_id")
            if not any(row.get(key) in completion_ids for key in _IDS) and origin not in completion_ids:
                continue
            answer, extra = _answer(fmt, row)
            clean = {k: v for k, v in row.items() if k not in _META}
            key = dedup_key(*(m.get("content", "") for m in row["prompt"]), answer, extra)
            completion = row.get("completion_id") or row.get("chosen_completion_id")
            rater, strength = row.get("rater") or completion, int(row.get("strength") or 1)
            if merge and key in merged:
                found = merged[key]
                found.completions.add(completion)
                found.raters[rater] = max(found.raters.get(rater, 0), strength)
                repeated += 1
                continue
            if not cleaner.keep(row["prompt"], answer, extra=extra):
                continue
            if origin:
                paraphrases[fmt].append((origin, clean))
                continue
            example = _Example(clean, {completion}, {rater: strength})
            gathered[fmt].append(example)
            if merge:
                merged[key] = example
        removed.update({f"{fmt}: {reason}": n for reason, n in cleaner.report.items()})
        repeats[fmt] = {"merged": repeated, "copies": 0}

    # One split per prompt, shared by every format.
    liked = {prompt_key(e.row["prompt"]) for e in gathered["sft"]}
    strata_of = {
        prompt_key(e.row["prompt"]): "liked" if prompt_key(e.row["prompt"]) in liked else "other"
        for fmt in FORMATS
        for e in gathered[fmt]
    }
    assignment = assign_groups(strata_of, f"{seed}:{salt}")
    for fmt in FORMATS:  # every method gets held-out data of its own, however rare its signal
        _hold_out_some(assignment, {prompt_key(e.row["prompt"]) for e in gathered[fmt]}, f"{seed}:{salt}")
    splits: dict[str, dict[str, list[dict[str, Any]]]] = {}
    per_format: dict[str, list[dict[str, Any]]] = {}
    held_out: set[str] = set()
    train_sources: dict[str, Counter[str]] = {}
    for fmt in FORMATS:
        splits[fmt] = {name: [] for name in SPLITS}
        train_sources[fmt] = Counter()
        trained_on: set[str] = set()
        for example in gathered[fmt]:
            where = assignment[prompt_key(example.row["prompt"])]
            if where == "train":
                copies = example.copies(max_copies)
                splits[fmt]["train"] += [example.row] * copies
                repeats[fmt]["copies"] += copies - 1
                trained_on |= example.completions
                train_sources[fmt][example.row.get("source", "")] += 1
            else:
                splits[fmt][where].append(example.row)
                held_out |= example.completions
        kept = [row for origin, row in paraphrases[fmt] if origin in trained_on]
        if len(kept) < len(paraphrases[fmt]):
            removed[f"{fmt}: paraphrase of a held-out example"] += len(paraphrases[fmt]) - len(kept)
        splits[fmt]["train"] += kept
        for name in SPLITS:
            splits[fmt][name].sort(
                key=lambda r: hashlib.sha256(f"{seed}:{_canonical(r)}".encode()).hexdigest()
            )
        per_format[fmt] = [e.row for e in gathered[fmt]] + kept
    digest = hashlib.sha256()
    for fmt in FORMATS:
        for name in SPLITS:
            for row in splits[fmt][name]:
                digest.update(f"{fmt}/{name}/{_canonical(row)}\n".encode())
    version = f"ds-{digest.hexdigest()[:12]}"
    target = root / version
    manifest = DatasetManifest(
        version=version,
        path=str(target),
        counts={fmt: {name: len(splits[fmt][name]) for name in SPLITS} for fmt in FORMATS},
        sources={fmt: dict(Counter(r.get("source", "") for r in per_format[fmt])) for fmt in FORMATS},
        removed=dict(removed),
        repeats=repeats,
        kto_weights=kto_weights(splits["kto"]["train"]),
        kto_labels={
            str(k).lower(): v for k, v in Counter(r["label"] for r in splits["kto"]["train"]).items()
        },
        held_out=sorted(held_out),
        train_sources={fmt: dict(counts) for fmt, counts in train_sources.items()},
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    if (target / "manifest.json").is_file():
        return manifest  # the same content is already written
    root.mkdir(parents=True, exist_ok=True)
    # Written beside the target and renamed: a crash leaves no half dataset under a version.
    staging = Path(tempfile.mkdtemp(prefix=f".{version}-", dir=root))
    try:
        for fmt in FORMATS:
            for name in SPLITS:
                with open(staging / f"{fmt}.{name}.jsonl", "w", encoding="utf-8") as handle:
                    for row in splits[fmt][name]:
                        handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        (staging / "manifest.json").write_text(json.dumps(asdict(manifest), indent=2))
        os.replace(staging, target)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not (target / "manifest.json").is_file():
            raise
    return manifest
