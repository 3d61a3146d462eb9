"""One turn of the whole loop on the real engine, watched by a real Prometheus.

A reduced `loopchat demo` runs against the test server (simulated users chat and rate, a real
retraining run, a canary experiment decided by the sequential test) while Prometheus scrapes the
server every second with deploy/'s rules. Then: the loop learned the users' taste, and every
dashboard panel and every rule returns data.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from loopchat.local_server import free_port
from monitoring.dashboards import DASHBOARDS
from retrain.demo import DemoReport, run_demo
from tests.conftest import LiveServer
from tests.utils.prometheus import (
    PrometheusServer,
    expand_grafana_macros,
    metric_names,
    skip_or_fail_without_prometheus,
)

pytestmark = pytest.mark.engine

# Before the loop the base model practically never opens with "Sure!"; after one turn the
# candidate must do so in a clearly larger share of its answers.
MARGIN = 0.3


@pytest.fixture(scope="module")
def prometheus(
    live_server: LiveServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[PrometheusServer]:
    skip_or_fail_without_prometheus()
    server = PrometheusServer(
        tmp_path_factory.mktemp("prometheus"), live_server.url.removeprefix("http://"), free_port()
    )
    try:
        yield server
    finally:
        server.stop()


def other_traffic(url: str) -> None:
    """What the demo's users do not: stars, comments, side-by-side choices, a stream, bad input."""
    # The base model by name: the alias changes version when the demo promotes its candidate,
    # and a rate needs two values of one series.
    ask = {
        "model": "SmolLM2-135M-Instruct",
        "messages": [{"role": "user", "content": "Name a colour."}],
        "max_tokens": 8,
        "user": "watcher",
    }
    answer = httpx.post(f"{url}/v1/chat/completions", json=ask, timeout=120).json()
    rating = {"completion_id": answer["id"], "user": "watcher", "score": 4, "comment": "fine"}
    httpx.post(f"{url}/v1/feedback", json=rating, timeout=60).raise_for_status()
    pair = httpx.post(f"{url}/v1/chat/compare", json=ask, timeout=120).json()["completions"]
    choice = {
        "chosen_completion_id": pair[0]["id"],
        "rejected_completion_id": pair[1]["id"],
        "user": "watcher",
    }
    httpx.post(f"{url}/v1/feedback/preference", json=choice, timeout=60).raise_for_status()
    with httpx.stream("POST", f"{url}/v1/chat/completions", json={**ask, "stream": True}, timeout=120) as s:
        assert "[DONE]" in "".join(s.iter_text())
    assert httpx.post(f"{url}/v1/chat/completions", json={"messages": []}, timeout=30).status_code == 400


@pytest.fixture(scope="module")
def loop(
    live_server: LiveServer, prometheus: PrometheusServer, base_model_path: Path, tmp_path_factory
) -> Iterator[tuple[DemoReport, float]]:
    started = time.time()
    # Before and after the demo: Prometheus sees a new series' first value as its start, so
    # panels of rates and ratios need the second.
    other_traffic(live_server.url)
    report = run_demo(
        tmp_path_factory.mktemp("demo"),
        users=32,
        # Steps of 4 examples: the "Sure!" opening is learned about as fast per step as with the
        # demo's 8, in half the time.
        train_steps=30,
        batch_size=4,
        server_url=live_server.url,
        admin_token=live_server.admin_token,
        database_url=live_server.database_url,
        base_model=base_model_path,
    )
    for line in report.lines():
        print(line)
    try:
        other_traffic(live_server.url)
        # A few scrapes and rule evaluations after the last request, and a refresh of the
        # database-backed series (runs, decisions: every 2 s on the test server).
        time.sleep(5)
        yield report, started
    finally:
        # Leave the shared test server as it was: the base model active, no experiment running.
        url, headers = live_server.url, live_server.admin_headers
        experiment = report.decision.get("experiment")
        if experiment:
            httpx.post(f"{url}/admin/experiments/{experiment}/stop", headers=headers, timeout=30)
        httpx.put(f"{url}/admin/active", json={"name": "SmolLM2-135M-Instruct"}, headers=headers, timeout=30)
        if report.run.get("candidate"):
            httpx.delete(f"{url}/admin/adapters/{report.run['candidate']}", headers=headers, timeout=30)


def test_one_turn_of_the_loop_moves_answers_towards_the_users_taste(loop) -> None:
    report, _ = loop
    assert report.run["status"] == "registered", report.run["reason"]
    before, after = report.before.rate(), report.after.rate("candidate")
    assert report.after.by_variant.get("candidate", 0) >= 8
    assert after - before >= MARGIN, (before, after)
    assert report.decision["action"] == "promote" and report.decision["status"] == "promoted"


def _has_values(series: list[dict]) -> bool:
    """At least one sample that is a number (histogram_quantile gives NaN without traffic)."""
    values = [v for s in series for _, v in (s.get("values") or [s["value"]])]
    return any(v not in ("NaN", "+Inf", "-Inf") for v in values)


def declared(name: str, exposition: str) -> bool:
    """Whether /metrics declares the series (histograms declare the name without _bucket etc.)."""
    families = {name} | {name.removesuffix(suffix) for suffix in ("_bucket", "_sum", "_count")}
    return any(f"# TYPE {family} " in exposition for family in families)


def test_every_dashboard_panel_returns_data(
    loop, prometheus: PrometheusServer, live_server: LiveServer
) -> None:
    _, started = loop
    exposed = httpx.get(f"{live_server.url}/metrics", timeout=10).text
    recorded = {
        r["name"] for g in prometheus.api("rules")["groups"] for r in g["rules"] if r["type"] == "recording"
    }
    empty, checked = [], 0
    for dashboard in DASHBOARDS:
        rendered = dashboard.render()
        for panel in rendered["panels"]:
            for target in panel.get("targets", []):
                expr = expand_grafana_macros(target["expr"])
                # Every series a query reads is one the service exposes or a recording rule:
                # a misspelt name would otherwise just draw an empty panel.
                for name in metric_names(expr):
                    assert name in recorded or declared(name, exposed), (panel["title"], name)
                if target["instant"]:
                    series = prometheus.query(expr)
                else:
                    series = prometheus.api(
                        "query_range", query=expr, start=started, end=time.time(), step="2s"
                    )["result"]
                checked += 1
                if not _has_values(series):
                    empty.append(f"{rendered['title']} / {panel['title']}: {expr}")
    assert checked >= 40
    assert not empty, "panels without data:\n" + "\n".join(empty)


def test_every_rule_evaluates_on_live_series(loop, prometheus: PrometheusServer) -> None:
    groups = prometheus.api("rules")["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    assert len(rules) >= 15
    for rule in rules:
        assert rule["health"] == "ok", (rule["name"], rule.get("lastError"))
    recorded = {r["name"] for r in rules if r["type"] == "recording"}
    for name in recorded:
        assert _has_values(prometheus.query(name)), f"recording rule {name} has no data"
    # An alert returns series only while it fires: each series it reads must have data instead.
    for rule in rules:
        if rule["type"] != "alerting":
            continue
        prometheus.query(rule["query"])  # parses and evaluates
        for name in metric_names(rule["query"]) - recorded:
            assert prometheus.query(name), f"alert {rule['name']} reads {name}, which has no data"
    # Nothing is wrong with the service, so nothing fires (the up/ready alerts would show a
    # broken scrape config or engine).
    firing = [a["labels"]["alertname"] for a in prometheus.api("alerts")["alerts"] if a["state"] == "firing"]
    assert not firing, firing
