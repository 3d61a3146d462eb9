"""A real Prometheus (Debian's package) on loopback, scraping a test server with deploy/'s rules."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from loopchat.local_server import ServerProcess

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "deploy" / "prometheus" / "rules" / "loopchat.yml"
# Grafana's interval macros, as Grafana would expand them on a 1 s scrape interval for the
# few minutes a test covers (every rate window then holds the whole test).
GRAFANA_MACROS = {"$__rate_interval": "5m", "$__interval": "15s", "$__range": "10m"}


def promtool() -> str | None:
    return shutil.which("promtool")


def skip_or_fail_without_prometheus() -> None:
    if shutil.which("prometheus") and promtool():
        return
    message = "prometheus and promtool not installed (Debian package prometheus; deploy/install.sh adds it)"
    if os.environ.get("LOOPCHAT_TEST_REQUIRE_PROMETHEUS"):
        pytest.fail(message)
    pytest.skip(message)


def expand_grafana_macros(expr: str) -> str:
    for macro, value in GRAFANA_MACROS.items():
        expr = expr.replace(macro, value)
    return expr


def metric_names(expr: str) -> set[str]:
    """loopchat series (metrics and recording rules) an expression reads."""
    without_strings = re.sub(r'"[^"]*"', '""', expr)  # job="loopchat" names no series
    return set(re.findall(r"\bloopchat[a-z0-9_:]*", without_strings))


class PrometheusServer:
    def __init__(self, workdir: Path, target: str, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.workdir = workdir
        config = yaml.safe_load((REPO / "deploy" / "prometheus" / "prometheus.yml").read_text())
        config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"}
        config["rule_files"] = [str(RULES)]
        # The loopchat job as deployed, with the test server as its one target.
        job = next(j for j in config["scrape_configs"] if j["job_name"] == "loopchat")
        job.pop("dns_sd_configs")
        job["static_configs"] = [{"targets": [target]}]
        config["scrape_configs"] = [job]
        config_path = workdir / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(config))
        self.log = workdir / "prometheus.log"
        command = [
            "prometheus",
            f"--config.file={config_path}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ]
        self.server = ServerProcess(command, log_path=self.log, name="prometheus").start()
        self.server.wait_ready(f"{self.url}/-/ready", timeout=60, interval=0.2)

    def api(self, path: str, **params: Any) -> Any:
        response = httpx.get(f"{self.url}/api/v1/{path}", params=params, timeout=30)
        body = response.json()
        if body.get("status") != "success":
            raise AssertionError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query's series; raises on a parse or evaluation error."""
        return self.api("query", query=expr)["result"]

    def stop(self) -> None:
        self.server.stop(timeout=30)
