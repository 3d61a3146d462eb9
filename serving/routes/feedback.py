"""Ratings of served answers: thumbs, stars, comments, corrections and side-by-side choices."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from feedback.models import ANONYMOUS
from feedback.protocol import (
    Conversation,
    FeedbackRequest,
    FeedbackResponse,
    PreferenceRequest,
    PreferenceResponse,
)
from monitoring.metrics import NO_VARIANT
from serving.deps import FeedbackDep, FeedbackMetricsDep, PrincipalDep
from serving.errors import error_responses

router = APIRouter(prefix="/v1/feedback", tags=["feedback"])
conversations = APIRouter(prefix="/v1/conversations", tags=["feedback"])

_ERRORS = error_responses(400, 404, 409, 503)


@router.post("", response_model=FeedbackResponse, responses=_ERRORS)
async def rate_completion(
    body: FeedbackRequest, service: FeedbackDep, metrics: FeedbackMetricsDep, principal: PrincipalDep
):
    """Rate one completion; posting again replaces this user's current rating (history is kept).
    Only completions of the key's site, and of this user (or anonymous ones), can be rated."""
    stored, rated = await service.rate(body, site=principal.site)
    version, variant = rated.model_version, rated.variant or NO_VARIANT
    for kind, given in (
        (body.rating, body.rating is not None),
        ("score", body.score is not None),
        ("comment", body.comment is not None),
        ("correction", body.correction is not None),
    ):
        if given:
            metrics.ratings.labels(kind, version, variant).inc()
    if body.score is not None:
        metrics.stars.labels(version).observe(body.score)
    return stored


@conversations.get("/{conversation_id}", response_model=Conversation, responses=_ERRORS)
async def read_conversation(
    conversation_id: str,
    service: FeedbackDep,
    principal: PrincipalDep,
    user: Annotated[
        str | None, Query(max_length=256, description="The end user whose answers to show.")
    ] = None,
) -> Conversation:
    """A conversation's logged answers, each with this user's rating: only the key's site, and
    only the user's own (or anonymous) answers."""
    return await service.conversation(conversation_id, site=principal.site, user_key=user or ANONYMOUS)


@router.post("/preference", response_model=PreferenceResponse, responses=_ERRORS)
async def prefer_completion(
    body: PreferenceRequest, service: FeedbackDep, metrics: FeedbackMetricsDep, principal: PrincipalDep
):
    """Say which of two answers to the same prompt is better (side-by-side)."""
    stored, chosen = await service.prefer(body, site=principal.site)
    metrics.ratings.labels("preference", chosen.model_version, chosen.variant or NO_VARIANT).inc()
    return stored
