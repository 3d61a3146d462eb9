"""The grouped CPU LoRA ops against vLLM's own CPU ops and a token-by-token reference: same
result for tokens with an adapter, nothing for the others, nothing at all in a step without one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from vllm.lora.layers.utils import LoRAMapping
from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

from serving.engine import cpu_lora
from serving.engine.cpu_lora_ops import GroupedPunicaWrapperCPU

REPO = Path(__file__).resolve().parents[2]
SLOTS, RANK, IN = 3, 8, 48
SLICES = (48, 16, 16)  # a fused q/k/v projection
LORA_IDS = [11, 22, None]  # slot 2 empty: vLLM's ops read the last slot for tokens without an adapter


def _weights(seed: int) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    generator = torch.Generator().manual_seed(seed)
    a = tuple(torch.randn(SLOTS, 1, RANK, IN, generator=generator) for _ in SLICES)
    b = tuple(torch.randn(SLOTS, 1, size, RANK, generator=generator) for size in SLICES)
    for tensor in (*a, *b):
        tensor[2].zero_()
    return a, b


def _wrapper(cls: type, mapping: list[int], *, prefill: bool) -> PunicaWrapperCPU:
    wrapper = cls(max_num_batched_tokens=64, max_batches=8, device="cpu")
    lora_mapping = LoRAMapping(tuple(mapping), tuple(mapping), is_prefill=prefill)
    wrapper.update_metadata(lora_mapping, LORA_IDS, SLOTS, vocab_size=100)
    return wrapper


def _reference(x, a, b, mapping, scale):
    out = torch.zeros(x.shape[0], sum(SLICES))
    for row, lora_id in enumerate(mapping):
        if lora_id == 0:
            continue
        slot = LORA_IDS.index(lora_id)
        parts = [(x[row] @ a[i][slot, 0].T * scale) @ b[i][slot, 0].T for i in range(len(SLICES))]
        out[row] = torch.cat(parts)
    return out


@pytest.mark.parametrize("prefill", [False, True])
@pytest.mark.parametrize(
    "mapping",
    [[0, 11, 0, 22, 11, 0], [11, 11, 11], [0, 0, 0, 0], [22]],
    ids=["mixed", "one-adapter", "no-adapter", "single"],
)
def test_grouped_ops_equal_vllm_ops_and_the_per_token_reference(mapping: list[int], prefill: bool) -> None:
    a, b = _weights(seed=len(mapping))
    x = torch.randn(len(mapping), IN, generator=torch.Generator().manual_seed(7))
    base = torch.randn(len(mapping), sum(SLICES), generator=torch.Generator().manual_seed(8))
    results = {}
    for cls in (PunicaWrapperCPU, GroupedPunicaWrapperCPU):
        y = base.clone()
        _wrapper(cls, mapping, prefill=prefill).add_lora_linear(y, x, a, b, 0.5, SLICES)
        results[cls] = y
    expected = base + _reference(x, a, b, mapping, 0.5)
    torch.testing.assert_close(results[GroupedPunicaWrapperCPU], expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(results[PunicaWrapperCPU], expected, rtol=1e-4, atol=1e-4)


def test_a_step_without_adapters_computes_nothing_even_with_weights_in_the_last_slot() -> None:
    a, b = _weights(seed=1)
    for tensor in (*a, *b):
        tensor[2].normal_()  # vLLM's own ops would add these to tokens without an adapter
    x, y = torch.randn(4, IN), torch.zeros(4, sum(SLICES))
    wrapper = _wrapper(GroupedPunicaWrapperCPU, [0, 0, 0, 0], prefill=False)
    wrapper.add_lora_linear(y, x, a, b, 1.0, SLICES)
    assert not y.any()


def test_the_plugin_changes_vllm_only_when_the_engine_asks(monkeypatch: pytest.MonkeyPatch) -> None:
    from vllm.platforms.cpu import CpuPlatform

    own = CpuPlatform.get_punica_wrapper()
    monkeypatch.setattr(CpuPlatform, "get_punica_wrapper", CpuPlatform.get_punica_wrapper)
    monkeypatch.delenv(cpu_lora.ENV, raising=False)
    cpu_lora.register()
    assert CpuPlatform.get_punica_wrapper() == own == "vllm.lora.punica_wrapper.punica_cpu.PunicaWrapperCPU"
    monkeypatch.setenv(cpu_lora.ENV, cpu_lora.GROUPED)
    cpu_lora.register()
    assert CpuPlatform.get_punica_wrapper() == cpu_lora.QUALNAME


def test_the_plugin_is_installed_for_vllm() -> None:
    from importlib.metadata import entry_points

    [plugin] = [p for p in entry_points(group="vllm.general_plugins") if p.name == "loopchat_cpu_lora"]
    assert plugin.load() is cpu_lora.register


def test_grouped_logits_equal_vllm_logits() -> None:
    generator = torch.Generator().manual_seed(3)
    vocab, mapping = 40, [0, 11, 22, 11]
    a = torch.randn(SLOTS, 1, RANK, IN, generator=generator)
    b = torch.randn(SLOTS, 1, vocab, RANK, generator=generator)
    a[2].zero_(), b[2].zero_()
    x, base = (
        torch.randn(len(mapping), IN, generator=generator),
        torch.randn(len(mapping), vocab, generator=generator),
    )
    results = {}
    for cls in (PunicaWrapperCPU, GroupedPunicaWrapperCPU):
        y = base.clone()
        _wrapper(cls, mapping, prefill=False).add_lora_logits(y, x, a, b, 0.5)
        results[cls] = y
    torch.testing.assert_close(
        results[GroupedPunicaWrapperCPU], results[PunicaWrapperCPU], rtol=1e-4, atol=1e-4
    )
    assert torch.equal(results[GroupedPunicaWrapperCPU][0], base[0])  # the token without an adapter
    assert not torch.equal(results[GroupedPunicaWrapperCPU][1], base[1])


def test_grouped_embedding_equals_vllm_embedding_and_skips_tokens_without_an_adapter() -> None:
    generator = torch.Generator().manual_seed(4)
    hidden, mapping = 24, [0, 11, 22, 0, 11]
    b = torch.randn(SLOTS, 1, hidden, RANK, generator=generator)
    b[2].zero_()
    # The adapters' A rows of each token id, as vLLM's embedding layer looks them up.
    x = torch.randn(len(mapping), RANK, generator=generator)
    base = torch.randn(len(mapping), hidden, generator=generator)
    results = {}
    for cls in (PunicaWrapperCPU, GroupedPunicaWrapperCPU):
        y = base.clone()
        _wrapper(cls, mapping, prefill=True).add_lora_embedding(y, x, b, add_inputs=True)
        results[cls] = y
    torch.testing.assert_close(
        results[GroupedPunicaWrapperCPU], results[PunicaWrapperCPU], rtol=1e-4, atol=1e-4
    )
    assert torch.equal(results[GroupedPunicaWrapperCPU][[0, 3]], base[[0, 3]])


class _ProjectionWithLoRA(torch.nn.Module):
    """The call a vLLM LoRA linear layer makes, inside a model that gets compiled."""

    def __init__(self, wrapper: PunicaWrapperCPU, a, b) -> None:
        super().__init__()
        self.wrapper, self.a, self.b = wrapper, a, b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.zeros(x.shape[0], sum(SLICES), dtype=x.dtype) + 1.0
        self.wrapper.add_lora_linear(y, x, self.a, self.b, 0.5, SLICES)
        return y * 2.0


def test_a_compiled_model_reads_each_steps_adapters_at_run_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """vLLM traces a CPU model once and then runs it without guards: the ops must not bake the
    traced step's adapter mapping into the graph. A recompile would hide a baked-in mapping here,
    so recompiling is an error."""
    import torch._dynamo

    monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)
    torch._dynamo.reset()
    a, b = _weights(seed=5)
    first, second = [0, 11, 0, 22], [22, 22, 0, 11]
    wrapper = _wrapper(GroupedPunicaWrapperCPU, first, prefill=False)
    compiled = torch.compile(
        _ProjectionWithLoRA(wrapper, a, b), backend="aot_eager", fullgraph=True, dynamic=True
    )
    x = torch.randn(4, IN, generator=torch.Generator().manual_seed(9))
    for mapping in (first, second, [0, 0, 0, 0]):
        wrapper.update_metadata(
            LoRAMapping(tuple(mapping), tuple(mapping), is_prefill=False), LORA_IDS, SLOTS, vocab_size=100
        )
        expected = (1.0 + _reference(x, a, b, mapping, 0.5)) * 2.0
        torch.testing.assert_close(compiled(x), expected, rtol=1e-4, atol=1e-4)
    torch._dynamo.reset()


def test_the_plugin_keeps_compiling_a_model_with_lora(monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    from vllm.config import CompilationMode

    def vllm_check(cls, config) -> None:  # what vLLM 0.32's CPU platform does with LoRA
        if config.compilation_config.mode == CompilationMode.VLLM_COMPILE:
            config.compilation_config.mode = CompilationMode.DYNAMO_TRACE_ONCE
        if config.lora_config is not None:
            config.compilation_config.mode = CompilationMode.NONE

    check = cpu_lora._compiling_with_lora(vllm_check)
    for requested, lora, expected in [
        (CompilationMode.VLLM_COMPILE, object(), CompilationMode.DYNAMO_TRACE_ONCE),
        (CompilationMode.VLLM_COMPILE, None, CompilationMode.DYNAMO_TRACE_ONCE),
        (CompilationMode.NONE, object(), CompilationMode.NONE),  # enforce_eager stays eager
    ]:
        config = SimpleNamespace(compilation_config=SimpleNamespace(mode=requested), lora_config=lora)
        check(None, config)
        assert config.compilation_config.mode == expected


_COMPILE_ONCE = """
import torch
from torch._dynamo.utils import counters
from serving.engine.cpu_lora_ops import GroupedPunicaWrapperCPU
from tests.serving.test_cpu_lora_ops import IN, _ProjectionWithLoRA, _weights, _wrapper
a, b = _weights(seed=5)
wrapper = _wrapper(GroupedPunicaWrapperCPU, [0, 11, 0, 22], prefill=False)
torch.compile(_ProjectionWithLoRA(wrapper, a, b), backend="inductor", dynamic=True)(torch.randn(4, IN))
print(dict(counters["inductor"]))
"""


def test_an_engine_start_finds_the_compiled_lora_model_in_torchs_cache(tmp_path: Path) -> None:
    """What a compiled graph holds of a wrapper is the same in every process, so an engine with
    LoRA starts from the inductor cache instead of compiling again (a minute and more on 2 cores)."""
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path)}
    runs = [
        subprocess.run(
            [sys.executable, "-c", _COMPILE_ONCE],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for _ in range(2)
    ]
    assert "fxgraph_cache_miss" in runs[0]
    assert "fxgraph_cache_hit" in runs[1] and "fxgraph_cache_miss" not in runs[1]
