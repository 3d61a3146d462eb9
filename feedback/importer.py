"""`loopchat import`: chat transcripts a team already has, into the conversation log.

Two formats, read as a stream (constant memory whatever the file size; `.gz` files too):

- JSON lines, one conversation per line, in the OpenAI messages format:
  `{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "...",
  "approved": true}], "resolved": true, "rating": 5}` (all keys but `messages` optional).
- CSV (or TSV) transcripts, one message per row, with a header: `conversation_id, role, text`
  and optionally `timestamp`, `approved`, `rating`, `resolved`. A conversation's rows are
  contiguous.

Every record is validated; a malformed one is reported with its line number and skipped as a
whole (a CSV conversation with one bad row is skipped entirely), so nothing is half-written.
Each assistant turn becomes a completion whose prompt is everything before it, marked
`source = "import"` with its import batch. Ids are content hashes of the raw text, so importing
the same file (or an overlapping one) again adds nothing. Text is cleaned before it is stored
(feedback/clean.py: HTML, sign-offs, PII, empty, short or long turns, duplicates; a report says
what each step did), so the database never holds the transcripts' PII.

Labels become ratings by the reserved user "import": `approved` on an answer is a thumb up or
down (tag agent-approved / agent-rejected); `rating` on an answer (1-5 stars, or up/down), or on
the conversation for its last answer; `resolved` on the conversation rates its last answer up
or down when nothing more specific did. `assume_approved` rates every other answer up.
"""

from __future__ import annotations

import gzip
import hashlib
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Engine
from sqlmodel import Session

from feedback.clean import Cleaner, CleaningConfig
from feedback.db import upsert
from feedback.import_rows import IMPORT_RATER, Converter, digest
from feedback.models import Completion, Conversation, ImportBatch, Rating, RatingEvent
from feedback.redact import Redactor
from feedback.transcripts import Format, Malformed, Transcript, detect_format, read_csv, read_jsonl

MAX_ERRORS_STORED = 1000


@dataclass(slots=True)
class ImportReport:
    batch: str = ""
    source: str = ""
    status: str = "running"
    counts: Counter[str] = field(default_factory=Counter)
    cleaning: Counter[str] = field(default_factory=Counter)
    errors: list[Malformed] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "batch": self.batch,
            "source": self.source,
            "status": self.status,
            "counts": dict(self.counts),
            "cleaning": dict(self.cleaning),
            "errors": [{"line": e.line, "error": e.error} for e in self.errors[:MAX_ERRORS_STORED]],
        }


# -- the import ------------------------------------------------------------------------------------


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def import_file(
    engine: Engine,
    path: Path,
    *,
    source: str | None = None,
    fmt: Format | None = None,
    cleaning: CleaningConfig | None = None,
    redactor: Redactor | None = None,
    assume_approved: bool = False,
    batch_size: int = 500,
    progress: Callable[[int], None] | None = None,
) -> ImportReport:
    """Import one file; `progress(bytes_read)` is called as it goes. Returns the report, which
    is also stored in `import_batch`."""
    fmt = fmt or detect_format(path)
    source = source or path.name.split(".")[0]
    report = ImportReport(
        batch=f"imp-{datetime.now(UTC):%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}", source=source
    )
    with Session(engine) as session:
        session.add(
            ImportBatch(
                id=report.batch, source=source, path=str(path), file_sha256=_file_sha256(path), format=fmt
            )
        )
        session.commit()
    cleaner = Cleaner(cleaning, redactor)
    converter = Converter(report.batch, source, cleaner, assume_approved)
    raw = open(path, "rb")  # noqa: SIM115  (closed below; its position drives the progress bar)
    try:
        stream = gzip.GzipFile(fileobj=raw) if path.suffix.lower() == ".gz" else raw
        delimiter = "\t" if ".tsv" in [s.lower() for s in path.suffixes] else ","
        records = read_jsonl(stream) if fmt == "jsonl" else read_csv(stream, delimiter=delimiter)
        pending: list[Transcript] = []
        for item in records:
            if isinstance(item, Malformed):
                report.counts["malformed records"] += 1
                report.errors.append(item)
                continue
            report.counts["conversations read"] += 1
            pending.append(item)
            if len(pending) >= batch_size:
                _write(engine, converter, pending, report)
                pending = []
                if progress is not None:
                    progress(raw.tell())
        if pending:
            _write(engine, converter, pending, report)
        if progress is not None:
            progress(raw.tell())
        report.status = "finished"
    except KeyboardInterrupt:
        report.status = "interrupted"
        raise
    except Exception:
        report.status = "failed"
        raise
    finally:
        raw.close()
        report.counts.update(converter.counts)
        report.cleaning = cleaner.report
        _finish(engine, report)
    return report


def _write(engine: Engine, converter: Converter, transcripts: list[Transcript], report: ImportReport) -> None:
    """One transaction per batch: every conversation is written whole or not at all."""
    conversations, completions, ratings = [], [], {}
    for transcript in transcripts:
        conversation, rows, rated = converter.rows(transcript)
        if not rows:
            report.counts["conversations without answers to keep"] += 1
            continue
        conversations.append(conversation)
        completions += rows
        ratings.update(rated)
    if not completions:
        return
    with engine.begin() as connection:
        added_conversations = upsert(connection, Conversation, conversations, ["id"], returning="id") or []
        added = set(upsert(connection, Completion, completions, ["id"], returning="id") or [])
        new_ratings = [ratings[cid] for cid in ratings if cid in added]
        if new_ratings:
            upsert(connection, Rating, new_ratings, ["completion_id", "user_key"])
            events = [
                {"id": digest(r["completion_id"], IMPORT_RATER)[:32], **{k: r[k] for k in _EVENT_KEYS}}
                for r in new_ratings
            ]
            upsert(connection, RatingEvent, events, ["id"])
    report.counts["conversations added"] += len(added_conversations)
    report.counts["answers added"] += len(added)
    report.counts["answers already imported"] += len(completions) - len(added)
    report.counts["ratings added"] += len(new_ratings)


_EVENT_KEYS = ("completion_id", "user_key", "thumb", "score", "tags", "created_at")


def _finish(engine: Engine, report: ImportReport) -> None:
    with Session(engine) as session:
        batch = session.get(ImportBatch, report.batch)
        if batch is None:
            return
        body = report.as_dict()
        batch.status, batch.counts, batch.cleaning, batch.errors = (
            report.status,
            body["counts"],
            body["cleaning"],
            body["errors"],
        )
        batch.finished_at = datetime.now(UTC)
        session.add(batch)
        session.commit()
