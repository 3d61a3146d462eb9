"""Prometheus metrics of a serving process.

Every metric lives in the registry passed in (tests use a fresh one); labels are bounded sets
(model versions, variants, routes, status codes, outcomes), never user ids or text.

Multiprocess mode: when PROMETHEUS_MULTIPROC_DIR is set (`loopchat serve --workers N` sets it),
prometheus_client keeps every value in files shared by the workers, and /metrics, whichever
worker answers, reports them all: counters and histograms summed, each gauge combined as its
`multiprocess_mode` says. Values read off live objects (the engine's scheduler, the log writer)
are therefore sampled into plain gauges (`LiveGauges`) instead of read at scrape time only.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_asgi_app, multiprocess
from starlette.routing import Match

if TYPE_CHECKING:
    from feedback.log import FeedbackWriter

logger = logging.getLogger(__name__)


class EngineStatsView(Protocol):
    """The scheduler numbers the engine gauges read (serving's `EngineStats`)."""

    running_requests: int
    waiting_requests: int
    unfinished_requests: int
    kv_cache_usage: float
    loaded_adapters: int
    lora_slots: int
    lora_max_rank: int


class ObservedEngine(Protocol):
    """What the engine gauges need of a generation engine (serving's `ChatEngine` has it)."""

    @property
    def ready(self) -> bool: ...

    def stats(self) -> EngineStatsView: ...


LATENCY_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
# Time per output token: ~5 ms on a GPU, 10-100 ms for a small model on a CPU, more under load.
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)
# The label value of requests outside any experiment (an empty value would drop the label).
NO_VARIANT = "none"


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class LiveGauges:
    """Gauges read off live objects: refreshed on every scrape this process answers and every
    few seconds by `run`, so that in multiprocess mode, where another worker may answer the
    scrape, each worker's share is at most that old."""

    def __init__(self) -> None:
        self._readers: list[tuple[Gauge, Callable[[], float]]] = []

    def add(self, gauge: Gauge, read: Callable[[], float]) -> None:
        self._readers.append((gauge, read))

    def sample(self) -> None:
        for gauge, read in self._readers:
            try:
                gauge.set(read())
            except Exception:  # a metric must never break the scrape or the service
                logger.debug("could not sample %s", gauge, exc_info=True)


class ServingMetrics:
    """Chat completions, the engine's scheduler and the HTTP routes."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.requests = Counter(
            "loopchat_chat_requests",
            "Chat completions by model version, A/B variant and finish reason (stop, length, abort)",
            ["model_version", "variant", "finish_reason"],
            registry=registry,
        )
        self.errors = Counter(
            "loopchat_chat_errors",
            "Completions that failed after they were accepted, by reason (engine, invalid_prompt)",
            ["model_version", "reason"],
            registry=registry,
        )
        self.inflight = Gauge(
            "loopchat_chat_inflight_requests",
            "Chat completions being generated",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.time_to_first_token = Histogram(
            "loopchat_time_to_first_token_seconds",
            "Time from the request to the first generated token",
            ["model_version"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.time_per_output_token = Histogram(
            "loopchat_time_per_output_token_seconds",
            "Time per generated token after the first (decode speed a user sees)",
            ["model_version"],
            buckets=TOKEN_BUCKETS,
            registry=registry,
        )
        self.latency = Histogram(
            "loopchat_chat_latency_seconds",
            "End-to-end generation time",
            ["model_version"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.prompt_tokens = Counter(
            "loopchat_prompt_tokens", "Prompt tokens processed", ["model_version"], registry=registry
        )
        self.completion_tokens = Counter(
            "loopchat_completion_tokens",
            "Completion tokens generated",
            ["model_version"],
            registry=registry,
        )
        self.http_requests = Counter(
            "loopchat_http_requests",
            "HTTP requests by route template, method, status code, and (chat routes) the model "
            "version and A/B variant that answered",
            ["route", "method", "status", "model_version", "variant"],
            registry=registry,
        )
        self.http_latency = Histogram(
            "loopchat_http_request_duration_seconds",
            "HTTP request duration by route template (streams: until the last byte)",
            ["route", "method"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )

    def watch_engine(self, engine: ObservedEngine, live: LiveGauges) -> None:
        """Sample the engine's readiness and scheduler."""
        registry = self.registry

        def gauge(name: str, documentation: str, mode: str, read: Callable[[], float]) -> None:
            live.add(Gauge(name, documentation, registry=registry, multiprocess_mode=mode), read)

        gauge(
            "loopchat_engine_ready",
            "1 when the engine serves requests",
            "livemin",
            lambda: float(engine.ready),
        )
        gauge(
            "loopchat_engine_running_requests",
            "Requests the scheduler is running",
            "livesum",
            lambda: engine.stats().running_requests,
        )
        gauge(
            "loopchat_engine_waiting_requests",
            "Requests waiting for the scheduler",
            "livesum",
            lambda: engine.stats().waiting_requests,
        )
        gauge(
            "loopchat_engine_unfinished_requests",
            "Requests the engine holds (running, waiting or streaming out)",
            "livesum",
            lambda: engine.stats().unfinished_requests,
        )
        gauge(
            "loopchat_engine_kv_cache_usage_ratio",
            "Share of the KV cache in use",
            "livemax",
            lambda: engine.stats().kv_cache_usage,
        )
        gauge(
            "loopchat_engine_loaded_adapters",
            "LoRA adapters loaded in the engine",
            "livemax",
            lambda: engine.stats().loaded_adapters,
        )
        gauge(
            "loopchat_engine_lora_slots",
            "LoRA slots the engine was built with (0: no LoRA)",
            "livemax",
            lambda: engine.stats().lora_slots,
        )
        gauge(
            "loopchat_engine_lora_max_rank",
            "Largest LoRA rank the engine was built for (0: no LoRA)",
            "livemax",
            lambda: engine.stats().lora_max_rank,
        )


