"""The grouped CPU LoRA ops (see serving/engine/cpu_lora.py): per step, the tokens are grouped
by adapter slot and each group gets two matrix products per slice."""

from __future__ import annotations

from typing import Any

import torch
from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

# (adapter slot, the rows of the step's tokens that use it)
Groups = list[tuple[int, torch.Tensor]]


def _groups(indices: torch.Tensor) -> Groups:
    """The rows of each adapter slot in `indices` (-1: no adapter, left out)."""
    slots = torch.unique(indices)
    return [(int(slot), torch.nonzero(indices == slot).flatten()) for slot in slots.tolist() if slot >= 0]


def _delta(inputs: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float, dtype: torch.dtype):
    """(inputs @ a^T * scale) @ b^T as vLLM's ops compute it: the shrink in float32, the expand
    in the output's dtype."""
    shrunk = (inputs.float() @ a.float().T) * scale
    return shrunk.to(dtype) @ b.to(dtype).T


class GroupedPunicaWrapperCPU(PunicaWrapperCPU):
    """vLLM's CPU punica wrapper with the linear and logits LoRA computed per adapter group."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._token_groups: Groups = []
        self._sampler_groups: Groups = []

    def update_metadata(self, *args: Any, **kwargs: Any) -> None:
        super().update_metadata(*args, **kwargs)
        # Once per step, not once per layer.
        self._token_groups = _groups(self.token_lora_indices)
        self._sampler_groups = _groups(self.sampler_indices)

    def add_lora_linear(
        self,
        y: torch.Tensor,
        x: torch.Tensor,
        lora_a_stacked: tuple[torch.Tensor, ...],
        lora_b_stacked: tuple[torch.Tensor, ...],
        scale: float,
        output_slices: tuple[int, ...],
        *,
        buffer: tuple[torch.Tensor, ...] | None = None,
        **kwargs: Any,
    ) -> None:
        """y[:, slice i] += (x @ A_i^T * scale) @ B_i^T for each token's adapter (A_i, B_i)."""
        assert len(lora_a_stacked) == len(lora_b_stacked) == len(output_slices)
        if not self._token_groups:
            return
        out = y.view(-1, y.shape[-1])
        x = x.view(-1, x.shape[-1])
        for slot, rows in self._token_groups:
            inputs = x.index_select(0, rows).float()
            offset = 0
            for a, b, size in zip(lora_a_stacked, lora_b_stacked, output_slices, strict=True):
                delta = _delta(inputs, a[slot, 0], b[slot, 0, :size], scale, out.dtype)
                out[:, offset : offset + size].index_add_(0, rows, delta)
                offset += size

    def add_lora_logits(
        self,
        y: torch.Tensor,
        x: torch.Tensor,
        lora_a_stacked: torch.Tensor,
        lora_b_stacked: torch.Tensor,
        scale: float,
        *,
        buffer: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> None:
        out = y.view(-1, y.shape[-1])
        x = x.view(-1, x.shape[-1])
        for slot, rows in self._sampler_groups:
            delta = _delta(
                x.index_select(0, rows), lora_a_stacked[slot, 0], lora_b_stacked[slot, 0], scale, out.dtype
            )
            # The adapter's logits may be padded differently from the model's (as vLLM allows).
            width = min(delta.shape[1], out.shape[1])
            out[:, :width].index_add_(0, rows, delta[:, :width])
