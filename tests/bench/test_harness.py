"""The benchmarks' figures: percentiles and the window's token and request counts."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from bench.harness import Record, Server, ServerSpec, free_port, percentile, summarize


def test_percentile_interpolates_between_ranks() -> None:
    assert percentile([], 50) is None
    assert percentile([3.0], 95) == 3.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == pytest.approx(2.5)
    assert percentile([4.0, 1.0, 3.0, 2.0], 100) == 4.0


def test_a_request_straddling_the_window_counts_only_the_tokens_inside_it() -> None:
    # 10 tokens over 5 chunks at t = 8..12; the window is [10, 20): chunks 10, 11 and 12 count.
    straddling = Record(
        start=7.0, max_tokens=10, end=12.5, chunk_times=[8, 9, 10, 11, 12], completion_tokens=10
    )
    inside = Record(start=13.0, max_tokens=4, end=15.0, chunk_times=[13.5, 14, 14.5, 15], completion_tokens=4)
    failed = Record(start=16.0, max_tokens=4, end=16.2, error="HTTP 503: busy")
    summary = summarize([straddling, inside, failed], t0=10.0, t1=20.0, warmup_s=3.0, drain_s=0.0)
    assert summary["output_tokens"] == pytest.approx(6 + 4)
    assert summary["output_tok_s"] == pytest.approx(1.0)
    # Requests: those that finished inside the window; TTFT: those that started inside it.
    assert summary["requests"] == 2 and summary["requests_started"] == 1
    assert summary["ttft_p50_ms"] == pytest.approx(500.0)
    assert summary["errors"] == 1 and summary["error_samples"] == ["HTTP 503: busy"]
    assert summary["tok_s_by_second"][:6] == [2.0, 2.0, 2.0, 1.0, 2.0, 1.0]


def test_a_benchmarked_server_starts_counts_its_cpu_and_stops(tmp_path: Path) -> None:
    port = free_port()
    busy_then_serve = (
        "import http.server, sys, time\n"
        "end = time.process_time() + 0.2\n"
        "while time.process_time() < end: pass\n"
        "http.server.ThreadingHTTPServer(('127.0.0.1', int(sys.argv[1])), "
        "http.server.SimpleHTTPRequestHandler).serve_forever()\n"
    )
    spec = ServerSpec("toy", [sys.executable, "-c", busy_then_serve, str(port)], dict(os.environ), "/")
    server = Server(spec, port, tmp_path / "toy.log")
    server.start()
    try:
        assert 0 <= server.wait_until_ready(timeout=30) == server.start_s
        assert server.alive and server.base_url == f"http://127.0.0.1:{port}"
        assert server.cpu_seconds() >= 0.2
    finally:
        server.stop(timeout=5)
    assert not server.alive
