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

import csv
import gzip
import hashlib
import io
import json
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from sqlalchemy import Engine
from sqlmodel import Session

from feedback.clean import Cleaner, CleaningConfig
from feedback.db import dialect_insert
from feedback.models import Completion, Conversation, ImportBatch, Rating, RatingEvent
from feedback.redact import Redactor
from feedback.service import prompt_hash

Format = Literal["jsonl", "csv"]
IMPORT_RATER = "import"  # the user key of ratings that come from labels in imported files
MAX_ERRORS_STORED = 1000

_ROLES = {
    "user": "user",
    "customer": "user",
    "client": "user",
    "visitor": "user",
    "human": "user",
    "assistant": "assistant",
    "agent": "assistant",
    "bot": "assistant",
    "support": "assistant",
    "operator": "assistant",
    "system": "system",
    # Tool traffic carries no text to learn from; such messages are dropped (counted).
    "tool": "tool",
    "function": "tool",
}
_THUMBS = {"up": "up", "down": "down", "+1": "up", "-1": "down", "positive": "up", "negative": "down",
           "good": "up", "bad": "down", "yes": "up", "no": "down", "true": "up", "false": "down"}  # fmt: skip
_BOOLS = {"true": True, "yes": True, "y": True, "1": True,
          "false": False, "no": False, "n": False, "0": False}  # fmt: skip


# -- what a record may hold ------------------------------------------------------------------------


def _rating(value: Any) -> tuple[str | None, int | None] | None:
    """(thumb, stars) of a rating label: 1-5 stars, or up/down in one of its spellings."""
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        return ("up" if value else "down"), None
    if isinstance(value, int | float) or (isinstance(value, str) and value.strip().lstrip("+-").isdigit()):
        number = float(value)
        if number in (1.0, -1.0) and isinstance(value, str) and value.strip()[0] in "+-":
            return ("up" if number > 0 else "down"), None
        if number != int(number) or not 1 <= number <= 5:
            raise ValueError(f"rating {value!r} is not 1-5 stars or up/down")
        return None, int(number)
    thumb = _THUMBS.get(str(value).strip().lower())
    if thumb is None:
        raise ValueError(f"rating {value!r} is not 1-5 stars or up/down")
    return thumb, None


def _flag(value: Any, name: str) -> bool | None:
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        return value
    found = _BOOLS.get(str(value).strip().lower())
    if found is None:
        raise ValueError(f"{name} {value!r} is not true or false")
    return found


