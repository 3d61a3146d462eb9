"""One retraining run, end to end: lock, select, augment (optional), build the dataset, train,
gate, register, canary.

Every run is a `training_run` row (config, dataset version, metrics, stage durations, outcome)
with its selected samples in `training_sample`. A lease in `retrain_lock` keeps two runs from
overlapping across processes and machines. The adapter is trained into a temporary folder and
moved into `<data_dir>/adapters/<version>` only when complete; the registry row and the run's
outcome are written in one transaction, so a crash at any point leaves no half-registered
version (at worst an unregistered folder, which the next run does not reuse).
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, func, or_, select, update
from sqlmodel import Session, col
from sqlmodel import select as sqlmodel_select

from feedback.import_rows import IMPORT_RATER
from feedback.models import Rating, RetrainLock, TrainingRun, TrainingSample
from feedback.redact import Redactor
from loopchat.settings import Settings
from retrain.augment import Generator, augment, model_generator
from retrain.config import Method, RetrainConfig
from retrain.dataset import DatasetManifest, build_dataset
from retrain.gate import GateResult, gate, score
from retrain.select import select_samples
from retrain.stages import choose_method, choose_stages, follow_up
from retrain.train import TrainResult, search_trials, train_adapter
from rollout.experiment_spec import ExperimentSpec, VariantSpec
from rollout.experiments import ExperimentService
from rollout.registry import Lineage, active_version, register_version

logger = logging.getLogger(__name__)

LOCK = "retrain"
LEASE = timedelta(hours=6)
SIDECAR = "loopchat.json"


class RetrainBusyError(RuntimeError):
    """Another run holds the lock."""


@contextmanager
def retrain_lock(engine: Engine, owner: str) -> Iterator[None]:
    """The cross-process lease; an expired lease (a crashed run) can be taken over."""
    now = datetime.now(UTC)
    table = RetrainLock.__table__
    with engine.begin() as connection:
        taken = connection.execute(
            update(table)
            .where(table.c.name == LOCK, or_(table.c.owner.is_(None), table.c.expires_at < now))
            .values(owner=owner, expires_at=now + LEASE)
        )
    if taken.rowcount != 1:
        raise RetrainBusyError("another retraining run is in progress")
    try:
        yield
    finally:
        with engine.begin() as connection:
            connection.execute(
                update(table).where(table.c.name == LOCK, table.c.owner == owner).values(owner=None)
            )


def canary_metric(manifest: DatasetManifest, config: RetrainConfig) -> str:
    """What the candidate's canary decides on: the configured metric, or for `auto` the kind of
    feedback the run learned from (ratings and corrections: ratings; side-by-side choices:
    choices; both kinds: both), so users who only ever choose can promote what they taught."""
    if config.canary_metric != "auto":
        return config.canary_metric
    sources = {source for counts in manifest.train_sources.values() for source, n in counts.items() if n}
    rated, chosen = bool(sources - {"preference"}), "preference" in sources
    return "both" if rated and chosen else "choices" if chosen else "ratings"


def new_ratings_since(engine: Engine, since: datetime | None) -> int:
    """Ratings by users since `since` (labels of imported transcripts are not new traffic)."""
    with engine.connect() as connection:
        query = (
            select(func.count())
            .select_from(Rating.__table__)
            .where(Rating.__table__.c.user_key != IMPORT_RATER)
        )
        if since is not None:
            query = query.where(Rating.__table__.c.updated_at > since)
        return int(connection.execute(query).scalar_one())


def last_run(engine: Engine) -> TrainingRun | None:
    with Session(engine) as session:
        query = sqlmodel_select(TrainingRun).where(col(TrainingRun.status) != "skipped")
        return session.exec(query.order_by(col(TrainingRun.started_at).desc())).first()


def due(engine: Engine, config: RetrainConfig, now: datetime | None = None) -> tuple[bool, str]:
    """Whether the schedule calls for a run: enough time and enough new ratings since the last."""
    now = now or datetime.now(UTC)
    previous = last_run(engine)
    since = (
        None if previous is None else previous.started_at.replace(tzinfo=previous.started_at.tzinfo or UTC)
    )
    if since is not None and now - since < timedelta(hours=config.schedule.every_hours):
        return False, f"last run {since:%Y-%m-%d %H:%M} is less than {config.schedule.every_hours:g} h ago"
    fresh = new_ratings_since(engine, since)
    if fresh < config.schedule.min_new_ratings:
        return False, f"{fresh} new ratings (< {config.schedule.min_new_ratings})"
    return True, f"{fresh} new ratings"


class RetrainRunner:
    """Runs retraining against one database and data directory."""

    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        config: RetrainConfig,
        *,
        embedder: Callable | None = None,
        generator: Generator | None = None,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.config = config
        self.embedder = embedder
        self.generator = generator  # paraphrases; default: the serving model (retrain/augment.py)
        self.adapters_dir = settings.data_dir / "adapters"
        self.datasets_dir = settings.data_dir / "datasets"

    # -- the run ---------------------------------------------------------------------------------

    def run(self, *, trigger: str = "manual") -> TrainingRun:
        run_id = f"run-{datetime.now(UTC):%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"
        with retrain_lock(self.engine, f"{socket.gethostname()}:{os.getpid()}:{run_id}"):
            self._create(run_id, trigger)
            try:
                return self._run(run_id)
            except Exception as exc:
                logger.exception("retraining run %s failed", run_id)
                # A half-trained or unregistered adapter of this run is not kept.
                for partial in self.adapters_dir.glob(f".*{run_id.removeprefix('run-')}*.partial"):
                    shutil.rmtree(partial, ignore_errors=True)
                return self._finish(run_id, "failed", reason=f"{type(exc).__name__}: {exc}"[:2000])

    def _run(self, run_id: str) -> TrainingRun:
        config, timings, metrics = self.config, {}, {}

        started = time.perf_counter()
        selection = select_samples(self.engine, config.selection, embedder=self.embedder)
        timings["select"] = time.perf_counter() - started
        metrics["selection"] = {
            "candidates": selection.candidates,
            "picked": len(selection.picked),
            "duplicates": selection.duplicates,
        }
        self._store_samples(run_id, [*selection.picked, *selection.riders])
        with Session(self.engine) as session:
            champion = active_version(session=session)
        redactor = Redactor(self.settings.feedback.custom_patterns)
        picked = selection.completion_ids

        if config.augment.paraphrases and picked:
            started = time.perf_counter()
            generate = self.generator or model_generator(
                self.settings.model_path,
                Path(champion.adapter_path) if champion else None,
                config.augment,
                seed=config.training.seed,
            )
            metrics["augment"] = augment(self.engine, sorted(picked), config.augment, generate, redactor)
            timings["augment"] = time.perf_counter() - started

        started = time.perf_counter()
        manifest = build_dataset(
            self.engine,
            picked,
            self.datasets_dir,
            redactor=redactor,
            cleaning=config.cleaning,
            seed=config.training.seed,
            salt=str(self._earlier_runs()),
        )
        self._mark_held_out(run_id, manifest.held_out)
        timings["dataset"] = time.perf_counter() - started
        metrics["dataset"] = {
            "counts": manifest.counts,
            "removed": manifest.removed,
            "repeats": manifest.repeats,
            "held_out": len(manifest.held_out),
            "kto": manifest.kto_weights,
        }
        self._update(run_id, dataset_version=manifest.version, metrics=metrics, durations=timings)

        method = choose_method(manifest, config)
        if method is None:
            reason = f"not enough training examples (need {config.min_examples}): {manifest.counts}"
            return self._finish(run_id, "skipped", reason=reason, metrics=metrics, durations=timings)

        start_adapter = Path(champion.adapter_path) if champion and config.start_from == "champion" else None
        champion_name = champion.name if champion else self.settings.model_name
        stem = f"{self.settings.model_name.split('-')[0].lower()}-{run_id.removeprefix('run-')}"

        started = time.perf_counter()
        trained = self._train(method, manifest, f"{stem}-{method}", start_adapter)
        metrics["training"] = self._training_metrics(trained)
        stages: list[Method] = [method]
        second = follow_up(manifest, config, method)
        if second is not None:
            trained, kept = self._second_stage(trained, method, second, manifest, f"{stem}-{method}-{second}")
            metrics["training"]["second_stage"] = kept
            if kept["kept"]:
                stages.append(second)
        timings["train"] = time.perf_counter() - started
        label = "+".join(stages)
        self._update(run_id, method=label, metrics=metrics, durations=timings)

        started = time.perf_counter()
        base = self.settings.model_path
        candidate_scores = score(base, trained.adapter_dir, manifest, config.gate)
        champion_scores = score(
            base, Path(champion.adapter_path) if champion else None, manifest, config.gate
        )
        result = gate(candidate_scores, champion_scores, config.gate, stages)
        timings["evaluate"] = time.perf_counter() - started
        metrics["evaluation"] = result.metrics()
        return self._register(
            run_id,
            f"{stem}-{'-'.join(stages)}",
            label,
            manifest,
            trained,
            result,
            champion_name,
            metrics,
            timings,
        )

    @staticmethod
    def _training_metrics(trained: TrainResult) -> dict[str, Any]:
        return {
            **trained.metrics,
            "tokens": trained.tokens,
            "tokens_per_second": trained.tokens_per_second,
            "train_seconds": trained.seconds,
        }

    def _second_stage(
        self, first: TrainResult, first_method: Method, method: Method, manifest: DatasetManifest, name: str
    ) -> tuple[TrainResult, dict[str, Any]]:
        """Continue the first stage's adapter on `method` (its reference: the first stage), and keep
        whichever of the two does better on validation (retrain/stages.py)."""
        both = self._train(method, manifest, name, first.adapter_dir)
        likelihoods = self.config.gate.model_copy(update={"generate_f1": False, "bias_probe": False})
        base = self.settings.model_path
        choice = choose_stages(
            score(base, first.adapter_dir, manifest, likelihoods, split="validation"),
            score(base, both.adapter_dir, manifest, likelihoods, split="validation"),
            first_method,
            method,
            self.config.combine_tolerance,
        )
        logger.info("second stage %s %s: %s", method, "kept" if choice.keep else "dropped", choice.reason)
        info = {
            "method": method,
            "kept": choice.keep,
            "reason": choice.reason,
            **choice.figures,
            **self._training_metrics(both),
        }
        if not choice.keep:
            shutil.rmtree(both.adapter_dir, ignore_errors=True)
            return first, info
        shutil.rmtree(first.adapter_dir, ignore_errors=True)
        both.hyperparameters["stages"] = [first.hyperparameters, dict(both.hyperparameters)]
        both.tokens += first.tokens
        both.seconds += first.seconds
        return both, info

    def _train(self, method: Method, manifest: DatasetManifest, name: str, start: Path | None) -> TrainResult:
        """Train into a temporary folder beside the final one (a search keeps the best trial)."""
        self.adapters_dir.mkdir(parents=True, exist_ok=True)
        configs = [self.config.training]
        if self.config.search.trials:
            configs = search_trials(
                self.config.training, self.config.search, random.Random(self.config.training.seed)
            )
        best: TrainResult | None = None
        for index, trial in enumerate(configs):
            folder = self.adapters_dir / f".{name}.trial{index}.partial"
            shutil.rmtree(folder, ignore_errors=True)
            result = train_adapter(
                method, manifest, self.settings.model_path, folder, trial, start_adapter=start
            )
            loss = result.metrics.get("eval_loss", result.metrics.get("train_loss", float("inf")))
            result.metrics["selection_loss"] = loss
            if best is None or loss < best.metrics["selection_loss"]:
                if best is not None:
                    shutil.rmtree(best.adapter_dir, ignore_errors=True)
                best = result
            else:
                shutil.rmtree(folder, ignore_errors=True)
        assert best is not None
        if len(configs) > 1:
            best.metrics["search_trials"] = len(configs)
        return best

    def _register(
        self,
        run_id: str,
        name: str,
        method: str,
        manifest: DatasetManifest,
        trained: TrainResult,
        result: GateResult,
        champion: str,
        metrics: dict[str, Any],
        timings: dict[str, float],
    ) -> TrainingRun:
        """Move the adapter into place, then record version and outcome in one transaction."""
        final = self.adapters_dir / name
        sidecar = {
            "name": name,
            "base_model": self.settings.model_name,
            "parent": champion,
            "dataset_version": manifest.version,
            "training_run": run_id,
            "method": method,
            "hyperparameters": trained.hyperparameters,
            "metrics": metrics.get("evaluation", {}),
            "gate": {"passed": result.passed, "reasons": result.reasons},
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        (trained.adapter_dir / SIDECAR).write_text(json.dumps(sidecar, indent=2))
        os.replace(trained.adapter_dir, final)
        status = "candidate" if result.passed else "rejected"
        reason = None if result.passed else "; ".join(result.reasons)
        with Session(self.engine) as session:
            register_version(
                session=session,
                name=name,
                adapter_path=final,
                base_model=self.settings.model_name,
                info=Lineage(champion, manifest.version, run_id, metrics.get("evaluation")),
                status=status,
                reason=reason,
            )
            run = session.get(TrainingRun, run_id)
            assert run is not None
            run.status = "registered" if result.passed else "rejected"
            run.candidate, run.champion, run.method = name, champion, method
            run.metrics, run.durations = metrics, timings
            run.reason = reason
            run.finished_at = datetime.now(UTC)
            session.add(run)
            session.commit()
        if result.passed and self.config.canary:
            self._start_canary(run_id, name, canary_metric(manifest, self.config))
        return self._get(run_id)

    def _start_canary(self, run_id: str, name: str, metric: str) -> None:
        service = ExperimentService(self.engine, base_name=self.settings.model_name)
        if service.running() is not None:
            self._update(run_id, reason=f"registered {name}; no canary: an experiment is already running")
            return
        spec = ExperimentSpec(
            name=f"canary-{name}"[:128],
            variants=[VariantSpec(name="candidate", version=name)],
            ramp=self.config.canary_ramp,
            min_samples_per_stage=self.config.canary_min_samples_per_stage,
            policy=self.config.canary_policy.model_copy(update={"metric": metric}),
        )
        service.start(spec, actor=f"retrain {run_id}")

    # -- bookkeeping -----------------------------------------------------------------------------

    def _create(self, run_id: str, trigger: str) -> None:
        with Session(self.engine) as session:
            session.add(TrainingRun(id=run_id, trigger=trigger, config=self.config.model_dump(mode="json")))
            session.commit()

    def _store_samples(self, run_id: str, picked) -> None:
        with self.engine.begin() as connection:
            rows = [
                {"run_id": run_id, "completion_id": c.completion_id, "score": c.signal, "reasons": c.reasons}
                for c in picked
            ]
            if rows:
                connection.execute(TrainingSample.__table__.insert(), rows)

    def _earlier_runs(self) -> int:
        """Runs that got as far as a dataset: salts the split, so held-out prompts rotate."""
        runs = TrainingRun.__table__.c
        with self.engine.connect() as connection:
            return int(
                connection.execute(
                    select(func.count())
                    .select_from(TrainingRun.__table__)
                    .where(runs.dataset_version.is_not(None))
                ).scalar_one()
            )

    def _mark_held_out(self, run_id: str, held_out: list[str]) -> None:
        """Record each sample's split: held-out ones are not spent by this run."""
        table = TrainingSample.__table__
        with self.engine.begin() as connection:
            connection.execute(update(table).where(table.c.run_id == run_id).values(split="train"))
            for start in range(0, len(held_out), 900):
                connection.execute(
                    update(table)
                    .where(table.c.run_id == run_id, table.c.completion_id.in_(held_out[start : start + 900]))
                    .values(split="held_out")
                )

    def _update(self, run_id: str, **values: Any) -> None:
        with Session(self.engine) as session:
            run = session.get(TrainingRun, run_id)
            assert run is not None
            for key, value in values.items():
                setattr(run, key, value)
            session.add(run)
            session.commit()

    def _finish(self, run_id: str, status: str, **values: Any) -> TrainingRun:
        self._update(run_id, status=status, finished_at=datetime.now(UTC), **values)
        return self._get(run_id)

    def _get(self, run_id: str) -> TrainingRun:
        with Session(self.engine) as session:
            run = session.get(TrainingRun, run_id)
            assert run is not None
            return run
