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

It is one turn of `loopchat simulate` (retrain/simulate.py) with the `prefix` population.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from retrain.populations import PROMPTS, TRAIT, Prefix, has_trait
from retrain.simulate import (
    MAX_AFTER_ROUNDS,
    SIMULATION_BATCH,
    DemoServer,
    Phase,
    run_simulation,
    simulation_config,
)

__all__ = [
    "MAX_AFTER_ROUNDS",
    "PROMPTS",
    "TRAIT",
    "DemoReport",
    "DemoServer",
    "Phase",
    "demo_config",
    "has_trait",
    "run_demo",
    "scripted_rating",
]


def scripted_rating(completion_id: str, user: str, answer: str) -> dict[str, Any]:
    """The simulated users' taste: up with the trait, else down with the answer they wanted."""
    return {"completion_id": completion_id, "user": user, **Prefix().rate("", answer)}


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


def demo_config(train_steps: int, batch_size: int = SIMULATION_BATCH):
    """The demo's retraining config: `simulation_config` with SFT for `train_steps` steps of
    `batch_size` examples."""
    return simulation_config(train_steps, method="sft", batch_size=batch_size)


def run_demo(
    data_dir: Path,
    *,
    users: int = 48,
    train_steps: int = 40,
    batch_size: int = SIMULATION_BATCH,
    server_url: str | None = None,
    admin_token: str | None = None,
    database_url: str | None = None,
    base_model: Path | None = None,
) -> DemoReport:
    """Run one turn of the loop (see the module docstring); an existing server may be given."""
    report = run_simulation(
        Prefix(),
        data_dir,
        users=users,
        train_config=demo_config(train_steps, batch_size),
        server_url=server_url,
        admin_token=admin_token,
        database_url=database_url,
        base_model=base_model,
        max_ratings=None,
        trigger="demo",
    )
    turn = report.turns[0]
    return DemoReport(turn.before, turn.after, turn.record, turn.decision, turn.seconds)
