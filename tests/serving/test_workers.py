"""`loopchat serve --workers 2` on the real engine: two worker processes behind one port, one
database, metrics in Prometheus's multiprocess mode."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import data_dir, start_server
from tests.utils.db import wait_for_rows

pytestmark = pytest.mark.engine


def metric(text: str, name: str, **labels: str) -> float:
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    )


def test_two_workers_report_one_set_of_metrics(base_model_path: Path, tmp_path: Path) -> None:
    # Its own data folder: the workers' spools and metric files are looked at below.
    server = start_server(
        tmp_path,
        base_model_path,
        "--workers",
        "2",
        LOOPCHAT_DATA_DIR=str(tmp_path),
        LOOPCHAT_ENGINE__MAX_MODEL_LEN="1024",
        VLLM_CACHE_ROOT=str(data_dir() / "cache" / "vllm"),
    )
    url = server.url
    try:
        # Ready when both workers are: probes land on either, so ask until a run of them agrees.
        deadline, ready_in_a_row = time.monotonic() + 300, 0
        while ready_in_a_row < 10:
            assert server.process.poll() is None, server.log.read_text()[-3000:]
            assert time.monotonic() < deadline, server.log.read_text()[-3000:]
            try:
                ok = httpx.get(f"{url}/readyz", timeout=2).status_code == 200
            except httpx.TransportError:
                ok = False
            ready_in_a_row = ready_in_a_row + 1 if ok else 0
            time.sleep(0.2 if ok else 1)

        ask = {"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4}
        for i in range(6):
            response = httpx.post(f"{url}/v1/chat/completions", json={**ask, "user": f"u{i}"}, timeout=120)
            assert response.status_code == 200, response.text
        # Whichever worker answers the scrape reports both workers' completions.
        for _ in range(6):
            text = httpx.get(f"{url}/metrics", timeout=10).text
            assert metric(text, "loopchat_chat_requests_total", finish_reason="length") == 6
            assert metric(text, "loopchat_engine_ready") == 1  # the minimum over live workers
        assert len({p.name for p in (tmp_path / "metrics").glob("*.db")}) >= 2
        assert len(wait_for_rows(server.database_url, "SELECT id FROM completion", 6)) == 6
        assert len(list((tmp_path / "spool").glob("worker-*"))) == 2
    finally:
        assert server.stop(timeout=90) == 0
