"""Experiment definitions and sticky assignment: what an A/B test is and who gets which variant.

Assignment is a pure function of the experiment's salt and the user key, so every replica
routes a user alike and a restart changes nothing; the request path (serving/router.py) needs
only this module. The service that starts, changes and decides experiments is
rollout/experiments.py.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from loopchat.errors import ConflictError, NotFoundError
from loopchat.names import VersionName
from rollout.abstats import DecisionPolicy
from rollout.registry import RegistryError

CONTROL = "control"
Name = VersionName


class ExperimentError(RegistryError):
    """An experiment request the service refuses (the caller's fault)."""


class ExperimentNotFoundError(NotFoundError):
    code = "experiment_not_found"

    def __init__(self, name: str) -> None:
        super().__init__(f"No experiment `{name}`.", param="name")
        self.name = name


class StaleExperimentError(ConflictError, ExperimentError):
    """Another process changed the experiment after it was read."""

    def __init__(self) -> None:
        super().__init__("the experiment changed meanwhile; retry")


class VariantSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Name
    version: Name | None = Field(None, description="Model version; default: the variant's name.")
    weight: float = Field(0, ge=0, le=100, description="Percent of traffic (without a ramp).")

    @property
    def model_version(self) -> str:
        return self.version or self.name


class ExperimentSpec(BaseModel):
    """An experiment as written in YAML or posted to the admin API."""

    model_config = ConfigDict(extra="forbid")

    name: Name
    control: Name | None = Field(None, description="Control version; default: the active one.")
    variants: list[VariantSpec] = Field(..., min_length=1, description="The candidate versions.")
    ramp: list[float] = Field(default_factory=list, description="Candidates' percent per stage, rising.")
    min_samples_per_stage: int = Field(200, ge=1, description="Requests per candidate before the next stage.")
    salt: str | None = Field(None, max_length=128, description="Assignment salt; default: the name.")
    auto: bool = Field(True, description="Apply promote / roll back / ramp decisions automatically.")
    policy: DecisionPolicy = Field(default_factory=DecisionPolicy)

    @model_validator(mode="after")
    def _check(self) -> ExperimentSpec:
        names = [v.name for v in self.variants]
        if CONTROL in names or len(set(names)) != len(names):
            raise ValueError(f"variant names must be unique and not {CONTROL!r}")
        versions = [v.model_version for v in self.variants]
        if len(set(versions)) != len(versions) or (self.control is not None and self.control in versions):
            raise ValueError(
                "each variant must serve a different model version than the others and the control"
            )
        if self.ramp:
            if any(not 0 < p <= 100 for p in self.ramp) or any(
                b <= a for a, b in zip(self.ramp, self.ramp[1:], strict=False)
            ):
                raise ValueError("ramp stages must rise strictly, each above 0 and at most 100 percent")
        elif sum(v.weight for v in self.variants) > 100:
            raise ValueError("the variants' weights add up to more than 100 percent")
        elif sum(v.weight for v in self.variants) == 0:
            raise ValueError("give the variants weights or a ramp")
        return self


def load_specs(path: Path) -> list[ExperimentSpec]:
    """Experiments from a YAML file: one mapping, a list, or a mapping with `experiments:`."""
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ExperimentError(f"cannot read {path}: {exc}") from exc
    if isinstance(data, dict) and "experiments" in data:
        data = data["experiments"]
    items = data if isinstance(data, list) else [data]
    try:
        return [ExperimentSpec.model_validate(item) for item in items]
    except ValidationError as exc:
        raise ExperimentError(f"{path}: {exc}") from exc


# -- assignment --------------------------------------------------------------------------------


def bucket(salt: str, key: str) -> float:
    """A uniform number in [0, 1) fixed by salt and key: identical on every replica and restart."""
    digest = hashlib.blake2b(f"{salt}\x00{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def assign(salt: str, key: str, variants: list[dict[str, Any]]) -> dict[str, Any]:
    """The variant of `key`. Candidates take the bottom of [0, 100) in order, the control the
    rest: raising a candidate's weight only moves users from the control to it."""
    point = bucket(salt, key) * 100
    edge = 0.0
    control = None
    for variant in variants:
        if variant["name"] == CONTROL:
            control = variant
            continue
        if variant.get("disabled"):
            continue
        edge += variant["weight"]
        if point < edge:
            return variant
    assert control is not None
    return control


def stage_weights(variants: list[dict[str, Any]], percent: float) -> list[dict[str, Any]]:
    """Weights for a ramp stage: `percent` shared by the enabled candidates, the rest to control."""
    enabled = [v for v in variants if v["name"] != CONTROL and not v.get("disabled")]
    share = percent / len(enabled) if enabled else 0.0
    updated = []
    for variant in variants:
        if variant["name"] == CONTROL:
            weight = 100.0 - (share * len(enabled))
        else:
            weight = 0.0 if variant.get("disabled") else share
        updated.append({**variant, "weight": round(weight, 6)})
    return updated


def weights_of(variants: list[dict[str, Any]]) -> dict[str, float]:
    return {v["name"]: v["weight"] for v in variants}
