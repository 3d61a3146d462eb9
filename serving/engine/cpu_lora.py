"""LoRA on CPU at the cost of the tokens that use an adapter, as a vLLM general plugin.

vLLM 0.32's CPU LoRA ops (`vllm.lora.ops.torch_ops`) gather a copy of an adapter's weights for
every token of every step and multiply token by token, also for tokens without an adapter
(index -1, which reads the last slot's weights). So once an engine has LoRA room, every step
pays for it, even when no request in the batch uses an adapter: with the champion merged into
the weights and a 5 % canary as a LoRA, 95 % of the work paid for the canary's 5 %.

`cpu_lora_ops.GroupedPunicaWrapperCPU` keeps vLLM's wrapper (its metadata, embeddings and full-linear paths)
and replaces the linear and logits ops: the tokens of a step are grouped by adapter slot once
per step, each group gets two matrix products per slice, tokens without an adapter get nothing
and a step without any costs nothing. Numerics follow vLLM's ops: the shrink in float32, scaled,
the expand in the layer's dtype, added to its output.

The plugin (entry point `vllm.general_plugins`, loaded by vLLM in every process, the engine
core included) changes nothing unless `LOOPCHAT_CPU_LORA_OPS=grouped` is set in the environment
of the process that starts the engine: loopchat's engine sets it (`engine.cpu_lora_ops`), so a
`vllm serve` started from the same environment keeps vLLM's own ops.
"""

from __future__ import annotations

import os

# Light on purpose: imported by the engine before vLLM is (see configure_vllm_environment).
ENV = "LOOPCHAT_CPU_LORA_OPS"
GROUPED = "grouped"
QUALNAME = "serving.engine.cpu_lora_ops.GroupedPunicaWrapperCPU"


def register() -> None:
    """vLLM general plugin: where asked to, the CPU platform hands out the grouped wrapper and
    keeps compiling a model with LoRA."""
    if os.environ.get(ENV) != GROUPED:
        return
    from vllm.platforms.cpu import CpuPlatform

    CpuPlatform.get_punica_wrapper = classmethod(lambda cls: QUALNAME)
    if not getattr(CpuPlatform.check_and_update_config, "_loopchat", False):
        CpuPlatform.check_and_update_config = classmethod(
            _compiling_with_lora(CpuPlatform.check_and_update_config.__func__)
        )


def _compiling_with_lora(check_and_update_config):
    """vLLM's CPU platform runs a model with LoRA eagerly (its LoRA ops are plain Python that a
    trace would bake in); the grouped ops are custom ops, opaque to the trace, so the model keeps
    the compilation it has without LoRA (about a fifth of a step on 2 cores)."""

    def patched(cls, vllm_config) -> None:
        from vllm.config import CompilationMode

        requested = vllm_config.compilation_config.mode
        check_and_update_config(cls, vllm_config)
        if vllm_config.lora_config is not None and requested == CompilationMode.VLLM_COMPILE:
            vllm_config.compilation_config.mode = CompilationMode.DYNAMO_TRACE_ONCE

    patched._loopchat = True
    return patched
