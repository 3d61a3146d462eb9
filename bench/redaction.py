"""Redaction against the writer: what one request's text can cost, and who pays for it.

Worst-case texts (prose, runs of numbers, phone-number-like digits, e-mail addresses) are
redacted at three sizes: 4 KiB, one longest message (64 KiB) and one largest body (1 MiB).
Then a real writer on SQLite logs one 1 MiB phone-number-heavy completion while 200 ratings
are stored one after another (each waiting for its commit, as the feedback API does):

- `writer hold`: the longest time the writer thread spent on one batch (its whole job per
  record now that redaction runs before the queue), against what it would hold if it redacted
  that record itself (redaction + write, the design where the writer thread redacts).
- `rating latency`: p50 / p99 / max of the ratings' commits while the big record is redacted,
  against the same ratings with no big record in flight.

Results: a table on the console and bench/results/redaction.{json,md}.

Usage: .venv/bin/python -m bench.redaction
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import platform
import random
import statistics
import tempfile
import time
from pathlib import Path

from feedback.db import make_engine, migrate
from feedback.log import FeedbackWriter
from feedback.records import CompletionRecord, RatingRecord
from feedback.redact import Redactor
from feedback.service import record_redactor

REPO = Path(__file__).resolve().parent.parent

OUT = REPO / "bench" / "results"
SIZES = {"4 KiB": 4096, "64 KiB": 65536, "1 MiB": 2**20}


def texts(size: int) -> dict[str, str]:
    rng = random.Random(0)
    words = ["hello", "my", "order", "number", "is", "the", "phone", "call", "me", "at", "please"]
    return {
        "prose": " ".join(rng.choice(words) for _ in range(size // 4))[:size],
        "numbers": " ".join(str(rng.randint(100, 99999)) for _ in range(size // 5))[:size],
        "phones": " ".join(f"call +1 415 555 {rng.randint(1000, 9999)}" for _ in range(size // 20))[:size],
        "emails": " ".join(f"a{i}@ex.com" for i in range(size // 10))[:size],
    }


def timed(function, *args) -> float:
    started = time.perf_counter()
    function(*args)
    return time.perf_counter() - started


def completion(index: int, text: str) -> CompletionRecord:
    return CompletionRecord(
        id=f"chatcmpl-bench-{index:06d}",
        conversation_id=f"conv-{index}",
        user_key="u",
        created_at=time.time(),
        model_version="base",
        messages=[{"role": "user", "content": text}],
        prompt_hash=f"{index:064d}",
        response="ok",
        prompt_tokens=1,
        completion_tokens=1,
        finish_reason="stop",
    )


def rating(completion_id: str, index: int) -> RatingRecord:
    return RatingRecord(
        event_id=f"event-{index}-{time.time_ns()}",
        completion_id=completion_id,
        user_key=f"user-{index}",
        thumb="up",
        comment="fine",
        at=time.time(),
    )


async def ratings_under(writer: FeedbackWriter, target: str, big: str | None) -> tuple[list[float], float]:
    """Latencies of 200 ratings, with a big record submitted first when `big` is given."""
    pending = writer.submit(completion(999, big)) if big is not None else None
    latencies = []
    for index in range(200):
        started = time.perf_counter()
        await writer.submit_and_wait(rating(target, index))
        latencies.append(time.perf_counter() - started)
    still = pending is not None and not pending.done()
    if pending is not None:
        await asyncio.wrap_future(pending)
    return latencies, still


def summary(latencies: list[float]) -> dict[str, float]:
    ordered = sorted(latencies)
    return {
        "p50_ms": round(statistics.median(ordered) * 1000, 2),
        "p99_ms": round(ordered[int(len(ordered) * 0.99) - 1] * 1000, 2),
        "max_ms": round(ordered[-1] * 1000, 2),
    }


async def writer_run(redactor: Redactor, big: str) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        url = f"sqlite:///{folder}/bench.db"
        migrate(url)
        holds: list[float] = []
        writer = FeedbackWriter(
            make_engine(url),
            Path(folder) / "spool",
            redact=record_redactor(redactor),
            on_batch=lambda outcome, _n, seconds: holds.append(seconds) if outcome == "written" else None,
        )
        writer.start()
        writer.submit(completion(0, "hello")).result()
        quiet, _ = await ratings_under(writer, "chatcmpl-bench-000000", None)
        quiet_hold = max(holds)
        holds.clear()
        loaded, overlapped = await ratings_under(writer, "chatcmpl-bench-000000", big)
        writer.close()
        write_only = timed(writer._write, [completion(5000, big).row()])
    redact_big = timed(record_redactor(redactor), completion(1, big).row())
    return {
        "writer_hold_max_ms": round(max(holds) * 1000, 2),
        "writer_hold_max_quiet_ms": round(quiet_hold * 1000, 2),
        "writer_hold_if_it_redacted_ms": round((redact_big + write_only) * 1000, 1),
        "big_record_redaction_ms": round(redact_big * 1000, 1),
        "big_record_write_ms": round(write_only * 1000, 2),
        "big_record_still_redacting_after_200_ratings": overlapped,
        "ratings_quiet": summary(quiet),
        "ratings_during_big_redaction": summary(loaded),
    }


def main() -> None:
    redactor = Redactor()
    redaction = {
        f"{kind} {label}": round(timed(redactor.redact, text) * 1000, 2)
        for label, size in SIZES.items()
        for kind, text in texts(size).items()
    }
    for name, ms in redaction.items():
        print(f"redact {name}: {ms} ms", flush=True)
    writer = asyncio.run(writer_run(redactor, texts(2**20)["phones"]))
    print(json.dumps(writer, indent=2), flush=True)
    result = {
        "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {__import__('os').cpu_count()} cores",
        "redaction_ms": redaction,
        "writer": writer,
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "redaction.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"# Redaction and the writer ({result['when']}, {result['machine']})",
        "",
        "| text | redaction ms |",
        "|---|---|",
        *(f"| {name} | {ms} |" for name, ms in redaction.items()),
        "",
        "| writer, one 1 MiB phone-heavy record among 200 ratings | value |",
        "|---|---|",
        f"| longest writer hold on one batch, during the big redaction | {writer['writer_hold_max_ms']} ms |",
        f"| longest writer hold on one batch, quiet | {writer['writer_hold_max_quiet_ms']} ms |",
        f"| writer hold for the big record's own write | {writer['big_record_write_ms']} ms |",
        f"| writer hold if the writer thread redacted it | {writer['writer_hold_if_it_redacted_ms']} ms |",
        "| rating commit p50 / p99 / max, quiet | "
        f"{' / '.join(map(str, writer['ratings_quiet'].values()))} ms |",
        "| rating commit p50 / p99 / max, during the big redaction | "
        f"{' / '.join(map(str, writer['ratings_during_big_redaction'].values()))} ms |",
    ]
    (OUT / "redaction.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
