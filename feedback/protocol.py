"""Wire models of the feedback API (/v1/feedback, /v1/feedback/preference)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator, model_validator

# Hard caps checked while parsing; the configured (smaller) caps are checked by the service.
HARD_TEXT_CAP = 100_000

CompletionId = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")]
Tag = Annotated[str, StringConstraints(min_length=1, max_length=64, strip_whitespace=True)]


class _Strict(BaseModel):
    # Unlike the chat route, feedback refuses unknown fields: a misspelt "ratting" must not
    # be stored as an empty rating.
    model_config = ConfigDict(extra="forbid")


class FeedbackRequest(_Strict):
    completion_id: CompletionId
    rating: Literal["up", "down"] | None = Field(None, description="Thumbs up or down.")
    score: int | None = Field(None, ge=1, le=5, description="Stars, 1 to 5.")
    comment: str | None = Field(None, max_length=HARD_TEXT_CAP)
    correction: str | None = Field(
        None, max_length=HARD_TEXT_CAP, description="The answer the user wanted instead."
    )
    tags: list[Tag] = Field(default_factory=list, max_length=256)
    user: str | None = Field(None, max_length=256, description="The rater; the chat's `user`.")

    @field_validator("comment", "correction")
    @classmethod
    def _blank_is_none(cls, value: str | None) -> str | None:
        return value if value is None or value.strip() else None

    @model_validator(mode="after")
    def _something_to_store(self) -> FeedbackRequest:
        if self.rating is None and self.score is None and self.comment is None and self.correction is None:
            raise ValueError("give at least one of rating, score, comment or correction")
        return self


class FeedbackResponse(BaseModel):
    object: Literal["feedback"] = "feedback"
    completion_id: str
    user: str | None
    rating: Literal["up", "down"] | None
    score: int | None
    comment: str | None
    correction: str | None
    tags: list[str]
    created: int


class ConversationTurn(BaseModel):
    """One logged answer of a conversation, with the reader's rating of it."""

    id: str
    created: int
    model: str
    messages: list[dict[str, Any]]
    response: str
    finish_reason: str | None
    rating: Literal["up", "down"] | None = None
    score: int | None = None
    comment: str | None = None
    correction: str | None = None


class Conversation(BaseModel):
    object: Literal["conversation"] = "conversation"
    id: str
    completions: list[ConversationTurn]


class PreferenceRequest(_Strict):
    chosen_completion_id: CompletionId
    rejected_completion_id: CompletionId
    comment: str | None = Field(None, max_length=HARD_TEXT_CAP)
    user: str | None = Field(None, max_length=256)

    @model_validator(mode="after")
    def _two_different(self) -> PreferenceRequest:
        if self.chosen_completion_id == self.rejected_completion_id:
            raise ValueError("chosen and rejected completions must differ")
        return self


class PreferenceResponse(BaseModel):
    object: Literal["feedback.preference"] = "feedback.preference"
    chosen_completion_id: str
    rejected_completion_id: str
    user: str | None
    comment: str | None
    created: int
