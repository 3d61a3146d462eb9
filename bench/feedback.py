"""Feedback benchmark: POST /v1/feedback under chat load (SQLite, PostgreSQL); chat with logging on/off.

Each scenario starts its own `python -m loopchat.cli serve` (the real vLLM engine on the embedded
model, the engine settings of bench/serving.py) as a subprocess on a free loopback port, with a
fresh data directory under .data/bench/feedback/<scenario>/ (so a fresh spool) and a fresh
database: a new SQLite file there, or the PostgreSQL database `loopchat_bench` dropped and
created again (and dropped at the end). Servers, CPU accounting and the chat client come from
bench/harness.py, so both benchmarks start and measure servers the same way.
Server logs go to .data/bench/logs/feedback-*.log.

Scenario A, ratings under chat load (once on SQLite, once on PostgreSQL):
1. a pool of `--pool` short completions (non-streaming, max_tokens 4, 16 at a time, users
   `user-0`..`user-49`) is created and the benchmark waits until the conversation log has
   written all of them;
2. background chat load starts: `--chat-concurrency` closed-loop streaming chats (max_tokens 64,
   ignore_eos, temperature 0, 0-100 ms pause, as bench/serving.py) run for the rest of the
   scenario, in their own thread (httpx, like bench/serving.py);
3. after `--warmup` seconds, a chat-only window (`--chat-baseline` s) measures chat tok/s
   without ratings;
4. `--rating-concurrency` closed-loop rating clients post to POST /v1/feedback back to back, a
   seeded mix of bodies (40% thumbs, 25% score with tags, 20% thumbs + comment, 15% score +
   correction; one comment in five holds an e-mail address or a phone number, so the default
   `redact: storage` policy has something to replace) about a random completion of the pool,
   each with the completion's `user`. After 2 s of ramp-up the window runs `--duration` s;
5. ratings stop (in-flight requests finish), then the chat load, and the benchmark counts the
   rows of `rating_event` and compares them with the 200 responses it received (a 200 means
   "stored": every acknowledged rating must be a row; nothing is spooled in a healthy run).

   - ratings/s: 200 responses received inside the window / window length.
   - p50/p95/p99: latency (request written -> whole response read) of the successful requests
     that started inside the window. errors: non-200 answers and transport errors, whole run.
   - chat tok/s: completion tokens received in the chat-only window and in the rating window
     (tokens spread over each request's content chunks, as bench/serving.py counts them).

The rating client is deliberately light: raw asyncio streams on uvloop, one keep-alive
HTTP/1.1 connection per client, request bytes built by hand, and only the status line and
Content-Length parsed. httpx costs several hundred microseconds of client CPU per request, which
on two cores would take CPU from the server under test; this client costs about 40-60 us per
rating, 2-4% of the machine at the rates seen (the table shows it: `rating client`, `client
us/rating`). 64 clients are enough: on the code measured first, 128 clients gave no more
ratings/s under chat load (the server, not the client count, set the rate). It runs in the
main thread; the chat client runs in a second thread. CPU is split per window into: the API
server process (uvicorn, FastAPI, the feedback writer thread), the engine core (the server's
child processes), PostgreSQL (processes named `postgres`), the rating client thread, the chat
client thread, and anything else on the machine (`other`; above 5% the row is marked
DISTURBED). Other work on this shared machine (a test suite with its own vLLM engine) ruins a
run, so before each server starts the script waits (up to `--quiet-wait` s) for an idle machine.

Scenario B, chat throughput with the conversation log on and off (SQLite): the same server
settings with LOOPCHAT_FEEDBACK__LOG_COMPLETIONS=false (off) or true (on), one fresh server per
round, alternating off, on, off, on ... (`--rounds` of each). Each round is bench/serving.py's
closed-loop streaming scenario: `--chat-concurrency` chats, max_tokens 64, a staggered warm-up,
then a `--chat-duration` s window. The figure is median(on tok/s) / median(off tok/s), target
>= 0.98. Servers of the same setting differ by up to about 6% on two cores (four off rounds in
one run: 72.7-76.9 tok/s; another process on the machine makes it +-10%), more than the 2%
looked for; alternating rounds and medians are the mitigation, and the per-round figures are
kept so the noise can be seen (with two rounds each, one run measured 0.978 and the next, with
four, 1.008: the verdict says "within noise" when a miss is smaller than the spread between
rounds of the same setting). With logging on, the `completion` table must end up
with one row per successful chat (the warm-up request included); with it off, with none.

Results: a table on the console, bench/results/feedback.json (every figure, the machine, the
git commit, versions, settings) and bench/results/feedback.md (with PASS/FAIL against the
targets: >= 1000 ratings/s on SQLite on two cores; chat throughput with logging >= 0.98 of
without). Targets are reported, not enforced: the exit status is 0 unless a server failed to
start or died, or the script itself failed.

A full run takes about 12 minutes (each server start is about 20 s; the on/off comparison is six
servers with three rounds).

Usage: .venv/bin/python -m bench.feedback [--duration 20] [--rating-concurrency 64]
       [--chat-concurrency 8] [--rounds 3] [--skip-postgres] [--skip-chat-ab]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import random
import shutil
import signal
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench import harness

REPO = Path(__file__).resolve().parent.parent


VENV_PYTHON = REPO / ".venv" / "bin" / "python"
MODEL_NAME = harness.MODEL_NAME
MODEL_PATH = harness.MODEL_PATH
WORK_DIR = harness.BENCH_DIR / "feedback"
LOG_DIR = harness.LOG_DIR
DEFAULT_OUT_DIR = REPO / "bench" / "results"
POSTGRES_ADMIN_URL = os.environ.get(
    "LOOPCHAT_BENCH_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
POSTGRES_DATABASE = "loopchat_bench"

RATINGS_TARGET = 1000.0  # ratings/s on SQLite, two cores
CHAT_RATIO_TARGET = 0.98  # chat tok/s with the conversation log / without
OTHER_CPU_MAX_PCT = harness.OTHER_CPU_MAX_PCT
RATING_RAMP_S = 2.0
POOL_CONCURRENCY = 16
POOL_USERS = 50
POOL_MAX_TOKENS = 4

COMMENTS = [
    "Too short.",
    "Clear and correct, thanks.",
    "It missed the point of my question.",
    "Good answer but a bit long.",
    "Wrong: the capital is not that city.",
    "Please reach me at jane.doe@example.com about this answer.",
    "Call me on +1 415 555 0134 if you need more context.",
    "Nice tone, helpful.",
    "Made up a fact in the second sentence.",
    "Exactly what I needed.",
]
CORRECTIONS = [
    "The capital of France is Paris.",
    "A prime number has exactly two divisors: one and itself.",
    "Water boils at 100 degrees Celsius at sea level.",
    "Plants make food by photosynthesis, using light, water and carbon dioxide.",
    "A spider has eight legs.",
]
TAGS = ["helpful", "accurate", "too-long", "too-short", "tone", "hallucination", "format"]


# --------------------------------------------------------------------------------------------
# Servers and databases
# --------------------------------------------------------------------------------------------


def loopchat_spec(
    port: int,
    *,
    data_dir: Path,
    database_url: str,
    log_completions: bool,
    redact: str,
    extra_env: dict[str, str] | None = None,
) -> Any:
    """bench/serving.py's loopchat server (same engine settings), on its own data dir and database."""
    spec = harness.loopchat_spec(port)
    spec.env.update(
        {
            "LOOPCHAT_DATA_DIR": str(data_dir),
            "LOOPCHAT_BASE_MODEL": str(MODEL_PATH),
            "LOOPCHAT_DATABASE_URL": database_url,
            "LOOPCHAT_FEEDBACK__LOG_COMPLETIONS": "true" if log_completions else "false",
            "LOOPCHAT_FEEDBACK__REDACT": redact,
            **(extra_env or {}),
        }
    )
    spec.command = [
        str(VENV_PYTHON),
        "-m",
        "loopchat.cli",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    return spec


def fresh_data_dir(name: str) -> Path:
    path = WORK_DIR / name
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def _sa_engine(url: str, **kwargs: Any):
    from sqlalchemy import create_engine

    return create_engine(url, **kwargs)


def recreate_postgres_database() -> str:
    """Drop and create the benchmark database; its URL."""
    from sqlalchemy import text
    from sqlalchemy.engine import make_url

    admin = _sa_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 5})
    try:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{POSTGRES_DATABASE}" WITH (FORCE)'))
            connection.execute(text(f'CREATE DATABASE "{POSTGRES_DATABASE}"'))
    finally:
        admin.dispose()
    url = make_url(POSTGRES_ADMIN_URL).set(database=POSTGRES_DATABASE)
    return url.render_as_string(hide_password=False)