class HTTPMetricsMiddleware:
    """Counts and times every HTTP request by route template, method, status and (chat) the
    answering version and variant.

    A pure ASGI middleware that reads the route Starlette matched from the scope afterwards:
    nothing is matched twice and no request or response object is built, which keeps it to a
    few microseconds a request (the ratings benchmark runs at over 1000 requests/s on 2 cores).
    Only requests refused before routing (401, 413, 429) are matched here, to name their route.
    """

    def __init__(self, app, metrics: ServingMetrics, exclude: tuple[str, ...] = ("/metrics",)) -> None:
        self.app = app
        self.metrics = metrics
        self.exclude = exclude

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status, version, variant = 500, "", None

        async def observed(message) -> None:
            nonlocal status, version, variant
            if message["type"] == "http.response.start":
                status = message["status"]
                for name, value in message.get("headers", ()):
                    if name == b"x-loopchat-model-version":
                        version = value.decode("latin-1")
                    elif name == b"x-loopchat-variant":
                        variant = value.decode("latin-1")
            await send(message)

        try:
            await self.app(scope, receive, observed)
        finally:
            route = self._route(scope)
            if not route.startswith(self.exclude):
                if variant is None:
                    variant = NO_VARIANT if version else ""
                metrics, method = self.metrics, scope["method"]
                metrics.http_requests.labels(route, method, str(status), version, variant).inc()
                metrics.http_latency.labels(route, method).observe(time.perf_counter() - started)

    def _route(self, scope) -> str:
        route = scope.get("route")
        if route is not None:
            return getattr(route, "path", "none")
        app = scope.get("app")
        for candidate in getattr(getattr(app, "router", None), "routes", ()):
            match, _ = candidate.matches(scope)
            if match is Match.FULL:
                return getattr(candidate, "path", "none")
        return "none"  # unknown paths share one label value


class FeedbackMetrics:
    """The conversation log's writer and the ratings it stores."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.records = Counter(
            "loopchat_feedback_records",
            "Log and rating records by outcome (written, spooled, replayed, rejected; dropped when the "
            "spool is full too; erased when a replay finds them deleted meanwhile)",
            ["outcome"],
            registry=registry,
        )
        self.batch_seconds = Histogram(
            "loopchat_feedback_batch_seconds",
            "Time to commit one batch of records",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0),
            registry=registry,
        )
        self.queue_depth = Gauge(
            "loopchat_feedback_queue_depth",
            "Records waiting for the writer",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.spooled = Gauge(
            "loopchat_feedback_spool_records",
            "Records waiting in the on-disk spool",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.queue_bytes = Gauge(
            "loopchat_feedback_queue_bytes",
            "Bytes of text waiting for the writer (bounded by feedback.queue_bytes)",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.spool_bytes = Gauge(
            "loopchat_feedback_spool_bytes",
            "Size of the on-disk spool (capped by feedback.max_spool_bytes)",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.database_up = Gauge(
            "loopchat_feedback_database_up",
            "1 while the database takes writes",
            registry=registry,
            multiprocess_mode="livemin",
        )
        self.ratings = Counter(
            "loopchat_feedback_ratings",
            "Ratings received by kind (up, down, score, comment, correction, preference), with the "
            "model version and A/B variant of the rated answer (of the chosen one for preferences)",
            ["kind", "model_version", "variant"],
            registry=registry,
        )
        self.stars = Histogram(
            "loopchat_feedback_stars",
            "Star scores (1-5) by model version",
            ["model_version"],
            buckets=(1, 2, 3, 4, 5),
            registry=registry,
        )

    def bind(self, writer: FeedbackWriter, live: LiveGauges) -> None:
        """Sample the writer's queue, spool and health."""
        live.add(self.queue_depth, lambda: writer.pending)
        live.add(self.spooled, lambda: len(writer.spool))
        live.add(self.queue_bytes, lambda: writer.pending_bytes)
        live.add(self.spool_bytes, lambda: writer.spool.size_bytes)
        live.add(self.database_up, lambda: float(writer.healthy))

    def on_batch(self, outcome: str, count: int, seconds: float) -> None:
        self.records.labels(outcome).inc(count)
        if outcome == "written" and seconds:
            self.batch_seconds.observe(seconds)


