"""On the CPU, a float32 model's linear layers keep their weights as float16, multiplied by
fbgemm's half-precision GEMM (inside torch): float32 rows in, float32 products out.

A CPU decode step of a few rows is bound by reading the weights once per step: float32 doubles
the bytes a step reads, and torch's float32 product of one row streams them far below the
machine's bandwidth (docs/performance.md, "How does the CPU compare with llama.cpp?"). fbgemm
keeps the weights packed as float16 and converts them to float32 inside its kernel, with float32
accumulation; the rows themselves are never rounded or quantized, so a row's product never
depends on the other rows in it (the engine's batch independence), and the only change to the
model is each weight rounded once to float16 — 11 bits of mantissa, far finer than the 4-bit
blocks the embedded GGUF was dequantized from.

torch.ao's dynamic float16 `Linear` wraps the same two operators, but that API is deprecated;
`HalfWeightLinear` is the two calls. q/k/v and gate/up are packed as one product each
(projections.py), so transformers' own forward and personas' decoder run the very same
modules: greedy text stays comparable with `generate` on the same loaded model.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from torch import nn

from .projections import Plan, plan_products, replace_products


class HalfWeightLinear(nn.Module):
    """A linear layer whose weights fbgemm keeps packed as float16 (see the module's text)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        # Rounded to float16 by torch first: the same values fbgemm's own conversion gives (tested),
        # but its packing takes about half the time when no value needs rounding.
        rounded = weight.detach().to(torch.float16).float()
        self.packed = torch.ops.quantized.linear_prepack_fp16(rounded, None if bias is None else bias.detach().float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.linear_dynamic_fp16(x, self.packed)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, weights=float16 (fbgemm)"


def half_weights_available() -> bool:
    """fbgemm is x86's: torch builds for other CPUs (Apple silicon, ARM servers) lack its kernels."""
    return "fbgemm" in torch.backends.quantized.supported_engines


def use_half_weights(model: Any) -> int:
    """Replace the float32 `nn.Linear` layers of `model` (on the CPU) with `HalfWeightLinear`,
    q/k/v and gate/up of a Llama-family layer fused into one each. Returns how many layers were
    replaced (fused groups count once); 0 where fbgemm is missing or nothing is float32 Linear."""
    if not half_weights_available():
        return 0
    plans = plan_products(model, _plain_float32)

    def build(plan: Plan) -> nn.Module:
        owner, names, _ = plan
        parts = [getattr(owner, name) for name in names]
        biases = [p.bias for p in parts]
        bias = None if biases[0] is None else torch.cat([b.detach() for b in biases])
        return HalfWeightLinear(torch.cat([p.weight.detach() for p in parts]), bias)

    # Packing is single-threaded in fbgemm and releases the GIL: one thread per core halves the
    # start-up it adds.
    with ThreadPoolExecutor(max(1, torch.get_num_threads())) as pool:
        built = list(pool.map(build, plans))
    replace_products(plans, built)
    if plans:
        keep_own_copies(model)
    return len(plans)


def keep_own_copies(model: Any) -> None:
    """The loader maps the checkpoint file and the remaining tensors (embedding, norms) are views
    of that mapping: packing read every page of it, and while any view lives those pages stay in
    the process. Copies of the few remaining tensors let the mapping go (for a 1B model, 8.7 GB
    resident after loading becomes 4.8 GB; docs/performance.md)."""
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.data = tensor.data.clone()


def _plain_float32(module: Any) -> bool:
    return (type(module) is nn.Linear and module.weight.dtype == torch.float32
            and module.weight.device.type == "cpu")
