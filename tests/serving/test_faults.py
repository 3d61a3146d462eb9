"""Faults on a real server of its own: SIGTERM drains the streams in flight; an engine killed
after start turns readiness off and ends the process for its supervisor."""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest

from tests.conftest import start_server
from tests.utils.db import wait_for_rows

pytestmark = pytest.mark.engine


def test_sigterm_drains_a_stream_in_flight(base_model_path: Path, tmp_path: Path) -> None:
    server = start_server(tmp_path, base_model_path)
    events: list[str] = []
    first = threading.Event()

    def stream() -> None:
        body = {
            "messages": [{"role": "user", "content": "Count to a hundred."}],
            "max_tokens": 96,
            "ignore_eos": True,
            "stream": True,
        }
        with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=120) as response:
            for line in response.iter_lines():
                if line.startswith("data: "):
                    events.append(line.removeprefix("data: "))
                    first.set()

    reader = threading.Thread(target=stream)
    try:
        reader.start()
        assert first.wait(60)
        started = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        reader.join(60)
        # The stream ran to its end after the signal, and the process then exited cleanly.
        assert events[-1] == "[DONE]"
        finish = [
            json.loads(e)["choices"][0]["finish_reason"] for e in events[:-1] if json.loads(e)["choices"]
        ]
        assert finish[-1] == "length"
        # uvicorn ends by re-raising the signal it drained on, as a supervisor expects.
        assert server.process.wait(60) in (0, -signal.SIGTERM)
        assert time.monotonic() - started < 45  # within the 30 s drain plus engine shutdown
        row = wait_for_rows(server.database_url, "SELECT finish_reason, completion_tokens FROM completion", 1)
        assert (row[0]["finish_reason"], row[0]["completion_tokens"]) == ("length", 96)
    finally:
        server.stop()


def test_a_killed_engine_stops_the_service(base_model_path: Path, tmp_path: Path) -> None:
    server = start_server(tmp_path, base_model_path)
    try:
        children = psutil.Process(server.process.pid).children(recursive=True)
        cores = [p for p in children if p.name().startswith("VLLM::EngineCor")]
        assert cores, "no engine core process found"
        for core in cores:
            core.kill()
        # Readiness turns off (or the process is already gone), then the process exits with 3
        # so that a supervisor restarts it.
        deadline = time.monotonic() + 60
        while server.process.poll() is None and time.monotonic() < deadline:
            try:
                ready = httpx.get(f"{server.url}/readyz", timeout=2)
                if ready.status_code == 503:
                    assert ready.json()["status"] == "failed"
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        assert server.process.wait(30) == 3, server.log.read_text()[-3000:]
    finally:
        server.stop()
