"""The simulated users' traffic: a demo server, and one phase of users asking and judging.

Shared by `loopchat simulate` (retrain/simulate.py) and `loopchat demo` (retrain/demo.py).
"""

from __future__ import annotations

import os
import secrets
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from loopchat.local_server import ServerProcess, free_port, loopchat_serve_command
from retrain.populations import Population, PopulationError, feedback_fields

ALIAS = "loopchat"  # loopchat.settings.ALIAS_MODEL
MAX_TOKENS = 32
TEMPERATURE = 0.7
CONCURRENCY = 8


@dataclass(slots=True)
class Phase:
    """Answers and how many had the trait, per variant ("all" too), and the feedback posted.

    feedback counts posts by kind (up, down, score, comment, correction, choice), `none` for
    answers the population gave no feedback on, `capped` for feedback over `max_ratings`.
    """

    answers: int = 0
    with_trait: dict[str, int] = field(default_factory=dict)
    by_variant: dict[str, int] = field(default_factory=dict)
    feedback: dict[str, int] = field(default_factory=dict)

    def count(self, variant: str, trait: bool) -> None:
        self.answers += 1
        for key in {variant, "all"}:
            self.by_variant[key] = self.by_variant.get(key, 0) + 1
            self.with_trait[key] = self.with_trait.get(key, 0) + int(trait)

    def merge(self, other: Phase) -> None:
        self.answers += other.answers
        pairs = (self.by_variant, other.by_variant), (self.with_trait, other.with_trait)
        for mine, theirs in (*pairs, (self.feedback, other.feedback)):
            for key, n in theirs.items():
                mine[key] = mine.get(key, 0) + n

    def rate(self, variant: str = "all") -> float:
        n = self.by_variant.get(variant, 0)
        return self.with_trait.get(variant, 0) / n if n else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "answers": self.answers,
            "rates": {k: round(self.rate(k), 4) for k in sorted(self.by_variant)},
            "by_variant": dict(self.by_variant),
            "with_trait": dict(self.with_trait),
            "feedback": dict(self.feedback),
        }


class DemoServer:
    """`loopchat serve` on a free port with the demo's data directory."""

    def __init__(self, data_dir: Path, base_model: Path) -> None:
        self.port = free_port()
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
        self.server = ServerProcess(
            loopchat_serve_command(sys.executable, self.port),
            log_path=data_dir / "demo-server.log",
            env=env,
            name="the demo server",
        ).start()

    def wait_ready(self, timeout: float = 600) -> None:
        self.server.wait_ready(f"{self.url}/readyz", timeout=timeout)

    def stop(self) -> None:
        self.server.stop()


class _Budget:
    """At most `limit` feedback posts (None: no limit), shared by a phase's threads."""

    def __init__(self, limit: int | None) -> None:
        self.left = limit
        self._lock = threading.Lock()

    def take(self) -> bool:
        with self._lock:
            if self.left is None:
                return True
            if self.left <= 0:
                return False
            self.left -= 1
            return True


def _post(client: httpx.Client, path: str, body: dict[str, Any]) -> httpx.Response:
    """POST with the client's timeout; an error answer raises with the API's message."""
    response = client.post(path, json=body)
    if response.status_code >= 400:
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.text[:500]
        raise RuntimeError(f"POST {path}: {response.status_code}: {message}")
    return response


def _kinds(fields: dict[str, Any]) -> list[str]:
    kinds = [fields["rating"]] if fields.get("rating") else []
    return kinds + [key for key in ("score", "comment", "correction") if fields.get(key) is not None]


def run_phase(
    client: httpx.Client,
    population: Population,
    users: int,
    *,
    round_name: str,
    seed: int = 0,
    max_ratings: int | None = None,
    models: tuple[str, str] | None = (ALIAS, ALIAS),
    arms: dict[str, str] | None = None,
    concurrency: int = CONCURRENCY,
) -> Phase:
    """Every simulated user asks one prompt (round robin) and gives the population's feedback.

    `client` has the server as its base URL (and a timeout long enough for a CPU engine).
    A "rate" population chats with the alias (split by a running experiment: the
    `x-loopchat-variant` header names the arm) and rates the answer; a "compare" one gets two
    answers of `models` (None: the running experiment's control and candidate; `arms`: model
    version -> arm name) and posts its choice.
    """
    phase, budget = Phase(), _Budget(max_ratings)
    prompts = list(population.prompts)

    def ask(i: int) -> tuple[list[tuple[str, bool]], list[str]]:
        user = f"sim-{population.name}-{round_name}-{i}"[:256]
        prompt = prompts[i % len(prompts)]
        messages = [{"role": "user", "content": prompt}]
        body = {"messages": messages, "user": user, "max_tokens": MAX_TOKENS, "temperature": TEMPERATURE}
        if population.mode == "compare":
            # Seeded (the pair's second answer takes the next seed): a phase is reproducible.
            compare = {**body, "seed": seed + 2 * i}
            return _compare(client, population, prompt, user, compare, models, arms or {}, budget)
        response = _post(client, "/v1/chat/completions", {**body, "seed": seed + i})
        answer = response.json()["choices"][0]["message"]["content"]
        seen = [(response.headers.get("x-loopchat-variant", "all"), bool(population.trait(prompt, answer)))]
        fields = feedback_fields(population, prompt, answer)
        if fields is None:
            return seen, ["none"]
        if not budget.take():
            return seen, ["capped"]
        _post(client, "/v1/feedback", {**fields, "completion_id": response.json()["id"], "user": user})
        return seen, _kinds(fields)

    with ThreadPoolExecutor(concurrency) as pool:
        for seen, kinds in pool.map(ask, range(users)):
            for variant, trait in seen:
                phase.count(variant, trait)
            for kind in kinds:
                phase.feedback[kind] = phase.feedback.get(kind, 0) + 1
    return phase


def _compare(
    client: httpx.Client,
    population: Population,
    prompt: str,
    user: str,
    body: dict[str, Any],
    models: tuple[str, str] | None,
    arms: dict[str, str],
    budget: _Budget,
) -> tuple[list[tuple[str, bool]], list[str]]:
    response = _post(client, "/v1/chat/compare", {**body, **({"models": list(models)} if models else {})})
    completions = response.json()["completions"]
    answers = [c["choices"][0]["message"]["content"] for c in completions]
    seen = [
        (arms.get(c["model"], "all"), bool(population.trait(prompt, a)))
        for c, a in zip(completions, answers, strict=True)
    ]
    choice = population.choose(prompt, answers[0], answers[1])
    if choice is None:
        return seen, ["none"]
    if choice not in (0, 1):
        raise PopulationError(
            f"population {population.name!r}: choose() must return 0, 1 or None, not {choice!r}"
        )
    if not budget.take():
        return seen, ["capped"]
    chosen, rejected = completions[choice]["id"], completions[1 - choice]["id"]
    choice_body = {"chosen_completion_id": chosen, "rejected_completion_id": rejected, "user": user}
    _post(client, "/v1/feedback/preference", choice_body)
    return seen, ["choice"]
