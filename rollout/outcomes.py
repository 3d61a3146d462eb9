"""What each variant of an experiment produced, read from the conversation log and the ratings.

A rating counts as positive when its thumb is up, or, without a thumb, when its score is 4 or 5;
negative when the thumb is down or the score 1 or 2; a score of 3 alone is neither. The current
rating of each (completion, user) counts once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Engine, and_, case, func, or_, select
from sqlalchemy.orm import aliased

from feedback.models import Completion, Preference, Rating
from rollout.abstats import VariantOutcome

# Latency percentiles are computed from at most this many recent completions per experiment.
LATENCY_SAMPLE = 50_000

_c = Completion.__table__.c
_r = Rating.__table__.c


def _positive():
    return or_(_r.thumb == "up", and_(_r.thumb.is_(None), _r.score >= 4))


def _negative():
    return or_(_r.thumb == "down", and_(_r.thumb.is_(None), _r.score <= 2))


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    index = max(0, math.ceil(q * len(values)) - 1)
    return values[index]


def experiment_outcomes(
    engine: Engine,
    experiment: str,
    versions: dict[str, str],
    *,
    since: datetime | None = None,
) -> dict[str, VariantOutcome]:
    """Outcomes per variant (`versions`: variant -> model version) of one experiment."""
    outcomes = {name: VariantOutcome(name, version) for name, version in versions.items()}
    where = [_c.experiment == experiment]
    if since is not None:
        where.append(_c.created_at >= since)
    with engine.connect() as connection:
        served = connection.execute(
            select(
                _c.variant,
                func.count(),
                func.sum(case((_c.error.is_not(None), 1), else_=0)),
                func.avg(_c.completion_tokens),
            )
            .where(*where)
            .group_by(_c.variant)
        )
        for variant, requests, errors, tokens in served:
            if variant in outcomes:
                outcome = outcomes[variant]
                outcome.requests, outcome.errors = int(requests), int(errors or 0)
                outcome.mean_completion_tokens = None if tokens is None else float(tokens)

        # Per variant: whole latencies, times to the first token, times per later token.
        latencies: dict[str, tuple[list[float], list[float], list[float]]] = {}
        recent = connection.execute(
            select(_c.variant, _c.latency_ms, _c.ttft_ms, _c.completion_tokens)
            .where(*where, _c.latency_ms.is_not(None), _c.error.is_(None))
            .order_by(_c.created_at.desc())
            .limit(LATENCY_SAMPLE)
        )
        for variant, latency, ttft, tokens in recent:
            whole, first, per_token = latencies.setdefault(variant, ([], [], []))
            whole.append(float(latency))
            if ttft is not None:
                first.append(float(ttft))
                if tokens and tokens > 1:
                    per_token.append((float(latency) - float(ttft)) / (tokens - 1))
        for variant, (whole, first, per_token) in latencies.items():
            if variant in outcomes:
                outcome = outcomes[variant]
                outcome.latency_p95_ms = _percentile(whole, 0.95)
                outcome.ttft_p95_ms = _percentile(first, 0.95)
                outcome.token_latency_p95_ms = _percentile(per_token, 0.95)

        rated = connection.execute(
            select(
                _c.variant,
                func.count(),
                func.sum(case((_positive(), 1), else_=0)),
                func.sum(case((_negative(), 1), else_=0)),
                func.avg(_r.score),
                func.sum(case((_r.correction.is_not(None), 1), else_=0)),
            )
            .select_from(Rating.__table__.join(Completion.__table__, _r.completion_id == _c.id))
            .where(*where)
            .group_by(_c.variant)
        )
        for variant, count, positive, negative, stars, corrections in rated:
            if variant in outcomes:
                outcome = outcomes[variant]
                outcome.rated, outcome.positive, outcome.negative = (
                    int(count),
                    int(positive or 0),
                    int(negative or 0),
                )
                outcome.mean_stars = None if stars is None else float(stars)
                outcome.corrections = int(corrections or 0)

        chosen, rejected = aliased(Completion.__table__), aliased(Completion.__table__)
        p = Preference.__table__.c
        pairs = connection.execute(
            select(chosen.c.variant, rejected.c.variant, func.count())
            .select_from(
                Preference.__table__.join(chosen, p.chosen_completion_id == chosen.c.id).join(
                    rejected, p.rejected_completion_id == rejected.c.id
                )
            )
            .where(
                chosen.c.experiment == experiment,
                rejected.c.experiment == experiment,
                chosen.c.variant != rejected.c.variant,
                *([chosen.c.created_at >= since] if since is not None else []),
            )
            .group_by(chosen.c.variant, rejected.c.variant)
        )
        for winner, loser, count in pairs:
            if winner in outcomes:
                outcomes[winner].pairwise_wins += int(count)
            if loser in outcomes:
                outcomes[loser].pairwise_losses += int(count)
    return outcomes


@dataclass(frozen=True, slots=True)
class RatingPoint:
    """One judged rating of an experiment's completion, for charts over time."""

    variant: str
    at: datetime
    positive: bool


def judged_ratings(engine: Engine, experiment: str) -> list[RatingPoint]:
    """Every positive or negative rating of the experiment's completions, oldest first."""
    with engine.connect() as connection:
        rows = connection.execute(
            select(_c.variant, _r.updated_at, case((_positive(), 1), else_=0))
            .select_from(Rating.__table__.join(Completion.__table__, _r.completion_id == _c.id))
            .where(_c.experiment == experiment, or_(_positive(), _negative()))
            .order_by(_r.updated_at)
        )
        return [RatingPoint(variant, at, bool(positive)) for variant, at, positive in rows]
