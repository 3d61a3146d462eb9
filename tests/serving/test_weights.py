"""Merged weights and LoRA deltas: every version served over a merged champion is the version."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from loopchat.errors import AdapterLoadError
from serving.weights import LowRank, delta, merge_adapter, read_lora, write_delta_adapter, write_lora
from tests.utils.adapters import make_lora_adapter


def _dense(change: LowRank) -> torch.Tensor:
    return change.b @ change.a


def test_delta_is_the_difference_of_the_two_changes() -> None:
    gen = torch.Generator().manual_seed(0)
    target = {
        "q": LowRank(a=torch.randn(4, 6, generator=gen), b=torch.randn(5, 4, generator=gen)),
        "v": LowRank(a=torch.randn(2, 6, generator=gen), b=torch.randn(5, 2, generator=gen)),
    }
    live = {
        "q": LowRank(a=torch.randn(3, 6, generator=gen), b=torch.randn(5, 3, generator=gen)),
        "o": LowRank(a=torch.randn(3, 6, generator=gen), b=torch.randn(5, 3, generator=gen)),
    }
    out = delta(target, live)
    assert set(out) == {"q", "v", "o"}
    assert out["q"].rank == 7
    torch.testing.assert_close(_dense(out["q"]), _dense(target["q"]) - _dense(live["q"]))
    torch.testing.assert_close(_dense(out["v"]), _dense(target["v"]))
    torch.testing.assert_close(_dense(out["o"]), -_dense(live["o"]))


def test_written_adapter_reads_back_with_its_scale_folded(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(1)

    def low_rank(rank: int, out: int) -> LowRank:
        return LowRank(a=torch.randn(rank, 8, generator=gen), b=torch.randn(out, rank, generator=gen))

    changes = {
        "model.layers.0.self_attn.q_proj": low_rank(3, 8),
        "model.layers.0.self_attn.v_proj": low_rank(5, 4),
    }
    folder = write_lora(changes, tmp_path / "delta", base_model="base")
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == 5
    assert config["target_modules"] == ["q_proj", "v_proj"]
    back = read_lora(folder)
    for module, change in changes.items():
        assert back[module].rank == 5  # padded with zero rows
        torch.testing.assert_close(_dense(back[module]), _dense(change))
    assert not (tmp_path / "delta.partial").exists()


def test_rslora_and_rank_patterns_scale_as_peft_does(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    folder = tmp_path / "rs"
    folder.mkdir()
    a, b = torch.ones(4, 2), torch.ones(2, 4)
    save_file(
        {
            "base_model.model.m.q_proj.lora_A.weight": a,
            "base_model.model.m.q_proj.lora_B.weight": b,
            "base_model.model.m.v_proj.lora_A.weight": a[:2].clone(),
            "base_model.model.m.v_proj.lora_B.weight": b[:, :2].contiguous(),
        },
        str(folder / "adapter_model.safetensors"),
    )
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "use_rslora": True, "rank_pattern": {"v_proj": 2}}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    changes = read_lora(folder)
    torch.testing.assert_close(_dense(changes["m.q_proj"]), (b @ a) * 8 / 2)  # 8 / sqrt(4)
    torch.testing.assert_close(_dense(changes["m.v_proj"]), (b[:, :2] @ a[:2]) * 8 / 2**0.5)


@pytest.mark.parametrize("config", [{"modules_to_save": ["lm_head"]}, {"use_dora": True}])
def test_adapters_that_are_not_plain_lora_are_refused(tmp_path: Path, config: dict) -> None:
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8, **config}))
    with pytest.raises(AdapterLoadError):
        read_lora(tmp_path)


def _logits(model_dir: Path, adapter: Path | None, ids: torch.Tensor) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    with torch.no_grad():
        return model(ids).logits[0]


def test_every_version_over_a_merged_champion_is_that_version(base_model_path: Path, tmp_path: Path) -> None:
    """With the champion merged, the candidate, the base and the champion itself (no adapter)
    give transformers+peft's logits of each version on the base weights."""
    champion = make_lora_adapter(base_model_path, tmp_path / "champion", rank=8, seed=1)
    candidate = make_lora_adapter(
        base_model_path,
        tmp_path / "candidate",
        rank=4,
        seed=2,
        target_modules=("q_proj", "v_proj", "up_proj"),
    )
    merged = merge_adapter(base_model_path, champion, tmp_path / "merged")
    assert (merged / "tokenizer.json").is_file() and (merged / "chat_template.jinja").is_file()
    ids = torch.tensor([[1, 504, 3458, 282, 253, 1345, 30, 2]])
    for version in (candidate, None, champion):
        expected = _logits(base_model_path, version, ids)
        adapter = write_delta_adapter(version, champion, tmp_path / "delta", base_model=str(base_model_path))
        if version == champion:
            assert adapter is None
        served = _logits(merged, adapter, ids)
        torch.testing.assert_close(served, expected, atol=2e-4, rtol=1e-4)
        assert torch.equal(served.argmax(-1), expected.argmax(-1))
