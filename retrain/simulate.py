"""`loopchat simulate`: turns of the loop against a simulated population (retrain/populations.py).

Each turn

1. before: `users` simulated users each ask one of the population's prompts (round robin) and
   give the population's feedback: ratings of answers from the alias `loopchat`, or, for a
   "compare" population, a choice between two answers of the active version;
2. runs one retraining run (selection, dataset, training, the gate, registration) that starts
   a 50/50 canary experiment;
3. after: users come in rounds, split by the canary, until the experiment decides (a compare
   population sees the candidate next to the control, and its choices decide the canary);
4. reports how often answers had the population's trait before and, per arm, after, with the
   always-valid interval of the difference, the run and the A/B decision.

Later turns train on top of the champion (the active version, promoted or not); an experiment
still running at the end of a turn is stopped first. `loopchat demo` is one turn of this with
the `prefix` population.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from retrain.populations import Population, check_population, load_population
from retrain.sim_report import MARKDOWN_HEADER, SimulationReport, TurnReport
from retrain.sim_traffic import DemoServer, Phase, run_phase

if TYPE_CHECKING:
    from retrain.config import RetrainConfig

__all__ = [
    "MARKDOWN_HEADER",
    "MAX_AFTER_ROUNDS",
    "SIMULATION_BATCH",
    "DemoServer",
    "Phase",
    "SimulationReport",
    "TurnReport",
    "run_phase",
    "run_simulation",
    "run_turns",
    "simulation_config",
]

MAX_AFTER_ROUNDS = 4
# Seconds to wait once the server lists a new version (its canary's routing), and for the log
# writer to flush a round's completions before the experiment is evaluated.
SETTLE_S = 2.0
FLUSH_S = 0.5
# Training examples per step of a simulation's run, unless a caller sets its own.
SIMULATION_BATCH = 8


def simulation_config(
    train_steps: int | None = None,
    *,
    method: str = "auto",
    start_from: str = "base",
    batch_size: int = SIMULATION_BATCH,
) -> RetrainConfig:
    """A retraining config for a simulation: one 50/50 canary stage decided on few ratings.

    `train_steps` None: the training decides its steps (max_steps -1); each step takes
    `batch_size` examples.
    """
    from retrain.config import GateConfig, RetrainConfig, SelectionConfig, TrainingConfig

    return RetrainConfig(
        method=method,
        start_from=start_from,
        min_examples=8,
        canary_ramp=[50],
        canary_min_samples_per_stage=1,
        canary_policy={
            "min_ratings_per_variant": 10,
            "guardrail_min_requests": 10_000,
            "guardrail_min_ratings": 10_000,
        },
        selection=SelectionConfig(budget=1000),
        # The learning rate follows the data and the method; so do the epochs unless the steps
        # are fixed.
        training=TrainingConfig(
            learning_rate=None,
            max_steps=-1 if train_steps is None else train_steps,
            batch_size=batch_size,
            max_length=128,
            lora_r=16,
            lora_alpha=32,
            lora_dropout=0.0,
            early_stopping_patience=0 if train_steps is not None else 2,
        ),
        # Two bias probe pairs keep a simulation quick; their figures are shown, but one pair
        # that happens to differ must not reject the candidate (limits for 2 pairs, not 8).
        gate=GateConfig(
            f1_examples=4,
            max_new_tokens=16,
            bias_examples=2,
            max_bias_change_increase=0.5,
            max_refusal_gap=0.5,
        ),
    )


def _run_summary(run) -> dict[str, Any]:
    dataset = (run.metrics or {}).get("dataset") or {}
    return {
        "id": run.id,
        "status": run.status,
        "method": run.method,
        "champion": run.champion,
        "candidate": run.candidate,
        "reason": run.reason,
        "dataset_version": run.dataset_version,
        "counts": dataset.get("counts", {}),
    }


def _after(
    client: httpx.Client,
    population: Population,
    users: int,
    candidate: str,
    headers: dict[str, str],
    *,
    turn: int,
    seed: int,
) -> tuple[Phase, dict[str, Any]]:
    """The canary's users, in rounds until the experiment decides; the phase and the decision."""
    experiment = f"canary-{candidate}"[:128]
    where = f"/admin/experiments/{experiment}"
    # The server picks the new version and the canary up within its poll interval.
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if candidate in {m["id"] for m in client.get("/v1/models").json()["data"]}:
            break
        time.sleep(0.5)
    time.sleep(SETTLE_S)
    status = client.get(where, headers=headers)
    if status.status_code == 404:
        return Phase(), {"action": "none", "reason": f"no canary {experiment}"}
    status.raise_for_status()
    control = status.json()["experiment"]["control"]
    after, evaluated = Phase(), {}
    # Users keep coming until the experiment decides (a hash split may leave one arm short of
    # the minimum sample at first); a bounded number of rounds. A compare population's pairs
    # are the experiment's own (its control next to the candidate, counted in it).
    for round_index in range(MAX_AFTER_ROUNDS):
        phase = run_phase(
            client,
            population,
            users,
            round_name=f"t{turn}-after{round_index}",
            seed=seed + round_index * users,
            models=None,
            arms={candidate: "candidate", control: "control"},
        )
        after.merge(phase)
        time.sleep(FLUSH_S)
        evaluated = client.post(f"{where}/evaluate", headers=headers).json()
        # The server's own evaluator may have decided first: read the stored state.
        state = client.get(where, headers=headers).json()
        if state["experiment"]["status"] != "running":
            break
    running = state["experiment"]["status"] == "running"
    # Undecided: the latest evaluation; decided: the stored decision that ended it.
    last = evaluated if running or not state["decisions"] else state["decisions"][-1]
    decision = {
        "action": last.get("action"),
        "reason": last.get("reason"),
        "experiment": experiment,
        "status": state["experiment"]["status"],
        "evaluated": evaluated.get("action"),
        "rounds": round_index + 1,
    }
    return after, decision


