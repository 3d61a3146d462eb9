"""The grouped CPU LoRA ops (see serving/engine/cpu_lora.py): per step, the tokens are grouped
by adapter slot and each group gets two matrix products per slice.

The per-layer entry points are torch custom ops (`torch.ops.loopchat.*`) when traced, so that a
compiled model calls them as they are instead of baking in the step's grouping: the op reads its
wrapper's groups of the current step at run time, as vLLM's attention ops read the forward
context. Run eagerly, the same code is called directly (no dispatch cost).
"""

from __future__ import annotations

import itertools
import weakref
from typing import Any

import torch
from torch.library import Library
from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU
from vllm.utils.torch_utils import direct_register_custom_op

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


def _add_rows(out: torch.Tensor, rows: torch.Tensor, delta: torch.Tensor) -> None:
    """out[rows] += delta; an adapter's width may differ from the output's (padding, as vLLM allows)."""
    width = min(delta.shape[1], out.shape[1])
    out[:, :width].index_add_(0, rows, delta[:, :width])


# The wrappers by key, for the ops (an engine has one; they go with their model). The key is a
# constant of the compiled graph: numbered per process, not id(), so that the graph, and so torch's
# compile cache entry, is the same at every engine start.
_WRAPPERS: weakref.WeakValueDictionary[int, GroupedPunicaWrapperCPU] = weakref.WeakValueDictionary()
_KEYS = itertools.count()


def _lora_linear(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: list[torch.Tensor],
    lora_b: list[torch.Tensor],
    scale: float,
    slices: list[int],
    wrapper: int,
) -> None:
    """y[:, slice i] += (x @ A_i^T * scale) @ B_i^T for the tokens of each adapter of the step."""
    out = y.view(-1, y.shape[-1])
    x = x.view(-1, x.shape[-1])
    for slot, rows in _WRAPPERS[wrapper].step_groups:
        inputs = x.index_select(0, rows).float()
        offset = 0
        for a, b, size in zip(lora_a, lora_b, slices, strict=True):
            delta = _delta(inputs, a[slot, 0], b[slot, 0, :size], scale, out.dtype)
            out[:, offset : offset + size].index_add_(0, rows, delta)
            offset += size


def _lora_embedding(y: torch.Tensor, x: torch.Tensor, lora_b: torch.Tensor, wrapper: int) -> None:
    """y += x @ B^T for the tokens of each adapter of the step, in y's dtype."""
    out = y.view(-1, y.shape[-1])
    x = x.view(-1, x.shape[-1])
    for slot, rows in _WRAPPERS[wrapper].step_groups:
        _add_rows(out, rows, x.index_select(0, rows).to(out.dtype) @ lora_b[slot, 0].to(out.dtype).T)


def _no_output(*args: Any) -> None:
    return None


_LIBRARY = Library("loopchat", "FRAGMENT")
direct_register_custom_op(
    "lora_linear", _lora_linear, mutates_args=["y"], fake_impl=_no_output, target_lib=_LIBRARY
)
direct_register_custom_op(
    "lora_embedding", _lora_embedding, mutates_args=["y"], fake_impl=_no_output, target_lib=_LIBRARY
)


class GroupedPunicaWrapperCPU(PunicaWrapperCPU):
    """vLLM's CPU punica wrapper with the linear, embedding and logits LoRA computed per adapter
    group."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._token_groups: Groups = []
        self._sampler_groups: Groups = []
        self._key = next(_KEYS)
        _WRAPPERS[self._key] = self

    def update_metadata(self, *args: Any, **kwargs: Any) -> None:
        super().update_metadata(*args, **kwargs)
        # Once per step, not once per layer.
        self._token_groups = _groups(self.token_lora_indices)
        self._sampler_groups = _groups(self.sampler_indices)

    @property
    def step_groups(self) -> Groups:
        """The adapter groups of the step's tokens (rows past them, padding, are in none)."""
        return self._token_groups

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
        # Traced: the custom op, so that a compiled model calls it each step; eager: the function.
        op = torch.ops.loopchat.lora_linear if torch.compiler.is_compiling() else _lora_linear
        op(y, x, list(lora_a_stacked), list(lora_b_stacked), scale, list(output_slices), self._key)

    def add_lora_embedding(
        self,
        y: torch.Tensor,
        x: torch.Tensor,
        lora_b_stacked: torch.Tensor,
        add_inputs: bool = True,
        **kwargs: Any,
    ) -> None:
        """y += x @ B^T for each token's adapter (x: the adapter's A rows of the token ids)."""
        assert add_inputs, "vLLM's embedding layer adds its LoRA to the base output"
        op = torch.ops.loopchat.lora_embedding if torch.compiler.is_compiling() else _lora_embedding
        op(y, x, lora_b_stacked, self._key)

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
        # Outside the compiled model (vLLM computes logits after its forward).
        out = y.view(-1, y.shape[-1])
        x = x.view(-1, x.shape[-1])
        for slot, rows in self._sampler_groups:
            delta = _delta(
                x.index_select(0, rows), lora_a_stacked[slot, 0], lora_b_stacked[slot, 0], scale, out.dtype
            )
            _add_rows(out, rows, delta)
