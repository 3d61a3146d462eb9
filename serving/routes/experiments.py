"""Operator routes for A/B experiments; mounted with the admin routes."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter

from feedback.models import Experiment
from rollout.experiment_spec import ExperimentSpec
from serving.deps import AdminDep, ExperimentMetricsDep, ExperimentsDep, WatcherDep
from serving.errors import error_responses
from serving.protocol import DecisionRequest, WeightsRequest

router = APIRouter(prefix="/admin/experiments", tags=["experiments"], dependencies=[AdminDep])

_ERRORS = error_responses(400, 401, 403, 404, 409, 503)


def experiment_json(experiment: Experiment) -> dict[str, Any]:
    return experiment.model_dump(mode="json")


async def _call(watcher, function, *args, **kwargs):
    """Run a service call off the event loop and re-route this process at once (the service's
    domain errors become the client's error in `serving.errors`)."""
    result = await asyncio.to_thread(function, *args, **kwargs)
    await watcher.sync()
    return result


@router.get("", responses=_ERRORS)
async def list_experiments(service: ExperimentsDep, watcher: WatcherDep) -> dict[str, Any]:
    experiments = await _call(watcher, service.list)
    return {"data": [experiment_json(e) for e in experiments], "count": len(experiments)}


@router.post("", status_code=201, responses=_ERRORS)
async def start_experiment(
    spec: ExperimentSpec, service: ExperimentsDep, watcher: WatcherDep
) -> dict[str, Any]:
    """Start an experiment on the alias: the variants' versions become canaries."""
    return experiment_json(await _call(watcher, service.start, spec))


@router.get("/{name}", responses=_ERRORS)
async def experiment_status(name: str, service: ExperimentsDep, watcher: WatcherDep) -> dict[str, Any]:
    """The experiment, each variant's outcomes, each candidate's always-valid test, the decisions."""
    status = await _call(watcher, service.status, name)
    return {
        "experiment": experiment_json(status["experiment"]),
        "outcomes": {variant: o.as_dict() for variant, o in status["outcomes"].items()},
        "metric": status["metric"],
        "tests": status["tests"],
        "choice_tests": status["choice_tests"],
        "alpha": status["alpha"],
        "decisions": [d.model_dump(mode="json") for d in status["decisions"]],
    }


@router.put("/{name}/weights", responses=_ERRORS)
async def set_weights(name: str, body: WeightsRequest, service: ExperimentsDep, watcher: WatcherDep):
    """Fixed weights for candidate variants (percent; the control gets the rest); ends the ramp."""
    return experiment_json(await _call(watcher, service.set_weights, name, body.weights))


@router.post("/{name}/promote", responses=_ERRORS)
async def promote(name: str, body: DecisionRequest, service: ExperimentsDep, watcher: WatcherDep):
    """Make a candidate the active version and end the experiment."""
    return experiment_json(await _call(watcher, service.promote, name, body.variant, reason=body.reason))


@router.post("/{name}/rollback", responses=_ERRORS)
async def rollback(name: str, body: DecisionRequest, service: ExperimentsDep, watcher: WatcherDep):
    """Reject a candidate (default: all) and send its traffic to the control."""
    return experiment_json(await _call(watcher, service.rollback, name, body.variant, reason=body.reason))


@router.post("/{name}/stop", responses=_ERRORS)
async def stop(name: str, service: ExperimentsDep, watcher: WatcherDep):
    """End the experiment without a winner."""
    return experiment_json(await _call(watcher, service.stop, name))


@router.post("/{name}/evaluate", responses=_ERRORS)
async def evaluate(
    name: str, service: ExperimentsDep, watcher: WatcherDep, metrics: ExperimentMetricsDep
) -> dict[str, Any]:
    """Run one evaluation now (the service also runs them on a schedule)."""
    decision = await _call(watcher, service.evaluate, name)
    if decision.numbers:
        metrics.observe_evaluation(name, decision.numbers)
    return {
        "action": decision.action,
        "reason": decision.reason,
        "variant": decision.candidate,
        "numbers": decision.numbers,
    }
