"""A/B experiments and canaries on the alias: starting, changing, evaluating and ending them.

An experiment splits the traffic of the alias `loopchat` between a control version and one or
more candidate versions (definitions and assignment: rollout/experiment_spec.py). A ramp raises the
candidates' share stage by stage (for example 5, 25, 50 percent) once each candidate has served
`min_samples_per_stage` requests at the current stage. `ExperimentService.evaluate` runs the
guardrails and the always-valid test (rollout/abstats.py) and applies the decision:
promote, roll back, ramp or keep. Every decision is stored in `ab_decision` with its numbers and
bumps the registry revision, so each serving process re-routes within its poll interval.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, update
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from feedback.models import ABDecision, Experiment, ModelVersionRecord, utcnow
from rollout.abstats import Decision, VariantOutcome, decide, tests_per_alpha
from rollout.abstats import tests as decision_tests
from rollout.experiment_spec import (
    CONTROL,
    ExperimentError,
    ExperimentNotFoundError,
    ExperimentSpec,
    StaleExperimentError,
    stage_weights,
    weights_of,
)
from rollout.outcomes import experiment_outcomes
from rollout.registry import (
    VersionConflictError,
    VersionNotFoundError,
    active_version,
    bump_revision,
    set_status,
)

logger = logging.getLogger(__name__)

# -- the service -------------------------------------------------------------------------------


class ExperimentService:
    """Starts, changes, evaluates and ends experiments; every change in one transaction."""

    def __init__(self, engine: Engine, *, base_name: str) -> None:
        self._engine = engine
        self._base_name = base_name

    # reading

    def get(self, name: str) -> Experiment:
        with Session(self._engine) as session:
            experiment = session.get(Experiment, name)
            if experiment is None:
                raise ExperimentNotFoundError(name)
            return experiment

    def running(self) -> Experiment | None:
        with Session(self._engine) as session:
            return session.exec(select(Experiment).where(Experiment.status == "running")).first()

    def list(self) -> list[Experiment]:
        with Session(self._engine) as session:
            return list(session.exec(select(Experiment).order_by(col(Experiment.created_at).desc())))

    def decisions(self, name: str) -> list[ABDecision]:
        with Session(self._engine) as session:
            query = select(ABDecision).where(ABDecision.experiment == name).order_by(col(ABDecision.id))
            return list(session.exec(query))

    def outcomes(self, experiment: Experiment) -> dict[str, VariantOutcome]:
        versions = {v["name"]: v["version"] for v in experiment.variants}
        return experiment_outcomes(self._engine, experiment.name, versions, since=experiment.created_at)

    def status(self, name: str) -> dict[str, Any]:
        """The experiment, each variant's outcomes and each candidate's test against control."""
        experiment = self.get(name)
        spec = ExperimentSpec.model_validate(experiment.spec)
        outcomes = self.outcomes(experiment)
        policy = spec.policy
        candidates = [v for v in experiment.variants if v["name"] != CONTROL and not v.get("disabled")]
        k = max(1, len(candidates))
        # Per candidate, each test the policy decides on: the ratings test (or, for a policy on
        # choices alone, the choices test) in "tests", the choices test in "choice_tests".
        tests, choice_tests = {}, {}
        for variant in candidates:
            results = decision_tests(outcomes[CONTROL], outcomes[variant["name"]], policy, k)
            first = results.get("ratings", results.get("choices"))
            tests[variant["name"]] = asdict(first[0])
            if "choices" in results:
                choice_tests[variant["name"]] = asdict(results["choices"][0])
        return {
            "experiment": experiment,
            "outcomes": outcomes,
            "tests": tests,
            "choice_tests": choice_tests,
            "metric": policy.metric,
            "alpha": policy.alpha / tests_per_alpha(policy, k),
            "decisions": self.decisions(name),
        }

    # changing

    def start(self, spec: ExperimentSpec, *, actor: str = "operator") -> Experiment:
        with Session(self._engine) as session:
            if session.get(Experiment, spec.name) is not None:
                raise VersionConflictError(f"experiment {spec.name!r} already exists")
            running = session.exec(select(Experiment).where(Experiment.status == "running")).first()
            if running is not None:
                raise VersionConflictError(f"experiment {running.name!r} is running; end it first")
            current = active_version(session=session)
            control = spec.control or (current.name if current else self._base_name)
            self._check_servable(session, control, "control")
            for variant in spec.variants:
                record = self._check_servable(session, variant.model_version, f"variant {variant.name}")
                if record is None or record.status not in ("candidate", "canary"):
                    raise ExperimentError(
                        f"variant {variant.name}: version {variant.model_version!r} must be a registered "
                        "candidate (not the base or the active version)"
                    )
            if control in {v.model_version for v in spec.variants}:
                raise ExperimentError("a variant serves the control's version")
            variants = [{"name": CONTROL, "version": control, "weight": 100.0}]
            variants += [
                {"name": v.name, "version": v.model_version, "weight": v.weight} for v in spec.variants
            ]
            if spec.ramp:
                variants = stage_weights(variants, spec.ramp[0])
            else:
                variants[0]["weight"] = 100.0 - sum(v.weight for v in spec.variants)
            experiment = Experiment(
                name=spec.name,
                salt=spec.salt or spec.name,
                control=control,
                variants=variants,
                ramp=list(spec.ramp),
                spec=spec.model_dump(mode="json"),
            )
            session.add(experiment)
            for variant in spec.variants:
                set_status(
                    session=session, name=variant.model_version, status="canary", reason=f"in {spec.name}"
                )
            session.add(
                ABDecision(
                    experiment=spec.name,
                    action="start",
                    actor=actor,
                    reason=f"control {control}; "
                    + ", ".join(f"{v['name']}={v['version']}" for v in variants[1:]),
                    weights_after=weights_of(variants),
                )
            )
            bump_revision(session)
            try:
                session.commit()
            except IntegrityError as exc:  # another process started one meanwhile
                raise VersionConflictError("another experiment started meanwhile") from exc
            session.refresh(experiment)
            return experiment

    def set_weights(self, name: str, weights: dict[str, float], *, actor: str = "operator") -> Experiment:
        """Fixed weights for the candidates (the control gets the rest); ends any ramp."""
        with Session(self._engine) as session:
            experiment = self._running(session, name)
            known = {v["name"] for v in experiment.variants if v["name"] != CONTROL}
            unknown = set(weights) - known
            if unknown:
                raise ExperimentError(f"unknown variants {sorted(unknown)}; candidates: {sorted(known)}")
            if any(not 0 <= w <= 100 for w in weights.values()):
                raise ExperimentError("weights are percentages between 0 and 100")
            variants = [dict(v) for v in experiment.variants]
            for variant in variants:
                if variant["name"] in weights:
                    if variant.get("disabled") and weights[variant["name"]] > 0:
                        raise ExperimentError(f"variant {variant['name']} was rolled back")
                    variant["weight"] = float(weights[variant["name"]])
            total = sum(v["weight"] for v in variants if v["name"] != CONTROL)
            if total > 100:
                raise ExperimentError("the candidates' weights add up to more than 100 percent")
            variants[0]["weight"] = 100.0 - total
            self._apply(
                session, experiment, "weights", actor, "weights set by hand; ramp ended", variants, ramp=[]
            )
            return self._commit(session, experiment)

    def promote(
        self,
        name: str,
        variant: str | None = None,
        *,
        actor: str = "operator",
        reason: str = "",
        numbers: dict | None = None,
    ) -> Experiment:
        with Session(self._engine) as session:
            experiment = self._running(session, name)
            winner = self._candidate(experiment, variant)
            for other in experiment.variants:
                if other["name"] not in (CONTROL, winner["name"]) and not other.get("disabled"):
                    set_status(
                        session=session, name=other["version"], status="candidate", reason=f"{name} ended"
                    )
            set_status(session=session, name=winner["version"], status="active", reason=f"promoted by {name}")
            variants = [
                {**v, "weight": 100.0 if v["name"] == winner["name"] else 0.0} for v in experiment.variants
            ]
            self._apply(
                session,
                experiment,
                "promote",
                actor,
                reason or "promoted by hand",
                variants,
                variant=winner["name"],
                numbers=numbers,
                status="promoted",
            )
            return self._commit(session, experiment)

    def rollback(
        self,
        name: str,
        variant: str | None = None,
        *,
        actor: str = "operator",
        reason: str = "",
        numbers: dict | None = None,
    ) -> Experiment:
        """Reject one candidate (default: all) and send its traffic to the control."""
        with Session(self._engine) as session:
            experiment = self._running(session, name)
            losers = [self._candidate(experiment, variant)] if variant else self._enabled(experiment)
            why = reason or "rolled back by hand"
            for loser in losers:
                set_status(
                    session=session, name=loser["version"], status="rejected", reason=f"{name}: {why}"[:1024]
                )
            lost = {v["name"] for v in losers}
            variants = [
                {**v, "disabled": True} if v["name"] in lost else dict(v) for v in experiment.variants
            ]
            remaining = [v for v in variants if v["name"] != CONTROL and not v.get("disabled")]
            if experiment.ramp and remaining:
                variants = stage_weights(variants, experiment.ramp[experiment.stage])
            else:
                variants = [{**v, "weight": 0.0} if v["name"] in lost else v for v in variants]
                variants[0]["weight"] = 100.0 - sum(v["weight"] for v in variants[1:])
            self._apply(
                session,
                experiment,
                "rollback",
                actor,
                why,
                variants,
                variant=variant,
                numbers=numbers,
                status=None if remaining else "rolled_back",
            )
            return self._commit(session, experiment)

    def stop(self, name: str, *, actor: str = "operator") -> Experiment:
        """End without a winner: the candidates go back to candidate, the alias to the active version."""
        with Session(self._engine) as session:
            experiment = self._running(session, name)
            for variant in self._enabled(experiment):
                set_status(
                    session=session, name=variant["version"], status="candidate", reason=f"{name} stopped"
                )
            variants = [{**v, "weight": 100.0 if v["name"] == CONTROL else 0.0} for v in experiment.variants]
            self._apply(session, experiment, "stop", actor, "stopped", variants, status="stopped")
            return self._commit(session, experiment)

    def evaluate(self, name: str) -> Decision:
        """One evaluation: guardrails, the sequential test, the ramp. Applied when `auto` is on."""
        experiment = self.get(name)
        if experiment.status != "running":
            return Decision("hold", f"experiment is {experiment.status}")
        spec = ExperimentSpec.model_validate(experiment.spec)
        outcomes = self.outcomes(experiment)
        enabled = self._enabled(experiment)
        decision = decide(outcomes[CONTROL], [outcomes[v["name"]] for v in enabled], spec.policy)
        decision.numbers["outcomes"] = {k: o.as_dict() for k, o in outcomes.items()}
        if not spec.auto:
            return decision
        try:
            if decision.action == "promote":
                self.promote(
                    name, decision.candidate, actor="auto", reason=decision.reason, numbers=decision.numbers
                )
            elif decision.action == "rollback":
                self.rollback(
                    name, decision.candidate, actor="auto", reason=decision.reason, numbers=decision.numbers
                )
            elif experiment.ramp and experiment.stage + 1 < len(experiment.ramp):
                ramped = self._ramp_if_due(experiment, spec, enabled)
                if ramped is not None:
                    return ramped
        except ExperimentError as exc:
            # Another process decided first (stale revision, or the experiment already ended).
            return Decision("hold", f"not applied: {exc}")
        return decision

    # helpers

    def _ramp_if_due(
        self, experiment: Experiment, spec: ExperimentSpec, enabled: list[dict]
    ) -> Decision | None:
        since = experiment.stage_started_at
        versions = {v["name"]: v["version"] for v in experiment.variants}
        at_stage = experiment_outcomes(self._engine, experiment.name, versions, since=since)
        short = [v["name"] for v in enabled if at_stage[v["name"]].requests < spec.min_samples_per_stage]
        if short:
            return None
        stage = experiment.stage + 1
        percent = experiment.ramp[stage]
        reason = (
            f"stage {stage + 1}/{len(experiment.ramp)}: {percent:g}% to candidates after "
            f">= {spec.min_samples_per_stage} requests each at {experiment.ramp[stage - 1]:g}% "
            "and no guardrail breach"
        )
        with Session(self._engine) as session:
            current = self._running(session, experiment.name)
            if current.revision != experiment.revision:
                raise StaleExperimentError
            variants = stage_weights(current.variants, percent)
            requests = {k: o.requests for k, o in at_stage.items()}
            self._apply(
                session,
                current,
                "ramp",
                "auto",
                reason,
                variants,
                stage=stage,
                numbers={"requests_at_stage": requests},
            )
            self._commit(session, current)
        return Decision("ramp", reason, None, {"stage": stage, "percent": percent})

    def _check_servable(self, session: Session, version: str, what: str) -> ModelVersionRecord | None:
        if version == self._base_name:
            return None
        record = session.get(ModelVersionRecord, version)
        if record is None:
            raise VersionNotFoundError(version, param="variants")
        if record.status in ("rejected", "retired"):
            raise ExperimentError(f"{what}: version {version!r} is {record.status}")
        return record

    def _running(self, session: Session, name: str) -> Experiment:
        experiment = session.get(Experiment, name)
        if experiment is None:
            raise ExperimentNotFoundError(name)
        if experiment.status != "running":
            raise ExperimentError(f"experiment {name!r} is {experiment.status}, not running")
        return experiment

    @staticmethod
    def _enabled(experiment: Experiment) -> list[dict[str, Any]]:
        return [v for v in experiment.variants if v["name"] != CONTROL and not v.get("disabled")]

    def _candidate(self, experiment: Experiment, variant: str | None) -> dict[str, Any]:
        enabled = self._enabled(experiment)
        if variant is None:
            if len(enabled) != 1:
                raise ExperimentError(f"name the variant: one of {[v['name'] for v in enabled]}")
            return enabled[0]
        for candidate in enabled:
            if candidate["name"] == variant:
                return candidate
        raise ExperimentError(f"no enabled candidate variant {variant!r} in {experiment.name!r}")

    def _apply(
        self,
        session: Session,
        experiment: Experiment,
        action: str,
        actor: str,
        reason: str,
        variants: list[dict[str, Any]],
        *,
        variant: str | None = None,
        numbers: dict | None = None,
        status: str | None = None,
        ramp: list[float] | None = None,
        stage: int | None = None,
    ) -> None:
        """Change the experiment only if nobody else did since it was read (optimistic lock)."""
        now = utcnow()
        values: dict[str, Any] = {
            "variants": variants,
            "revision": experiment.revision + 1,
            "updated_at": now,
        }
        if status is not None:
            values.update(status=status, ended_at=now)
        if ramp is not None:
            values["ramp"] = ramp
        if stage is not None:
            values.update(stage=stage, stage_started_at=now)
        changed = session.exec(
            update(Experiment)
            .where(col(Experiment.name) == experiment.name, col(Experiment.revision) == experiment.revision)
            .values(**values)
        )
        if changed.rowcount != 1:
            session.rollback()
            raise StaleExperimentError
        session.add(
            ABDecision(
                experiment=experiment.name,
                action=action,
                variant=variant,
                actor=actor,
                reason=reason[:2048],
                numbers=_jsonable(numbers or {}),
                weights_before=weights_of(experiment.variants),
                weights_after=weights_of(variants),
            )
        )
        bump_revision(session)

    @staticmethod
    def _commit(session: Session, experiment: Experiment) -> Experiment:
        session.commit()
        session.refresh(experiment)
        return experiment


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat()
    return value
