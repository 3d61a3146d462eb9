"""Names every package agrees on: the serving alias, how a model version may be named, and which
names are reserved."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import StringConstraints

from loopchat.errors import ConflictError, InvalidInputError

# The model name that follows the active version (and the running experiment's split).
ALIAS_MODEL = "loopchat"

# A model version (and experiment, variant) name: safe in URLs, file names and Prometheus labels.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$"
VersionName = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=NAME_PATTERN)]


def reserved_names(base_name: str) -> tuple[str, ...]:
    """Names no version may take: the alias and the base model's own name."""
    return (ALIAS_MODEL, base_name)


def check_version_name(name: str, *, base_name: str) -> None:
    """Raise when `name` cannot name a new model version."""
    if not re.fullmatch(NAME_PATTERN, name):
        raise InvalidInputError(
            "a version name is 1-128 letters, digits, _ . : - and starts with a letter or digit",
            param="name",
        )
    if name in reserved_names(base_name):
        raise ConflictError(f"{name!r} is reserved", param="name")
