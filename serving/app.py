"""The FastAPI application: `create_app(settings)` builds it, the lifespan owns the engine."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from contextlib import asynccontextmanager

from fastapi import FastAPI
from prometheus_client import CollectorRegistry, disable_created_metrics
from sqlalchemy.exc import SQLAlchemyError

from feedback.db import make_engine, migrate
from feedback.log import FeedbackWriter
from feedback.service import FeedbackService, record_redactor
from feedback.spool import adopt_orphaned_spools, worker_spool_dir
from loopchat.settings import Settings, get_settings
from monitoring.loop_stats import LoopMetrics
from monitoring.metrics import (
    ExperimentMetrics,
    FeedbackMetrics,
    HTTPMetricsMiddleware,
    LiveGauges,
    MetricsEndpoint,
    ServingMetrics,
    mark_process_dead,
    multiprocess_dir,
)
from rollout.evaluator import ExperimentEvaluator
from rollout.experiments import ExperimentService
from serving.access import AccessMiddleware, KeyOriginsCORS, KeyStore
from serving.adapters import AdapterSet
from serving.chat import ChatService
from serving.engine.base import ChatEngine
from serving.errors import BodySizeLimit, document_errors, install_error_handlers
from serving.openai_layer import build_openai_layer, serve_arguments
from serving.registry_sync import RegistryWatcher, bootstrap_registry
from serving.router import ABRouter
from serving.routes import admin, chat, completions, experiments, health, models, ui
from serving.routes import feedback as feedback_routes
from serving.weights import WeightStore

logger = logging.getLogger(__name__)


async def _start_engine(app: FastAPI) -> None:
    """Load the model, then the registry's versions; the server answers probes meanwhile."""
    state = app.state
    try:
        await state.engine.start()
        args = serve_arguments(
            state.settings, model_path=state.engine.model_path, served_name=state.engine.model_name
        )
        layer = await build_openai_layer(state.engine.client, args)
        state.adapters.attach(layer, rebuild=lambda client: build_openai_layer(client, args))
        await _start_registry(app)
    except Exception as exc:
        logger.exception("engine start failed")
        _engine_failed(app, f"{type(exc).__name__}: {exc}")
        return
    state.background.append(asyncio.create_task(_watch_engine(app), name="engine-watchdog"))


def _engine_failed(app: FastAPI, reason: str) -> None:
    """/readyz reports the failure; the process exits (status 3) so that its supervisor
    (Kubernetes, systemd, compose) starts a fresh one. Streams in flight get the drain timeout."""
    app.state.engine_error = reason
    if app.state.exit_on_engine_failure:
        shutdown = getattr(app.state, "request_shutdown", None)
        if shutdown is not None:
            shutdown()
        else:  # under another server (uvicorn workers, gunicorn): its SIGTERM handling
            os.kill(os.getpid(), signal.SIGTERM)


async def _watch_engine(app: FastAPI, interval: float = 1.0) -> None:
    """An engine that dies after start (its process killed, a device lost) stops the service."""
    while app.state.engine.ready:
        await asyncio.sleep(interval)
    logger.error("the engine stopped serving; shutting down for a restart")
    _engine_failed(app, "the engine stopped serving after start")


async def _start_registry(app: FastAPI) -> None:
    """Register the configured adapters and experiments, sync with the registry, start the loops."""
    state, settings = app.state, app.state.settings
    try:
        await bootstrap_registry(
            state.database,
            state.adapters,
            state.experiments,
            adapters_to_register=settings.adapters,
            active=settings.active_model,
            experiments_file=settings.ab.experiments_file,
            base_model=settings.model_path,
        )
        await state.watcher.sync(force=True)
        await state.watcher.report()
    except SQLAlchemyError as exc:
        # Serve the base (and configured adapters) now; the watcher retries the database.
        logger.error("model registry unavailable at start-up: %s", exc.__class__.__name__)
    state.registry_synced = True
    state.background.append(asyncio.create_task(state.watcher.run(), name="registry-watcher"))
    if settings.ab.evaluate:
        state.background.append(asyncio.create_task(state.evaluator.run(), name="experiment-evaluator"))
    if settings.retrain.schedule:
        from retrain.schedule import run_on_schedule

        state.background.append(
            asyncio.create_task(run_on_schedule(settings, state.database), name="retrain")
        )


