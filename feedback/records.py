"""What the conversation log records: a completion, a rating, a side-by-side choice.

These are the writer's input (`FeedbackWriter.submit`). Each becomes a JSON-ready row with its
`kind` (`row()`), the form that is redacted, queued, spooled to disk during a database outage
and replayed: the spool's lines are these rows, so a field added here must stay optional.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, ClassVar


@dataclass(frozen=True, slots=True, kw_only=True)
class _LogRecord:
    kind: ClassVar[str]

    def row(self) -> dict[str, Any]:
        return {"kind": self.kind, **{f.name: getattr(self, f.name) for f in fields(self)}}


@dataclass(frozen=True, slots=True, kw_only=True)
class CompletionRecord(_LogRecord):
    """One answer as served (one choice of a request), with the prompt it answered."""

    kind: ClassVar[str] = "completion"
    id: str
    conversation_id: str
    user_key: str
    created_at: float  # Unix time
    model_version: str
    messages: list[dict[str, Any]]
    prompt_hash: str
    response: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None
    experiment: str = ""
    variant: str = ""
    pair_id: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_calls: list[dict[str, Any]] | None = None
    sampling: dict[str, Any] = field(default_factory=dict)
    latency_ms: float | None = None
    ttft_ms: float | None = None
    logprob_mean: float | None = None
    logprob_min: float | None = None
    error: str | None = None
    redacted: bool = False
    site: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class RatingRecord(_LogRecord):
    """One rating event; the latest event of a (completion, user) is that user's rating."""

    kind: ClassVar[str] = "rating"
    event_id: str
    completion_id: str
    user_key: str
    at: float  # Unix time
    thumb: str | None = None
    score: int | None = None
    comment: str | None = None
    correction: str | None = None
    tags: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True, kw_only=True)
class PreferenceRecord(_LogRecord):
    """A side-by-side choice between two answers to the same prompt."""

    kind: ClassVar[str] = "preference"
    chosen_completion_id: str
    rejected_completion_id: str
    user_key: str
    at: float  # Unix time
    comment: str | None = None


LogRecord = CompletionRecord | RatingRecord | PreferenceRecord
