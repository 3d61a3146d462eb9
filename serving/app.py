"""The FastAPI application: `create_app(settings)` builds it, the lifespan owns the engine."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from contextlib import asynccontextmanager

from fastapi import FastAPI
from prometheus_client import CollectorRegistry, make_asgi_app

from feedback.db import make_engine, migrate
from feedback.log import FeedbackWriter
from feedback.service import FeedbackService, record_redactor
from monitoring.metrics import FeedbackMetrics, ServingMetrics
from serving.adapters import AdapterSet
from serving.chat import ChatService
from serving.engine.base import ChatEngine
from serving.errors import install_error_handlers
from serving.routes import admin, chat, health, models, ui
from serving.routes import feedback as feedback_routes
from serving.settings import Settings, get_settings

logger = logging.getLogger(__name__)


async def _start_engine(app: FastAPI) -> None:
    """Load the model, then the configured adapters; the server answers probes meanwhile."""
    state = app.state
    try:
        await state.engine.start()
        for name, path in state.settings.adapters.items():
            await state.adapters.load(name, path)
        state.adapters.set_active(state.settings.active_model)
    except Exception as exc:
        logger.exception("engine start failed")
        state.engine_error = f"{type(exc).__name__}: {exc}"
        if state.exit_on_engine_failure:
            # Let the supervisor (systemd, Kubernetes) restart the process.
            os.kill(os.getpid(), signal.SIGTERM)


async def _start_feedback(app: FastAPI, settings: Settings, registry: CollectorRegistry):
    """The database, the background writer and the feedback service."""
    database = make_engine(settings.db_url)
    options = settings.feedback
    redact = None
    if options.redact == "storage":
        from feedback.redact import Redactor

        redact = record_redactor(Redactor(options.custom_patterns))
    metrics = FeedbackMetrics(registry)
    writer = FeedbackWriter(
        database,
        settings.spool_dir,
        redact=redact,
        batch_size=options.batch_size,
        flush_interval=options.flush_interval_ms / 1000,
        queue_size=options.queue_size,
        retry_interval=options.retry_interval_s,
        on_batch=metrics.on_batch,
    )
    if settings.auto_migrate:
        try:
            await asyncio.to_thread(migrate, settings.db_url)
        except Exception as exc:
            # Chat keeps serving; the writer spools and migrates once the database answers.
            logger.error("database migration failed, records will be spooled: %s", exc)
            writer.require_setup(lambda: migrate(settings.db_url))
    metrics.bind(writer)
    writer.start()
    app.state.feedback = FeedbackService(database, writer, options)
    app.state.feedback_metrics = metrics
    return writer, database


def create_app(
    settings: Settings | None = None,
    *,
    engine: ChatEngine | None = None,
    exit_on_engine_failure: bool = True,
) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if engine is None:
            from serving.engine.vllm_engine import VLLMEngine

            app.state.engine = VLLMEngine(settings)
        else:
            app.state.engine = engine
        app.state.adapters = AdapterSet(app.state.engine)
        writer, database = await _start_feedback(app, settings, registry)
        metrics = ServingMetrics(registry, app.state.engine)
        app.state.chat = ChatService(
            app.state.engine,
            app.state.adapters,
            metrics=metrics,
            log=app.state.feedback,
            sampled_logprobs=settings.engine.sampled_logprobs,
        )
        app.state.engine_error = None
        app.state.exit_on_engine_failure = exit_on_engine_failure
        starting = asyncio.create_task(_start_engine(app))
        try:
            yield
        finally:
            starting.cancel()
            await app.state.engine.shutdown()
            # After the engine: the last completions are logged before the writer drains.
            await asyncio.to_thread(writer.close)
            database.dispose()

    app = FastAPI(
        title="loopchat",
        summary="OpenAI-compatible chat serving with a feedback loop.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.settings = settings
    registry = CollectorRegistry()
    app.mount("/metrics", make_asgi_app(registry))
    install_error_handlers(app)
    app.include_router(health.router)
    app.include_router(models.router)
    app.include_router(chat.router)
    app.include_router(feedback_routes.router)
    app.include_router(ui.router)
    if settings.admin_token is not None:
        app.include_router(admin.router)
    return app
