"""`loopchat adapters ...` and `loopchat ab ...`: the model registry and experiments, on the database.

These commands talk to the database directly (as `loopchat db` does); every running server
follows within its poll interval (LOOPCHAT_AB__POLL_INTERVAL_S).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

from feedback.cli import database
from loopchat.console import fail
from loopchat.errors import LoopchatError

adapters_app = typer.Typer(help="Model versions (LoRA adapters) in the registry.", no_args_is_help=True)
ab_app = typer.Typer(help="A/B experiments and canaries on the alias `loopchat`.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(adapters_app, name="adapters")
    app.add_typer(ab_app, name="ab")


def _console():
    from rich.console import Console

    return Console(width=140)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


# -- adapters ----------------------------------------------------------------------------------


@adapters_app.command("list")
def adapters_list(
    status: Annotated[str | None, typer.Option(help="Only versions with this status.")] = None,
) -> None:
    """Every registered model version with its status and lineage."""
    from rich.table import Table
    from sqlmodel import Session

    from rollout.registry import list_versions

    with database() as (settings, engine), Session(engine) as session:
        rows = list_versions(session=session, status=status)
    table = Table("name", "status", "parent", "dataset", "run", "created (UTC)", "adapter", "reason")
    table.add_row(settings.model_name, "base", "", "", "", "", str(settings.model_path), "")
    for row in rows:
        created = row.created_at.strftime("%Y-%m-%d %H:%M")
        lineage = (row.parent or "", row.dataset_version or "", row.training_run or "")
        table.add_row(row.name, row.status, *lineage, created, row.adapter_path, row.status_reason or "")
    _console().print(table)


@adapters_app.command("register")
def adapters_register(
    name: Annotated[str, typer.Argument(help="Version name (letters, digits, _ . : -).")],
    path: Annotated[Path, typer.Argument(help="Adapter folder (adapter_config.json and weights).")],
    parent: Annotated[str | None, typer.Option(help="Version it was trained from.")] = None,
    dataset_version: Annotated[str | None, typer.Option(help="Dataset version it was trained on.")] = None,
    training_run: Annotated[str | None, typer.Option(help="Training run id.")] = None,
    metrics: Annotated[str | None, typer.Option(help="Evaluation metrics as a JSON object.")] = None,
) -> None:
    """Register an adapter as a candidate version; every server loads it."""
    from sqlmodel import Session

    from loopchat.names import check_version_name
    from rollout.registry import (
        Lineage,
        check_adapter_base,
        read_adapter_config,
        register_version,
    )

    try:
        parsed = json.loads(metrics) if metrics else {}
    except json.JSONDecodeError as exc:
        raise fail(f"--metrics is not JSON: {exc}") from exc
    if not isinstance(parsed, dict):
        raise fail("--metrics must be a JSON object")
    with database() as (settings, engine):
        if not path.is_dir():
            raise fail(f"{path} is not a folder")
        try:
            check_version_name(name, base_name=settings.model_name)
            config = read_adapter_config(path, max_rank=settings.engine.max_lora_rank)
            check_adapter_base(config, base_model=settings.model_path, base_name=settings.model_name)
            with Session(engine) as session:
                info = Lineage(parent or settings.model_name, dataset_version, training_run, parsed)
                register_version(
                    session=session,
                    name=name,
                    adapter_path=path.resolve(),
                    base_model=settings.model_name,
                    info=info,
                )
                session.commit()
        except LoopchatError as exc:
            raise fail(exc.message) from exc
    typer.echo(f"registered {name} (candidate); servers load it within {settings.ab.poll_interval_s:g} s")


@adapters_app.command("retire")
def adapters_retire(name: Annotated[str, typer.Argument(help="Version name.")]) -> None:
    """Take a version out of service; every server unloads it."""
    _registry_change(lambda session, _settings: _retire(session, name))
    typer.echo(f"retired {name}")


@adapters_app.command("activate")
def adapters_activate(
    name: Annotated[str, typer.Argument(help="Version name, or the base model's name.")],
) -> None:
    """Make a version the one the alias `loopchat` serves (outside any experiment)."""
    from rollout.registry import activate

    _registry_change(
        lambda session, settings: activate(session=session, name=name, base_name=settings.model_name)
    )
    typer.echo(f"active: {name}")


def _retire(session, name: str) -> None:
    from rollout.registry import retire_version

    retire_version(session=session, name=name)


def _registry_change(change) -> None:
    from sqlmodel import Session

    with database() as (settings, engine), Session(engine) as session:
        _run(change, session, settings)
        session.commit()


# -- experiments -------------------------------------------------------------------------------


@contextmanager
def _service() -> Iterator[tuple[Any, Any]]:
    """The experiment service on the configured database, and that database."""
    from rollout.experiments import ExperimentService

    with database() as (settings, engine):
        yield ExperimentService(engine, base_name=settings.model_name), engine


def _run(call, *args, **kwargs) -> Any:
    """A service call; a domain error becomes the command's error line."""
    try:
        return call(*args, **kwargs)
    except LoopchatError as exc:
        raise _failure(exc) from None


