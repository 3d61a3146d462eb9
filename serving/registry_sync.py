"""Keeps one serving process in step with the registry.

`RegistryWatcher.sync` reads the registry revision (one tiny query); when it changed, it loads
the servable versions this process lacks, unloads the ones taken out of service, points the
alias at the active version and hands the router a new table. Every replica runs one, so a
version registered or promoted anywhere is served everywhere within `poll_interval_s`.
`register_adapter` and `bootstrap_registry` record versions from this process; the running
experiment's decisions are made by `rollout.evaluator.ExperimentEvaluator`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from pathlib import Path

from sqlalchemy import Engine
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlmodel import Session, select

from feedback.models import Experiment, ModelVersionRecord, ServingReplica
from loopchat.errors import AdapterLoadError
from loopchat.names import check_version_name
from monitoring.metrics import ExperimentMetrics
from rollout.experiment_spec import ExperimentNotFoundError, load_specs
from rollout.experiments import ExperimentService
from rollout.registry import (
    Lineage,
    VersionConflictError,
    activate,
    active_version,
    check_adapter_base,
    list_versions,
    read_adapter_config,
    register_version,
    registry_revision,
    report_replica,
    servable_versions,
)
from serving.adapters import AdapterConflictError, AdapterSet, UnknownModelError
from serving.engine.base import EngineError
from serving.router import ABRouter, ExperimentRoute, RoutingTable

logger = logging.getLogger(__name__)


class RegistryWatcher:
    def __init__(
        self,
        database: Engine,
        adapters: AdapterSet,
        router: ABRouter,
        metrics: ExperimentMetrics,
        *,
        poll_interval: float = 2.0,
    ) -> None:
        self._database = database
        self._adapters = adapters
        self._router = router
        self._metrics = metrics
        self._poll_interval = poll_interval
        self._seen: int | None = None
        self._lock = asyncio.Lock()
        # Versions that failed to load here, with why; retried every `retry_failed_s` (shared
        # storage that was not mounted yet, a file still being copied) and at every change.
        self.failed: dict[str, str] = {}
        self.retry_failed_s = 30.0
        self._retry_at = 0.0
        self._shrinking: asyncio.Task[None] | None = None
        # This process in the registry's `serving_replica` table (see `report`).
        self.replica = f"{socket.gethostname()}:{os.getpid()}"
        self._reported: dict[str, object] | None = None
        self._reported_at = 0.0

    def _read(self) -> tuple[int, list[ModelVersionRecord], Experiment | None]:
        with Session(self._database) as session:
            revision = registry_revision(session=session)
            versions = servable_versions(session=session)
            experiment = session.exec(select(Experiment).where(Experiment.status == "running")).first()
            return revision, versions, experiment

    def _read_revision(self) -> int:
        with Session(self._database) as session:
            return registry_revision(session=session)

    async def sync(self, *, force: bool = False) -> bool:
        """Apply the registry if it changed; True when something was (re)applied."""
        async with self._lock:
            retry = bool(self.failed) and time.monotonic() >= self._retry_at
            unchanged = not force and not retry and self._seen is not None
            if unchanged and await asyncio.to_thread(self._read_revision) == self._seen:
                await self._fit_lora()  # LoRA room no longer used is given back
                return False
            revision, versions, experiment = await asyncio.to_thread(self._read)
            await self._reconcile(versions)
            variants = experiment.variants if experiment is not None else ()
            self._adapters.serve_routed(
                v["version"] for v in variants if not v.get("disabled") and v["version"] in self._loaded()
            )
            # Before routing: the experiment's traffic starts once the engine has room for it.
            await self._fit_lora()
            self._route(versions, experiment)
            self._seen = revision
            self._retry_at = time.monotonic() + self.retry_failed_s
            self._metrics.registry_revision.set(revision)
            return True

    async def register(
        self, name: str, path: Path, *, base_model: Path, info: Lineage | None = None
    ) -> ModelVersionRecord:
        """`register_adapter` from this process, with no sync in between: the version is loaded
        here before it is recorded, and a sync reading the registry meanwhile would unload it."""
        async with self._lock:
            return await register_adapter(
                self._database, self._adapters, name, path, base_model=base_model, info=info
            )

    async def _reconcile(self, versions: list[ModelVersionRecord]) -> None:
        adapters = self._adapters
        wanted = {v.name: v for v in versions}
        loaded = {v.name for v in adapters.versions()} - {adapters.base.name}
        for name, record in wanted.items():
            if name in loaded:
                continue
            started = time.perf_counter()
            try:
                await adapters.load(name, Path(record.adapter_path), parent=record.parent or None)
            except (AdapterLoadError, AdapterConflictError, EngineError, OSError) as exc:
                self.failed[name] = str(exc)
                self._metrics.adapter_loads.labels("failed").inc()
                self._metrics.adapter_failed.labels(name).set(1)
                logger.error(
                    "model version %s could not be loaded; its traffic goes to control: %s", name, exc
                )
                continue
            self.failed.pop(name, None)
            self._metrics.adapter_loads.labels("ok").inc()
            self._metrics.adapter_failed.labels(name).set(0)
            self._metrics.adapter_load_seconds.observe(time.perf_counter() - started)
            logger.info("model version %s loaded (%s)", name, record.status)
        active = next((v.name for v in versions if v.status == "active" and v.name in self._loaded()), None)
        await adapters.set_active(active)
        for name in loaded - set(wanted):
            try:
                await adapters.unload(name)
                logger.info("model version %s unloaded", name)
            except (UnknownModelError, AdapterConflictError) as exc:
                logger.warning("could not unload %s: %s", name, exc)
        for name in list(self.failed):
            if name not in wanted:
                self.failed.pop(name)
                self._metrics.adapter_failed.labels(name).set(0)

    async def report(self) -> None:
        """Record what this process serves in the registry, when it changed or every
        REPORT_EVERY_S (the rows of processes that stopped reporting show as stale)."""
        state: dict[str, object] = {**self._adapters.serving_state(), "registry_revision": self._seen or 0}
        if state == self._reported and time.monotonic() - self._reported_at < REPORT_EVERY_S:
            return
        await asyncio.to_thread(self._write_report, state)
        self._reported, self._reported_at = state, time.monotonic()

    def _write_report(self, state: dict[str, object]) -> None:
        with Session(self._database) as session:
            report_replica(ServingReplica(replica=self.replica, **state), session=session)

    async def _fit_lora(self) -> None:
        """The engine's LoRA room for what the registry serves: grown before the experiment is
        routed; given back off the sync, since nothing waits for it."""
        if self._adapters.lora_wanted():
            await self._fit()
        elif self._shrinking is None or self._shrinking.done():
            self._shrinking = asyncio.create_task(self._fit(), name="lora-give-back")

    async def _fit(self) -> None:
        try:
            await self._adapters.fit_lora()
        except EngineError as exc:
            logger.error("the engine's LoRA room could not follow the registry: %s", exc)

    def _loaded(self) -> set[str]:
        return {v.name for v in self._adapters.versions()}

    def _route(self, versions: list[ModelVersionRecord], experiment: Experiment | None) -> None:
        self._metrics.on_experiment(experiment.name if experiment is not None else None)
        route = None
        if experiment is not None:
            route = ExperimentRoute(experiment.name, experiment.salt, list(experiment.variants))
            for variant in experiment.variants:
                self._metrics.weight.labels(experiment.name, variant["name"], variant["version"]).set(
                    variant["weight"]
                )
        self._router.update(
            RoutingTable(
                active=self._adapters.active.name, experiment=route, servable=frozenset(self._loaded())
            )
        )

    async def run(self) -> None:
        try:
            await self._poll()
        finally:
            if self._shrinking is not None:
                self._shrinking.cancel()

    async def _poll(self) -> None:
        failing = False
        while True:
            await asyncio.sleep(self._poll_interval)
            try:
                await self.sync()
                await self.report()
            except (SQLAlchemyError, OSError) as exc:
                # Keep serving with the last known table while the database is away; say so once.
                log = logger.debug if failing else logger.warning
                log("registry sync failed, routing by the last known registry: %s", exc.__class__.__name__)
                failing = True
                continue
            except Exception:
                logger.exception("registry sync failed")
                continue
            if failing:
                logger.info("registry sync works again")
                failing = False


REPORT_EVERY_S = 30.0


async def register_adapter(
    database: Engine,
    adapters: AdapterSet,
    name: str,
    path: Path,
    *,
    base_model: Path,
    info: Lineage | None = None,
) -> ModelVersionRecord:
    """Validate a new version by loading it here, then record it; other processes follow.

    Nothing is recorded when the adapter fails to load, was trained on another base, or the
    name is taken (then it is unloaded again).
    """
    info = info or Lineage()
    check_version_name(name, base_name=adapters.base.name)
    # The engine's load checks the weights; the config is read here for the base model's name.
    config = await asyncio.to_thread(read_adapter_config, path, require_weights=False)
    check_adapter_base(config, base_model=base_model, base_name=adapters.base.name)
    await adapters.load(name, path, parent=info.parent)

    def record() -> ModelVersionRecord:
        with Session(database) as session:
            row = register_version(
                session=session,
                name=name,
                adapter_path=path.expanduser().resolve(),
                base_model=adapters.base.name,
                info=Lineage(
                    info.parent or adapters.base.name, info.dataset_version, info.training_run, info.metrics
                ),
            )
            session.commit()
            session.refresh(row)
            return row

    try:
        return await asyncio.to_thread(record)
    except (VersionConflictError, IntegrityError) as exc:
        await adapters.unload(name)
        raise AdapterConflictError(f"model version {name!r} already exists") from exc
    except BaseException:
        await adapters.unload(name)
        raise


async def bootstrap_registry(
    database: Engine,
    adapters: AdapterSet,
    experiments: ExperimentService,
    *,
    adapters_to_register: dict[str, Path],
    active: str | None,
    experiments_file: Path | None,
    base_model: Path,
) -> None:
    """Start-up: configured adapters and experiments go into the registry unless already there,
    and `active` becomes the active version if the registry has none."""

    def known() -> set[str]:
        with Session(database) as session:
            return {v.name for v in list_versions(session=session)}

    names = await asyncio.to_thread(known)
    for name, path in adapters_to_register.items():
        if name not in names:
            await register_adapter(database, adapters, name, path, base_model=base_model)
            logger.info("registered configured adapter %s (%s)", name, path)
    if active is not None:

        def activate_if_none() -> None:
            with Session(database) as session:
                if active_version(session=session) is None:
                    activate(session=session, name=active, base_name=adapters.base.name, reason="configured")
                    session.commit()

        await asyncio.to_thread(activate_if_none)
    if experiments_file is not None:
        for spec in load_specs(experiments_file):
            try:
                await asyncio.to_thread(experiments.get, spec.name)
            except ExperimentNotFoundError:
                await asyncio.to_thread(experiments.start, spec, actor="config")
                logger.info("started experiment %s from %s", spec.name, experiments_file)
