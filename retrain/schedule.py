"""Retraining on a schedule inside the serving process (LOOPCHAT_RETRAIN__SCHEDULE=true).

A separate job does the same with `loopchat retrain --schedule` (or a cron job running
`loopchat retrain`); the database lease keeps runs from overlapping whichever process starts
them. Training in the serving process takes CPU (or GPU) from serving: on one small machine
prefer the separate job at quiet hours.
"""

from __future__ import annotations

import asyncio
import logging

from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from loopchat.settings import Settings
from retrain.config import load_config
from retrain.pipeline import RetrainBusyError, RetrainRunner, due

logger = logging.getLogger(__name__)


async def run_on_schedule(settings: Settings, database: Engine) -> None:
    config = load_config(settings.retrain.config_file)
    runner = RetrainRunner(settings, database, config)
    while True:
        await asyncio.sleep(settings.retrain.check_interval_s)
        try:
            ready, why = await asyncio.to_thread(due, database, config)
            if not ready:
                logger.debug("retraining not due: %s", why)
                continue
            run = await asyncio.to_thread(runner.run, trigger="schedule")
            logger.info("scheduled retraining %s: %s %s", run.id, run.status, run.reason or "")
        except RetrainBusyError:
            logger.info("scheduled retraining skipped: another run is in progress")
        except SQLAlchemyError as exc:
            logger.warning("scheduled retraining check failed: %s", exc.__class__.__name__)
