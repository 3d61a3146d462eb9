"""Runs the decision rule of the running experiment every `evaluation_interval_s`.

With several replicas each may evaluate; the experiment's optimistic lock lets only the first
apply a given decision. A decision that changes routing calls `on_decision` (the replica's
registry sync) so traffic follows it now rather than at the next poll.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from sqlalchemy.exc import SQLAlchemyError

from monitoring.metrics import ExperimentMetrics
from rollout.experiments import ExperimentService

logger = logging.getLogger(__name__)


class ExperimentEvaluator:
    def __init__(
        self,
        service: ExperimentService,
        metrics: ExperimentMetrics,
        *,
        on_decision: Callable[[], Awaitable[object]],
        interval: float = 30.0,
    ) -> None:
        self._service = service
        self._metrics = metrics
        self._on_decision = on_decision
        self._interval = interval

    async def evaluate_once(self) -> None:
        running = await asyncio.to_thread(self._service.running)
        if running is None:
            return
        decision = await asyncio.to_thread(self._service.evaluate, running.name)
        self._metrics.observe_evaluation(running.name, decision.numbers)
        if decision.action != "hold" and running.spec.get("auto", True):
            logger.info(
                "experiment %s: %s %s (%s)",
                running.name,
                decision.action,
                decision.candidate or "",
                decision.reason,
            )
            await self._on_decision()

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.evaluate_once()
            except (SQLAlchemyError, OSError) as exc:
                logger.warning("experiment evaluation failed: %s", exc.__class__.__name__)
            except Exception:
                logger.exception("experiment evaluation failed")
