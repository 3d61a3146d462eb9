"""The Grafana dashboards, written as code: `python -m monitoring.dashboards deploy/grafana/dashboards`.

Panels are declared here once and rendered to Grafana's dashboard JSON (schema 39, Grafana 10
and newer), so every dashboard shares one layout and one datasource variable. The test suite
checks that the committed JSON is what this module renders and that every panel's queries
return data from a real Prometheus scraping a running service.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
RATE = "$__rate_interval"
WIDTH = 24


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str = ""


@dataclass(frozen=True)
class Panel:
    title: str
    description: str
    queries: tuple[Query, ...]
    unit: str = "short"
    kind: str = "timeseries"  # timeseries, stat, bargauge, table
    width: int = 8
    height: int = 8
    decimals: int | None = None
    thresholds: tuple[tuple[float, str], ...] = ()


@dataclass(frozen=True)
class Row:
    title: str
    panels: tuple[Panel, ...]


@dataclass
class Dashboard:
    uid: str
    title: str
    description: str
    rows: list[Row] = field(default_factory=list)

    def panels(self) -> list[Panel]:
        return [panel for row in self.rows for panel in row.panels]

    def render(self) -> dict[str, Any]:
        panels: list[dict[str, Any]] = []
        y, next_id = 0, 1
        for row in self.rows:
            panels.append(
                {
                    "id": next_id,
                    "type": "row",
                    "title": row.title,
                    "collapsed": False,
                    "panels": [],
                    "gridPos": {"h": 1, "w": WIDTH, "x": 0, "y": y},
                }
            )
            next_id, y, x, row_height = next_id + 1, y + 1, 0, 0
            for panel in row.panels:
                if x + panel.width > WIDTH:
                    x, y, row_height = 0, y + row_height, 0
                panels.append(_render_panel(panel, next_id, x, y))
                next_id, x, row_height = next_id + 1, x + panel.width, max(row_height, panel.height)
            y += row_height
        return {
            "uid": self.uid,
            "title": self.title,
            "description": self.description,
            "tags": ["loopchat"],
            "timezone": "browser",
            "editable": True,
            "graphTooltip": 1,
            "schemaVersion": 39,
            "version": 1,
            "refresh": "30s",
            "time": {"from": "now-6h", "to": "now"},
            "templating": {
                "list": [
                    {
                        "name": "datasource",
                        "label": "Prometheus",
                        "type": "datasource",
                        "query": "prometheus",
                        "current": {},
                        "hide": 0,
                        "refresh": 1,
                        "options": [],
                    }
                ]
            },
            "annotations": {"list": []},
            "links": [{"title": "loopchat", "type": "dashboards", "tags": ["loopchat"], "asDropdown": True}],
            "panels": panels,
        }


def _render_panel(panel: Panel, panel_id: int, x: int, y: int) -> dict[str, Any]:
    defaults: dict[str, Any] = {"unit": panel.unit}
    if panel.decimals is not None:
        defaults["decimals"] = panel.decimals
    if panel.thresholds:
        steps = [{"color": "green", "value": None}]
        steps += [{"color": color, "value": value} for value, color in panel.thresholds]
        defaults["thresholds"] = {"mode": "absolute", "steps": steps}
    if panel.kind == "timeseries":
        defaults["custom"] = {
            "drawStyle": "line",
            "lineWidth": 1,
            "fillOpacity": 10,
            "showPoints": "never",
            "spanNulls": True,
        }
    options: dict[str, Any] = {"tooltip": {"mode": "multi", "sort": "desc"}}
    if panel.kind == "timeseries":
        options["legend"] = {"displayMode": "list", "placement": "bottom", "showLegend": True}
    elif panel.kind in ("stat", "bargauge"):
        options["reduceOptions"] = {"calcs": ["lastNotNull"], "fields": "", "values": False}
    instant = panel.kind in ("stat", "bargauge", "table")
    return {
        "id": panel_id,
        "type": panel.kind,
        "title": panel.title,
        "description": panel.description,
        "datasource": DATASOURCE,
        "gridPos": {"h": panel.height, "w": panel.width, "x": x, "y": y},
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": options,
        "targets": [
            {
                "refId": chr(ord("A") + index),
                "datasource": DATASOURCE,
                "expr": query.expr,
                "legendFormat": query.legend or "__auto",
                "range": not instant,
                "instant": instant,
                **({"format": "table"} if panel.kind == "table" else {}),
            }
            for index, query in enumerate(panel.queries)
        ],
    }


def _quantiles(metric: str, by: str = "model_version") -> tuple[Query, ...]:
    return tuple(
        Query(
            f"histogram_quantile({q}, sum by (le, {by}) (rate({metric}_bucket[{RATE}])))",
            f"p{int(q * 100)} {{{{{by}}}}}",
        )
        for q in (0.5, 0.95)
    )


def _share(kind: str, of: str, by: str, window: str, where: str = "") -> str:
    """Share of ratings of `kind` among ratings of the kinds matching `of`, per `by`."""
    ratings = "loopchat_feedback_ratings_total"
    extra = f",{where}" if where else ""
    return (
        f'sum by ({by}) (increase({ratings}{{kind="{kind}"{extra}}}[{window}]))'
        f' / sum by ({by}) (increase({ratings}{{kind=~"{of}"{extra}}}[{window}]))'
    )


SERVICE = Dashboard(
    uid="loopchat-service",
    title="loopchat / Service overview",
    description="Traffic, latency, errors, the engine and the conversation log of every replica.",
    rows=[
        Row(
            "Traffic and errors",
            (
                Panel(
                    "Requests by route",
                    "HTTP requests per second by route template.",
                    (
                        Query(
                            f'sum by (route) (rate(loopchat_http_requests_total{{route!="none"}}[{RATE}]))',
                            "{{route}}",
                        ),
                    ),
                    "reqps",
                ),
                Panel(
                    "Responses by status",
                    "HTTP responses per second by status code.",
                    (Query(f"sum by (status) (rate(loopchat_http_requests_total[{RATE}]))", "{{status}}"),),
                    "reqps",
                ),
                Panel(
                    "API error ratio",
                    "Share of /v1 requests answered with a 5xx (5 minutes).",
                    (Query("loopchat:api_error_ratio:rate5m", "5xx share"),),
                    "percentunit",
                    "stat",
                    width=4,
                    decimals=2,
                    thresholds=((0.01, "orange"), (0.05, "red")),
                ),
                Panel(
                    "Replicas ready",
                    "Serving processes whose engine is ready, of those scraped.",
                    (
                        Query("sum(loopchat_engine_ready)", "ready"),
                        Query('count(up{job="loopchat"})', "scraped"),
                    ),
                    "none",
                    "stat",
                    width=4,
                ),
                Panel(
                    "Completions by version",
                    "Chat completions per second by model version and finish reason.",
                    (
                        Query(
                            f"sum by (model_version, finish_reason) (rate(loopchat_chat_requests_total[{RATE}]))",
                            "{{model_version}} {{finish_reason}}",
                        ),
                    ),
                    "reqps",
                ),
                Panel(
                    "Completion errors",
                    "Completions that failed after they were accepted, by reason.",
                    (
                        Query(
                            f"sum by (model_version, reason) (rate(loopchat_chat_errors_total[{RATE}])) "
                            f"or sum(rate(loopchat_chat_requests_total[{RATE}])) * 0",
                            "{{model_version}} {{reason}}",
                        ),
                    ),
                    "reqps",
                ),
                Panel(
                    "Tokens",
                    "Prompt and completion tokens per second.",
                    (
                        Query(f"sum(rate(loopchat_prompt_tokens_total[{RATE}]))", "prompt"),
                        Query(f"sum(rate(loopchat_completion_tokens_total[{RATE}]))", "completion"),
                    ),
                    "short",
                ),
            ),
        ),
        Row(
            "Latency",
            (
                Panel(
                    "Time to first token",
                    "p50 and p95 by model version.",
                    _quantiles("loopchat_time_to_first_token_seconds"),
                    "s",
                ),
                Panel(
                    "Time per output token",
                    "p50 and p95 by model version (after the first token).",
                    _quantiles("loopchat_time_per_output_token_seconds"),
                    "s",
                ),
                Panel(
                    "End-to-end latency",
                    "p50 and p95 of a whole completion by model version.",
                    _quantiles("loopchat_chat_latency_seconds"),
                    "s",
                ),
                Panel(
                    "HTTP duration by route",
                    "p95 of every route, streams until their last byte.",
                    (
                        Query(
                            f"histogram_quantile(0.95, sum by (le, route) "
                            f"(rate(loopchat_http_request_duration_seconds_bucket[{RATE}])))",
                            "{{route}}",
                        ),
                    ),
                    "s",
                    width=24,
                ),
            ),
        ),
        Row(
            "Engine",
            (
                Panel(
                    "Requests in the engine",
                    "In flight in the API, running and waiting in the scheduler.",
                    (
                        Query("sum(loopchat_chat_inflight_requests)", "in flight"),
                        Query("sum(loopchat_engine_running_requests)", "running"),
                        Query("sum(loopchat_engine_waiting_requests)", "waiting"),
                    ),
                    "short",
                ),
                Panel(
                    "KV cache usage",
                    "Share of the KV cache in use (fullest replica).",
                    (Query("max(loopchat_engine_kv_cache_usage_ratio)", "KV cache"),),
                    "percentunit",
                ),
                Panel(
                    "Adapters",
                    "LoRA adapters loaded; versions a replica could not load (traffic to control).",
                    (
                        Query("max(loopchat_engine_loaded_adapters)", "loaded"),
                        Query("sum(loopchat_adapter_load_failed)", "failed to load"),
                    ),
                    "short",
                ),
                Panel(
                    "LoRA room",
                    "LoRA slots and largest rank the engines were built with (0: no LoRA, the "
                    "base model's speed); rises while a canary or a version requested by name is served.",
                    (
                        Query("max(loopchat_engine_lora_slots)", "slots"),
                        Query("max(loopchat_engine_lora_max_rank)", "max rank"),
                    ),
                    "none",
                ),
                Panel(
                    "Adapter loads",
                    "Adapter loads per hour by outcome.",
                    (Query("sum by (outcome) (increase(loopchat_adapter_loads_total[1h]))", "{{outcome}}"),),
                    "short",
                ),
                Panel(
                    "Adapter load time",
                    "p95 time to load an adapter into the engine.",
                    (
                        Query(
                            "histogram_quantile(0.95, sum by (le) (rate(loopchat_adapter_load_seconds_bucket[1h])))",
                            "p95",
                        ),
                    ),
                    "s",
                ),
                Panel(
                    "Registry revision",
                    "Revision each replica routes by (a laggard shows as the minimum).",
                    (
                        Query("min(loopchat_registry_revision)", "min"),
                        Query("max(loopchat_registry_revision)", "max"),
                    ),
                    "none",
                ),
            ),
        ),
        Row(
            "Conversation log",
            (
                Panel(
                    "Log writer",
                    "Records waiting in memory and in the on-disk spool (database outage).",
                    (
                        Query("sum(loopchat_feedback_queue_depth)", "queue"),
                        Query("sum(loopchat_feedback_spool_records)", "spool"),
                    ),
                    "short",
                ),
                Panel(
                    "Records written",
                    "Log and rating records per second by outcome.",
                    (
                        Query(
                            f"sum by (outcome) (rate(loopchat_feedback_records_total[{RATE}]))", "{{outcome}}"
                        ),
                    ),
                    "short",
                ),
                Panel(
                    "Batch commit time",
                    "p95 time to commit one batch of records.",
                    (
                        Query(
                            f"histogram_quantile(0.95, sum by (le) (rate(loopchat_feedback_batch_seconds_bucket[{RATE}])))",
                            "p95",
                        ),
                    ),
                    "s",
                ),
                Panel(
                    "Database up",
                    "1 while every replica's writer reaches the database.",
                    (Query("min(loopchat_feedback_database_up)", "database"),),
                    "none",
                    "stat",
                    width=4,
                    thresholds=((-1, "red"), (1, "green")),
                ),
            ),
        ),
    ],
)

EXPERIMENTS = Dashboard(
    uid="loopchat-experiments",
    title="loopchat / A/B experiments",
    description="The running experiment: traffic split, outcomes per variant, the sequential test, decisions.",
    rows=[
        Row(
            "Traffic",
            (
                Panel(
                    "Traffic weight",
                    "Share of the alias's traffic each variant gets.",
                    (
                        Query(
                            "max by (experiment, variant, model_version) (loopchat_experiment_weight_percent)",
                            "{{experiment}} {{variant}} ({{model_version}})",
                        ),
                    ),
                    "percent",
                ),
                Panel(
                    "Requests by variant",
                    "Completions per second routed to each variant.",
                    (
                        Query(
                            f'sum by (variant, model_version) (rate(loopchat_chat_requests_total{{variant!="none"}}[{RATE}]))',
                            "{{variant}} ({{model_version}})",
                        ),
                    ),
                    "reqps",
                ),
                Panel(
                    "Ratings by variant",
                    "Ratings per second by variant and kind.",
                    (
                        Query(
                            f'sum by (variant, kind) (rate(loopchat_feedback_ratings_total{{variant!="none"}}[{RATE}]))',
                            "{{variant}} {{kind}}",
                        ),
                    ),
                    "short",
                ),
            ),
        ),
        Row(
            "Outcomes and the test",
            (
                Panel(
                    "Positive rate (evaluator)",
                    "Positive share of judged ratings per variant at the last evaluation.",
                    (
                        Query(
                            "max by (experiment, variant) (loopchat_experiment_positive_rate)",
                            "{{experiment}} {{variant}}",
                        ),
                    ),
                    "percentunit",
                ),
                Panel(
                    "Positive rate (last hour)",
                    "Thumbs up among thumbs up and down per variant, last hour.",
                    (Query(_share("up", "up|down", "variant", "1h", 'variant!="none"'), "{{variant}}"),),
                    "percentunit",
                ),
                Panel(
                    "Always-valid p-value",
                    "Each candidate against the control; it decides below alpha.",
                    (
                        Query(
                            "min by (experiment, variant) (loopchat_experiment_p_value)",
                            "{{experiment}} {{variant}}",
                        ),
                    ),
                    "none",
                    decimals=4,
                ),
                Panel(
                    "Latency by version",
                    "p95 end-to-end latency by model version (guardrail input).",
                    (
                        Query(
                            f"histogram_quantile(0.95, sum by (le, model_version) "
                            f"(rate(loopchat_chat_latency_seconds_bucket[{RATE}])))",
                            "{{model_version}}",
                        ),
                    ),
                    "s",
                ),
                Panel(
                    "Errors by version",
                    "Failed completions per second by model version (guardrail input).",
                    (
                        Query(
                            f"sum by (model_version) (rate(loopchat_chat_errors_total[{RATE}])) "
                            f"or sum by (model_version) (rate(loopchat_chat_requests_total[{RATE}])) * 0",
                            "{{model_version}}",
                        ),
                    ),
                    "reqps",
                ),
                Panel(
                    "Decisions",
                    "A/B decisions in the database by action and by whom.",
                    (Query("max by (action, by) (loopchat_ab_decisions) > 0", "{{action}} ({{by}})"),),
                    "none",
                    "bargauge",
                ),
            ),
        ),
    ],
)

FEEDBACK_RETRAINING = Dashboard(
    uid="loopchat-feedback-retraining",
    title="loopchat / Feedback and retraining",
    description="What users say about each version, and the retraining runs that learn from it.",
    rows=[
        Row(
            "Feedback",
            (
                Panel(
                    "Ratings by kind",
                    "Ratings per second: thumbs, stars, comments, corrections, preferences.",
                    (Query(f"sum by (kind) (rate(loopchat_feedback_ratings_total[{RATE}]))", "{{kind}}"),),
                    "short",
                ),
                Panel(
                    "Positive share by version",
                    "Thumbs up among thumbs up and down, last hour.",
                    (Query(_share("up", "up|down", "model_version", "1h"), "{{model_version}}"),),
                    "percentunit",
                ),
                Panel(
                    "Negative share",
                    "Thumbs down share over 30 minutes against the service's day.",
                    (
                        Query("loopchat:negative_ratio:rate30m", "{{model_version}} {{variant}}"),
                        Query("loopchat:negative_ratio_all:rate1d", "all versions, 1 day"),
                    ),
                    "percentunit",
                ),
                Panel(
                    "Average stars",
                    "Mean star score by version, last hour.",
                    (
                        Query(
                            "sum by (model_version) (increase(loopchat_feedback_stars_sum[1h])) "
                            "/ sum by (model_version) (increase(loopchat_feedback_stars_count[1h]))",
                            "{{model_version}}",
                        ),
                    ),
                    "none",
                    decimals=2,
                ),
                Panel(
                    "Comments and corrections",
                    "Per hour, by version.",
                    (
                        Query(
                            'sum by (kind, model_version) (increase(loopchat_feedback_ratings_total{kind=~"comment|correction"}[1h]))',
                            "{{kind}} {{model_version}}",
                        ),
                    ),
                    "short",
                ),
                Panel(
                    "Side-by-side wins",
                    "Preferences per hour by the chosen answer's version.",
                    (
                        Query(
                            'sum by (model_version) (increase(loopchat_feedback_ratings_total{kind="preference"}[1h]))',
                            "{{model_version}}",
                        ),
                    ),
                    "short",
                ),
            ),
        ),
        Row(
            "Retraining",
            (
                Panel(
                    "Runs by outcome",
                    "Retraining runs in the database by status.",
                    (Query("max by (status) (loopchat_retrain_runs)", "{{status}}"),),
                    "none",
                    "bargauge",
                ),
                Panel(
                    "Since the last registered run",
                    "Time since a run last registered a candidate.",
                    (
                        Query(
                            'time() - max(loopchat_retrain_last_finished_timestamp_seconds{status="registered"})',
                            "since",
                        ),
                    ),
                    "s",
                    "stat",
                    width=4,
                ),
                Panel(
                    "Last gate",
                    "Whether the newest evaluated candidate passed the gate (1) or not (0).",
                    (Query("max(loopchat_retrain_last_gate_passed)", "passed"),),
                    "none",
                    "stat",
                    width=4,
                    thresholds=((-1, "red"), (1, "green")),
                ),
                Panel(
                    "Stage durations",
                    "Select, dataset, train and evaluate of the newest finished run.",
                    (Query("max by (stage) (loopchat_retrain_last_stage_seconds)", "{{stage}}"),),
                    "s",
                    "bargauge",
                ),
                Panel(
                    "Last evaluation",
                    "Held-out scores of the newest evaluated candidate and its champion.",
                    (Query("max by (model, metric) (loopchat_retrain_last_evaluation)", ""),),
                    "none",
                    "table",
                    width=16,
                    decimals=3,
                ),
                Panel(
                    "Counterfactual bias probe",
                    "Newest evaluated candidate and its champion, on prompts asked again with names, pronouns and "
                    "nationalities swapped: answer change (1 - token F1 between the two answers) and refusal gap "
                    "(difference of the refusal rates). Limits: gate.max_bias_change_increase, gate.max_refusal_gap.",
                    (
                        Query(
                            'max by (model, metric) (loopchat_retrain_last_evaluation{metric=~"bias_answer_change|bias_refusal_gap"})',
                            "{{model}} {{metric}}",
                        ),
                    ),
                    "percentunit",
                    "bargauge",
                    decimals=1,
                ),
            ),
        ),
    ],
)

DASHBOARDS = (SERVICE, EXPERIMENTS, FEEDBACK_RETRAINING)


def render_all() -> dict[str, str]:
    """File name -> JSON text of every dashboard."""
    return {f"{d.uid}.json": json.dumps(d.render(), indent=2) + "\n" for d in DASHBOARDS}


def main(argv: list[str]) -> None:
    target = Path(argv[0] if argv else "deploy/grafana/dashboards")
    target.mkdir(parents=True, exist_ok=True)
    for name, text in render_all().items():
        (target / name).write_text(text)
        print(f"wrote {target / name}")


if __name__ == "__main__":
    main(sys.argv[1:])
