"""The conversation log and the ratings: what the chat and feedback routes call.

`FeedbackService.record_completion` turns a finished completion into a log record (never
waiting on the database). `rate` and `prefer` check that the completion exists and belongs to
the rater, then wait until the writer has committed or spooled the rating.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import json
import logging
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from sqlalchemy import Engine, select
from sqlalchemy.exc import OperationalError, SQLAlchemyError
from sqlmodel import Session
from starlette.concurrency import run_in_threadpool

from feedback.log import FeedbackWriter, QueueFullError, RecordRejectedError
from feedback.models import ANONYMOUS, Completion, Rating
from feedback.protocol import (
    Conversation,
    ConversationTurn,
    FeedbackRequest,
    FeedbackResponse,
    PreferenceRequest,
    PreferenceResponse,
)
from feedback.records import CompletionRecord, LogRecord, PreferenceRecord, RatingRecord
from feedback.spool import SpoolFullError
from loopchat.errors import ConflictError, InvalidInputError, NotFoundError, UnavailableError
from loopchat.settings import FeedbackSettings

if TYPE_CHECKING:
    from feedback.redact import Redactor

logger = logging.getLogger(__name__)


class _Named(Protocol):
    @property
    def name(self) -> str: ...


class ServedChat(Protocol):
    """What the log needs of a chat request as it was served (serving's `PreparedChat`)."""

    user: str | None
    conversation_id: str
    version: _Named
    experiment: str
    variant: str
    pair_id: str | None
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None
    site: str | None

    @property
    def prompt_tokens(self) -> int: ...

    def choice_id(self, index: int) -> str: ...

    def sampling(self) -> dict[str, Any]: ...


class ServedAnswer(Protocol):
    """What the log needs of one answer (serving's `CompletionResult`)."""

    index: int
    text: str
    tool_calls: list[dict[str, Any]]
    logprobs: list[float]
    completion_tokens: int
    finish_reason: str | None
    error: str | None
    started: float
    first_token_at: float | None
    finished_at: float | None


@dataclass(frozen=True, slots=True)
class CompletionRef:
    """What rating a completion needs to know about it."""

    user_key: str
    prompt_hash: str
    model_version: str = ""
    variant: str = ""
    site: str | None = None
    # Resolves once the completion's record is queued (after redaction): a rating waits for it,
    # so that it never reaches the database before the completion it rates.
    logged: concurrent.futures.Future | None = field(default=None, compare=False)


class RecentCompletions:
    """Completions logged by this process, newest last: a rating right after an answer finds
    its completion here even before the writer has committed it."""

    def __init__(self, capacity: int = 100_000) -> None:
        self._items: OrderedDict[str, CompletionRef] = OrderedDict()
        self._capacity = capacity
        self._lock = threading.Lock()

    def add(self, completion_id: str, ref: CompletionRef) -> None:
        with self._lock:
            self._items[completion_id] = ref
            if len(self._items) > self._capacity:
                self._items.popitem(last=False)

    def get(self, completion_id: str) -> CompletionRef | None:
        with self._lock:
            return self._items.get(completion_id)


def prompt_hash(messages: list[dict[str, Any]]) -> str:
    canonical = json.dumps(messages, ensure_ascii=False, separators=(",", ":"), sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _logprob_stats(values: list[float]) -> tuple[float | None, float | None]:
    finite = [v for v in values if v == v and v != float("-inf")]
    if not finite:
        return None, None
    return sum(finite) / len(finite), min(finite)


def record_redactor(redactor: Redactor):
    """The writer's redaction step for the 'storage' policy: free text replaced before writing."""

    def redact(data: dict[str, Any]) -> dict[str, Any]:
        kind = data["kind"]
        if kind == "completion":
            data = {
                **data,
                "messages": redactor.redact_messages(data["messages"]),
                "response": redactor.redact(data["response"]),
                "tool_calls": redactor.redact_tool_calls(data.get("tool_calls")),
                "redacted": True,
            }
        else:
            data = dict(data)
            for key in ("comment", "correction"):
                if data.get(key):
                    data[key] = redactor.redact(data[key])
        return data

    return redact


class FeedbackService:
    def __init__(self, engine: Engine, writer: FeedbackWriter, settings: FeedbackSettings) -> None:
        self._engine = engine
        self._writer = writer
        self._settings = settings
        self.recent = RecentCompletions()

    # -- conversation log ----------------------------------------------------------------------

    def record_completion(self, chat: ServedChat, result: ServedAnswer) -> None:
        if not self._settings.log_completions:
            return
        mean, minimum = _logprob_stats(result.logprobs)
        finished = result.finished_at or time.perf_counter()
        first = result.first_token_at
        user_key = chat.user or ANONYMOUS
        hashed = prompt_hash(chat.messages)
        completion_id = chat.choice_id(result.index)
        logged = self._writer.submit(
            CompletionRecord(
                id=completion_id,
                conversation_id=chat.conversation_id,
                user_key=user_key,
                created_at=time.time(),
                model_version=chat.version.name,
                experiment=chat.experiment,
                variant=chat.variant,
                pair_id=chat.pair_id,
                messages=chat.messages,
                prompt_hash=hashed,
                response=result.text,
                tools=chat.tools,
                tool_calls=result.tool_calls or None,
                sampling=chat.sampling(),
                prompt_tokens=chat.prompt_tokens,
                completion_tokens=result.completion_tokens,
                latency_ms=round((finished - result.started) * 1000, 3),
                ttft_ms=None if first is None else round((first - result.started) * 1000, 3),
                finish_reason=result.finish_reason,
                logprob_mean=mean,
                logprob_min=minimum,
                error=result.error,
                site=chat.site,
            )
        )
        self.recent.add(
            completion_id,
            CompletionRef(user_key, hashed, chat.version.name, chat.variant, chat.site, logged),
        )

    # -- ratings -------------------------------------------------------------------------------

    async def rate(
        self, request: FeedbackRequest, *, site: str | None = None
    ) -> tuple[FeedbackResponse, CompletionRef]:
        """Store the rating; returns it with what it rated."""
        caps = self._settings
        _check_length(request.comment, caps.max_comment_chars, "comment")
        _check_length(request.correction, caps.max_correction_chars, "correction")
        if len(request.tags) > caps.max_tags:
            raise InvalidInputError(f"at most {caps.max_tags} tags", param="tags")
        user_key = request.user or ANONYMOUS
        rated = await self._owned(request.completion_id, user_key, "completion_id", site)
        now = time.time()
        await self._store(
            RatingRecord(
                event_id=uuid.uuid4().hex,
                completion_id=request.completion_id,
                user_key=user_key,
                thumb=request.rating,
                score=request.score,
                comment=request.comment,
                correction=request.correction,
                tags=list(dict.fromkeys(request.tags)),
                at=now,
            )
        )
        response = FeedbackResponse(
            completion_id=request.completion_id,
            user=request.user,
            rating=request.rating,
            score=request.score,
            comment=request.comment,
            correction=request.correction,
            tags=list(dict.fromkeys(request.tags)),
            created=int(now),
        )
        return response, rated

    async def prefer(
        self, request: PreferenceRequest, *, site: str | None = None
    ) -> tuple[PreferenceResponse, CompletionRef]:
        """Store the choice; returns it with the chosen completion."""
        _check_length(request.comment, self._settings.max_comment_chars, "comment")
        user_key = request.user or ANONYMOUS
        chosen = await self._owned(request.chosen_completion_id, user_key, "chosen_completion_id", site)
        rejected = await self._owned(request.rejected_completion_id, user_key, "rejected_completion_id", site)
        if chosen.prompt_hash != rejected.prompt_hash:
            raise InvalidInputError(
                "the two completions answer different prompts", param="rejected_completion_id"
            )
        now = time.time()
        await self._store(
            PreferenceRecord(
                chosen_completion_id=request.chosen_completion_id,
                rejected_completion_id=request.rejected_completion_id,
                user_key=user_key,
                comment=request.comment,
                at=now,
            )
        )
        response = PreferenceResponse(
            chosen_completion_id=request.chosen_completion_id,
            rejected_completion_id=request.rejected_completion_id,
            user=request.user,
            comment=request.comment,
            created=int(now),
        )
        return response, chosen

    async def _owned(self, completion_id: str, user_key: str, param: str, site: str | None) -> CompletionRef:
        """The completion, if the rater may rate it; else 404 (someone else's looks unknown):
        the same site (API key), and the same user unless the completion was anonymous."""
        ref = self.recent.get(completion_id)
        if ref is None:
            ref = await run_in_threadpool(self._lookup, completion_id)
        # Anonymous completions can be rated by whoever holds their (unguessable) id.
        if ref is None or ref.site != site or (ref.user_key != ANONYMOUS and ref.user_key != user_key):
            raise NotFoundError(f"No completion `{completion_id}`.", param=param, code="completion_not_found")
        if ref.logged is not None and not ref.logged.done():
            await asyncio.wrap_future(ref.logged)
        return ref

    def _lookup(self, completion_id: str) -> CompletionRef | None:
        try:
            with self._engine.connect() as connection:
                row = connection.execute(
                    select(
                        Completion.user_key,
                        Completion.prompt_hash,
                        Completion.model_version,
                        Completion.variant,
                        Completion.site,
                    ).where(Completion.id == completion_id)
                ).first()
        except OperationalError as exc:
            logger.warning("completion lookup failed: %s", exc.__class__.__name__)
            raise _unavailable() from None
        except SQLAlchemyError:
            logger.exception("completion lookup failed")
            raise _unavailable() from None
        return None if row is None else CompletionRef(*row)

    async def conversation(self, conversation_id: str, *, site: str | None, user_key: str) -> Conversation:
        """The conversation's answers this reader may see: the key's site, and the user's own
        (or anonymous) completions; 404 when there are none, as for an unknown id."""
        turns = await run_in_threadpool(self._read_conversation, conversation_id, site, user_key)
        if not turns:
            raise NotFoundError(
                f"No conversation `{conversation_id}`.",
                param="conversation_id",
                code="conversation_not_found",
            )
        return Conversation(id=conversation_id, completions=turns)

    def _read_conversation(
        self, conversation_id: str, site: str | None, user_key: str
    ) -> list[ConversationTurn]:
        same_site = Completion.site.is_(None) if site is None else Completion.site == site
        query = (
            select(Completion, Rating)
            .outerjoin(Rating, (Rating.completion_id == Completion.id) & (Rating.user_key == user_key))
            .where(Completion.conversation_id == conversation_id, same_site)
            .where(Completion.user_key.in_((user_key, ANONYMOUS)))
            .order_by(Completion.created_at)
        )
        try:
            with Session(self._engine) as session:
                rows = session.exec(query).all()
        except SQLAlchemyError as exc:
            logger.warning("conversation read failed: %s", exc.__class__.__name__)
            raise _unavailable() from None
        return [
            ConversationTurn(
                id=c.id,
                created=int(c.created_at.timestamp()),
                model=c.model_version,
                messages=c.messages,
                response=c.response,
                finish_reason=c.finish_reason,
                rating=r.thumb if r else None,
                score=r.score if r else None,
                comment=r.comment if r else None,
                correction=r.correction if r else None,
            )
            for c, r in rows
        ]

    def first_answer(self, conversation_id: str) -> tuple[str, str, str] | None:
        """(model version, experiment, variant) of a conversation's first logged answer."""
        try:
            with self._engine.connect() as connection:
                row = connection.execute(
                    select(Completion.model_version, Completion.experiment, Completion.variant)
                    .where(Completion.conversation_id == conversation_id)
                    .order_by(Completion.created_at)
                    .limit(1)
                ).first()
        except SQLAlchemyError as exc:
            # Routing goes on without the pin rather than failing the chat.
            logger.warning("conversation lookup failed: %s", exc.__class__.__name__)
            return None
        return None if row is None else (row.model_version, row.experiment, row.variant)

    async def _store(self, record: LogRecord) -> None:
        try:
            await self._writer.submit_and_wait(record)
        except (QueueFullError, SpoolFullError):
            raise _unavailable() from None
        except RecordRejectedError:
            raise ConflictError("the rating could not be stored", code="feedback_rejected") from None
        except OSError:
            logger.exception("feedback could not be stored or spooled")
            raise _unavailable() from None


def _check_length(value: str | None, cap: int, param: str) -> None:
    if value is not None and len(value) > cap:
        raise InvalidInputError(
            f"{param} is longer than {cap} characters", param=param, code="string_too_long"
        )


def _unavailable() -> UnavailableError:
    return UnavailableError(
        "Feedback storage is unavailable; retry shortly.", code="feedback_unavailable", retry_after_s=5
    )