def _failure(exc: LoopchatError) -> typer.Exit:
    from rollout.experiment_spec import ExperimentNotFoundError
    from rollout.registry import VersionNotFoundError

    if isinstance(exc, ExperimentNotFoundError):
        return fail(f"no experiment {exc.name!r}")
    if isinstance(exc, VersionNotFoundError):
        return fail(f"no model version {exc.name!r}")
    return fail(exc.message)


@ab_app.command("start")
def ab_start(
    file: Annotated[Path, typer.Argument(help="YAML file with one experiment or `experiments:`.")],
    name: Annotated[str | None, typer.Option(help="Start only this experiment of the file.")] = None,
) -> None:
    """Start an experiment defined in YAML (see deploy/experiments.example.yaml)."""
    from rollout.experiment_spec import load_specs

    specs = _run(load_specs, file)
    if name is not None:
        specs = [s for s in specs if s.name == name]
        if not specs:
            raise fail(f"{file} has no experiment {name!r}")
    if len(specs) != 1:
        raise fail(f"{file} defines {len(specs)} experiments; choose one with --name")
    with _service() as (service, _):
        experiment = _run(service.start, specs[0])
    typer.echo(f"started {experiment.name}: " + _weights_text(experiment.variants))


@ab_app.command("status")
def ab_status(
    name: Annotated[str | None, typer.Argument(help="Experiment; default: the running one.")] = None,
):
    """Weights, outcomes per variant and the always-valid test of each candidate."""
    with _service() as (service, _):
        name = name or _running_name(service)
        _print_status(_run(service.status, name))


@ab_app.command("weights")
def ab_weights(
    name: Annotated[str, typer.Argument(help="Experiment.")],
    weights: Annotated[
        list[str], typer.Argument(help="VARIANT=PERCENT for candidates; control gets the rest.")
    ],
) -> None:
    """Set fixed weights (ends the ramp)."""
    parsed: dict[str, float] = {}
    for item in weights:
        variant, sep, value = item.partition("=")
        try:
            parsed[variant] = float(value)
        except ValueError:
            raise fail(f"{item!r} is not VARIANT=PERCENT") from None
        if not sep or not variant:
            raise fail(f"{item!r} is not VARIANT=PERCENT")
    with _service() as (service, _):
        experiment = _run(service.set_weights, name, parsed)
    typer.echo(f"{name}: " + _weights_text(experiment.variants))


@ab_app.command("promote")
def ab_promote(
    name: Annotated[str, typer.Argument(help="Experiment.")],
    variant: Annotated[str | None, typer.Option(help="Candidate variant (needed with several).")] = None,
    reason: Annotated[str, typer.Option(help="Why, for the audit log.")] = "",
) -> None:
    """Make a candidate the active version and end the experiment."""
    with _service() as (service, _):
        _run(service.promote, name, variant, reason=reason)
    typer.echo(f"{name}: promoted")


@ab_app.command("rollback")
def ab_rollback(
    name: Annotated[str, typer.Argument(help="Experiment.")],
    variant: Annotated[str | None, typer.Option(help="Candidate variant; default: all.")] = None,
    reason: Annotated[str, typer.Option(help="Why, for the audit log.")] = "",
) -> None:
    """Reject a candidate and send its traffic to the control."""
    with _service() as (service, _):
        experiment = _run(service.rollback, name, variant, reason=reason)
    typer.echo(f"{name}: rolled back ({experiment.status})")


