"""The benchmarks' figures: percentiles and the window's token and request counts."""

from __future__ import annotations

import pytest

from bench.harness import Record, percentile, summarize


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
