"""Active learning: which logged completions would teach the next model version the most.

Every completion with a training signal (a rating, a correction, a side-by-side choice) that no
registered version was trained on yet is a candidate, from the configured sources (live traffic;
imported transcripts for `retrain --from-import`; paraphrases never: they follow their original).
Its signal score adds up what it says:

- a negative rating (thumb down, 1-2 stars): the model got it wrong (+1.0)
- a correction: the answer the user wanted, the strongest teacher (+1.5)
- a side-by-side choice: a direct preference between versions (+1.0)
- disagreement: versions answered the same prompt differently (+0.5)
- a positive rating: a good answer to imitate (+0.2)
- low confidence: 1 - exp(mean log-probability of the sampled tokens), times `confidence_weight`

The top `prefilter` x `budget` by signal are embedded (MiniLM), then picked greedily by signal
plus `novelty_weight` x distance from everything picked so far (maximal marginal relevance), so
the selection is diverse; a sample closer than `near_duplicate` (cosine) to a picked one is left
out of the budget as a repeat of it: it still comes along (`riders`), so the dataset counts
how many people gave the same feedback (retrain/dataset.py weighs repeats). Each pick keeps its
reasons.

Samples of a registered version's run are spent, except those whose prompt that run held out
to judge the candidate: a later run may teach them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
from sqlalchemy import Engine, and_, case, func, or_, select

from feedback.models import Completion, Preference, Rating, TrainingRun, TrainingSample
from retrain.config import SelectionConfig

_c, _r, _p = Completion.__table__.c, Rating.__table__.c, Preference.__table__.c

WEIGHTS = {"negative": 1.0, "correction": 1.5, "preference": 1.0, "disagreement": 0.5, "positive": 0.2}
_REASONS = {
    "correction": "correction",
    "negative": "negative rating",
    "preference": "side-by-side choice",
    "positive": "positive rating",
}
_CHUNK = 900  # ids per IN (...) list


@dataclass(slots=True)
class Candidate:
    completion_id: str
    signal: float
    reasons: list[str] = field(default_factory=list)
    text: str = ""


@dataclass(slots=True)
class Selection:
    picked: list[Candidate]
    candidates: int
    duplicates: int
    scores: dict[str, float] = field(default_factory=dict)
    # Near-duplicates of a pick: outside the budget, still training data (they weigh its example).
    riders: list[Candidate] = field(default_factory=list)

    @property
    def completion_ids(self) -> set[str]:
        return {c.completion_id for c in (*self.picked, *self.riders)}


def _chunks(items: Sequence[str]) -> Iterable[Sequence[str]]:
    for start in range(0, len(items), _CHUNK):
        yield items[start : start + _CHUNK]


def score_candidates(engine: Engine, config: SelectionConfig) -> list[Candidate]:
    """Every unused completion with a training signal, with its signal score and reasons."""
    negative = or_(_r.thumb == "down", and_(_r.thumb.is_(None), _r.score <= 2))
    positive = or_(_r.thumb == "up", and_(_r.thumb.is_(None), _r.score >= 4))
    signals: dict[str, dict[str, int]] = {}
    with engine.connect() as connection:
        rated = connection.execute(
            select(
                _r.completion_id,
                func.sum(case((negative, 1), else_=0)),
                func.sum(case((positive, 1), else_=0)),
                func.sum(case((_r.correction.is_not(None), 1), else_=0)),
            ).group_by(_r.completion_id)
        )
        for completion_id, neg, pos, corrections in rated:
            signals[completion_id] = {
                "negative": neg or 0,
                "positive": pos or 0,
                "correction": corrections or 0,
            }
        for column in (_p.chosen_completion_id, _p.rejected_completion_id):
            for (completion_id,) in connection.execute(select(column).distinct()):
                signals.setdefault(completion_id, {})["preference"] = 1
        # Samples behind a registered version are spent; a skipped, failed or rejected run's are not.
        samples, runs = TrainingSample.__table__.c, TrainingRun.__table__.c
        used = {
            row[0]
            for row in connection.execute(
                select(samples.completion_id)
                .join(TrainingRun.__table__, runs.id == samples.run_id)
                .where(runs.status == "registered", or_(samples.split.is_(None), samples.split == "train"))
                .distinct()
            )
        }
        disagreeing = {
            row[0]
            for row in connection.execute(
                select(_c.prompt_hash)
                .group_by(_c.prompt_hash)
                .having(
                    and_(func.count(_c.model_version.distinct()) > 1, func.count(_c.response.distinct()) > 1)
                )
            )
        }
        ids = [cid for cid in signals if cid not in used]
        candidates = []
        for chunk in _chunks(ids):
            where = [_c.id.in_(chunk), _c.error.is_(None), _c.source.in_(config.sources)]
            if config.since is not None:
                where.append(_c.created_at >= config.since)
            rows = connection.execute(select(_c.id, _c.prompt_hash, _c.logprob_mean).where(*where))
            for completion_id, prompt_hash, logprob_mean in rows:
                found = signals[completion_id]
                reasons, score = [], 0.0
                for name in ("correction", "negative", "preference", "positive"):
                    if found.get(name):
                        reasons.append(_REASONS[name])
                        score += WEIGHTS[name]
                if prompt_hash in disagreeing:
                    reasons.append("versions disagree")
                    score += WEIGHTS["disagreement"]
                if logprob_mean is not None and config.confidence_weight:
                    uncertainty = 1 - math.exp(min(0.0, logprob_mean))
                    score += config.confidence_weight * uncertainty
                    if uncertainty >= 0.5:
                        reasons.append(f"low confidence ({uncertainty:.2f})")
                candidates.append(Candidate(completion_id, score, reasons))
    return candidates


def _texts(engine: Engine, candidates: list[Candidate]) -> None:
    """Fill in the text embedded for novelty: the last user turn and the answer."""
    by_id = {c.completion_id: c for c in candidates}
    with engine.connect() as connection:
        for chunk in _chunks(list(by_id)):
            for completion_id, messages, response in connection.execute(
                select(_c.id, _c.messages, _c.response).where(_c.id.in_(chunk))
            ):
                user = next((m["content"] for m in reversed(messages or []) if m.get("role") == "user"), "")
                by_id[completion_id].text = f"{user}\n{response}"


def _exact_groups(texts: Sequence[str]) -> Callable[[int], np.ndarray]:
    """Without embeddings: identical texts (up to case and spacing) are duplicates, all else is new."""
    ids: dict[str, int] = {}
    groups = np.array([ids.setdefault(" ".join(t.lower().split()), len(ids)) for t in texts])
    return lambda i: (groups == groups[i]).astype(np.float64)


def select_samples(
    engine: Engine,
    config: SelectionConfig,
    *,
    embedder: Callable[[Sequence[str]], np.ndarray] | None = None,
) -> Selection:
    """Score, prefilter, embed and pick up to `config.budget` samples."""
    candidates = score_candidates(engine, config)
    total = len(candidates)
    candidates.sort(key=lambda c: (-c.signal, c.completion_id))
    pool = candidates[: config.budget * config.prefilter]
    if not pool:
        return Selection([], total, 0)
    _texts(engine, pool)
    texts = [c.text for c in pool]
    if config.embed:
        if embedder is None:
            from retrain.embed import embed as embedder
        vectors = embedder(texts)
        similarity = lambda i: vectors @ vectors[i]  # noqa: E731  (unit vectors: cosine)
    else:
        similarity = _exact_groups(texts)
    picked, riders = mmr(pool, similarity, config)
    return Selection(picked, total, len(riders), {c.completion_id: c.signal for c in picked}, riders)


def mmr(
    pool: list[Candidate], similarity: Callable[[int], np.ndarray], config: SelectionConfig
) -> tuple[list[Candidate], list[Candidate]]:
    """Greedy maximal marginal relevance with near-duplicates set aside (the riders, returned
    second); `similarity(i)` gives the similarity of every pool member to member i."""
    n = len(pool)
    signal = np.array([c.signal for c in pool], dtype=np.float64)
    closest = np.zeros(n)  # highest cosine similarity to anything picked so far
    open_ = np.ones(n, dtype=bool)
    picked: list[Candidate] = []
    riders: list[Candidate] = []
    while len(picked) < config.budget and open_.any():
        value = np.where(open_, signal + config.novelty_weight * (1 - closest), -np.inf)
        i = int(np.argmax(value))
        open_[i] = False
        if picked and closest[i] >= config.near_duplicate:
            pool[i].reasons.append(f"repeats a pick ({closest[i]:.2f})")
            riders.append(pool[i])
            continue
        candidate = pool[i]
        if picked:
            candidate.reasons.append(f"novelty {1 - closest[i]:.2f}")
        picked.append(candidate)
        closest = np.maximum(closest, similarity(i))
    return picked, riders
