"""`loopchat demo`: one turn of the whole loop on the embedded model, with simulated users.

The simulated users have a known taste: they like answers that open with "Sure!". The scripted
rater gives such an answer a thumb up; any other gets a thumb down and a correction (the same
answer opened with "Sure!"). The demo

1. serves the embedded model (`loopchat serve`, or an already running server) and lets the
   users chat with the alias `loopchat` and rate every answer;
2. runs one retraining run: selection, dataset, SFT on LoRA, the held-out gate, registration,
   and a 50/50 canary experiment;
3. lets the users chat and rate again, now split by the experiment, and evaluates it;
4. prints how often answers had the trait before and after (per variant) and the A/B decision.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

TRAIT = "Sure!"
MAX_AFTER_ROUNDS = 4
PROMPTS = [
    "What is a good name for a cat?", "How do I boil an egg?", "Give me a tip for sleeping better.",
    "What is the capital of Italy?", "Suggest a weekend hobby.", "How can I learn to type faster?",
    "What should I cook tonight?", "Recommend a book for a long trip.", "How do plants grow?",
    "What is a healthy breakfast?", "How do I start running?", "Explain what a rainbow is.",
    "Give me a fun fact about the ocean.", "How do I keep my desk tidy?", "What is a good first pet?",
    "How can I save money on groceries?", "What should I pack for a picnic?", "How do I water a cactus?",
    "Suggest a name for a blog.", "How do I make tea?", "What is the tallest animal?",
    "How can I remember names better?", "What is a quick stretch for my back?", "How do bees make honey?",
]  # fmt: skip


def has_trait(text: str) -> bool:
    return text.strip().startswith(TRAIT)


def scripted_rating(completion_id: str, user: str, answer: str) -> dict[str, Any]:
    """The simulated users' taste: up with the trait, else down with the answer they wanted."""
    if has_trait(answer):
        return {"completion_id": completion_id, "user": user, "rating": "up"}
    wanted = f"{TRAIT} {answer.strip() or 'Happy to help.'}"
    return {"completion_id": completion_id, "user": user, "rating": "down", "correction": wanted[:2000]}


@dataclass(slots=True)
class Phase:
    answers: int = 0
    with_trait: dict[str, int] = field(default_factory=dict)
    by_variant: dict[str, int] = field(default_factory=dict)

    def merge(self, other: Phase) -> None:
        self.answers += other.answers
        for key, n in other.by_variant.items():
            self.by_variant[key] = self.by_variant.get(key, 0) + n
        for key, n in other.with_trait.items():
            self.with_trait[key] = self.with_trait.get(key, 0) + n

    def rate(self, variant: str = "all") -> float:
        n = self.by_variant.get(variant, 0)
        return self.with_trait.get(variant, 0) / n if n else 0.0


@dataclass(slots=True)
class DemoReport:
    before: Phase
    after: Phase
    run: dict[str, Any]
    decision: dict[str, Any]
    seconds: dict[str, float]

    def lines(self) -> list[str]:
        after_candidate, after_control = self.after.rate("candidate"), self.after.rate("control")
        served = self.after.by_variant
        return [
            f"taste: answers opening with {TRAIT!r}",
            f"before the loop: {self.before.rate():.2f} of {self.before.answers} answers had it",
            f"retraining run {self.run.get('id')}: {self.run.get('status')} -> {self.run.get('candidate')} "
            f"(method {self.run.get('method')}, dataset {self.run.get('dataset_version')})",
            f"after the loop: candidate {after_candidate:.2f} of {served.get('candidate', 0)}, "
            f"control {after_control:.2f} of {served.get('control', 0)}",
            f"A/B decision: {self.decision.get('action')} ({self.decision.get('reason')})",
            "seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in self.seconds.items()),
        ]


class DemoServer:
    """`loopchat serve` on a free port with the demo's data directory."""

    def __init__(self, data_dir: Path, base_model: Path) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.token = secrets.token_urlsafe(24)
        self.database_url = f"sqlite:///{data_dir / 'loopchat.db'}"
        env = {
            **os.environ,
            "LOOPCHAT_DATA_DIR": str(data_dir),
            "LOOPCHAT_BASE_MODEL": str(base_model),
            "LOOPCHAT_ADMIN_TOKEN": self.token,
            "LOOPCHAT_DATABASE_URL": self.database_url,
            "LOOPCHAT_ENGINE__MAX_MODEL_LEN": "1024",
            "LOOPCHAT_ENGINE__MAX_LORA_RANK": "16",
            "LOOPCHAT_AB__POLL_INTERVAL_S": "1",
            "LOOPCHAT_LOG_LEVEL": "warning",
        }
        data_dir.mkdir(parents=True, exist_ok=True)
        self.log = open(data_dir / "demo-server.log", "w")  # noqa: SIM115 (open for the server's life)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "serving.cli", "serve", "--port", str(self.port)],
            env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip

    def wait_ready(self, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the demo server exited ({self.process.returncode}); see {self.log.name}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(1)
        raise TimeoutError("the demo server did not become ready")

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
        self.log.close()


def chat_and_rate(
    url: str, users: int, *, round_name: str, max_tokens: int = 32, concurrency: int = 8
) -> Phase:
    """Every simulated user asks one question; every answer is rated by the scripted rater."""
    phase = Phase()

    def one(i: int) -> tuple[str, bool]:
        user = f"demo-{round_name}-{i}"
        body = {"messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}], "user": user,
                "max_tokens": max_tokens, "temperature": 0.7, "seed": i}  # fmt: skip
        response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=300)
        response.raise_for_status()
        answer = response.json()["choices"][0]["message"]["content"]
        rated = httpx.post(
            f"{url}/v1/feedback", json=scripted_rating(response.json()["id"], user, answer), timeout=60
        )
        rated.raise_for_status()
        return response.headers.get("x-loopchat-variant", "all"), has_trait(answer)

    with ThreadPoolExecutor(concurrency) as pool:
        for variant, trait in pool.map(one, range(users)):
            phase.answers += 1
            for key in {variant, "all"}:
                phase.by_variant[key] = phase.by_variant.get(key, 0) + 1
                phase.with_trait[key] = phase.with_trait.get(key, 0) + int(trait)
    return phase


