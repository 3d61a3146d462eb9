"""The model registry: every model version (a LoRA adapter on the base) and its status, in the database.

The database is the source of truth for every serving process: a change here bumps
`registry_state.revision`, and each process's `RegistryWatcher` (serving/registry_sync.py) loads,
unloads and re-routes when it sees a new revision. The base model has no row; it is the version
the alias serves while no version is active.

Statuses: candidate (registered, served by name), canary (a variant of the running experiment),
active (the alias `loopchat` serves it; at most one), rejected (failed evaluation or rolled
back), retired (taken out of service). The first three are kept loaded on every process.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import delete, update
from sqlmodel import Session, col, select

from feedback.models import (
    SERVABLE_STATUSES,
    VERSION_STATUSES,
    Experiment,
    ModelVersionRecord,
    RegistryState,
    ServingReplica,
    utcnow,
)
from loopchat.errors import AdapterLoadError, ConflictError, InvalidInputError, ModelNotFoundError


class RegistryError(InvalidInputError):
    """A request the registry refuses (the caller's fault)."""


class VersionNotFoundError(ModelNotFoundError):
    """No registered version of that name."""


class VersionConflictError(ConflictError, RegistryError):
    """The change contradicts the version's state (retiring the active version, a taken name)."""

    def __init__(self, message: str, *, param: str | None = "name") -> None:
        super().__init__(message, param=param)


def bump_revision(session: Session) -> None:
    """Tell every serving process that the registry or an experiment changed."""
    session.exec(
        update(RegistryState).where(col(RegistryState.id) == 1).values(revision=RegistryState.revision + 1)
    )


def registry_revision(*, session: Session) -> int:
    state = session.get(RegistryState, 1)
    return 0 if state is None else state.revision


def read_adapter_config(
    path: Path, *, max_rank: int | None = None, require_weights: bool = True
) -> dict[str, Any]:
    """The adapter's peft config, after the checks that would make the engine fail on it."""
    config_file = path / "adapter_config.json"
    if not config_file.is_file():
        raise AdapterLoadError(f"{path} has no adapter_config.json (not a peft LoRA)")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise AdapterLoadError(f"{config_file} is not valid JSON") from exc
    if not isinstance(config, dict):
        raise AdapterLoadError(f"{config_file} is not a JSON object")
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterLoadError(f"{path} is a {config.get('peft_type')} adapter, not LoRA")
    rank = int(config.get("r", 0))
    if max_rank is not None and rank > max_rank:
        raise AdapterLoadError(f"adapter rank {rank} exceeds the engine's max_lora_rank {max_rank}")
    weights = ("adapter_model.safetensors", "adapter_model.bin")
    if require_weights and not any((path / name).is_file() for name in weights):
        raise AdapterLoadError(f"{path} has no adapter weights")
    return config


def check_adapter_base(config: dict[str, Any], *, base_model: Path, base_name: str) -> None:
    """Refuse an adapter trained on another base model (by name: the weights' shapes are the
    engine's check when it loads)."""
    trained_on = config.get("base_model_name_or_path")
    if not trained_on:
        return
    names = {base_name, base_model.name, str(base_model)}
    if trained_on not in names and Path(str(trained_on)).name not in names:
        raise AdapterLoadError(
            f"adapter was trained on {trained_on!r}; this service serves {base_model.name!r}"
        )


@dataclass(frozen=True, slots=True)
class Lineage:
    """Where a version comes from, as training records it."""

    parent: str | None = None
    dataset_version: str | None = None
    training_run: str | None = None
    metrics: dict[str, Any] | None = None


def list_versions(*, session: Session, status: str | None = None) -> list[ModelVersionRecord]:
    query = select(ModelVersionRecord).order_by(col(ModelVersionRecord.created_at))
    if status is not None:
        query = query.where(ModelVersionRecord.status == status)
    return list(session.exec(query))


def get_version(*, session: Session, name: str) -> ModelVersionRecord:
    record = session.get(ModelVersionRecord, name)
    if record is None:
        raise VersionNotFoundError(name, param="name")
    return record


def register_version(
    *,
    session: Session,
    name: str,
    adapter_path: Path,
    base_model: str,
    info: Lineage = Lineage(),
    status: str = "candidate",
    reason: str | None = None,
) -> ModelVersionRecord:
    """Add a version (the caller has validated the adapter).

    Names are never reused for other weights: a name that exists is a conflict, except a retired
    version registered again from the same folder, which comes back as a candidate.
    """
    if status not in VERSION_STATUSES or status == "active":
        raise RegistryError(f"a version is registered as candidate, canary or rejected, not {status!r}")
    existing = session.get(ModelVersionRecord, name)
    if existing is not None:
        if existing.status != "retired" or existing.adapter_path != str(adapter_path):
            raise VersionConflictError(f"model version {name!r} already exists")
        return set_status(session=session, name=name, status=status, reason=reason or "registered again")
    record = ModelVersionRecord(
        name=name,
        base_model=base_model,
        adapter_path=str(adapter_path),
        parent=info.parent,
        dataset_version=info.dataset_version,
        training_run=info.training_run,
        metrics=info.metrics or {},
        status=status,
        status_reason=reason,
    )
    session.add(record)
    bump_revision(session)
    return record


def set_status(*, session: Session, name: str, status: str, reason: str | None = None) -> ModelVersionRecord:
    if status not in VERSION_STATUSES:
        raise RegistryError(f"unknown status {status!r}")
    record = get_version(session=session, name=name)
    if status == "active":
        _demote_active(session, except_name=name)
    record.status = status
    record.status_reason = reason
    record.updated_at = utcnow()
    session.add(record)
    bump_revision(session)
    return record


def activate(*, session: Session, name: str | None, base_name: str, reason: str | None = None) -> None:
    """Make `name` the version the alias serves (None or the base name: the base model)."""
    if name is None or name == base_name:
        _demote_active(session, except_name=None)
        bump_revision(session)
        return
    record = get_version(session=session, name=name)
    if record.status in ("rejected", "retired"):
        raise VersionConflictError(f"model version {name!r} is {record.status}; register it again to use it")
    set_status(session=session, name=name, status="active", reason=reason)


def retire_version(*, session: Session, name: str, reason: str | None = None) -> ModelVersionRecord:
    record = get_version(session=session, name=name)
    if record.status == "active":
        raise VersionConflictError(f"model version {name!r} is active; activate another one first")
    running = session.exec(select(Experiment).where(Experiment.status == "running")).first()
    if running is not None and name in {v["version"] for v in running.variants}:
        raise VersionConflictError(f"model version {name!r} is in the running experiment {running.name!r}")
    return set_status(session=session, name=name, status="retired", reason=reason or "retired")


def active_version(*, session: Session) -> ModelVersionRecord | None:
    return session.exec(select(ModelVersionRecord).where(ModelVersionRecord.status == "active")).first()


def servable_versions(*, session: Session) -> list[ModelVersionRecord]:
    query = select(ModelVersionRecord).where(col(ModelVersionRecord.status).in_(SERVABLE_STATUSES))
    return list(session.exec(query.order_by(col(ModelVersionRecord.created_at))))


def _demote_active(session: Session, *, except_name: str | None) -> None:
    # The previous active version stays loaded as a candidate: a quick way back.
    current = active_version(session=session)
    if current is not None and current.name != except_name:
        current.status = "candidate"
        current.status_reason = "replaced as the active version"
        current.updated_at = utcnow()
        session.add(current)
        # The partial unique index allows one active row: write this change first.
        session.flush()


# A replica that has not reported for this long is shown as stale, and forgotten after a day.
REPLICA_STALE_AFTER = timedelta(seconds=90)
REPLICA_FORGOTTEN_AFTER = timedelta(days=1)


def report_replica(report: ServingReplica, *, session: Session) -> None:
    """Record what one serving process serves now (replacing its previous report)."""
    stored = session.get(ServingReplica, report.replica)
    if stored is not None:
        report.started_at = stored.started_at
    report.updated_at = utcnow()
    session.merge(report)
    session.exec(
        delete(ServingReplica).where(col(ServingReplica.updated_at) < utcnow() - REPLICA_FORGOTTEN_AFTER)
    )
    session.commit()


def list_replicas(*, session: Session) -> list[ServingReplica]:
    return list(session.exec(select(ServingReplica).order_by(col(ServingReplica.replica))))
