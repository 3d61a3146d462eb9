"""Logged conversations and ratings written straight into a test database (as the writer would)."""

from __future__ import annotations

import hashlib
import json
import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine

from feedback.models import Completion, Conversation, Preference, Rating, pair_key


def log_completion(
    engine: Engine,
    prompt: str,
    response: str,
    *,
    version: str = "fake-base",
    user: str = "u",
    logprob_mean: float | None = -0.2,
    thumb: str | None = None,
    score: int | None = None,
    correction: str | None = None,
    comment: str | None = None,
) -> str:
    """One completion (and its rating when given); returns the completion id."""
    now = datetime.now(UTC)
    completion_id, conversation_id = f"chatcmpl-{uuid.uuid4().hex}", f"conv-{uuid.uuid4().hex}"
    messages = [{"role": "user", "content": prompt}]
    row: dict[str, Any] = {
        "id": completion_id,
        "conversation_id": conversation_id,
        "user_key": user,
        "created_at": now,
        "model_version": version,
        "experiment": "",
        "variant": "",
        "messages": messages,
        "prompt_hash": hashlib.sha256(json.dumps(messages, sort_keys=True).encode()).hexdigest(),
        "response": response,
        "sampling": {},
        "latency_ms": 50.0,
        "logprob_mean": logprob_mean,
        "logprob_min": logprob_mean,
        "redacted": True,
    }
    with engine.begin() as connection:
        connection.execute(
            Conversation.__table__.insert(),
            {"id": conversation_id, "user_key": user, "created_at": now, "last_active_at": now},
        )
        connection.execute(Completion.__table__.insert(), row)
        if thumb or score or correction or comment:
            rating = {
                "completion_id": completion_id,
                "user_key": user,
                "thumb": thumb,
                "score": score,
                "correction": correction,
                "comment": comment,
                "tags": [],
                "created_at": now,
                "updated_at": now,
            }
            connection.execute(Rating.__table__.insert(), rating)
    return completion_id


def log_preference(engine: Engine, chosen: str, rejected: str, *, user: str = "u") -> None:
    now = datetime.now(UTC)
    with engine.begin() as connection:
        row = {
            "pair_key": pair_key(chosen, rejected),
            "chosen_completion_id": chosen,
            "rejected_completion_id": rejected,
            "user_key": user,
            "created_at": now,
            "updated_at": now,
        }
        connection.execute(Preference.__table__.insert(), row)