def demo_config(train_steps: int):
    from retrain.config import GateConfig, RetrainConfig, SelectionConfig, TrainingConfig

    return RetrainConfig(
        method="sft",
        start_from="base",
        min_examples=8,
        canary_ramp=[50],
        canary_min_samples_per_stage=1,
        canary_policy={
            "min_ratings_per_variant": 10,
            "guardrail_min_requests": 10_000,
            "guardrail_min_ratings": 10_000,
        },
        selection=SelectionConfig(budget=1000),
        training=TrainingConfig(
            learning_rate=1e-3,
            max_steps=train_steps,
            batch_size=8,
            max_length=128,
            lora_r=16,
            lora_alpha=32,
            lora_dropout=0.0,
            early_stopping_patience=0,
        ),  # fmt: skip
        # Two bias probe pairs keep the demo quick; their figures are shown, but one pair that
        # happens to differ must not reject the candidate (limits for 2 pairs, not 8).
        gate=GateConfig(
            f1_examples=4,
            max_new_tokens=16,
            bias_examples=2,
            max_bias_change_increase=0.5,
            max_refusal_gap=0.5,
        ),
    )


def run_demo(
    data_dir: Path,
    *,
    users: int = 48,
    train_steps: int = 40,
    server_url: str | None = None,
    admin_token: str | None = None,
    database_url: str | None = None,
    base_model: Path | None = None,
) -> DemoReport:
    """Run one turn of the loop (see the module docstring); an existing server may be given."""
    from feedback.db import make_engine
    from retrain.pipeline import RetrainRunner
    from serving.embedded_model import prepare
    from serving.settings import Settings

    base_model = base_model or prepare(data_dir / "models" / "SmolLM2-135M-Instruct")
    server = None
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    if server_url is None:
        server = DemoServer(data_dir, base_model)
        server_url, admin_token, database_url = server.url, server.token, server.database_url
        server.wait_ready()
    seconds["start"] = time.perf_counter() - started
    try:
        started = time.perf_counter()
        before = chat_and_rate(server_url, users, round_name="before")
        seconds["chat before"] = time.perf_counter() - started

        started = time.perf_counter()
        settings = Settings(data_dir=data_dir, base_model=base_model, database_url=database_url)
        engine = make_engine(settings.db_url)
        run = RetrainRunner(settings, engine, demo_config(train_steps)).run(trigger="demo")
        engine.dispose()
        seconds["retrain"] = time.perf_counter() - started
        run_info = run.model_dump(mode="json")
        decision: dict[str, Any] = {"action": "none", "reason": f"run {run.status}: {run.reason}"}
        after = Phase()
        if run.status == "registered":
            headers = {"Authorization": f"Bearer {admin_token}"}
            experiment = f"canary-{run.candidate}"[:128]
            where = f"{server_url}/admin/experiments/{experiment}"
            # The server picks the new version and the canary up within its poll interval.
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                models = httpx.get(f"{server_url}/v1/models", timeout=10).json()["data"]
                if run.candidate in {m["id"] for m in models}:
                    break
                time.sleep(0.5)
            time.sleep(2)
            started = time.perf_counter()
            # Users keep coming until the experiment decides (a hash split may leave one arm
            # short of the minimum sample at first); a bounded number of rounds.
            for round_index in range(MAX_AFTER_ROUNDS):
                after.merge(chat_and_rate(server_url, users, round_name=f"after{round_index}"))
                time.sleep(0.5)  # the log writer's flush
                evaluated = httpx.post(f"{where}/evaluate", headers=headers, timeout=60).json()
                # The server's own evaluator may have decided first: read the stored state.
                status = httpx.get(where, headers=headers, timeout=60).json()
                if status["experiment"]["status"] != "running":
                    break
            seconds["chat after"] = time.perf_counter() - started
            last = status["decisions"][-1]
            decision = {
                "action": last["action"],
                "reason": last["reason"],
                "experiment": experiment,
                "status": status["experiment"]["status"],
                "evaluated": evaluated.get("action"),
                "rounds": round_index + 1,
            }
        return DemoReport(before, after, run_info, decision, seconds)
    finally:
        if server is not None:
            server.stop()
