"""Several projections that read the same input, run as one product over their concatenated
output columns: q/k/v, and gate/up, of a Llama-family layer.

One product instead of three (two) launches one kernel and reads one packed weight. The fused
layer itself is built by whoever knows the weights' layout: fused_gptq.py for GPTQ's 4-bit
layers, half_weights.py for the CPU's half-precision ones.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

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


# A product to replace: (owner, its projection names, the fused name or None for a single layer).
Plan = tuple[nn.Module, tuple[str, ...], str | None]


def plan_products(model: Any, eligible: Callable[[nn.Module], bool],
                  fusable_together: Callable[[list[nn.Module]], bool] = lambda parts: True) -> list[Plan]:
    """The layers of `model` to replace with another kind of product: each Llama-family layer's
    q/k/v and gate/up as one product where every part is `eligible`, their biases alike and the
    parts `fusable_together`; every other `eligible` child as itself."""
    plans: list[Plan] = []
    grouped: set[int] = set()
    fusable = getattr(getattr(model, "config", None), "model_type", None) in FUSABLE_FAMILIES
    if fusable and hasattr(getattr(model, "model", None), "layers"):
        for layer in model.model.layers:
            for owner_name, names, fused_name in FUSED_GROUPS:
                owner = getattr(layer, owner_name, None)
                parts = [getattr(owner, name, None) for name in names]
                if (all(eligible(p) for p in parts) and len({p.bias is None for p in parts}) == 1
                        and fusable_together(parts)):
                    plans.append((owner, names, fused_name))
                    grouped.update(id(p) for p in parts)
    for owner in list(model.modules()):
        for name, child in owner.named_children():
            if eligible(child) and id(child) not in grouped:
                plans.append((owner, (name,), None))
    return plans


def replace_products(plans: list[Plan], built: list[nn.Module]) -> None:
    """Put each built layer in its plan's place: a single layer by name, a group fused (`install`)."""
    for (owner, names, fused_name), layer in zip(plans, built):
        if fused_name is None:
            setattr(owner, names[0], layer)
        else:
            install(owner, names, fused_name, layer)
