"""Converting transcripts for `loopchat import`: cleaned turns become conversation, completion
and rating rows (ids are content hashes, so the same transcript converts to the same rows).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from feedback.clean import Cleaner
from feedback.service import prompt_hash
from feedback.transcripts import Transcript, Turn

IMPORT_RATER = "import"  # the user key of ratings that come from labels in imported files


# -- from transcripts to rows ----------------------------------------------------------------------


def digest(*parts: str) -> str:
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


class Converter:
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
