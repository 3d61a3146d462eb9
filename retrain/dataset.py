"""Versioned training datasets from the selected completions.

The examples are the export's (feedback/export.py: TRL conversational formats, always
redacted): SFT from positively rated answers and corrections, KTO from every judged rating and
corrections, DPO from side-by-side choices and correction pairs. Here they are restricted to the
selected completions, cleaned (feedback/clean.py: empty, too short or too long answers and
duplicates removed, each counted), split 80/10/10 (stratified by label for KTO, by source
otherwise, deterministic), and written under `<root>/<version>/` where the version is a hash of
the content: the same data is the same version. `manifest.json` records counts, sources, what
cleaning removed, KTO weights and the hash.

Paraphrases of a selected completion (augmentation) come along with it but never take part in
the split: they join the training split when their original is in it and are dropped otherwise,
so no held-out prompt leaks into training in other words and evaluation never scores one.
"""

from __future__ import annotations

import hashlib
import json
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

from feedback.clean import Cleaner, CleaningConfig
from feedback.export import FORMATS, examples
from feedback.redact import Redactor

SPLITS = ("train", "validation", "test")
_IDS = ("completion_id", "chosen_completion_id", "rejected_completion_id")


@dataclass(slots=True)
class DatasetManifest:
    version: str
    path: str
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    sources: dict[str, dict[str, int]] = field(default_factory=dict)
    removed: dict[str, int] = field(default_factory=dict)
    kto_weights: dict[str, float] = field(default_factory=dict)
    kto_labels: dict[str, int] = field(default_factory=dict)
    created_at: str = ""

    def size(self, fmt: str, split: str = "train") -> int:
        return self.counts.get(fmt, {}).get(split, 0)

    def file(self, fmt: str, split: str) -> Path:
        return Path(self.path) / f"{fmt}.{split}.jsonl"


def _canonical(row: dict[str, Any]) -> str:
    return json.dumps(row, ensure_ascii=False, sort_keys=True, separators=(",", ":"))


def _answer(fmt: str, row: dict[str, Any]) -> tuple[str, Any]:
    """The answer the filters judge, and what else makes the example distinct."""
    if fmt == "dpo":
        return row["chosen"][0]["content"], row["rejected"][0]["content"]
    return row["completion"][0]["content"], row.get("label", "")


def _stratum(fmt: str, row: dict[str, Any]) -> str:
    return str(row["label"]) if fmt == "kto" else row.get("source", "")


def split(rows: list[dict[str, Any]], fmt: str, seed: int) -> dict[str, list[dict[str, Any]]]:
    """80/10/10, stratified: each stratum gives its share of the held-out splits (largest
    remainders first, so the totals are 10% each), rows ordered by a seeded hash (stable
    whatever the input order)."""
    strata: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        strata[_stratum(fmt, row)].append(row)
    total = len(rows)
    held_total = max(round(total / 10), 1 if total >= 3 else 0)
    shares = {key: len(members) * held_total / total for key, members in strata.items()} if total else {}
    held = {key: int(share) for key, share in shares.items()}
    for key in sorted(shares, key=lambda k: (held[k] - shares[k], k))[: held_total - sum(held.values())]:
        held[key] += 1
    out: dict[str, list[dict[str, Any]]] = {name: [] for name in SPLITS}
    for key, members in sorted(strata.items()):
        members.sort(key=lambda r: hashlib.sha256(f"{seed}:{_canonical(r)}".encode()).hexdigest())
        n = held[key]
        out["test"] += members[:n]
        out["validation"] += members[n : 2 * n]
        out["train"] += members[2 * n :]
    return out


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
) -> DatasetManifest:
    """Write the dataset of the selected completions (all formats) and return its manifest."""
    redactor = redactor or Redactor()
    per_format: dict[str, list[dict[str, Any]]] = {}
    splits: dict[str, dict[str, list[dict[str, Any]]]] = {}
    removed: Counter[str] = Counter()
    for fmt in FORMATS:
        cleaner = Cleaner(cleaning, redactor)
        rows, paraphrases = [], []
        origin_of: dict[int, str] = {}  # id(row) -> the completion it came from
        for row in examples(engine, fmt, redactor, metadata=True):
            origin = row.get("origin_id")
            if not any(row.get(key) in completion_ids for key in _IDS) and origin not in completion_ids:
                continue
            answer, extra = _answer(fmt, row)
            if not cleaner.keep(row["prompt"], answer, extra=extra):
                continue
            clean = {k: v for k, v in row.items() if k not in (*_IDS, "model_version", "origin_id")}
            if origin:
                paraphrases.append((origin, clean))
            else:
                origin_of[id(clean)] = row.get("completion_id") or row.get("chosen_completion_id")
                rows.append(clean)
        removed.update({f"{fmt}: {reason}": n for reason, n in cleaner.report.items()})
        splits[fmt] = split(rows, fmt, seed)
        trained_on = {origin_of[id(row)] for row in splits[fmt]["train"]}
        kept = [row for origin, row in paraphrases if origin in trained_on]
        if len(kept) < len(paraphrases):
            removed[f"{fmt}: paraphrase of a held-out example"] += len(paraphrases) - len(kept)
        splits[fmt]["train"] += kept
        per_format[fmt] = rows + kept
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
        kto_weights=kto_weights(splits["kto"]["train"]),
        kto_labels={
            str(k).lower(): v for k, v in Counter(r["label"] for r in splits["kto"]["train"]).items()
        },
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
