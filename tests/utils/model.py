"""Where the suite finds its data and the embedded model (converted once, as `make test` does)."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def data_dir() -> Path:
    return Path(os.environ.get("LOOPCHAT_DATA_DIR", REPO / ".data")).resolve()


@lru_cache(maxsize=1)
def embedded_model_path() -> Path:
    """The embedded model's folder, prepared on first use."""
    from loopchat.embedded_model import prepare

    return prepare(data_dir() / "models" / "SmolLM2-135M-Instruct")
