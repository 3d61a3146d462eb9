"""Small LoRA adapters made on the spot from the base model (tests and benchmarks)."""

from __future__ import annotations

from pathlib import Path


def make_lora_adapter(
    base_model: Path,
    out_dir: Path,
    *,
    rank: int = 8,
    seed: int = 0,
    std: float = 0.02,
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj"),
) -> Path:
    """Save a peft LoRA whose A and B are random, so it visibly changes greedy output.

    peft initialises B to zero (a no-op adapter); both matrices get N(0, std) here instead.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    if (out_dir / "adapter_config.json").is_file():
        return out_dir
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32)
    config = LoraConfig(
        r=rank, lora_alpha=2 * rank, target_modules=list(target_modules), task_type="CAUSAL_LM"
    )
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                param.normal_(0.0, std)
    peft_model.save_pretrained(out_dir)
    return out_dir


def make_adapter_dir(folder: Path) -> Path:
    """A folder the fake engine accepts as an adapter (config only, no weights)."""
    import json

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    return folder