@ab_app.command("stop")
def ab_stop(name: Annotated[str, typer.Argument(help="Experiment.")]) -> None:
    """End an experiment without a winner."""
    with _service() as (service, _):
        _run(service.stop, name)
    typer.echo(f"{name}: stopped")


@ab_app.command("report")
def ab_report(
    name: Annotated[str, typer.Argument(help="Experiment.")],
    png: Annotated[Path | None, typer.Option(help="Chart file; default: <name>.png here.")] = None,
) -> None:
    """The status table, every decision, and a PNG chart of each variant's rate over time."""
    from rollout.abreport import plot_rates, rate_series
    from rollout.outcomes import judged_ratings

    with _service() as (service, engine):
        status = _run(service.status, name)
        _print_status(status)
        policy = status["experiment"].spec.get("policy", {})
        series = rate_series(judged_ratings(engine, name), alpha=status["alpha"], tau=policy.get("tau", 0.08))
    out = plot_rates(
        series, png or Path(f"{name}.png"), title=f"{name}: positive rate, always-valid interval"
    )
    typer.echo(f"chart: {out}")


def _running_name(service) -> str:
    running = service.running()
    if running is None:
        raise fail("no experiment is running; name one")
    return running.name


def _weights_text(variants: list[dict]) -> str:
    return ", ".join(
        f"{v['name']}={v['version']} {v['weight']:g}%" + (" (rolled back)" if v.get("disabled") else "")
        for v in variants
    )


def _print_status(status: dict) -> None:
    from rich.table import Table

    experiment = status["experiment"]
    console = _console()
    stage = f", ramp stage {experiment.stage + 1}/{len(experiment.ramp)}" if experiment.ramp else ""
    console.print(
        f"[bold]{experiment.name}[/bold] ({experiment.status}{stage}): {_weights_text(experiment.variants)}"
    )
    columns = (
        "variant",
        "version",
        "requests",
        "errors",
        "p95 ms",
        "TTFT p95",
        "ms/token p95",
        "tokens",
        "judged",
        "positive",
        "stars",
        "corrections",
        "win rate",
        "diff vs control",
        "always-valid p",
        "interval",
    )
    table = Table(*columns)
    for variant, outcome in status["outcomes"].items():
        test = status["tests"].get(variant)
        interval = test and test["interval"]
        table.add_row(
            variant,
            outcome.model_version,
            str(outcome.requests),
            _pct(outcome.error_rate),
            "-" if outcome.latency_p95_ms is None else f"{outcome.latency_p95_ms:.0f}",
            "-" if outcome.ttft_p95_ms is None else f"{outcome.ttft_p95_ms:.0f}",
            "-" if outcome.token_latency_p95_ms is None else f"{outcome.token_latency_p95_ms:.1f}",
            "-" if outcome.mean_completion_tokens is None else f"{outcome.mean_completion_tokens:.1f}",
            str(outcome.judged),
            _pct(outcome.positive_rate),
            "-" if outcome.mean_stars is None else f"{outcome.mean_stars:.2f}",
            _pct(outcome.correction_rate),
            _pct(outcome.win_rate),
            "-" if not test or test["difference"] is None else f"{test['difference']:+.3f}",
            "-" if not test else f"{test['p_value']:.4f}",
            "-" if not interval else f"[{interval[0]:+.3f}, {interval[1]:+.3f}]",
        )
    console.print(table)
    for variant, test in status.get("choice_tests", {}).items():
        low, high = test["interval"] or (None, None)
        share = "-" if test["candidate_rate"] is None else f"{test['candidate_rate']:.3f}"
        console.print(
            f"{variant}: share of side-by-side choices {share} against 1/2, always-valid p "
            f"{test['p_value']:.4f}"
            + ("" if low is None else f", interval of share - 1/2 [{low:+.3f}, {high:+.3f}]")
        )
    console.print(
        f"decides on {status.get('metric', 'ratings')}; threshold: always-valid p <= {status['alpha']:.4f}"
    )
    decisions = Table("at (UTC)", "action", "variant", "by", "reason", "weights after")
    for decision in status["decisions"]:
        at = decision.created_at.strftime("%Y-%m-%d %H:%M:%S")
        after = json.dumps(decision.weights_after)
        decisions.add_row(at, decision.action, decision.variant or "", decision.actor, decision.reason, after)
    console.print(decisions)
