"""Load benchmark: 64 concurrent streaming chats for two minutes with ratings mixed in.

Starts `loopchat serve` (the real vLLM engine on the embedded model, bench/serving.py's engine
settings) in production mode on a fresh data directory and SQLite database, creates an API key,
then runs `--clients` closed-loop clients for `--duration` seconds. Each client streams a chat
(max_tokens `--max-tokens`, its own user) and rates every second answer (thumbs, one in four
with a comment). Afterwards it waits for the conversation log and checks what was kept:

- errors: any non-200 answer, transport error, in-band error event or stream without [DONE];
- completion rows: must equal the chat requests answered (every answer logged, none twice);
- rating rows (`rating_event`): must equal the ratings acknowledged.

Results go to bench/results/load.{json,md}; the server log to .data/bench/logs/load.log.
    .venv/bin/python -m bench.load [--clients 64] [--duration 120]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench import feedback as fb
from bench import harness


@dataclass
class Tally:
    requests: int = 0
    answered: int = 0
    tokens: int = 0
    ratings: int = 0
    rated: int = 0
    errors: list[str] = field(default_factory=list)
    ttft: list[float] = field(default_factory=list)
    latency: list[float] = field(default_factory=list)


async def client(index: int, url: str, key: str, deadline: float, args: argparse.Namespace, tally: Tally):
    rng = random.Random(index)
    user = f"load-user-{index}"
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=300, trust_env=False) as http:
        turn = 0
        while time.monotonic() < deadline:
            turn += 1
            ask = [{"role": "user", "content": harness.prompt_for(index, turn)}]
            body = {
                "model": "loopchat",
                "stream": True,
                "max_tokens": args.max_tokens,
                "temperature": 0.7,
                "user": user,
                "messages": ask,
            }
            tally.requests += 1
            started, first, done, completion_id = time.perf_counter(), None, False, None
            try:
                async with http.stream("POST", "/v1/chat/completions", json=body) as response:
                    if response.status_code != 200:
                        tally.errors.append(
                            f"chat {response.status_code}: {(await response.aread())[:200]!r}"
                        )
                        continue
                    completion_id = response.headers["x-loopchat-completion-id"]
                    async for line in response.aiter_lines():
                        if not line.startswith("data: "):
                            continue
                        data = line.removeprefix("data: ")
                        if data == "[DONE]":
                            done = True
                            break
                        event = json.loads(data)
                        if "error" in event:
                            tally.errors.append(f"in-band error: {event['error']}")
                            break
                        if event["choices"] and event["choices"][0]["delta"].get("content"):
                            first = first or time.perf_counter()
                            tally.tokens += 1
            except httpx.HTTPError as exc:
                tally.errors.append(f"chat transport: {type(exc).__name__}: {exc}")
                continue
            if not done:
                tally.errors.append("stream ended without [DONE]")
                continue
            tally.answered += 1
            tally.latency.append(time.perf_counter() - started)
            if first is not None:
                tally.ttft.append(first - started)
            if turn % 2 == 0:
                rating: dict[str, Any] = {
                    "completion_id": completion_id,
                    "user": user,
                    "rating": rng.choice(["up", "down"]),
                }
                if rng.random() < 0.25:
                    rating["comment"] = "<b>load</b> test comment"
                tally.ratings += 1
                try:
                    rated = await http.post("/v1/feedback", json=rating)
                except httpx.HTTPError as exc:
                    tally.errors.append(f"rating transport: {type(exc).__name__}: {exc}")
                    continue
                if rated.status_code == 200:
                    tally.rated += 1
                else:
                    tally.errors.append(f"rating {rated.status_code}: {rated.text[:200]}")


async def drive(url: str, key: str, args: argparse.Namespace) -> tuple[Tally, float]:
    tally = Tally()
    started = time.monotonic()
    deadline = started + args.duration
    await asyncio.gather(*(client(i, url, key, deadline, args, tally) for i in range(args.clients)))
    return tally, time.monotonic() - started


def create_key(database_url: str) -> str:
    from feedback.db import make_engine
    from serving.access import create_key as create

    engine = make_engine(database_url)
    try:
        _, token = create(engine, "load", requests_per_minute=100_000, max_concurrent=1_000)
    finally:
        engine.dispose()
    return token


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--duration", type=float, default=120.0)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--out", type=Path, default=harness.DEFAULT_OUT_DIR)
    args = parser.parse_args(argv)

    data_dir = fb.fresh_data_dir("load")
    database_url = f"sqlite:///{data_dir / 'loopchat.db'}"
    from feedback.db import migrate

    migrate(database_url)
    key = create_key(database_url)
    port = harness.free_port()
    spec = fb.loopchat_spec(
        port,
        data_dir=data_dir,
        database_url=database_url,
        log_completions=True,
        redact="storage",
        extra_env={"LOOPCHAT_ENVIRONMENT": "production"},
    )
    server = harness.Server(spec, port, harness.LOG_DIR / "load.log")
    print(f"starting loopchat on port {port} (log: {server.log_path})", flush=True)
    server.start()
    try:
        startup = server.wait_until_ready()
        print(f"ready after {startup:.1f} s; {args.clients} clients for {args.duration:g} s", flush=True)
        tally, elapsed = asyncio.run(drive(server.base_url, key, args))
        completions = fb.wait_for_count(database_url, "completion", tally.answered, timeout=60)
        rating_rows = fb.wait_for_count(database_url, "rating_event", tally.rated, timeout=60)
        alive = server.alive
    finally:
        exit_code = server.stop()

    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": fb.machine_info(),
        "clients": args.clients,
        "duration_s": round(elapsed, 1),
        "max_tokens": args.max_tokens,
        "chat_requests": tally.requests,
        "chat_answered": tally.answered,
        "completion_rows": completions,
        "ratings_sent": tally.ratings,
        "ratings_acknowledged": tally.rated,
        "rating_rows": rating_rows,
        "errors": len(tally.errors),
        "error_samples": tally.errors[:10],
        "tokens_per_s": round(tally.tokens / elapsed, 1),
        "ttft_p50_ms": harness.ms(harness.percentile(tally.ttft, 50)),
        "ttft_p95_ms": harness.ms(harness.percentile(tally.ttft, 95)),
        "latency_p95_ms": harness.ms(harness.percentile(tally.latency, 95)),
        "server_alive_after": alive,
        "server_exit_code": exit_code,
    }
    held = (
        not tally.errors
        and completions == tally.answered == tally.requests
        and rating_rows == tally.rated == tally.ratings
    )
    result["verdict"] = "PASS" if held else "FAIL"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "load.json").write_text(json.dumps(result, indent=2) + "\n")
    columns = [
        "chat requests",
        "answered",
        "completion rows",
        "ratings",
        "acknowledged",
        "rating rows",
        "errors",
        "tok/s",
        "TTFT p50 / p95 ms",
        "verdict",
    ]
    values = [
        tally.requests,
        tally.answered,
        completions,
        tally.ratings,
        tally.rated,
        rating_rows,
        len(tally.errors),
        result["tokens_per_s"],
        f"{result['ttft_p50_ms']} / {result['ttft_p95_ms']}",
        result["verdict"],
    ]
    title = f"# Load: {args.clients} streaming chats for {result['duration_s']} s with ratings"
    lines = [
        f"{title} ({result['date']})",
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
        "| " + " | ".join(str(v) for v in values) + " |",
    ]
    (args.out / "load.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    for sample in tally.errors[:10]:
        print("  error:", sample)
    return 0 if held else 1


if __name__ == "__main__":
    sys.exit(main())
