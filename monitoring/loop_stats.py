"""The loop's decisions as metrics, read from the database: retraining runs and A/B decisions.

Runs happen in whichever process holds the retraining lease (the service's schedule, a CronJob,
an operator's `loopchat retrain`), often one Prometheus never scrapes and that exits when done;
A/B decisions are taken by any replica's evaluator or by an operator. Both are rows in the
database, so each serving process reports them from there; the values are the same on every
replica (dashboards take `max`).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime

from prometheus_client import CollectorRegistry, Gauge
from sqlalchemy import Engine, func
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import Session, col, select

from feedback.models import ABDecision, TrainingRun

logger = logging.getLogger(__name__)

RUN_STATUSES = ("running", "registered", "rejected", "skipped", "failed")
STAGES = ("select", "dataset", "train", "evaluate")
# Evaluation figures of the gate, per model (candidate, champion); the bias probe's answer change
# (1 - token F1 between answers to a prompt and to its demographic counterfactual) and refusal gap.
EVALUATION_METRICS = (
    "perplexity",
    "token_accuracy",
    "token_f1",
    "preference_accuracy",
    "bias_answer_change",
    "bias_refusal_gap",
)
DECISION_ACTIONS = ("start", "ramp", "promote", "rollback", "weights", "stop")
# Who decided: the evaluator (auto), a retraining run's canary (retrain), the experiments file
# (config), or an operator (any other actor: names are not label values).
DECISION_BY = ("auto", "retrain", "config", "operator")


def decided_by(actor: str) -> str:
    if actor in ("auto", "config"):
        return actor
    return "retrain" if actor.startswith("retrain") else "operator"


@dataclass(slots=True)
class LoopSnapshot:
    decisions: dict[tuple[str, str], int] = field(default_factory=dict)
    runs: dict[str, int] = field(default_factory=dict)
    last_finished: dict[str, float] = field(default_factory=dict)
    last_stage_seconds: dict[str, float] = field(default_factory=dict)
    # (model, metric) -> value, of the newest run that reached the gate
    last_evaluation: dict[tuple[str, str], float] = field(default_factory=dict)
    last_gate_passed: float | None = None


def read_snapshot(database: Engine) -> LoopSnapshot:
    snapshot = LoopSnapshot(
        runs=dict.fromkeys(RUN_STATUSES, 0),
        decisions={(action, by): 0 for action in DECISION_ACTIONS for by in DECISION_BY},
    )
    with Session(database) as session:
        for action, actor, count in session.exec(
            select(ABDecision.action, ABDecision.actor, func.count()).group_by(
                ABDecision.action, ABDecision.actor
            )
        ):
            key = (action, decided_by(actor))
            snapshot.decisions[key] = snapshot.decisions.get(key, 0) + count
        for status, count, finished in session.exec(
            select(TrainingRun.status, func.count(), func.max(TrainingRun.finished_at)).group_by(
                TrainingRun.status
            )
        ):
            snapshot.runs[status] = count
            if finished is not None:
                snapshot.last_finished[status] = _epoch(finished)
        last = session.exec(
            select(TrainingRun)
            .where(col(TrainingRun.finished_at).is_not(None))
            .order_by(col(TrainingRun.finished_at).desc())
            .limit(1)
        ).first()
        if last is not None:
            snapshot.last_stage_seconds = {s: float(v) for s, v in last.durations.items() if s in STAGES}
        gated = session.exec(
            select(TrainingRun)
            .where(col(TrainingRun.status).in_(("registered", "rejected")))
            .order_by(col(TrainingRun.finished_at).desc())
            .limit(1)
        ).first()
        if gated is not None:
            evaluation = gated.metrics.get("evaluation", {})
            for model in ("candidate", "champion"):
                for metric in EVALUATION_METRICS:
                    value = evaluation.get(model, {}).get(metric)
                    if value is not None:
                        snapshot.last_evaluation[(model, metric)] = float(value)
            snapshot.last_gate_passed = 1.0 if gated.status == "registered" else 0.0
    return snapshot


def _epoch(value: datetime) -> float:
    # SQLite hands back naive datetimes; they were stored in UTC.
    return (value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp()


class LoopMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.decisions = Gauge(
            "loopchat_ab_decisions",
            "A/B decisions in the database by action (start, ramp, promote, rollback, weights, stop) and "
            "by whom (auto: the evaluator, retrain: a run's canary, config: the experiments file, operator)",
            ["action", "by"],
            registry=registry,
            multiprocess_mode="livemax",
        )
        self.runs = Gauge(
            "loopchat_retrain_runs",
            "Retraining runs in the database by status (running, registered, rejected, skipped, failed)",
            ["status"],
            registry=registry,
            multiprocess_mode="livemax",
        )
        self.last_finished = Gauge(
            "loopchat_retrain_last_finished_timestamp_seconds",
            "When the newest run of each status finished (Unix time)",
            ["status"],
            registry=registry,
            multiprocess_mode="livemax",
        )
        self.stage_seconds = Gauge(
            "loopchat_retrain_last_stage_seconds",
            "Stage durations of the newest finished run (select, dataset, train, evaluate)",
            ["stage"],
            registry=registry,
            multiprocess_mode="livemostrecent",
        )
        self.evaluation = Gauge(
            "loopchat_retrain_last_evaluation",
            "Held-out evaluation of the newest gated run, for the candidate and the champion "
            "(perplexity, token accuracy and F1, preference accuracy, the bias probe's answer change "
            "and refusal gap)",
            ["model", "metric"],
            registry=registry,
            multiprocess_mode="livemostrecent",
        )
        self.gate_passed = Gauge(
            "loopchat_retrain_last_gate_passed",
            "1 when the newest gated candidate passed the evaluation gate, 0 when it failed",
            registry=registry,
            multiprocess_mode="livemostrecent",
        )
        self.up = Gauge(
            "loopchat_loop_stats_up",
            "1 when the last read of retraining runs and A/B decisions from the database succeeded",
            registry=registry,
            multiprocess_mode="livemin",
        )

    def apply(self, snapshot: LoopSnapshot) -> None:
        for (action, by), count in snapshot.decisions.items():
            self.decisions.labels(action, by).set(count)
        for status, count in snapshot.runs.items():
            self.runs.labels(status).set(count)
        for status, at in snapshot.last_finished.items():
            self.last_finished.labels(status).set(at)
        for stage, seconds in snapshot.last_stage_seconds.items():
            self.stage_seconds.labels(stage).set(seconds)
        for (model, metric), value in snapshot.last_evaluation.items():
            self.evaluation.labels(model, metric).set(value)
        if snapshot.last_gate_passed is not None:
            self.gate_passed.set(snapshot.last_gate_passed)

    async def refresh(self, database: Engine) -> None:
        try:
            snapshot = await asyncio.to_thread(read_snapshot, database)
        except SQLAlchemyError as exc:
            self.up.set(0)
            logger.warning("could not read retraining runs and decisions: %s", exc.__class__.__name__)
            return
        self.apply(snapshot)
        self.up.set(1)

    async def run(self, database: Engine, interval: float) -> None:
        while True:
            await self.refresh(database)
            await asyncio.sleep(interval)