class ExperimentMetrics:
    """Routing weights, A/B decisions and adapter loads of a serving process."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.weight = Gauge(
            "loopchat_experiment_weight_percent",
            "Share of the alias's traffic each variant of the running experiment gets",
            ["experiment", "variant", "model_version"],
            registry=registry,
            multiprocess_mode="livemax",
        )
        self.p_value = Gauge(
            "loopchat_experiment_p_value",
            "Always-valid p-value of each candidate against the control at the last evaluation",
            ["experiment", "variant"],
            registry=registry,
            multiprocess_mode="mostrecent",
        )
        self.positive_rate = Gauge(
            "loopchat_experiment_positive_rate",
            "Positive share of judged ratings per variant at the last evaluation",
            ["experiment", "variant"],
            registry=registry,
            multiprocess_mode="mostrecent",
        )
        self.adapter_loads = Counter(
            "loopchat_adapter_loads",
            "Adapter loads by outcome (ok, failed)",
            ["outcome"],
            registry=registry,
        )
        for outcome in ("ok", "failed"):
            self.adapter_loads.labels(outcome)
        self.adapter_load_seconds = Histogram(
            "loopchat_adapter_load_seconds",
            "Time to load one adapter into the engine",
            registry=registry,
            buckets=LATENCY_BUCKETS,
        )
        self.adapter_failed = Gauge(
            "loopchat_adapter_load_failed",
            "1 for each registered version this process could not load (its traffic goes to control)",
            ["model_version"],
            registry=registry,
            multiprocess_mode="livemax",
        )
        self.registry_revision = Gauge(
            "loopchat_registry_revision",
            "Registry revision this process routes by",
            registry=registry,
            multiprocess_mode="livemin",
        )

    def on_experiment(self, running: str | None) -> None:
        """The routing table changed: weights are set anew. The last evaluation's numbers stay
        after an experiment ends (they show why it ended) until another one starts."""
        clear_gauge(self.weight)
        if running is None:
            return
        for gauge in (self.p_value, self.positive_rate):
            if any(labels[0] != running for labels in list(gauge._metrics)):  # noqa: SLF001
                clear_gauge(gauge)

    def observe_evaluation(self, experiment: str, numbers: dict) -> None:
        """Each candidate's p-value and each variant's positive rate from one evaluation."""
        for variant, test in numbers.get("variants", {}).items():
            self.p_value.labels(experiment, variant).set(test["p_value"])
        for variant, outcome in numbers.get("outcomes", {}).items():
            if outcome.get("positive_rate") is not None:
                self.positive_rate.labels(experiment, variant).set(outcome["positive_rate"])


def clear_gauge(gauge: Gauge) -> None:
    """Drop a labelled gauge's series. In multiprocess mode a value written to the shared files
    outlives `clear()`, so every series is set to 0 first."""
    if multiprocess_dir():
        for labels in list(gauge._metrics):  # noqa: SLF001 - prometheus_client has no public listing
            gauge.labels(*labels).set(0)
    gauge.clear()


class MetricsEndpoint:
    """/metrics as an ASGI app: refreshes the live gauges, then reports this process's registry,
    or in multiprocess mode every worker's values."""

    def __init__(self, registry: CollectorRegistry, live: LiveGauges) -> None:
        self._live = live
        if multiprocess_dir():
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
        self._app = make_asgi_app(registry)

    async def __call__(self, scope, receive, send) -> None:
        self._live.sample()
        await self._app(scope, receive, send)


def mark_process_dead() -> None:
    """Drop this worker's live gauges from the shared files (multiprocess mode) at exit."""
    if multiprocess_dir():
        multiprocess.mark_process_dead(os.getpid())
