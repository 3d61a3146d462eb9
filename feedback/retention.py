"""Retention: purge what is older than a cut-off, and erase one user's data.

Deleting a completion deletes its ratings, rating history and preferences with it (foreign
keys with ON DELETE CASCADE). Deletes run in chunks so that a large purge never holds the
database's write lock for long while the service keeps logging. Each erasure also leaves a
tombstone (`Erasure`) first, so that records still spooled on some replica during an outage
are dropped when they are replayed instead of bringing the erased data back.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import Engine, delete, func, or_, select

from feedback.models import Completion, Conversation, Erasure, Preference, Rating, RatingEvent

CHUNK = 2000
_DURATION = re.compile(r"^\s*(\d+)\s*([smhdw])\s*$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_duration(text: str) -> timedelta:
    """'90d', '12h', '2w', '30m', '45s' -> timedelta."""
    match = _DURATION.match(text)
    if not match or int(match.group(1)) == 0:
        raise ValueError(f"{text!r} is not a duration like 90d, 12h, 2w, 30m or 45s")
    return timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})


@dataclass(slots=True)
class Deleted:
    conversations: int = 0
    completions: int = 0
    ratings: int = 0
    preferences: int = 0

    def __str__(self) -> str:
        return (
            f"{self.conversations} conversations, {self.completions} completions, "
            f"{self.ratings} ratings, {self.preferences} preferences"
        )


def _count_dependents(connection, completion_ids: list[str], deleted: Deleted) -> None:
    deleted.ratings += connection.execute(
        select(func.count()).select_from(Rating).where(Rating.completion_id.in_(completion_ids))
    ).scalar_one()
    deleted.preferences += connection.execute(
        select(func.count())
        .select_from(Preference)
        .where(
            or_(
                Preference.chosen_completion_id.in_(completion_ids),
                Preference.rejected_completion_id.in_(completion_ids),
            )
        )
    ).scalar_one()


def _delete_completions(engine: Engine, condition, *, dry_run: bool) -> Deleted:
    deleted = Deleted()
    last = ""
    while True:
        with engine.begin() as connection:
            ids = list(
                connection.execute(
                    select(Completion.id)
                    .where(condition, Completion.id > last)
                    .order_by(Completion.id)
                    .limit(CHUNK)
                ).scalars()
            )
            if not ids:
                return deleted
            last = ids[-1]
            _count_dependents(connection, ids, deleted)
            deleted.completions += len(ids)
            if not dry_run:
                connection.execute(delete(Completion).where(Completion.id.in_(ids)))


def _delete_empty_conversations(engine: Engine, condition, *, dry_run: bool) -> int:
    has_completions = select(Completion.id).where(Completion.conversation_id == Conversation.id).exists()
    with engine.begin() as connection:
        query = select(Conversation.id).where(condition, ~has_completions)
        ids = list(connection.execute(query).scalars())
        if not dry_run:
            for start in range(0, len(ids), CHUNK):
                connection.execute(
                    delete(Conversation).where(Conversation.id.in_(ids[start : start + CHUNK]))
                )
    return len(ids)


def user_hash(user_key: str) -> str:
    """How an erasure names a user: a hash, so the tombstone keeps no identifier of them."""
    return hashlib.sha256(user_key.encode()).hexdigest()


def _tombstone(engine: Engine, scope: str, before: datetime, user_key: str | None = None) -> None:
    with engine.begin() as connection:
        connection.execute(
            Erasure.__table__.insert(),
            [
                {
                    "scope": scope,
                    "user_hash": user_key and user_hash(user_key),
                    "before": before,
                    "created_at": datetime.now(UTC),
                }
            ],
        )


def purge_older_than(engine: Engine, age: timedelta, *, dry_run: bool = False) -> Deleted:
    """Delete completions created before now - age (with their ratings), then idle conversations."""
    cutoff = datetime.now(UTC) - age
    if not dry_run:
        _tombstone(engine, "older_than", cutoff)
    deleted = _delete_completions(engine, Completion.created_at < cutoff, dry_run=dry_run)
    deleted.conversations = _delete_empty_conversations(
        engine, Conversation.last_active_at < cutoff, dry_run=dry_run
    )
    return deleted


def delete_user(engine: Engine, user_key: str, *, dry_run: bool = False) -> Deleted:
    """Erase a user: their conversations and completions, and every rating they gave."""
    if not user_key:
        raise ValueError("a user key is required (anonymous data is removed by age only)")
    if not dry_run:
        _tombstone(engine, "user", datetime.now(UTC), user_key)
    deleted = Deleted()
    with engine.begin() as connection:
        # Their ratings of other people's (or anonymous) completions; those of their own
        # completions are counted with the completions below.
        own = select(Completion.id).where(Completion.user_key == user_key)
        ratings = (Rating.user_key == user_key, Rating.completion_id.not_in(own))
        preferences = (
            Preference.user_key == user_key,
            Preference.chosen_completion_id.not_in(own),
            Preference.rejected_completion_id.not_in(own),
        )
        deleted.ratings += connection.execute(
            select(func.count()).select_from(Rating).where(*ratings)
        ).scalar_one()
        deleted.preferences += connection.execute(
            select(func.count()).select_from(Preference).where(*preferences)
        ).scalar_one()
        if not dry_run:
            connection.execute(
                delete(RatingEvent).where(
                    RatingEvent.user_key == user_key, RatingEvent.completion_id.not_in(own)
                )
            )
            connection.execute(delete(Rating).where(*ratings))
            connection.execute(delete(Preference).where(*preferences))
    owned = _delete_completions(engine, Completion.user_key == user_key, dry_run=dry_run)
    deleted.completions = owned.completions
    deleted.ratings += owned.ratings
    deleted.preferences += owned.preferences
    deleted.conversations = _delete_empty_conversations(
        engine, Conversation.user_key == user_key, dry_run=dry_run
    )
    return deleted
