"""Paraphrase augmentation: the selected user turns reworded by the serving model itself.

For each selected completion, the serving model (the base with the active adapter, loaded here
with transformers; no outside service) rewrites the last user turn `paraphrases` times. A
paraphrase is kept only if it says something new in the same terms: not empty, not the original
again (nor a paraphrase already kept), of a similar length, sharing words with the original
(token F1 at least `_MIN_F1`), and keeping every PII placeholder of the original; it is redacted
like everything else, in case the model invents an address or a number.

Kept paraphrases are completions with `source = "paraphrase"` and `origin_id` set: the original's
context with the reworded turn, the original's answer, copies of its ratings. They are never
candidates of a selection and never held out: the dataset puts them in the training split with
their original, or drops them (retrain/dataset.py), so evaluation never scores one.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, func, select

from feedback.db import upsert
from feedback.models import Completion, Rating
from feedback.redact import Redactor
from feedback.service import prompt_hash
from retrain.config import AugmentConfig
from retrain.gate import Scorer
from retrain.text_metrics import token_f1

_c, _r = Completion.__table__.c, Rating.__table__.c
_CHUNK = 900
_MIN_F1 = 0.2
_LENGTH_RATIO = (0.4, 2.5)
_PLACEHOLDER = re.compile(r"<[A-Z][A-Z0-9_]*>")
# Applied to stripped text. Each whitespace run follows its (optional) word inside one group: three
# optional runs in a row split a run of spaces every possible way (cubic in its length).
_LEADING_LABEL = re.compile(
    r"^(?:(?:rewritten|paraphrased?|new)\s*)?(?:(?:message|version|text)\s*)?:\s*", re.I
)
INSTRUCTION = (
    "Rewrite the message below in different words. Keep its meaning, its language and every detail "
    "(names, numbers, and placeholders such as <EMAIL>). Reply with the rewritten message only.\n\n"
    "Message: {text}"
)

# texts to reword -> one sampled rewording per text (the same order)
Generator = Callable[[Sequence[str]], list[str]]


def _normal(text: str) -> str:
    return " ".join(text.casefold().split())


def tidy(text: str) -> str:
    """A generated paraphrase without a leading label or wrapping quotes."""
    text = _LEADING_LABEL.sub("", text.strip(), count=1).strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'“”":
        text = text[1:-1].strip()
    return text.strip("“”").strip()


def judge(original: str, paraphrase: str, kept: Sequence[str] = ()) -> str | None:
    """Why a paraphrase is refused, or None when it is kept."""
    if not paraphrase:
        return "empty"
    normal = _normal(paraphrase)
    if normal == _normal(original):
        return "same as the original"
    if any(normal == _normal(k) for k in kept):
        return "repeated"
    ratio = len(paraphrase) / max(len(original), 1)
    if not _LENGTH_RATIO[0] <= ratio <= _LENGTH_RATIO[1]:
        return "length far from the original"
    if not set(_PLACEHOLDER.findall(original)) <= set(_PLACEHOLDER.findall(paraphrase)):
        return "lost a placeholder"
    if token_f1(paraphrase, original) < _MIN_F1:
        return "drifted from the original"
    return None


def model_generator(base_model: Path, adapter: Path | None, config: AugmentConfig, seed: int) -> Generator:
    """Sampled rewordings from the base model with the serving adapter."""
    import torch

    torch.manual_seed(seed)
    scorer = Scorer(base_model, adapter)

    def generate(texts: Sequence[str]) -> list[str]:
        prompts = [[{"role": "user", "content": INSTRUCTION.format(text=t)}] for t in texts]
        return scorer.generate_many(
            prompts, config.max_new_tokens, config.batch_size, temperature=config.temperature, top_p=0.95
        )

    return generate


def _chunks(items: Sequence[str]):
    for start in range(0, len(items), _CHUNK):
        yield items[start : start + _CHUNK]


def augment(
    engine: Engine,
    completion_ids: Sequence[str],
    config: AugmentConfig,
    generate: Generator,
    redactor: Redactor,
) -> dict[str, Any]:
    """Add up to `config.paraphrases` kept paraphrases to each completion (counting those it
    already has); returns what was asked, kept and refused (by reason)."""
    report: Counter[str] = Counter()
    originals: dict[str, dict[str, Any]] = {}
    have: Counter[str] = Counter()
    with engine.connect() as connection:
        for chunk in _chunks(list(completion_ids)):
            for row in connection.execute(
                select(Completion.__table__).where(_c.id.in_(chunk), _c.source != "paraphrase")
            ).mappings():
                originals[row["id"]] = dict(row)
            for origin, count in connection.execute(
                select(_c.origin_id, func.count()).where(_c.origin_id.in_(chunk)).group_by(_c.origin_id)
            ):
                have[origin] = count
        ratings: dict[str, list[dict[str, Any]]] = {}
        for chunk in _chunks(list(originals)):
            for row in connection.execute(
                select(Rating.__table__).where(_r.completion_id.in_(chunk))
            ).mappings():
                ratings.setdefault(row["completion_id"], []).append(dict(row))
    # The turn reworded: the last user message of each original's prompt.
    todo: list[tuple[str, int, str]] = []
    for completion_id, row in originals.items():
        users = [i for i, m in enumerate(row["messages"]) if m.get("role") == "user"]
        if not users:
            continue
        index = users[-1]
        todo += [(completion_id, index, row["messages"][index]["content"])] * max(
            0, config.paraphrases - have[completion_id]
        )
    report["asked"] = len(todo)
    if not todo:
        return dict(report)
    generated = generate([text for _, _, text in todo])
    kept: dict[str, list[str]] = {}
    completions, copies = [], []
    now = datetime.now(UTC)
    for (completion_id, index, original), raw in zip(todo, generated, strict=True):
        paraphrase = redactor.redact(tidy(raw))
        reason = judge(original, paraphrase, kept.get(completion_id, ()))
        if reason is not None:
            report[f"refused: {reason}"] += 1
            continue
        kept.setdefault(completion_id, []).append(paraphrase)
        row = originals[completion_id]
        messages = [dict(m) for m in row["messages"]]
        messages[index] = {**messages[index], "content": paraphrase}
        new_id = "par-" + hashlib.sha256(f"{completion_id}\x1f{paraphrase}".encode()).hexdigest()[:40]
        completions.append(
            {
                **{k: row[k] for k in ("conversation_id", "user_key", "model_version", "response", "site")},
                "id": new_id,
                "created_at": now,
                "messages": messages,
                "prompt_hash": prompt_hash(messages),
                "sampling": {},
                "redacted": True,
                "source": "paraphrase",
                "import_batch": row["import_batch"],
                "origin_id": completion_id,
                "experiment": "",
                "variant": "",
            }
        )
        for rating in ratings.get(completion_id, []):
            copies.append(
                {
                    **{k: rating[k] for k in ("user_key", "thumb", "score", "correction", "created_at")},
                    "completion_id": new_id,
                    "tags": [*rating["tags"], "paraphrase"],
                    "updated_at": rating["updated_at"],
                }
            )
    with engine.begin() as connection:
        if completions:
            upsert(connection, Completion, completions, ["id"])
        if copies:
            upsert(connection, Rating, copies, ["completion_id", "user_key"])
    report["kept"] = len(completions)
    return dict(report)
