"""Several projections that read the same input, run as one product over their concatenated
output columns: q/k/v, and gate/up, of a Llama-family layer.

One product instead of three (two) launches one kernel and reads one packed weight. The fused
layer itself is built by whoever knows the weights' layout: fused_gptq.py for GPTQ's 4-bit
layers, half_weights.py for the CPU's half-precision ones.
"""

from __future__ import annotations

import torch
from torch import nn

# Modules of one Llama layer that read the same input: (owner attribute, projections, fused name).
FUSED_GROUPS = (("self_attn", ("q_proj", "k_proj", "v_proj"), "qkv_proj"),
                ("mlp", ("gate_proj", "up_proj"), "gate_up_proj"))


class FusedProjection(nn.Module):
    """One layer over the concatenated output columns of several projections."""

    def __init__(self, linear: nn.Module, sizes: list[int]):
        super().__init__()
        self.linear = linear
        self.sizes = sizes
        self._input: torch.Tensor | None = None
        self._pieces: list[torch.Tensor] = []
        self._left = 0

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.linear(x).split(self.sizes, dim=-1))

    def piece(self, x: torch.Tensor, index: int) -> torch.Tensor:
        """Columns `index` of the product with x. The product is computed for the first caller
        with a new input and kept until every slice has taken its columns, then dropped (keeping
        it longer would hold a layer's activations per layer)."""
        if self._input is not x or not self._left:
            self._pieces = list(self.forward(x))
            self._input, self._left = x, len(self.sizes)
        piece = self._pieces[index]
        self._left -= 1
        if not self._left:
            self._input, self._pieces = None, []
        return piece


class ProjectionSlice(nn.Module):
    """What was `q_proj` (or k, v, gate, up): its columns of the fused layer."""

    def __init__(self, fused: FusedProjection, index: int):
        super().__init__()
        object.__setattr__(self, "fused", fused)  # not a submodule: the layer owns it once
        self.index = index
        self.out_features = fused.sizes[index]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fused.piece(x, self.index)


# The families whose q/k/v and gate/up projections fuse as Llama's do (engine/decoder.py runs them).
FUSABLE_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


def install(owner: nn.Module, projection_names: tuple[str, ...], fused_name: str, linear: nn.Module) -> None:
    """Put `linear` (the projections' columns end to end, in `projection_names`' order) in place
    of `owner`'s projections: the owner holds it as `fused_name`, each projection becomes its slice."""
    group = FusedProjection(linear, [getattr(owner, name).out_features for name in projection_names])
    setattr(owner, fused_name, group)
    for index, name in enumerate(projection_names):
        setattr(owner, name, ProjectionSlice(group, index))