class _Part(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str = "text"
    text: str | None = None


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    role: str
    content: str | list[_Part] | None = None
    timestamp: datetime | None = Field(None, alias="created_at")
    approved: Any = Field(None, alias="agent_approved")
    rating: Any = None

    @field_validator("role")
    @classmethod
    def _known_role(cls, value: str) -> str:
        role = _ROLES.get(value.strip().lower())
        if role is None:
            raise ValueError(f"unknown role {value!r} (user, assistant, system, or their synonyms)")
        return role

    @field_validator("approved")
    @classmethod
    def _approved(cls, value: Any) -> bool | None:
        return _flag(value, "approved")

    @field_validator("rating")
    @classmethod
    def _rating(cls, value: Any) -> tuple[str | None, int | None] | None:
        return _rating(value)

    def text(self) -> str:
        if isinstance(self.content, list):
            return "\n".join(p.text for p in self.content if p.type == "text" and p.text)
        return self.content or ""


class _Labels(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    resolved: Any = None
    rating: Any = None
    approved: Any = Field(None, alias="agent_approved")

    @field_validator("resolved", "approved")
    @classmethod
    def _flags(cls, value: Any, info) -> bool | None:
        return _flag(value, info.field_name)

    @field_validator("rating")
    @classmethod
    def _rating(cls, value: Any) -> tuple[str | None, int | None] | None:
        return _rating(value)


class _Record(_Labels):
    """One JSON line: the messages, and labels at the top level or under `labels`."""

    id: str | int | None = Field(None, alias="conversation_id")
    messages: list[_Message] = Field(min_length=1)
    timestamp: datetime | None = Field(None, alias="created_at")
    labels: _Labels | None = None


# -- parsed transcripts ----------------------------------------------------------------------------


@dataclass(slots=True)
class Turn:
    role: str
    text: str
    at: datetime | None = None
    approved: bool | None = None
    rating: tuple[str | None, int | None] | None = None


@dataclass(slots=True)
class Transcript:
    line: int
    turns: list[Turn]
    resolved: bool | None = None
    rating: tuple[str | None, int | None] | None = None
    approved: bool | None = None  # every answer of the conversation
    at: datetime | None = None


@dataclass(slots=True)
class Malformed:
    line: int
    error: str


def _error_text(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        parts = []
        for error in exc.errors()[:3]:
            where = ".".join(str(p) for p in error["loc"])
            message = error["msg"].removeprefix("Value error, ")
            parts.append(f"{where}: {message}" if where else message)
        return "; ".join(parts)
    return " ".join(str(exc).split())[:300]


def _utc(value: datetime | None) -> datetime | None:
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


def read_jsonl(stream: IO[bytes]) -> Iterator[Transcript | Malformed]:
    for number, raw in enumerate(stream, start=1):
        try:
            line = raw.decode("utf-8-sig" if number == 1 else "utf-8").strip()
        except UnicodeDecodeError as exc:
            yield Malformed(number, f"not valid UTF-8 ({exc.reason} at byte {exc.start})")
            continue
        if not line:
            continue
        try:
            data = json.loads(line)
            if not isinstance(data, dict):
                raise ValueError("a line must be a JSON object with a 'messages' list")
            record = _Record.model_validate(data)
        except (ValueError, ValidationError) as exc:
            yield Malformed(number, _error_text(exc))
            continue
        labels = record.labels or _Labels()
        yield Transcript(
            line=number,
            turns=[Turn(m.role, m.text(), _utc(m.timestamp), m.approved, m.rating) for m in record.messages],
            resolved=labels.resolved if labels.resolved is not None else record.resolved,
            rating=labels.rating if labels.rating is not None else record.rating,
            approved=labels.approved if labels.approved is not None else record.approved,
            at=_utc(record.timestamp),
        )


_CSV_COLUMNS = {
    "conversation_id": ("conversation_id", "conversation", "chat_id", "ticket_id"),
    "role": ("role", "sender", "author"),
    "text": ("text", "content", "message", "body"),
    "timestamp": ("timestamp", "time", "created_at", "date"),
    "approved": ("approved", "agent_approved"),
    "rating": ("rating",),
    "resolved": ("resolved",),
}


class _Row(_Labels):
    """One CSV row: a message, with the same labels (approved, rating, resolved) as a JSON line."""

    conversation_id: str = Field(min_length=1)
    role: str
    text: str
    timestamp: datetime | None = None

    _known_role = field_validator("role")(_Message._known_role.__func__)

    @field_validator("timestamp", mode="before")
    @classmethod
    def _empty_time(cls, value: Any) -> Any:
        return None if value == "" else value


def read_csv(stream: IO[bytes], *, delimiter: str = ",") -> Iterator[Transcript | Malformed]:
    """Rows grouped into conversations (contiguous rows with one id), in file order or by time."""
    # surrogateescape: undecodable bytes survive decoding and are found per row (below).
    text = io.TextIOWrapper(stream, encoding="utf-8-sig", errors="surrogateescape", newline="")
    reader = csv.reader(text, delimiter=delimiter)
    try:
        header = next(reader)
    except StopIteration:
        return
    names = [h.strip().lower() for h in header]
    columns: dict[str, int] = {}
    for key, aliases in _CSV_COLUMNS.items():
        found = next((names.index(a) for a in aliases if a in names), None)
        if found is not None:
            columns[key] = found
    missing = [key for key in ("conversation_id", "role", "text") if key not in columns]
    if missing:
        yield Malformed(1, f"header lacks column(s) {', '.join(missing)} (has: {', '.join(header)})")
        return

    finished: set[str] = set()
    current: str | None = None
    rows: list[tuple[int, _Row]] = []
    bad: list[Malformed] = []

    def flush() -> Iterator[Transcript | Malformed]:
        if current is None:
            return
        finished.add(current)
        if bad:
            yield from bad
            return
        yield _transcript(rows)

    start = 2
    for values in reader:
        line, start = start, reader.line_num + 1
        if not any(v.strip() for v in values):
            continue
        record = {key: values[index] if index < len(values) else "" for key, index in columns.items()}
        conversation = record["conversation_id"].strip()
        if conversation != current:
            yield from flush()
            current, rows, bad = conversation, [], []
            if conversation in finished:
                bad.append(Malformed(line, f"conversation {conversation!r} appeared earlier in the file; "
                                           "the rows of one conversation must be contiguous"))  # fmt: skip
        try:
            if any("\udc80" <= ch <= "\udcff" for v in values for ch in v):
                raise ValueError("not valid UTF-8")
            if len(values) != len(header):
                raise ValueError(f"{len(values)} fields, the header has {len(header)}")
            rows.append((line, _Row.model_validate(record)))
        except (ValueError, ValidationError) as exc:
            bad.append(Malformed(line, f"{_error_text(exc)} (conversation {conversation!r} skipped)"))
    yield from flush()


def _transcript(rows: list[tuple[int, _Row]]) -> Transcript | Malformed:
    resolved = {r.resolved for _, r in rows if r.resolved is not None}
    if len(resolved) > 1:
        return Malformed(rows[0][0], f"conversation {rows[0][1].conversation_id!r} is both resolved and not")
    if all(r.timestamp is not None for _, r in rows):
        rows = sorted(rows, key=lambda item: _utc(item[1].timestamp))  # stable: ties keep file order
    conversation_rating = None
    turns = []
    for _, row in rows:
        if row.role != "assistant" and row.rating is not None:
            conversation_rating = row.rating
        turns.append(
            Turn(
                row.role,
                row.text,
                _utc(row.timestamp),
                row.approved,
                row.rating if row.role == "assistant" else None,
            )
        )
    return Transcript(
        line=rows[0][0],
        turns=turns,
        resolved=resolved.pop() if resolved else None,
        rating=conversation_rating,
    )


# -- from transcripts to rows ----------------------------------------------------------------------


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


def _digest(*parts: str) -> str:
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()


@dataclass(slots=True)
class _Merged:
    """A turn after cleaning; consecutive messages of one role are one turn."""

    role: str
    text: str
    at: datetime | None
    approved: bool | None
    rating: tuple[str | None, int | None] | None
    digest: str  # of the raw conversation up to this turn's last message

    def merge(self, text: str, turn: Turn, digest: str) -> None:
        self.text = f"{self.text}\n{text}"
        self.at = turn.at or self.at
        self.approved = turn.approved if turn.approved is not None else self.approved
        self.rating = turn.rating or self.rating
        self.digest = digest


class _Converter:
    """Transcripts to conversation, completion and rating rows, cleaning on the way."""

    def __init__(self, batch: str, source: str, cleaner: Cleaner, assume_approved: bool) -> None:
        self.batch, self.source, self.cleaner = batch, source, cleaner
        self.assume_approved = assume_approved
        self.counts: Counter[str] = Counter()
        self.now = datetime.now(UTC)

    def rows(self, transcript: Transcript) -> tuple[dict, list[dict], dict[str, dict]]:
        """(conversation row, completion rows, rating rows by completion id)."""
        counts, cleaner = self.counts, self.cleaner
        raw = hashlib.sha256()  # over the raw text: the same conversation is the same id, however cleaned
        turns: list[_Merged] = []
        for turn in transcript.turns:
            raw.update(f"{turn.role}\x1f{turn.text}\x1e".encode())
            if turn.role == "tool":
                counts["tool messages dropped"] += 1
                continue
            text = cleaner.text(turn.text, answer=turn.role == "assistant")
            if not text:
                cleaner.report["empty messages dropped"] += 1
                continue
            digest = raw.copy().hexdigest() if turn.role == "assistant" else ""
            if turns and turns[-1].role == turn.role:  # one turn sent as several messages
                turns[-1].merge(text, turn, digest)
                counts["messages merged into the turn before"] += 1
            else:
                turns.append(_Merged(turn.role, text, turn.at, turn.approved, turn.rating, digest))
        started = transcript.at or next((t.at for t in transcript.turns if t.at), None) or self.now
        messages: list[dict[str, str]] = []
        completions: list[dict[str, Any]] = []
        labels: dict[str, _Merged] = {}
        for turn in turns:
            prompt = list(messages)
            messages.append({"role": turn.role, "content": turn.text})
            if turn.role != "assistant":
                continue
            counts["answers"] += 1
            if not any(m["role"] == "user" for m in prompt):
                counts["answers without a user turn before (context only)"] += 1
                continue
            if not cleaner.keep(prompt, turn.text):
                continue
            completion_id = f"imp-{turn.digest[:40]}"
            completions.append(
                {
                    "id": completion_id,
                    "created_at": turn.at or started,
                    "messages": prompt,
                    "prompt_hash": prompt_hash(prompt),
                    "response": turn.text,
                }
            )
            labels[completion_id] = turn
        conversation_id = f"imp-{raw.hexdigest()[:40]}"
        ended = max((c["created_at"] for c in completions), default=started)
        conversation = {
            "id": conversation_id,
            "user_key": "",
            "created_at": started,
            "last_active_at": ended,
        }
        for row in completions:
            row.update(
                conversation_id=conversation_id,
                user_key="",
                model_version=f"import:{self.source}"[:128],
                experiment="",
                variant="",
                sampling={},
                finish_reason="stop",
                redacted=self.cleaner.config.redact,
                source="import",
                import_batch=self.batch,
            )
        ratings = {}
        last_answer = next((t for t in reversed(turns) if t.role == "assistant"), None)
        for row in completions:
            turn = labels[row["id"]]
            rating = self._rating(transcript, turn, is_last=turn is last_answer)
            if rating is not None:
                thumb, score, tags = rating
                ratings[row["id"]] = {
                    "completion_id": row["id"],
                    "user_key": IMPORT_RATER,
                    "thumb": thumb,
                    "score": score,
                    "tags": tags,
                    "created_at": row["created_at"],
                    "updated_at": row["created_at"],
                }
        return conversation, completions, ratings

    def _rating(
        self, transcript: Transcript, turn: _Merged, *, is_last: bool
    ) -> tuple[str | None, int | None, list[str]] | None:
        thumb, score, tags = None, None, []
        approved = turn.approved if turn.approved is not None else transcript.approved
        if approved is not None:
            thumb = "up" if approved else "down"
            tags.append("agent-approved" if approved else "agent-rejected")
        rating = turn.rating or (transcript.rating if is_last else None)
        if rating is not None:
            thumb, score = thumb or rating[0], rating[1]
            tags.append("rated")
        if is_last and transcript.resolved is not None:
            tags.append("resolved" if transcript.resolved else "unresolved")
            if thumb is None and score is None:
                thumb = "up" if transcript.resolved else "down"
        if thumb is None and score is None and self.assume_approved:
            thumb = "up"
            tags.append("assumed-approved")
        if thumb is None and score is None:
            return None
        return thumb, score, ["import", *tags]


# -- the import ------------------------------------------------------------------------------------


def detect_format(path: Path) -> Format:
    suffixes = [s.lower() for s in path.suffixes if s.lower() != ".gz"]
    last = suffixes[-1] if suffixes else ""
    if last in (".jsonl", ".ndjson", ".json"):
        return "jsonl"
    if last in (".csv", ".tsv"):
        return "csv"
    raise ValueError(f"{path.name}: cannot tell the format from the name; give --format jsonl or csv")


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
    converter = _Converter(report.batch, source, cleaner, assume_approved)
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


def _write(
    engine: Engine, converter: _Converter, transcripts: list[Transcript], report: ImportReport
) -> None:
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
        insert = dialect_insert(connection)
        added_conversations = connection.execute(
            insert(Conversation.__table__)
            .on_conflict_do_nothing(index_elements=["id"])
            .returning(Conversation.__table__.c.id),
            conversations,
        ).all()
        added = {
            row[0]
            for row in connection.execute(
                insert(Completion.__table__)
                .on_conflict_do_nothing(index_elements=["id"])
                .returning(Completion.__table__.c.id),
                completions,
            )
        }
        new_ratings = [ratings[cid] for cid in ratings if cid in added]
        if new_ratings:
            connection.execute(insert(Rating.__table__).on_conflict_do_nothing(), new_ratings)
            events = [
                {"id": _digest(r["completion_id"], IMPORT_RATER)[:32], **{k: r[k] for k in _EVENT_KEYS}}
                for r in new_ratings
            ]
            connection.execute(insert(RatingEvent.__table__).on_conflict_do_nothing(), events)
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
