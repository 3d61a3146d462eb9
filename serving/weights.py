"""The weights a replica serves: the active model version merged into the base weights, and every
other version as an exact LoRA delta over them.

A LoRA adapter changes a linear layer's weight W by s·B·A (s = lora_alpha / r, or lora_alpha / √r
with rsLoRA). Once the active version's change is folded into W, serving version T means adding
ΔT − ΔL, where L is the merged (live) version: a difference of two low-rank products is itself
low-rank, [sT·BT | −sL·BL] · [AT ; AL], of rank rT + rL. Written as a peft adapter with scale 1,
vLLM serves it as any other LoRA: the base model is the delta −ΔL, the merged version needs none.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from loopchat.errors import AdapterLoadError

if TYPE_CHECKING:
    import torch

# peft's key for one LoRA matrix: base_model.model.<module path>.lora_A.weight (B alike).
_LORA_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<side>[AB])(?:\.[^.]+)?\.weight$")


@dataclass(frozen=True, slots=True)
class LowRank:
    """One module's change s·B·A, the scale folded into B: B (out × r), A (r × in)."""

    a: torch.Tensor
    b: torch.Tensor

    @property
    def rank(self) -> int:
        return self.a.shape[0]


def _pattern_value(patterns: dict[str, float], module: str, default: float) -> float:
    # peft's rank_pattern/alpha_pattern keys match the end of a module's name (or a regex of it).
    for key, value in patterns.items():
        if module == key or module.endswith("." + key) or re.fullmatch(key, module):
            return value
    return default


def read_lora(folder: Path) -> dict[str, LowRank]:
    """A peft LoRA adapter's change, by module path (e.g. `model.layers.0.self_attn.q_proj`)."""
    import torch
    from safetensors.torch import load_file

    config = json.loads((folder / "adapter_config.json").read_text())
    if config.get("modules_to_save"):
        raise AdapterLoadError(f"{folder}: adapters with modules_to_save cannot be served as LoRA deltas")
    if config.get("use_dora"):
        raise AdapterLoadError(f"{folder}: DoRA adapters cannot be served as LoRA deltas")
    weights_file = folder / "adapter_model.safetensors"
    if not weights_file.is_file():
        raise AdapterLoadError(f"{folder} has no adapter_model.safetensors")
    tensors = load_file(str(weights_file))
    sides: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _LORA_KEY.match(key)
        if match is None:
            raise AdapterLoadError(f"{folder}: unexpected tensor {key!r} in a LoRA adapter")
        sides.setdefault(match["module"], {})[match["side"]] = tensor.to(torch.float32)
    changes = {}
    for module, pair in sides.items():
        if set(pair) != {"A", "B"}:
            raise AdapterLoadError(f"{folder}: module {module} lacks its lora_A or lora_B")
        rank = pair["A"].shape[0]
        r = _pattern_value(config.get("rank_pattern") or {}, module, config.get("r", rank))
        alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", r))
        scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        changes[module] = LowRank(a=pair["A"], b=pair["B"] * scale)
    return changes


def delta(target: dict[str, LowRank], live: dict[str, LowRank]) -> dict[str, LowRank]:
    """The change that takes weights holding `live` to weights holding `target`: ΔT − ΔL, module
    by module, each of rank rT + rL (a module only one side changes keeps that side alone)."""
    import torch

    out = {}
    for module in sorted(target.keys() | live.keys()):
        parts = [target[module]] if module in target else []
        if module in live:
            parts.append(LowRank(a=live[module].a, b=-live[module].b))
        out[module] = LowRank(a=torch.cat([p.a for p in parts]), b=torch.cat([p.b for p in parts], dim=1))
    return out


def write_lora(changes: dict[str, LowRank], folder: Path, *, base_model: str) -> Path:
    """`changes` as a peft LoRA adapter folder vLLM and peft load: scale 1 (lora_alpha = r), every
    module padded with zero rows to the largest rank."""
    import torch
    from safetensors.torch import save_file

    if not changes:
        raise ValueError("a LoRA adapter needs at least one changed module")
    rank = max(change.rank for change in changes.values())
    tensors = {}
    for module, change in changes.items():
        pad = rank - change.rank
        a = torch.cat([change.a, change.a.new_zeros(pad, change.a.shape[1])])
        b = torch.cat([change.b, change.b.new_zeros(change.b.shape[0], pad)], dim=1)
        tensors[f"base_model.model.{module}.lora_A.weight"] = a.contiguous()
        tensors[f"base_model.model.{module}.lora_B.weight"] = b.contiguous()
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": rank,
        "lora_alpha": rank,
        "lora_dropout": 0.0,
        "bias": "none",
        "use_rslora": False,
        "target_modules": sorted({module.rsplit(".", 1)[-1] for module in changes}),
    }
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    save_file(tensors, str(partial / "adapter_model.safetensors"))
    (partial / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)
    return folder


