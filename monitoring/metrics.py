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
