"""Prometheus metrics of a serving process.

Every metric lives in the registry passed in (tests use a fresh one); labels are bounded sets
(model versions, routes, outcomes), never user ids or text.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from serving.engine.base import ChatEngine

LATENCY_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class EngineCollector(Collector):
    """Reads the engine's own numbers at scrape time."""

    def __init__(self, engine: ChatEngine) -> None:
        self._engine = engine

    def collect(self) -> Iterator[GaugeMetricFamily]:
        stats = self._engine.stats()
        yield GaugeMetricFamily(
            "loopchat_engine_ready", "1 when the engine serves requests", value=float(self._engine.ready)
        )
        yield GaugeMetricFamily(
            "loopchat_engine_running_requests",
            "Requests the scheduler is running",
            value=stats.running_requests,
        )
        yield GaugeMetricFamily(
            "loopchat_engine_waiting_requests",
            "Requests waiting for the scheduler",
            value=stats.waiting_requests,
        )
        yield GaugeMetricFamily(
            "loopchat_engine_unfinished_requests",
            "Requests the engine holds (running, waiting or streaming out)",
            value=stats.unfinished_requests,
        )
        yield GaugeMetricFamily(
            "loopchat_engine_kv_cache_usage_ratio", "Share of the KV cache in use", value=stats.kv_cache_usage
        )
        yield GaugeMetricFamily(
            "loopchat_engine_loaded_adapters",
            "LoRA adapters loaded in the engine",
            value=stats.loaded_adapters,
        )


class ServingMetrics:
    def __init__(self, registry: CollectorRegistry, engine: ChatEngine) -> None:
        self.registry = registry
        registry.register(EngineCollector(engine))
        self.requests = Counter(
            "loopchat_chat_requests",
            "Chat completions by model version and outcome",
            ["model_version", "finish_reason"],
            registry=registry,
        )
        self.inflight = Gauge(
            "loopchat_chat_inflight_requests", "Chat completions being generated", registry=registry
        )
        self.time_to_first_token = Histogram(
            "loopchat_time_to_first_token_seconds",
            "Time to first token",
            ["model_version"],
            buckets=LATENCY_BUCKETS,
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


class FeedbackMetrics:
    """The conversation log's writer and the ratings it stores."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.records = Counter(
            "loopchat_feedback_records",
            "Log and rating records by outcome (written, spooled, replayed, rejected)",
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
            "loopchat_feedback_queue_depth", "Records waiting for the writer", registry=registry
        )
        self.spooled = Gauge(
            "loopchat_feedback_spool_records", "Records waiting in the on-disk spool", registry=registry
        )
        self.database_up = Gauge(
            "loopchat_feedback_database_up", "1 while the database takes writes", registry=registry
        )
        self.ratings = Counter(
            "loopchat_feedback_ratings",
            "Ratings received by kind (up, down, score, comment, correction, preference)",
            ["kind"],
            registry=registry,
        )

    def bind(self, writer) -> None:
        """Read the writer's queue, spool and health at scrape time."""
        self.queue_depth.set_function(lambda: writer.pending)
        self.spooled.set_function(lambda: len(writer.spool))
        self.database_up.set_function(lambda: float(writer.healthy))

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
        )
        self.decisions = Counter(
            "loopchat_ab_decisions_total",
            "A/B decisions taken by this process's evaluator (promote, rollback, ramp)",
            ["experiment", "action"],
            registry=registry,
        )
        self.p_value = Gauge(
            "loopchat_experiment_p_value",
            "Always-valid p-value of each candidate against the control at the last evaluation",
            ["experiment", "variant"],
            registry=registry,
        )
        self.positive_rate = Gauge(
            "loopchat_experiment_positive_rate",
            "Positive share of judged ratings per variant at the last evaluation",
            ["experiment", "variant"],
            registry=registry,
        )
        self.adapter_loads = Counter(
            "loopchat_adapter_loads_total",
            "Adapter loads by outcome (ok, failed)",
            ["outcome"],
            registry=registry,
        )
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
        )
        self.registry_revision = Gauge(
            "loopchat_registry_revision", "Registry revision this process routes by", registry=registry
        )