def drop_postgres_database() -> None:
    from sqlalchemy import text

    with contextlib.suppress(Exception):
        admin = _sa_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{POSTGRES_DATABASE}" WITH (FORCE)'))
        admin.dispose()


def postgres_version() -> str | None:
    from sqlalchemy import text

    try:
        admin = _sa_engine(POSTGRES_ADMIN_URL, connect_args={"connect_timeout": 5})
        with admin.connect() as connection:
            version = connection.execute(text("SHOW server_version")).scalar()
        admin.dispose()
        return f"PostgreSQL {version}"
    except Exception as exc:
        print(f"PostgreSQL at {POSTGRES_ADMIN_URL} is not reachable: {type(exc).__name__}: {exc}")
        return None


def count_rows(url: str, table: str) -> int:
    from sqlalchemy import text

    engine = _sa_engine(url)
    try:
        with engine.connect() as connection:
            return int(connection.execute(text(f"SELECT count(*) FROM {table}")).scalar() or 0)
    finally:
        engine.dispose()


def wait_for_count(url: str, table: str, expected: int, timeout: float = 30.0) -> int:
    """Rows in `table` once there are `expected` (the log is written in the background), or at timeout."""
    deadline = time.monotonic() + timeout
    while True:
        count = count_rows(url, table)
        if count >= expected or time.monotonic() > deadline:
            return count
        time.sleep(0.2)


def scrape_metrics(base_url: str) -> dict[str, float]:
    """The feedback writer's counters from /metrics (`name{labels}` -> value)."""
    try:
        text = httpx.get(base_url + "/metrics/", timeout=10, trust_env=False).text
    except httpx.HTTPError:
        return {}
    out = {}
    for line in text.splitlines():
        if line.startswith("loopchat_feedback_"):
            name, _, value = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                out[name] = float(value)
    return out


def writer_figures(metrics: dict[str, float]) -> dict[str, Any]:
    def get(name: str) -> float:
        return metrics.get(name, 0.0)

    batches = get("loopchat_feedback_batch_seconds_count")
    written = get('loopchat_feedback_records_total{outcome="written"}')
    return {
        "written": int(written),
        "spooled": int(get('loopchat_feedback_records_total{outcome="spooled"}')),
        "rejected": int(get('loopchat_feedback_records_total{outcome="rejected"}')),
        "batches": int(batches),
        # Commits that took longer than 100 ms (from the histogram's buckets).
        "batches_over_100ms": int(batches - get('loopchat_feedback_batch_seconds_bucket{le="0.1"}')),
        "mean_batch_records": round(written / batches, 1) if batches else None,
        "mean_batch_ms": round(1000 * get("loopchat_feedback_batch_seconds_sum") / batches, 2)
        if batches
        else None,
    }


# --------------------------------------------------------------------------------------------
# CPU accounting
# --------------------------------------------------------------------------------------------


def _proc_seconds(proc: Any) -> float:
    times = proc.cpu_times()
    return times.user + times.system


def _thread_seconds(native_ids: set[int]) -> float:
    import psutil

    total = 0.0
    with contextlib.suppress(psutil.Error):
        for thread in psutil.Process().threads():
            if thread.id in native_ids:
                total += thread.user_time + thread.system_time
    return total


