"""`loopchat retrain` and `loopchat runs ...`."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer

from feedback.cli import database
from loopchat.console import fail
from retrain.populations import BUILT_INS

runs_app = typer.Typer(help="Retraining runs.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.command("retrain")(retrain)
    app.add_typer(runs_app, name="runs")
    app.command("demo")(demo)
    app.command("simulate")(simulate)


def retrain(
    config: Annotated[
        Path | None, typer.Option(help="Retraining config (YAML); see deploy/retrain.example.yaml.")
    ] = None,
    schedule: Annotated[
        bool, typer.Option(help="Keep running: start a run whenever the schedule says so.")
    ] = False,
    check_every: Annotated[float, typer.Option(help="With --schedule: minutes between checks.")] = 10.0,
    if_due: Annotated[
        bool,
        typer.Option(help="Run once if the schedule says a run is due, else exit 0 (for cron jobs)."),
    ] = False,
    from_import: Annotated[
        bool,
        typer.Option(
            help="Train from imported transcripts (loopchat import) instead of live traffic: "
            "the first adapter, before there is traffic to learn from."
        ),
    ] = False,
    paraphrases: Annotated[
        int | None,
        typer.Option(
            min=0, max=8, help="Paraphrases per selected user turn (overrides augment.paraphrases)."
        ),
    ] = None,
) -> None:
    """Run the retraining loop once (select, dataset, train, gate, register, canary), or on a schedule."""
    from retrain.config import load_config
    from retrain.pipeline import RetrainBusyError, RetrainRunner, due

    try:
        retrain_config = load_config(config)
    except ValueError as exc:
        raise fail(str(exc)) from exc
    if from_import and (schedule or if_due):
        raise fail("--from-import runs once; it does not combine with --schedule or --if-due")
    if from_import:
        retrain_config.selection.sources = ["import"]
    if paraphrases is not None:
        retrain_config.augment.paraphrases = paraphrases
    with database() as (settings, engine):
        runner = RetrainRunner(settings, engine, retrain_config)
        if if_due:
            ready, why = due(engine, retrain_config)
            if not ready:
                typer.echo(f"not due: {why}")
                return
        while True:
            if schedule:
                ready, why = due(engine, retrain_config)
                if not ready:
                    typer.echo(f"not due: {why}")
                    time.sleep(check_every * 60)
                    continue
            try:
                trigger = "import" if from_import else "schedule" if schedule or if_due else "manual"
                run = runner.run(trigger=trigger)
            except RetrainBusyError as exc:
                if not schedule:
                    raise fail(str(exc)) from exc
                typer.echo(str(exc))
                time.sleep(check_every * 60)
                continue
            typer.echo(
                f"{run.id}: {run.status}"
                + (f" ({run.candidate})" if run.candidate else "")
                + (f": {run.reason}" if run.reason else "")
            )
            if not schedule:
                if run.status == "failed":
                    raise typer.Exit(1)
                return


@runs_app.command("list")
def runs_list(limit: Annotated[int, typer.Option(help="Most recent runs shown.")] = 20) -> None:
    """Recent retraining runs: outcome, method, dataset, candidate, durations."""
    from rich.console import Console
    from rich.table import Table
    from sqlmodel import Session, col, select

    from feedback.models import TrainingRun

    with database() as (_, engine), Session(engine) as session:
        runs = session.exec(
            select(TrainingRun).order_by(col(TrainingRun.started_at).desc()).limit(limit)
        ).all()
    table = Table("run", "status", "trigger", "method", "dataset", "candidate", "seconds", "reason")
    for run in runs:
        seconds = f"{sum(run.durations.values()):.0f}" if run.durations else "-"
        table.add_row(
            run.id,
            run.status,
            run.trigger,
            run.method or "",
            run.dataset_version or "",
            run.candidate or "",
            seconds,
            (run.reason or "")[:80],
        )
    Console(width=160).print(table)


@runs_app.command("show")
def runs_show(run_id: Annotated[str, typer.Argument(help="Run id.")]) -> None:
    """One run in full, with its selected samples (why each was picked)."""
    from sqlmodel import Session, select

    from feedback.models import TrainingRun, TrainingSample

    with database() as (_, engine), Session(engine) as session:
        run = session.get(TrainingRun, run_id)
        if run is None:
            raise fail(f"no run {run_id!r}")
        samples = session.exec(select(TrainingSample).where(TrainingSample.run_id == run_id)).all()
        body = run.model_dump(mode="json")
        body["samples"] = [
            {"completion_id": s.completion_id, "score": round(s.score, 4), "reasons": s.reasons}
            for s in samples
        ]
    typer.echo(json.dumps(body, indent=2))


def demo(
    users: Annotated[int, typer.Option(help="Simulated users per phase (one question each).")] = 48,
    train_steps: Annotated[int, typer.Option(help="SFT steps of the retraining run.")] = 40,
    data_dir: Annotated[
        Path | None, typer.Option(help="Work folder; default: <data_dir>/demo-<time>.")
    ] = None,
) -> None:
    """One turn of the loop on the embedded model with simulated users of known taste."""
    from datetime import UTC, datetime

    from loopchat.settings import Settings
    from retrain.demo import run_demo

    settings = Settings()
    folder = data_dir or settings.data_dir / f"demo-{datetime.now(UTC):%Y%m%d-%H%M%S}"
    typer.echo(f"demo in {folder} (server, database, adapters); this takes a few minutes on a CPU")
    report = run_demo(folder, users=users, train_steps=train_steps, base_model=settings.model_path)
    for line in report.lines():
        typer.echo(line)


def simulate(
    population: Annotated[
        str,
        typer.Option(
            help=f"The simulated users: a built-in population ({', '.join(BUILT_INS)}) "
            "or module:attr of your own (see retrain/populations.py)."
        ),
    ],
    users: Annotated[int, typer.Option(min=1, help="Simulated users per phase (one question each).")] = 48,
    turns: Annotated[int, typer.Option(min=1, help="Loop turns; later turns start from the champion.")] = 1,
    train_steps: Annotated[
        int | None, typer.Option(min=1, help="Training steps per run; default: the training decides.")
    ] = None,
    max_ratings: Annotated[
        int, typer.Option(min=0, help="Most ratings or choices posted before each turn's run.")
    ] = 200,
    after_users: Annotated[
        int | None, typer.Option(min=1, help="Users per round of the canary; default: --users.")
    ] = None,
    data_dir: Annotated[
        Path | None, typer.Option(help="Work folder; default: <data_dir>/simulate-<population>-<time>.")
    ] = None,
    results: Annotated[Path | None, typer.Option(help="Also write the report as JSON to this file.")] = None,
) -> None:
    """Turns of the loop on the embedded model against a simulated population of known taste."""
    from datetime import UTC, datetime

    from loopchat.settings import Settings
    from retrain.populations import PopulationError, load_population
    from retrain.simulate import run_simulation, simulation_config

    try:
        simulated = load_population(population)
    except PopulationError as exc:
        raise fail(str(exc)) from exc
    settings = Settings()
    stamp = f"{datetime.now(UTC):%Y%m%d-%H%M%S}"
    folder = data_dir or settings.data_dir / f"simulate-{simulated.name}-{stamp}"
    typer.echo(
        f"simulation in {folder} (server, database, adapters); this takes a few minutes per turn on a CPU"
    )
    report = run_simulation(
        simulated,
        folder,
        users=users,
        turns=turns,
        train_config=simulation_config(train_steps),
        base_model=settings.model_path,
        max_ratings=max_ratings,
        after_users=after_users,
    )
    for line in report.lines():
        typer.echo(line)
    if results is not None:
        results.write_text(json.dumps(report.as_dict(), indent=2) + "\n")
        typer.echo(f"wrote {results}")