def run_simulation(
    population: Population | str,
    data_dir: Path,
    *,
    users: int,
    turns: int = 1,
    train_config: RetrainConfig | None = None,
    server_url: str | None = None,
    admin_token: str | None = None,
    database_url: str | None = None,
    base_model: Path | None = None,
    max_ratings: int | None = 200,
    after_users: int | None = None,
    seed: int = 0,
    trigger: str = "simulate",
) -> SimulationReport:
    """Run `turns` turns of the loop (see the module docstring); an existing server may be given.

    `max_ratings` caps the feedback posted in each turn's before phase (the signal its run
    trains on; None: no cap); the after phase rates every answer, since the canary decides on
    those ratings, and has `after_users` users per round (default: `users`). `train_config`
    (default `simulation_config()`) is the first turn's; later turns start from the champion.
    """
    from feedback.db import make_engine
    from loopchat.embedded_model import prepare
    from loopchat.settings import Settings
    from retrain.pipeline import RetrainRunner

    if isinstance(population, str):
        population = load_population(population)
    check_population(population)
    # Only this simulation's users teach its runs, also on a server with other traffic.
    first = train_config or simulation_config()
    since = datetime.now(UTC)
    first = first.model_copy(update={"selection": first.selection.model_copy(update={"since": since})})
    base_model = base_model or prepare(data_dir / "models" / "SmolLM2-135M-Instruct")
    server = None
    started = time.perf_counter()
    if server_url is None:
        server = DemoServer(data_dir, base_model)
        server_url, admin_token, database_url = server.url, server.token, server.database_url
        server.wait_ready()
    seconds_start = time.perf_counter() - started
    headers = {"Authorization": f"Bearer {admin_token}"}
    engine = None
    try:
        settings = Settings(data_dir=data_dir, base_model=base_model, database_url=database_url)
        engine = make_engine(settings.db_url)
        with httpx.Client(base_url=server_url, timeout=300) as client:
            reports = run_turns(
                client,
                population,
                lambda config: RetrainRunner(settings, engine, config),
                headers,
                turns=turns,
                config=first,
                users=users,
                max_ratings=max_ratings,
                after_users=after_users,
                seed=seed,
                trigger=trigger,
            )
        reports[0].seconds = {"start": seconds_start, **reports[0].seconds}
        return SimulationReport(population.name, population.description, reports)
    finally:
        if engine is not None:
            engine.dispose()
        if server is not None:
            server.stop()


def run_turns(
    client: httpx.Client,
    population: Population,
    make_runner: Callable[[RetrainConfig], Any],
    headers: dict[str, str],
    *,
    turns: int,
    config: RetrainConfig,
    users: int,
    max_ratings: int | None,
    after_users: int | None = None,
    seed: int = 0,
    trigger: str = "simulate",
) -> list[TurnReport]:
    """The turns against a server (`client`); `make_runner(config)` gives a turn's RetrainRunner."""
    reports: list[TurnReport] = []
    for turn in range(1, turns + 1):
        runner = make_runner(config if turn == 1 else config.model_copy(update={"start_from": "champion"}))
        report = _turn(
            client,
            population,
            turn,
            runner,
            headers,
            users=users,
            max_ratings=max_ratings,
            after_users=after_users or users,
            seed=seed,
            trigger=trigger,
        )
        reports.append(report)
        if turn < turns and report.decision.get("status") == "running":
            # The next run's canary needs this one ended; the champion stays active.
            stop = f"/admin/experiments/{report.decision['experiment']}/stop"
            client.post(stop, headers=headers).raise_for_status()
            report.decision["status"] = "stopped"
    return reports


def _turn(
    client: httpx.Client,
    population: Population,
    turn: int,
    runner,
    headers: dict[str, str],
    *,
    users: int,
    max_ratings: int | None,
    after_users: int,
    seed: int,
    trigger: str,
) -> TurnReport:
    """One turn: users before, a retraining run, the canary's users after."""
    # Seeds differ per user, phase and turn (one version and one seed give one answer).
    seed += (turn - 1) * (MAX_AFTER_ROUNDS + 1) * max(users, after_users)
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    before = run_phase(
        client, population, users, round_name=f"t{turn}-before", seed=seed, max_ratings=max_ratings
    )
    seconds["chat before"] = time.perf_counter() - started

    started = time.perf_counter()
    run = runner.run(trigger=trigger)
    seconds["retrain"] = time.perf_counter() - started
    decision: dict[str, Any] = {"action": "none", "reason": f"run {run.status}: {run.reason}"}
    after = Phase()
    if run.status == "registered" and run.candidate:
        started = time.perf_counter()
        after, decision = _after(
            client, population, after_users, run.candidate, headers, turn=turn, seed=seed + users
        )
        seconds["chat after"] = time.perf_counter() - started
    summary, record = _run_summary(run), run.model_dump(mode="json")
    return TurnReport(population.name, turn, before, after, summary, decision, seconds, record)
