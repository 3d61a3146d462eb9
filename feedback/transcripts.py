"""Reading transcript files for `loopchat import`: JSON lines in the OpenAI messages format, or
CSV/TSV with one message per row (see feedback/importer.py for what the formats may hold).

Read as a stream (constant memory whatever the file size); every record is validated, and a
malformed one comes out as `Malformed` with its line number (a CSV conversation with one bad
row as a whole), so nothing is half-imported.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

Format = Literal["jsonl", "csv"]

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
_THUMBS = {
    "up": "up",
    "down": "down",
    "+1": "up",
    "-1": "down",
    "positive": "up",
    "negative": "down",
    "good": "up",
    "bad": "down",
    "yes": "up",
    "no": "down",
    "true": "up",
    "false": "down",
}
_BOOLS = {
    "true": True,
    "yes": True,
    "y": True,
    "1": True,
    "false": False,
    "no": False,
    "n": False,
    "0": False,
}


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
                bad.append(
                    Malformed(
                        line,
                        f"conversation {conversation!r} appeared earlier in the file; "
                        "the rows of one conversation must be contiguous",
                    )
                )
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


def detect_format(path: Path) -> Format:
    suffixes = [s.lower() for s in path.suffixes if s.lower() != ".gz"]
    last = suffixes[-1] if suffixes else ""
    if last in (".jsonl", ".ndjson", ".json"):
        return "jsonl"
    if last in (".csv", ".tsv"):
        return "csv"
    raise ValueError(f"{path.name}: cannot tell the format from the name; give --format jsonl or csv")
