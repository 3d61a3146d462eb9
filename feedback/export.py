"""Ratings as training data, in TRL's dataset formats (JSON lines, conversational).

- sft: `{"prompt": [...messages], "completion": [{"role": "assistant", ...}]}` from answers rated
  up (or 4-5 stars) and from corrections (the answer the user wanted).
- kto: the same plus `"label": true|false`: up / 4-5 stars true, down / 1-2 stars false,
  corrections true; 3 stars alone says nothing and is left out.
- dpo: `{"prompt", "chosen", "rejected"}` from side-by-side choices, and from corrections
  (the correction chosen over the answer it corrects).

With `metadata`, rows also carry the completion ids, the version, the kind of signal
(`source`: rating, correction, preference, or paraphrase for an augmented prompt, which also
names its `origin_id`), who gave it (`rater`: the user key, or the completion for an anonymous
one, so repeated feedback can be counted once per person) and how strongly (`strength`: 2 for 1
or 5 stars, else 1).

Every text goes through the PII redactor on the way out, whatever the storage policy was.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from sqlalchemy import Engine, select
from sqlalchemy.orm import aliased
from sqlmodel import Session

from feedback.models import Completion, Preference, Rating
from feedback.redact import Redactor

ExportFormat = Literal["sft", "kto", "dpo"]
FORMATS: tuple[ExportFormat, ...] = ("sft", "kto", "dpo")


@dataclass(slots=True)
class ExportFilter:
    since: datetime | None = None
    model_version: str | None = None


def _assistant(text: str, tool_calls: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """The answer as TRL's conversational format has it: one assistant message, with its tool
    calls (OpenAI's shape, which chat templates read) when it made any."""
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if tool_calls:
        message["tool_calls"] = tool_calls
    return [message]


def _rating_label(rating: Rating) -> bool | None:
    if rating.thumb is not None:
        return rating.thumb == "up"
    if rating.score is not None and rating.score != 3:
        return rating.score >= 4
    return None


def _strength(rating: Rating) -> int:
    return 2 if rating.thumb is None and rating.score in (1, 5) else 1


def _rater(user_key: str, completion_id: str) -> str:
    # Anonymous completions are rated by whoever holds their id: one rater per completion.
    return user_key or f"anonymous:{completion_id}"


def _rated(session: Session, where: ExportFilter) -> Iterator[tuple[Rating, Completion]]:
    query = select(Rating, Completion).join(Completion, Completion.id == Rating.completion_id)
    if where.since is not None:
        query = query.where(Rating.updated_at >= where.since)
    if where.model_version is not None:
        query = query.where(Completion.model_version == where.model_version)
    yield from session.execute(query.order_by(Rating.updated_at, Rating.id).execution_options(yield_per=500))


def _preferred(session: Session, where: ExportFilter) -> Iterator[tuple[Preference, Completion, Completion]]:
    chosen, rejected = aliased(Completion), aliased(Completion)
    query = (
        select(Preference, chosen, rejected)
        .join(chosen, chosen.id == Preference.chosen_completion_id)
        .join(rejected, rejected.id == Preference.rejected_completion_id)
    )
    if where.since is not None:
        query = query.where(Preference.updated_at >= where.since)
    if where.model_version is not None:
        query = query.where(
            (chosen.model_version == where.model_version) | (rejected.model_version == where.model_version)
        )
    yield from session.execute(
        query.order_by(Preference.updated_at, Preference.id).execution_options(yield_per=500)
    )


def examples(
    engine: Engine,
    fmt: ExportFormat,
    redactor: Redactor,
    where: ExportFilter | None = None,
    *,
    metadata: bool = False,
) -> Iterator[dict[str, Any]]:
    """The training examples of one format, redacted, oldest rating first."""
    where = where or ExportFilter()

    def prompt(completion: Completion) -> list[dict[str, str]]:
        return redactor.redact_messages(completion.messages)

    def answer(completion: Completion) -> list[dict[str, Any]]:
        return _assistant(
            redactor.redact(completion.response), redactor.redact_tool_calls(completion.tool_calls)
        )

    def meta(row: dict[str, Any], completion: Completion, **ids: Any) -> dict[str, Any]:
        if completion.tools:
            # TRL passes an example's `tools` to the chat template (its conversational format).
            row["tools"] = completion.tools
        return {**row, **ids} if metadata else row

    with Session(engine) as session:
        if fmt in ("sft", "kto"):
            for rating, completion in _rated(session, where):
                ids = {
                    "completion_id": completion.id,
                    "model_version": completion.model_version,
                    "rater": _rater(rating.user_key, completion.id),
                }
                kind = "rating"
                if completion.origin_id is not None:  # a reworded prompt: it follows its original
                    ids["origin_id"], kind = completion.origin_id, completion.source
                label = _rating_label(rating)
                if label is not None and (fmt == "kto" or label):
                    row = {"prompt": prompt(completion), "completion": answer(completion)}
                    if fmt == "kto":
                        row["label"] = label
                    yield meta(row, completion, **ids, source=kind, strength=_strength(rating))
                if rating.correction:
                    row = {
                        "prompt": prompt(completion),
                        "completion": _assistant(redactor.redact(rating.correction)),
                    }
                    if fmt == "kto":
                        row["label"] = True
                    yield meta(row, completion, **ids, source="correction", strength=1)
            return
        for preference, chosen, rejected in _preferred(session, where):
            yield meta(
                {"prompt": prompt(chosen), "chosen": answer(chosen), "rejected": answer(rejected)},
                chosen,
                chosen_completion_id=chosen.id,
                rejected_completion_id=rejected.id,
                rater=_rater(preference.user_key, chosen.id),
                source="preference",
                strength=1,
            )
        for rating, completion in _rated(session, where):
            if rating.correction and rating.correction.strip() != completion.response.strip():
                yield meta(
                    {
                        "prompt": prompt(completion),
                        "chosen": _assistant(redactor.redact(rating.correction)),
                        "rejected": answer(completion),
                    },
                    completion,
                    completion_id=completion.id,
                    model_version=completion.model_version,
                    rater=_rater(rating.user_key, completion.id),
                    source="correction",
                    strength=1,
                )


def export_jsonl(
    engine: Engine,
    fmt: ExportFormat,
    out: Path,
    redactor: Redactor,
    where: ExportFilter | None = None,
    *,
    metadata: bool = False,
) -> int:
    """Write the examples to `out` atomically (a reader never sees half a file); returns the count."""
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial")
    written = 0
    with open(partial, "w", encoding="utf-8") as handle:
        for row in examples(engine, fmt, redactor, where, metadata=metadata):
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
            written += 1
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(partial, out)
    return written