def write_delta_adapter(
    target: Path | None, live: Path | None, folder: Path, *, base_model: str
) -> Path | None:
    """The adapter that serves version `target` (None: the base model) on weights with `live`
    merged (None: the base weights); None when the two are the same weights."""
    if target == live:
        return None
    changes = delta(read_lora(target) if target else {}, read_lora(live) if live else {})
    return write_lora(changes, folder, base_model=base_model)


def merge_adapter(base_model: Path, adapter: Path, folder: Path) -> Path:
    """The base model with `adapter` folded into its weights, saved as a model folder (with the
    base's tokenizer and chat template) vLLM loads or reloads in place."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    merged.save_pretrained(partial, safe_serialization=True)
    for item in base_model.iterdir():
        # The tokenizer, chat template and generation config, as the base has them.
        if item.is_file() and not (partial / item.name).exists() and not item.name.startswith("model"):
            shutil.copy2(item, partial / item.name)
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)
    return folder


_ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def _fingerprint(adapter: Path) -> str:
    """A short hash of an adapter's files: a name registered again with other weights gets
    other merged weights and deltas. Hashed once per file state (a promotion asks for the live
    version's key once per other version)."""
    stats = tuple((s.st_size, s.st_mtime_ns) for s in ((adapter / n).stat() for n in _ADAPTER_FILES))
    return _hash_files(adapter, stats)


@functools.lru_cache(maxsize=64)
def _hash_files(adapter: Path, stats: tuple[tuple[int, int], ...]) -> str:
    digest = hashlib.sha256()
    for name in _ADAPTER_FILES:
        with (adapter / name).open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:12]


def _rank(adapter: Path | None) -> int:
    if adapter is None:
        return 0
    config = json.loads((adapter / "adapter_config.json").read_text())
    return max([int(config.get("r", 0)), *map(int, (config.get("rank_pattern") or {}).values())])


Version = tuple[str, Path | None]  # a model version's name and adapter folder (None: the base)


class WeightStore:
    """Merged models and LoRA deltas on disk under `root`, built once per version and weights:
    merged/<version>-<hash>/ is a model folder, deltas/<live>-<hash>/<version>-<hash>/ an adapter."""

    def __init__(self, root: Path, base_model: Path, *, max_rank: int | None = None) -> None:
        self.root = root
        self.base_model = base_model
        # The engine's max_lora_rank: a delta has the ranks of its two versions added up.
        self.max_rank = max_rank

    def _key(self, version: Version) -> str:
        name, adapter = version
        return f"{name}-{_fingerprint(adapter)}" if adapter is not None else f"{name}-base"

    def merged(self, version: Version) -> Path:
        """The model folder holding `version`'s weights (the base model's own for the base)."""
        name, adapter = version
        if adapter is None:
            return self.base_model
        folder = self.root / "merged" / self._key(version)
        if not (folder / "config.json").is_file():
            read_lora(adapter)  # refuses what cannot be served as deltas before any work
            merge_adapter(self.base_model, adapter, folder)
        return folder

    def delta(self, version: Version, live: Version) -> Path | None:
        """The adapter that serves `version` on `live`'s merged weights; None when it is `live`.
        On the base weights a version's own adapter is its delta."""
        if version[0] == live[0]:
            return None
        if live[1] is None:
            return version[1]
        if self.max_rank is not None:
            rank = _rank(version[1]) + _rank(live[1])
            if rank > self.max_rank:
                raise AdapterLoadError(
                    f"{version[0]} over {live[0]} needs a LoRA of rank {rank}, above the engine's "
                    f"max_lora_rank {self.max_rank}"
                )
        folder = self.root / "deltas" / self._key(live) / self._key(version)
        if not (folder / "adapter_config.json").is_file():
            write_delta_adapter(version[1], live[1], folder, base_model=str(self.base_model))
        return folder

    def prune(self, live: Version) -> None:
        """Removes the merged weights and deltas of every other live version (a merged model is
        as large as the base)."""
        keep = self._key(live)
        for kind in ("merged", "deltas"):
            for folder in (self.root / kind).glob("*"):
                if folder.name != keep:
                    shutil.rmtree(folder, ignore_errors=True)