async def _sample_live_gauges(live: LiveGauges, interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        live.sample()


async def _start_feedback(app: FastAPI, settings: Settings, registry: CollectorRegistry, live: LiveGauges):
    """The database, the background writer and the feedback service."""
    database = make_engine(settings.db_url)
    options = settings.feedback
    redact = None
    if options.redact == "storage":
        from feedback.redact import Redactor

        redact = record_redactor(Redactor(options.custom_patterns))
    metrics = FeedbackMetrics(registry)
    # Several workers on one data_dir each keep their own spool; each takes over the files of
    # processes that no longer run.
    spool_dir = worker_spool_dir(settings.spool_dir) if multiprocess_dir() else settings.spool_dir
    await asyncio.to_thread(adopt_orphaned_spools, settings.spool_dir, spool_dir)
    writer = FeedbackWriter(
        database,
        spool_dir,
        redact=redact,
        batch_size=options.batch_size,
        flush_interval=options.flush_interval_ms / 1000,
        queue_size=options.queue_size,
        queue_bytes=options.queue_bytes,
        max_spool_bytes=options.max_spool_bytes,
        redact_workers=options.redact_workers,
        retry_interval=options.retry_interval_s,
        rejected_retention_s=options.rejected_retention_days * 86400,
        on_batch=metrics.on_batch,
    )
    if settings.auto_migrate:
        try:
            await asyncio.to_thread(migrate, settings.db_url)
        except Exception as exc:
            # Chat keeps serving; the writer spools and migrates once the database answers.
            logger.error("database migration failed, records will be spooled: %s", exc)
            writer.require_setup(lambda: migrate(settings.db_url))
    metrics.bind(writer, live)
    writer.start()
    app.state.feedback = FeedbackService(database, writer, options)
    app.state.feedback_metrics = metrics
    return writer, database


def create_app_from_env() -> FastAPI:
    """The app as uvicorn's worker processes build it (`loopchat serve --workers N`)."""
    return create_app(get_settings())


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
        weights = WeightStore(
            settings.data_dir / "weights", app.state.engine.model_path, max_rank=settings.engine.max_lora_rank
        )
        app.state.adapters = AdapterSet(
            app.state.engine,
            weights=weights if settings.engine.merge_active else None,
            lora_idle_s=settings.engine.lora_idle_s,
            max_loras=settings.engine.max_loras,
            max_lora_rank=settings.engine.max_lora_rank,
        )
        writer, database = await _start_feedback(app, settings, registry, live)
        app.state.database = database
        serving_metrics.watch_engine(app.state.engine, live)
        monitoring = settings.monitoring
        app.state.keys = KeyStore(database, ttl=settings.access.key_cache_s)
        app.state.background = [
            asyncio.create_task(app.state.keys.run(), name="key-origins"),
            asyncio.create_task(_sample_live_gauges(live, monitoring.sample_interval_s), name="live-gauges"),
            asyncio.create_task(
                LoopMetrics(registry).run(database, monitoring.database_refresh_s), name="loop-metrics"
            ),
        ]
        base_name = app.state.engine.model_name
        ab_metrics = app.state.experiment_metrics = ExperimentMetrics(registry)
        router = ABRouter(base_name, lookup=app.state.feedback.first_answer)
        app.state.experiments = ExperimentService(database, base_name=base_name)
        app.state.watcher = RegistryWatcher(
            database, app.state.adapters, router, ab_metrics, poll_interval=settings.ab.poll_interval_s
        )
        app.state.evaluator = ExperimentEvaluator(
            app.state.experiments,
            ab_metrics,
            on_decision=app.state.watcher.sync,
            interval=settings.ab.evaluation_interval_s,
        )
        app.state.registry_synced = False
        app.state.chat = ChatService(
            app.state.adapters,
            metrics=serving_metrics,
            log=app.state.feedback,
            sampled_logprobs=settings.engine.sampled_logprobs,
            router=router,
            limits=settings.limits,
        )
        app.state.engine_error = None
        app.state.exit_on_engine_failure = exit_on_engine_failure
        starting = asyncio.create_task(_start_engine(app))
        try:
            yield
        finally:
            starting.cancel()
            for task in app.state.background:
                task.cancel()
            await app.state.adapters.close()
            await app.state.engine.shutdown()
            # After the engine: the last completions are logged before the writer drains.
            await asyncio.to_thread(writer.close)
            database.dispose()
            mark_process_dead()

    app = FastAPI(
        title="loopchat",
        summary="OpenAI-compatible chat serving with a feedback loop.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.settings = settings
    # `_created` series double what Prometheus stores and no dashboard reads them.
    disable_created_metrics()
    registry = CollectorRegistry()
    live = LiveGauges()
    serving_metrics = ServingMetrics(registry)
    # Middleware, innermost first: keys and limits on /v1, the HTTP metrics (which see the 401s
    # and 429s), the body cap, CORS for the sites with public keys.
    store_of = lambda: getattr(app.state, "keys", None)  # noqa: E731 - created at start-up
    app.add_middleware(
        AccessMiddleware, settings=settings.access, required=settings.keys_required, store_of=store_of
    )
    # Route templates, status codes and the answering version/variant of every HTTP request.
    app.add_middleware(HTTPMetricsMiddleware, metrics=serving_metrics)
    endpoint = MetricsEndpoint(registry, live)
    app.add_route("/metrics", endpoint, include_in_schema=False)
    app.mount("/metrics", endpoint)
    install_error_handlers(app)
    document_errors(app)
    app.add_middleware(BodySizeLimit, max_bytes=settings.limits.max_body_bytes)
    app.add_middleware(KeyOriginsCORS, settings=settings.access, store_of=store_of)
    app.include_router(health.router)
    app.include_router(models.router)
    app.include_router(chat.router)
    app.include_router(completions.router)
    app.include_router(completions.tokenizer)
    app.include_router(feedback_routes.router)
    app.include_router(feedback_routes.conversations)
    app.include_router(ui.router)
    if settings.admin_token is not None:
        app.include_router(admin.router)
        app.include_router(experiments.router)
    return app
