"""`loopchat serve --workers 2` on the real engine: two worker processes behind one port, one
database, metrics in Prometheus's multiprocess mode."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import REPO, data_dir, free_port
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
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    database_url = f"sqlite:///{tmp_path / 'loopchat.db'}"
    env = {
        **os.environ,
        "LOOPCHAT_DATA_DIR": str(tmp_path),
        "LOOPCHAT_BASE_MODEL": str(base_model_path),
        "LOOPCHAT_DATABASE_URL": database_url,
        "LOOPCHAT_ENGINE__MAX_MODEL_LEN": "1024",
        "VLLM_CACHE_ROOT": str(data_dir() / "cache" / "vllm"),
    }
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    log = (tmp_path / "server.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "serving.cli", "serve", "--port", str(port), "--workers", "2"],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        # Ready when both workers are: probes land on either, so ask until a run of them agrees.
        deadline, ready_in_a_row = time.monotonic() + 300, 0
        while ready_in_a_row < 10:
            assert process.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            assert time.monotonic() < deadline, (tmp_path / "server.log").read_text()[-3000:]
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
        assert len(wait_for_rows(database_url, "SELECT id FROM completion", 6)) == 6
        assert len(list((tmp_path / "spool").glob("worker-*"))) == 2
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            assert process.wait(timeout=90) == 0
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
            log.close()