class CpuSampler:
    """Cumulative CPU seconds of each party; `split(a, b)` turns two samples into shares of all cores."""

    def __init__(self, server: Any, *, rating_threads: set[int], chat_threads: set[int]) -> None:
        self.server = server
        self.rating_threads = rating_threads
        self.chat_threads = chat_threads
        self.postgres: dict[int, Any] = {}

    def _postgres_seconds(self) -> float:
        import psutil

        for proc in psutil.process_iter(["name"]):
            if proc.info["name"] == "postgres" and proc.pid not in self.postgres:
                self.postgres[proc.pid] = proc
        total = 0.0
        for pid, proc in list(self.postgres.items()):
            try:
                total += _proc_seconds(proc)
            except psutil.Error:
                # An exited backend's CPU time is lost; its last reading is kept.
                del self.postgres[pid]
        return total

    def sample(self) -> dict[str, float]:
        import psutil

        api = engine = 0.0
        if self.server.process is not None:
            with contextlib.suppress(psutil.Error):
                root = psutil.Process(self.server.process.pid)
                api = _proc_seconds(root)
                for child in root.children(recursive=True):
                    with contextlib.suppress(psutil.Error):
                        engine += _proc_seconds(child)
        own = os.times()
        busy, steal = harness.system_cpu()
        return {
            "t": time.monotonic(),
            "api": api,
            "engine": engine,
            "postgres": self._postgres_seconds(),
            "rating_client": _thread_seconds(self.rating_threads),
            "chat_client": _thread_seconds(self.chat_threads),
            "client": own.user + own.system,
            "busy": busy,
            "steal": steal,
        }

    @staticmethod
    def split(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
        wall = max(b["t"] - a["t"], 1e-9) * (os.cpu_count() or 1)
        d = {k: b[k] - a[k] for k in a}
        # Postgres backends that exited are not counted, so this can be slightly low.
        other = d["busy"] - d["api"] - d["engine"] - d["postgres"] - d["client"]

        def pct(seconds: float) -> float:
            return round(100 * max(seconds, 0.0) / wall, 1)

        return {
            "server_api_cpu_pct": pct(d["api"]),
            "engine_cpu_pct": pct(d["engine"]),
            "server_cpu_pct": pct(d["api"] + d["engine"]),
            "postgres_cpu_pct": pct(d["postgres"]),
            "rating_client_cpu_pct": pct(d["rating_client"]),
            "chat_client_cpu_pct": pct(d["chat_client"]),
            "client_cpu_pct": pct(d["client"]),
            "other_cpu_pct": pct(other),
            "steal_pct": pct(d["steal"]),
        }


# --------------------------------------------------------------------------------------------
# Completion pool
# --------------------------------------------------------------------------------------------


async def _make_pool(base_url: str, size: int) -> tuple[list[tuple[str, str]], list[str]]:
    """`size` short completions: (completion id, user) pairs, and the errors met."""
    pool: list[tuple[str, str]] = []
    errors: list[str] = []
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(size):
        queue.put_nowait(i)
    async with httpx.AsyncClient(base_url=base_url, timeout=120.0, trust_env=False) as client:

        async def worker() -> None:
            while not queue.empty():
                i = queue.get_nowait()
                user = f"user-{i % POOL_USERS}"
                body = {
                    "model": MODEL_NAME,
                    "messages": [
                        {"role": "user", "content": f"{harness.PROMPTS[i % len(harness.PROMPTS)]} ({i})"}
                    ],
                    "max_tokens": POOL_MAX_TOKENS,
                    "temperature": 0,
                    "user": user,
                }
                try:
                    resp = await client.post("/v1/chat/completions", json=body)
                    if resp.status_code == 200:
                        pool.append((resp.json()["id"], user))
                    else:
                        errors.append(f"HTTP {resp.status_code}: {resp.text[:200]}")
                except httpx.HTTPError as exc:
                    errors.append(f"{type(exc).__name__}: {exc}"[:200])

        await asyncio.gather(*(worker() for _ in range(POOL_CONCURRENCY)))
    return pool, errors


# --------------------------------------------------------------------------------------------
# Background chat load (its own thread and event loop)
# --------------------------------------------------------------------------------------------


class ChatLoad:
    """Closed-loop streaming chats until stopped, in a thread; records every request."""

    def __init__(self, base_url: str, concurrency: int, max_tokens: int, jitter_s: float) -> None:
        self.base_url = base_url
        self.concurrency = concurrency
        self.max_tokens = max_tokens
        self.jitter_s = jitter_s
        self.records: list[Any] = []
        self.native_id: int | None = None
        self._stop = threading.Event()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._main, name="chat-load", daemon=True)
        self.error: BaseException | None = None

    def start(self) -> None:
        self._thread.start()
        self._started.wait(10)

    def stop(self, timeout: float = harness.REQUEST_TIMEOUT_S) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def _main(self) -> None:
        self.native_id = threading.get_native_id()
        self._started.set()
        try:
            asyncio.run(self._run())
        except BaseException as exc:  # reported by the caller
            self.error = exc

    async def _run(self) -> None:
        n = self.concurrency
        limits = httpx.Limits(max_connections=n + 4, max_keepalive_connections=n + 4)
        timeout = httpx.Timeout(harness.REQUEST_TIMEOUT_S, connect=10.0)
        async with httpx.AsyncClient(
            base_url=self.base_url, limits=limits, timeout=timeout, trust_env=False
        ) as client:

            async def worker(i: int) -> None:
                rng = random.Random(1000 + i)
                k = 0
                while not self._stop.is_set():
                    # Staggered first requests, as bench/serving.py: no waves of equal requests.
                    tokens = self.max_tokens if k else max(1, -(-self.max_tokens * (i + 1) // n))
                    rec = await harness.stream_chat(client, MODEL_NAME, harness.prompt_for(i, k), tokens)
                    self.records.append(rec)
                    k += 1
                    if rec.error is not None:
                        await asyncio.sleep(0.1)
                    elif self.jitter_s > 0:
                        await asyncio.sleep(rng.uniform(0.0, self.jitter_s))

            await asyncio.gather(*(worker(i) for i in range(n)))

    def tok_s(self, t0: float, t1: float) -> float:
        tokens = sum(r.tokens_between(t0, t1) for r in list(self.records) if r.error is None)
        return round(tokens / (t1 - t0), 2)

    def summary(self) -> dict[str, Any]:
        records = list(self.records)
        errors = [r for r in records if r.error is not None]
        return {
            "requests_total": len(records),
            "errors": len(errors),
            "error_samples": sorted({r.error for r in errors if r.error})[:5],
        }


# --------------------------------------------------------------------------------------------
# Rating load: raw HTTP/1.1 over asyncio streams
# --------------------------------------------------------------------------------------------


def rating_body(rng: random.Random, completion_id: str, user: str) -> dict[str, Any]:
    kind = rng.random()
    body: dict[str, Any] = {"completion_id": completion_id, "user": user}
    if kind < 0.40:
        body["rating"] = rng.choice(("up", "down"))
    elif kind < 0.65:
        body["score"] = rng.randint(1, 5)
        body["tags"] = rng.sample(TAGS, rng.randint(1, 3))
    elif kind < 0.85:
        body["rating"] = rng.choice(("up", "down"))
        body["comment"] = rng.choice(COMMENTS)
    else:
        body["score"] = rng.randint(1, 3)
        body["correction"] = rng.choice(CORRECTIONS)
    return body


@dataclass
class RatingStats:
    # (start, end) of each 200 response, perf_counter seconds.
    ok: list[tuple[float, float]] = field(default_factory=list)
    errors: list[tuple[float, str]] = field(default_factory=list)
    reconnects: int = 0


async def _rating_client(
    index: int,
    host: str,
    port: int,
    pool: Sequence[tuple[str, str]],
    stats: RatingStats,
    stop: asyncio.Event,
) -> None:
    rng = random.Random(index)
    head = (
        f"POST /v1/feedback HTTP/1.1\r\nHost: {host}:{port}\r\n"
        "Content-Type: application/json\r\nAccept: application/json\r\nContent-Length: "
    ).encode()
    reader = writer = None
    while not stop.is_set():
        if writer is None:
            try:
                reader, writer = await asyncio.open_connection(host, port)
            except OSError as exc:
                stats.errors.append((time.perf_counter(), f"connect: {exc}"[:200]))
                await asyncio.sleep(0.1)
                continue
        assert reader is not None
        completion_id, user = pool[rng.randrange(len(pool))]
        payload = json.dumps(rating_body(rng, completion_id, user), separators=(",", ":")).encode()
        start = time.perf_counter()
        try:
            writer.write(head + str(len(payload)).encode() + b"\r\n\r\n" + payload)
            header = await reader.readuntil(b"\r\n\r\n")
            status = int(header[9:12])
            lower = header.lower()
            pos = lower.find(b"content-length:")
            length = int(lower[pos + 15 : lower.index(b"\r\n", pos)]) if pos >= 0 else 0
            body = await reader.readexactly(length) if length else b""
            end = time.perf_counter()
            if status == 200:
                stats.ok.append((start, end))
            else:
                stats.errors.append((end, f"HTTP {status}: {body[:200].decode(errors='replace')}"))
            if b"connection: close" in lower:
                writer.close()
                writer = None
                stats.reconnects += 1
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
            stats.errors.append((time.perf_counter(), f"{type(exc).__name__}: {exc}"[:200]))
            with contextlib.suppress(Exception):
                writer.close()
            writer = None
            stats.reconnects += 1
            await asyncio.sleep(0.05)
    if writer is not None:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def run_ratings(
    base_url: str,
    pool: Sequence[tuple[str, str]],
    *,
    concurrency: int,
    duration_s: float,
    on_window: Callable[[str], None],
) -> tuple[RatingStats, float, float, float]:
    """Closed loop of `concurrency` rating clients: ramp-up, window, then drain.

    `on_window("start" | "end")` is called at the window's edges (CPU samples).
    Returns the stats, the window (t0, t1) and the drain time.
    """
    host, port = base_url.removeprefix("http://").split(":")
    stats = RatingStats()
    stop = asyncio.Event()
    tasks = [
        asyncio.create_task(_rating_client(i, host, int(port), pool, stats, stop)) for i in range(concurrency)
    ]
    await asyncio.sleep(RATING_RAMP_S)
    on_window("start")
    t0 = time.perf_counter()
    await asyncio.sleep(duration_s)
    t1 = time.perf_counter()
    on_window("end")
    stop.set()
    await asyncio.gather(*tasks)
    return stats, t0, t1, time.perf_counter() - t1


def _new_event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop

        return uvloop.new_event_loop()
    except ImportError:
        return asyncio.new_event_loop()


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000.0, 2)


def summarize_ratings(stats: RatingStats, t0: float, t1: float) -> dict[str, Any]:
    duration = t1 - t0
    done = [1 for _s, e in stats.ok if t0 <= e < t1]
    latency = [e - s for s, e in stats.ok if t0 <= s < t1]
    return {
        "window_s": round(duration, 2),
        "ratings_in_window": len(done),
        "ratings_s": round(len(done) / duration, 1),
        "latency_p50_ms": _ms(harness.percentile(latency, 50)),
        "latency_p95_ms": _ms(harness.percentile(latency, 95)),
        "latency_p99_ms": _ms(harness.percentile(latency, 99)),
        "latency_max_ms": _ms(max(latency)) if latency else None,
        "ok_total": len(stats.ok),
        "errors": len(stats.errors),
        "errors_in_window": sum(1 for t, _ in stats.errors if t0 <= t < t1),
        "error_samples": sorted({e for _, e in stats.errors})[:5],
        "reconnects": stats.reconnects,
        "timeline": timeline(stats, t0, t1),
    }


def timeline(stats: RatingStats, t0: float, t1: float, step: float = 0.5) -> list[dict[str, Any]]:
    """Per `step` seconds of the window: ratings finished, and the slowest of them (stalls show)."""
    buckets: list[list[float]] = [[] for _ in range(max(1, int((t1 - t0) / step + 0.999)))]
    for start, end in stats.ok:
        if t0 <= end < t1:
            buckets[min(int((end - t0) / step), len(buckets) - 1)].append(end - start)
    return [
        {"t": round(i * step, 2), "ratings": len(b), "max_ms": _ms(max(b)) if b else None}
        for i, b in enumerate(buckets)
    ]


# --------------------------------------------------------------------------------------------
# Scenario A: ratings under chat load
# --------------------------------------------------------------------------------------------


@dataclass
class RunResult:
    name: str
    database: str
    log: str = ""
    startup_s: float | None = None
    exit_code: int | None = None
    failure: str | None = None
    waited_for_quiet_s: float = 0.0
    figures: dict[str, Any] = field(default_factory=dict)


def server_options(args: argparse.Namespace, data_dir: Path, url: str, *, log: bool) -> dict[str, Any]:
    return {
        "data_dir": data_dir,
        "database_url": url,
        "log_completions": log,
        "redact": args.redact,
        "extra_env": args.server_env,
    }


def start_server(name: str, spec_kwargs: dict[str, Any], result: RunResult, quiet_wait: float) -> Any:
    result.waited_for_quiet_s = wait_for_quiet(quiet_wait) if quiet_wait > 0 else 0.0
    port = harness.free_port()
    spec = loopchat_spec(port, **spec_kwargs)
    server = harness.Server(spec, port, LOG_DIR / f"feedback-{name}.log")
    result.log = str(server.log_path)
    print(f"\n== {name}: starting loopchat on port {port} (log: {server.log_path})", flush=True)
    server.start()
    result.startup_s = round(server.wait_until_ready(), 1)
    print(f"  ready after {result.startup_s:.1f} s", flush=True)
    return server


def _stop_server(server: Any, result: RunResult) -> None:
    if server is None:
        return
    result.exit_code = server.stop()
    if result.failure is None and result.exit_code not in (0, None, -signal.SIGTERM):
        print(f"  note: server exited with status {result.exit_code}; see {server.log_path}")


def ratings_scenario(database: str, args: argparse.Namespace) -> RunResult:
    name = f"ratings-{database}"
    result = RunResult(name=name, database=database)
    data_dir = fresh_data_dir(name)
    url = f"sqlite:///{data_dir / 'loopchat.db'}" if database == "sqlite" else recreate_postgres_database()
    server = chat = None
    try:
        options = server_options(args, data_dir, url, log=True)
        server = start_server(name, options, result, args.quiet_wait)
        prime_errors = harness.prime_server(server, [MODEL_NAME], 64)
        began = time.monotonic()
        pool, pool_errors = asyncio.run(_make_pool(server.base_url, args.pool))
        pool_s = time.monotonic() - began
        logged = wait_for_count(url, "completion", len(pool) + 1)
        print(
            f"  pool: {len(pool)} completions in {pool_s:.1f} s ({len(pool_errors)} errors), "
            f"{logged} completion rows",
            flush=True,
        )
        if len(pool) < max(1, args.pool // 2):
            raise harness.ServerFailure(f"could not create the completion pool: {pool_errors[:3]}")

        chat = ChatLoad(server.base_url, args.chat_concurrency, args.max_tokens, args.jitter_ms / 1000)
        chat.start()
        cpu = CpuSampler(
            server, rating_threads={threading.get_native_id()}, chat_threads={chat.native_id or -1}
        )
        time.sleep(args.warmup)
        c0, b0 = time.perf_counter(), cpu.sample()
        time.sleep(args.chat_baseline)
        c1, b1 = time.perf_counter(), cpu.sample()
        baseline = CpuSampler.split(b0, b1)
        print(
            f"  chat only: CPU api {baseline['server_api_cpu_pct']}%, engine {baseline['engine_cpu_pct']}%, "
            f"other {baseline['other_cpu_pct']}%",
            flush=True,
        )
        print(
            f"  ratings: {args.rating_concurrency} clients, {RATING_RAMP_S:g} s ramp-up + "
            f"{args.duration:g} s window ...",
            flush=True,
        )
        samples: dict[str, dict[str, float]] = {}
        profile_path = LOG_DIR / f"feedback-{name}.pyspy.txt"

        def on_window(edge: str) -> None:
            samples[edge] = cpu.sample()
            if edge == "start" and args.profile:
                start_profiler(server.process.pid, profile_path, args.duration)

        runner = asyncio.Runner(loop_factory=_new_event_loop)
        with runner:
            stats, t0, t1, drain_s = runner.run(
                run_ratings(
                    server.base_url,
                    pool,
                    concurrency=args.rating_concurrency,
                    duration_s=args.duration,
                    on_window=on_window,
                )
            )
        # Chat figures once every chat has finished: requests still streaming at a window's end
        # delivered tokens inside it too.
        chat.stop()
        baseline["chat_tok_s"] = chat.tok_s(c0, c1)
        under_ratings_tok_s = chat.tok_s(t0, t1)
        if chat.error is not None:
            raise harness.ServerFailure(f"chat load failed: {chat.error!r}")
        if not server.alive:
            raise harness.ServerFailure("server died during the scenario")
        figures = summarize_ratings(stats, t0, t1)
        figures.update(CpuSampler.split(samples["start"], samples["end"]))
        rating_cpu_s = samples["end"]["rating_client"] - samples["start"]["rating_client"]
        api_cpu_s = samples["end"]["api"] - samples["start"]["api"]
        done = figures["ratings_in_window"]
        figures["client_us_per_rating"] = round(1e6 * rating_cpu_s / done, 1) if done else None
        figures["drain_s"] = round(drain_s, 2)
        rows = count_rows(url, "rating_event")
        current = count_rows(url, "rating")
        writer = writer_figures(scrape_metrics(server.base_url))
        figures.update(
            {
                "pool": len(pool),
                "pool_s": round(pool_s, 1),
                "pool_errors": len(pool_errors),
                "prime_errors": prime_errors,
                "completion_rows_before": logged,
                "rating_event_rows": rows,
                "rating_rows": current,
                "rows_match": rows == figures["ok_total"],
                "writer": writer,
                "chat": {
                    "concurrency": args.chat_concurrency,
                    "tok_s_without_ratings": baseline["chat_tok_s"],
                    "tok_s_with_ratings": under_ratings_tok_s,
                    "cpu_without_ratings": baseline,
                    **chat.summary(),
                },
                "api_ms_cpu_per_rating": round(1e3 * api_cpu_s / done, 3) if done else None,
            }
        )
        result.figures = figures
        print(
            f"    {figures['ratings_s']:.1f} ratings/s, p50 {harness.fmt(figures['latency_p50_ms'])} ms, "
            f"p99 {harness.fmt(figures['latency_p99_ms'])} ms, errors {figures['errors']}; chat "
            f"{under_ratings_tok_s} tok/s (without ratings {baseline['chat_tok_s']}); CPU: api "
            f"{figures['server_api_cpu_pct']}%, engine {figures['engine_cpu_pct']}%, postgres "
            f"{figures['postgres_cpu_pct']}%, rating client {figures['rating_client_cpu_pct']}% "
            f"({harness.fmt(figures['client_us_per_rating'])} us/rating), chat client "
            f"{figures['chat_client_cpu_pct']}%, other {figures['other_cpu_pct']}%",
            flush=True,
        )
        print(
            f"    rating_event rows: {rows}, 200 responses: {figures['ok_total']} -> "
            + ("match" if figures["rows_match"] else "MISMATCH")
            + f"; writer: {writer['batches']} batches, {harness.fmt(writer['mean_batch_records'])} "
            f"records/batch, {harness.fmt(writer['mean_batch_ms'], 2)} ms/batch, spooled {writer['spooled']}",
            flush=True,
        )
        if figures["error_samples"]:
            print(f"    error samples: {figures['error_samples']}")
    except (harness.ServerFailure, httpx.HTTPError) as exc:
        result.failure = f"{type(exc).__name__}: {exc}"
        print(f"  FAILED: {exc}")
    finally:
        if chat is not None:
            chat.stop(timeout=30)
        print("  stopping the server ...", flush=True)
        _stop_server(server, result)
        if database == "postgres":
            drop_postgres_database()
    return result


def start_profiler(pid: int, path: Path, duration: float) -> None:
    """py-spy record (collapsed stacks, per thread) of the API process during the window.

    Only with --profile: py-spy's own CPU shows as `other`, so profiled runs are not the
    figures to quote.
    """
    py_spy = shutil.which("py-spy", path=str(VENV_PYTHON.parent)) or shutil.which("py-spy")
    if py_spy is None:
        print("  --profile: py-spy not found (pip install py-spy)")
        return
    import subprocess

    command = [
        py_spy,
        "record",
        "--pid",
        str(pid),
        "--duration",
        str(max(1, int(duration) - 1)),
        "--rate",
        "100",
        "--threads",
        "--nonblocking",
        "--format",
        "raw",
        "--output",
        str(path),
    ]
    subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    print(f"  profiling the API process into {path}")


def wait_for_quiet(max_wait: float, threshold_pct: float = 10.0) -> float:
    """Before a server starts: wait (up to `max_wait` s) until the machine is nearly idle.

    Other work on the machine (a test suite starting its own vLLM engine) would take the same
    two cores. Returns the seconds waited.
    """
    began = time.monotonic()
    cpus = os.cpu_count() or 1
    while True:
        busy0, _ = harness.system_cpu()
        time.sleep(3.0)
        busy1, _ = harness.system_cpu()
        busy_pct = 100 * (busy1 - busy0) / (3.0 * cpus)
        waited = time.monotonic() - began
        if busy_pct < threshold_pct:
            return round(waited - 3.0, 1)
        if waited >= max_wait:
            print(f"  machine still busy ({busy_pct:.0f}% CPU) after {waited:.0f} s; going on")
            return round(waited, 1)
        if waited < 4.0:
            print(f"  machine busy ({busy_pct:.0f}% CPU): waiting up to {max_wait:.0f} s", flush=True)


# --------------------------------------------------------------------------------------------
# Scenario B: chat throughput, conversation log on / off
# --------------------------------------------------------------------------------------------


def chat_ab_round(mode: str, round_index: int, args: argparse.Namespace) -> RunResult:
    name = f"chat-log-{mode}-r{round_index + 1}"
    result = RunResult(name=name, database="sqlite")
    data_dir = fresh_data_dir(name)
    url = f"sqlite:///{data_dir / 'loopchat.db'}"
    server = None
    try:
        options = server_options(args, data_dir, url, log=mode == "on")
        server = start_server(name, options, result, args.quiet_wait)
        prime_errors = harness.prime_server(server, [MODEL_NAME], args.max_tokens)
        print(f"  {args.chat_concurrency} streaming chats, {args.chat_duration:g} s window ...", flush=True)
        # CPU over the whole scenario (warm-up, window, drain), split API process / engine.
        cpu = CpuSampler(server, rating_threads=set(), chat_threads={threading.get_native_id()})
        before = cpu.sample()
        summary = asyncio.run(
            harness.run_scenario(
                server.base_url,
                args.chat_concurrency,
                models=[MODEL_NAME],
                warmup_s=args.warmup,
                duration_s=args.chat_duration,
                max_tokens=args.max_tokens,
                jitter_s=args.jitter_ms / 1000.0,
                server_alive=lambda: server.alive,
            )
        )
        summary.update(CpuSampler.split(before, cpu.sample()))
        successful = summary["requests_total"] - summary["errors"] + 1 - len(prime_errors)
        expected = successful if mode == "on" else 0
        rows = (
            wait_for_count(url, "completion", expected, timeout=10.0)
            if mode == "on"
            else count_rows(url, "completion")
        )
        summary.update(
            mode=mode,
            round=round_index + 1,
            successful_chats=successful,
            completion_rows=rows,
            rows_match=rows == expected,
            prime_errors=prime_errors,
            writer=writer_figures(scrape_metrics(server.base_url)),
        )
        result.figures = summary
        print(
            f"    {summary['output_tok_s']:.1f} tok/s, {summary['requests']} requests, TTFT p50 "
            f"{harness.fmt(summary['ttft_p50_ms'])} ms, errors {summary['errors']}; completion rows {rows} "
            f"for {successful} chats ({'match' if summary['rows_match'] else 'MISMATCH'}); CPU: api "
            f"{summary['server_api_cpu_pct']}%, engine {summary['engine_cpu_pct']}%, client "
            f"{summary['client_cpu_pct']}%, other {summary['other_cpu_pct']}%",
            flush=True,
        )
    except (harness.ServerFailure, httpx.HTTPError) as exc:
        result.failure = f"{type(exc).__name__}: {exc}"
        print(f"  FAILED: {exc}")
    finally:
        print("  stopping the server ...", flush=True)
        _stop_server(server, result)
    return result


def chat_comparison(runs: list[RunResult]) -> dict[str, Any] | None:
    ok = [r for r in runs if r.failure is None and r.figures]
    off = [r.figures["output_tok_s"] for r in ok if r.figures["mode"] == "off"]
    on = [r.figures["output_tok_s"] for r in ok if r.figures["mode"] == "on"]
    if not off or not on:
        return None
    ratio = statistics.median(on) / statistics.median(off)
    # Each on round against the off round just before it: the drift-free pairing.
    pairs = []
    for i, run in enumerate(ok):
        if run.figures["mode"] == "on" and i > 0 and ok[i - 1].figures["mode"] == "off":
            pairs.append(round(run.figures["output_tok_s"] / ok[i - 1].figures["output_tok_s"], 4))
    spread = [*off, *on]
    return {
        "off_tok_s": off,
        "on_tok_s": on,
        "off_median": round(statistics.median(off), 2),
        "on_median": round(statistics.median(on), 2),
        "ratio": round(ratio, 4),
        "pass": ratio >= CHAT_RATIO_TARGET,
        "pair_ratios": pairs,
        "off_spread_pct": round(100 * (max(off) - min(off)) / statistics.median(off), 1),
        "on_spread_pct": round(100 * (max(on) - min(on)) / statistics.median(on), 1),
        "all_spread_pct": round(100 * (max(spread) - min(spread)) / statistics.median(spread), 1),
        # A miss smaller than the spread between rounds of one setting says little.
        "within_noise": ratio < CHAT_RATIO_TARGET
        and 100 * (CHAT_RATIO_TARGET - ratio)
        < max(
            100 * (max(off) - min(off)) / statistics.median(off),
            100 * (max(on) - min(on)) / statistics.median(on),
        ),
        "rows_match": all(r.figures["rows_match"] for r in ok),
        "disturbed": any(r.figures["other_cpu_pct"] > OTHER_CPU_MAX_PCT for r in ok),
    }


# --------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


RATING_HEADER = [
    "database",
    "clients",
    "ratings/s",
    "p50 ms",
    "p95 ms",
    "p99 ms",
    "errors",
    "rows = 200s",
    "records/batch",
    "chat tok/s (no ratings / ratings)",
    "CPU % api / engine / postgres",
    "CPU % rating client / chat client / other",
    "client us/rating",
]


def rating_rows(runs: list[RunResult]) -> list[list[str]]:
    rows = []
    for run in runs:
        if run.failure or not run.figures:
            rows.append([run.database, "FAILED", *[""] * (len(RATING_HEADER) - 2)])
            continue
        f = run.figures
        target = f" {_verdict(f['ratings_s'] >= RATINGS_TARGET)}" if run.database == "sqlite" else ""
        disturbed = " DISTURBED" if f["other_cpu_pct"] > OTHER_CPU_MAX_PCT else ""
        clients = f"{f['rating_client_cpu_pct']} / {f['chat_client_cpu_pct']} / {f['other_cpu_pct']}"
        rows.append(
            [
                run.database,
                str(f["concurrency"]),
                f"{f['ratings_s']:.1f}{target}",
                harness.fmt(f["latency_p50_ms"]),
                harness.fmt(f["latency_p95_ms"]),
                harness.fmt(f["latency_p99_ms"]),
                str(f["errors"]),
                f"{f['rating_event_rows']} = {f['ok_total']} " + ("yes" if f["rows_match"] else "NO"),
                harness.fmt(f["writer"]["mean_batch_records"]),
                f"{f['chat']['tok_s_without_ratings']} / {f['chat']['tok_s_with_ratings']}",
                f"{f['server_api_cpu_pct']} / {f['engine_cpu_pct']} / {f['postgres_cpu_pct']}",
                clients + disturbed,
                harness.fmt(f["client_us_per_rating"]),
            ]
        )
    return rows


CHAT_HEADER = [
    "round",
    "log",
    "tok/s",
    "req/s",
    "TTFT p50 ms",
    "TPOT p50 ms",
    "errors",
    "completion rows / chats",
    "CPU % api / engine / client / other",
]


def chat_rows(runs: list[RunResult]) -> list[list[str]]:
    rows = []
    for run in runs:
        if run.failure or not run.figures:
            rows.append([run.name, "FAILED", *[""] * (len(CHAT_HEADER) - 2)])
            continue
        s = run.figures
        disturbed = " DISTURBED" if s["other_cpu_pct"] > OTHER_CPU_MAX_PCT else ""
        rows.append(
            [
                str(s["round"]),
                s["mode"],
                harness.fmt(s["output_tok_s"]),
                harness.fmt(s["req_s"], 2),
                harness.fmt(s["ttft_p50_ms"]),
                harness.fmt(s["tpot_p50_ms"]),
                str(s["errors"]),
                f"{s['completion_rows']} / {s['successful_chats'] if s['mode'] == 'on' else 0} "
                + ("ok" if s["rows_match"] else "MISMATCH"),
                f"{s['server_api_cpu_pct']} / {s['engine_cpu_pct']} / {s['client_cpu_pct']} / "
                f"{s['other_cpu_pct']}{disturbed}",
            ]
        )
    return rows


SUMMARY_HEADER = ["requirement", "target", "measured", "verdict"]


def summary_rows(ratings: list[RunResult], chat: dict[str, Any] | None) -> list[list[str]]:
    rows = []
    for run in ratings:
        f = run.figures
        if run.failure or not f:
            rows.append([f"ratings/s on {run.database}", "", "failed", "FAIL"])
            continue
        if run.database == "sqlite":
            rows.append(
                [
                    "ratings/s on SQLite under chat load",
                    f">= {RATINGS_TARGET:g}",
                    f"{f['ratings_s']:.1f} (p99 {harness.fmt(f['latency_p99_ms'])} ms)",
                    _verdict(f["ratings_s"] >= RATINGS_TARGET),
                ]
            )
        else:
            rows.append(
                [
                    f"ratings/s on {run.database} under chat load",
                    "(reported)",
                    f"{f['ratings_s']:.1f} (p99 {harness.fmt(f['latency_p99_ms'])} ms)",
                    "",
                ]
            )
        rows.append(
            [
                f"acknowledged ratings stored ({run.database})",
                "rating_event rows = 200s",
                f"{f['rating_event_rows']} / {f['ok_total']}",
                _verdict(f["rows_match"]),
            ]
        )
    if chat is not None:
        rows.append(
            [
                "chat tok/s, log on / off (median)",
                f">= {CHAT_RATIO_TARGET}",
                f"{chat['ratio']:.3f} ({chat['on_median']} / {chat['off_median']})",
                _verdict(chat["pass"])
                + (" (within noise)" if chat["within_noise"] else "")
                + (" (DISTURBED)" if chat["disturbed"] else ""),
            ]
        )
        rows.append(
            [
                "every logged chat has a completion row",
                "rows = successful chats",
                "yes" if chat["rows_match"] else "no",
                _verdict(chat["rows_match"]),
            ]
        )
    return rows


def markdown(
    info: dict[str, Any],
    config: dict[str, Any],
    tables: list[tuple[str, list[str], list[list[str]]]],
    chat: dict[str, Any] | None,
    failures: list[RunResult],
) -> str:
    def table(header: list[str], rows: list[list[str]]) -> list[str]:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return lines

    lines = [
        "# Feedback benchmark: ratings under chat load, chat with the conversation log on/off",
        "",
        f"- date: {config['timestamp']}",
        f"- machine: {info['cpu_count']} CPUs ({info['cpu_model']}), {info['memory_gib']} GiB, "
        f"{info['vllm']}, {info['torch']}, {info.get('postgres') or 'no PostgreSQL'}",
        f"- code: git {info['git_commit']}"
        + (" with uncommitted changes in serving/, feedback/ or monitoring/" if info["code_modified"] else "")
        + f"; {info['sqlalchemy']}, {info['psycopg']}, SQLite {info['sqlite']}",
        f"- model: {MODEL_NAME} ({', '.join(f'{k}={v}' for k, v in harness.ENGINE.items())}); "
        f"feedback: defaults (batch_size 256, flush_interval_ms 20), redact={config['redact']}"
        + "".join(f", {k}={v}" for k, v in config["server_env"].items()),
        f"- ratings: {config['rating_concurrency']} closed-loop clients (raw HTTP/1.1 keep-alive, uvloop), "
        f"mixed bodies about {config['pool']} completions, {RATING_RAMP_S:g} s ramp-up then a "
        f"{config['duration_s']:g} s window, while {config['chat_concurrency']} streaming chats "
        f"(max_tokens {config['max_tokens']}, ignore_eos) run; ratings/s = 200s received in the window / "
        "window; latency = request written -> response read, requests started in the window",
        f"- chat log on/off: {config['chat_concurrency']} closed-loop streaming chats, max_tokens "
        f"{config['max_tokens']}, {config['chat_duration_s']:g} s window per server, a fresh server per "
        f"round, rounds alternating off/on ({config['rounds']} of each); ratio = median(on) / median(off)",
        f"- CPU %: share of all cores; other = the rest of the machine (above {OTHER_CPU_MAX_PCT:g}% "
        "DISTURBED); api = the uvicorn process (FastAPI, feedback writer), engine = its child processes",
        "",
    ]
    for title, header, rows in tables:
        lines += [f"## {title}", ""]
        lines += table(header, rows)
        lines.append("")
    if chat is not None:
        lines += [
            f"Chat noise: off rounds {chat['off_tok_s']} tok/s (spread {chat['off_spread_pct']}%), "
            f"on rounds {chat['on_tok_s']} (spread {chat['on_spread_pct']}%); each on round / the off "
            f"round before it: {chat['pair_ratios']}. The spread between rounds of the same setting "
            "is the noise (on two shared cores it reaches several percent when anything else runs): "
            "a difference from 1 smaller than it is not significant.",
            "",
        ]
    for run in failures:
        lines += [f"**{run.name} failed**: see {run.log}", "", "```", run.failure or "", "```", ""]
    return "\n".join(lines).rstrip() + "\n"


def machine_info() -> dict[str, Any]:
    import subprocess

    info = harness.machine_info()
    info.pop("serving_code_modified", None)
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        info["code_modified"] = bool(
            subprocess.run(
                [
                    "git",
                    "status",
                    "--porcelain",
                    "--",
                    "loopchat",
                    "serving",
                    "feedback",
                    "rollout",
                    "monitoring",
                ],
                cwd=REPO,
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
        )
    info.setdefault("code_modified", None)
    info["sqlalchemy"] = harness.dist_version("sqlalchemy")
    info["psycopg"] = harness.dist_version("psycopg", "psycopg-binary")
    info["uvloop"] = harness.dist_version("uvloop")
    info["sqlite"] = __import__("sqlite3").sqlite_version
    return info


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=20.0, help="rating window, seconds")
    parser.add_argument("--rating-concurrency", type=int, default=64, help="closed-loop rating clients")
    parser.add_argument("--chat-concurrency", type=int, default=8, help="streaming chats (both scenarios)")
    parser.add_argument("--chat-duration", type=float, default=30.0, help="chat window of each on/off round")
    parser.add_argument("--chat-baseline", type=float, default=10.0, help="chat-only window before ratings")
    parser.add_argument("--rounds", type=int, default=3, help="on/off rounds of each kind, alternating")
    parser.add_argument("--pool", type=int, default=300, help="completions to rate")
    parser.add_argument("--warmup", type=float, default=5.0, help="minimum seconds of chat before a window")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--jitter-ms", type=float, default=100.0, help="pause 0..this after each chat")
    parser.add_argument("--redact", choices=("storage", "export"), default="storage")
    parser.add_argument("--skip-postgres", action="store_true", help="ratings on SQLite only")
    parser.add_argument("--skip-sqlite", action="store_true", help="ratings on PostgreSQL only")
    parser.add_argument("--skip-ratings", action="store_true", help="no rating scenario")
    parser.add_argument("--skip-chat-ab", action="store_true", help="no logging on/off comparison")
    parser.add_argument("--profile", action="store_true", help="py-spy the API process in rating windows")
    parser.add_argument(
        "--server-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra LOOPCHAT_* setting for every server, e.g. LOOPCHAT_FEEDBACK__FLUSH_INTERVAL_MS=0",
    )
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=300.0,
        help="before each server starts, wait up to this many seconds for the machine to be idle (0: no)",
    )
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR)
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.pool < 1:
        parser.error("--rounds and --pool must be at least 1")
    if args.rating_concurrency < 1 or args.chat_concurrency < 0:
        parser.error("--rating-concurrency must be at least 1, --chat-concurrency at least 0")
    if args.chat_concurrency == 0 and not args.skip_chat_ab:
        parser.error("--chat-concurrency 0 (ratings without chat load) needs --skip-chat-ab")
    try:
        args.server_env = dict(item.split("=", 1) for item in args.server_env)
    except ValueError:
        parser.error("--server-env takes KEY=VALUE")
    if any(not key.startswith("LOOPCHAT_") for key in args.server_env):
        parser.error("--server-env sets LOOPCHAT_* variables only")
    if min(args.duration, args.chat_duration, args.chat_baseline) <= 0 or args.warmup < 0:
        parser.error("durations must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not (MODEL_PATH / "config.json").is_file():
        print(f"no model at {MODEL_PATH}: run `make model` (loopchat model prepare) first")
        return 1
    timestamp = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    info = machine_info()
    wanted = {"sqlite": not args.skip_sqlite, "postgres": not args.skip_postgres}
    databases = [] if args.skip_ratings else [d for d, on in wanted.items() if on]
    if "postgres" in databases:
        info["postgres"] = postgres_version()
        if info["postgres"] is None:
            print("skipping the PostgreSQL scenario")
            databases.remove("postgres")

    def on_sigterm(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    began = time.monotonic()
    ratings: list[RunResult] = []
    for database in databases:
        run = ratings_scenario(database, args)
        if run.figures:
            run.figures["concurrency"] = args.rating_concurrency
        ratings.append(run)
    chat_runs: list[RunResult] = []
    if not args.skip_chat_ab:
        for r in range(args.rounds):
            for mode in ("off", "on"):
                chat_runs.append(chat_ab_round(mode, r, args))
    elapsed = time.monotonic() - began
    chat = chat_comparison(chat_runs)

    tables = [("Summary", SUMMARY_HEADER, summary_rows(ratings, chat))]
    if ratings:
        tables.append(("Ratings under chat load (POST /v1/feedback)", RATING_HEADER, rating_rows(ratings)))
    if chat_runs:
        title = "Chat throughput, conversation log off / on (SQLite)"
        tables.append((title, CHAT_HEADER, chat_rows(chat_runs)))
    config = {
        "timestamp": timestamp,
        "model": MODEL_NAME,
        "engine": harness.ENGINE,
        "duration_s": args.duration,
        "rating_ramp_s": RATING_RAMP_S,
        "rating_concurrency": args.rating_concurrency,
        "chat_concurrency": args.chat_concurrency,
        "chat_duration_s": args.chat_duration,
        "chat_baseline_s": args.chat_baseline,
        "rounds": args.rounds,
        "pool": args.pool,
        "pool_users": POOL_USERS,
        "warmup_s": args.warmup,
        "max_tokens": args.max_tokens,
        "jitter_ms": args.jitter_ms,
        "redact": args.redact,
        "server_env": args.server_env,
        "databases": databases,
        "postgres_url": POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + f"/{POSTGRES_DATABASE}",
        "targets": {"sqlite_ratings_s_min": RATINGS_TARGET, "chat_ratio_min": CHAT_RATIO_TARGET},
        "elapsed_s": round(elapsed, 1),
    }
    failures = [r for r in [*ratings, *chat_runs] if r.failure]
    document = {
        "machine": info,
        "config": config,
        "ratings": [vars(r) for r in ratings],
        "chat_log_on_off": {"comparison": chat, "rounds": [vars(r) for r in chat_runs]},
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = args.out_dir / "feedback.json", args.out_dir / "feedback.md"
    json_path.write_text(json.dumps(document, indent=2) + "\n")
    md_path.write_text(markdown(info, config, tables, chat, failures))
    print()
    harness.render_tables(tables)
    print(f"\nwrote {json_path} and {md_path} ({elapsed:.0f} s)")
    if failures:
        print(f"server failure: {', '.join(r.name for r in failures)} (logs under {LOG_DIR})")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
