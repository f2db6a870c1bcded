"""Dense copies of a GPTQ model's weights, for the products over many rows.

A GPTQ kernel such as Marlin reads the 4-bit codes and dequantizes them in registers: at one to a
few dozen rows a product is bound by the bytes it reads, and 4 bits a weight is the fewest. At
hundreds of rows (a bulk job's decode step, every prefill pass) the product is bound by
arithmetic instead, and there Marlin (written for Ampere's tensor-core instructions) runs at
about half the rate of cuBLAS's half-precision GEMM on Hopper (docs/performance.md;
`benchmarks/engine_profile.py --gemm-crossover`). `make_dense` keeps a half-precision copy of
every quantized weight beside the quantized layer; `DenseWhenMany` sends a product of at least `DENSE_MIN_ROWS`
rows to cuBLAS through that copy and a smaller one to the kernel, so a step of 24 rows still
reads 4 bits a weight. The copy costs 2 bytes a weight, about 25 GB for a 13B: whoever asks for
it (the decode engine) first checks that the memory left still holds the rows it is for.

The copy is the kernel's own dequantization, read back by multiplying the identity: row i of
I·W is row i of W, each output one product 1·w plus exact zeros in the kernel's float32
accumulator. So it is exact for whatever kernel loaded the layer — Marlin repacks the
checkpoint's layout into its own at load — with no knowledge of its packing.
"""

from __future__ import annotations

import torch
from torch import nn

from .gptq import is_quantized

# Rows from which a product goes to the dense copy. Decode steps capture powers of two of rows,
# so this picks 256 and 512 rows (and every prefill pass of that many tokens).
DENSE_MIN_ROWS = 256
IDENTITY_ROWS = 4096  # the identity is multiplied in blocks of this many rows (bounded memory)


class DenseWhenMany(nn.Module):
    """A quantized layer with a dense copy of its weight: products of many rows go to the copy."""

    def __init__(self, quantized: nn.Module, dense: torch.Tensor):
        super().__init__()
        self.quantized = quantized
        self.dense = dense  # (in_features, out_features): x @ dense, no transpose per call
        self.in_features, self.out_features = dense.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() < DENSE_MIN_ROWS * self.in_features:
            return self.quantized(x)
        return torch.matmul(x, self.dense)


def _quantized_layers(model: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """(parent, attribute, layer) of every quantized layer not yet given a dense copy. Layers
    with a bias are left out: I·W + b less b need not give W back exactly in half precision
    (Llama's have none)."""
    found = []
    for parent in model.modules():
        if isinstance(parent, DenseWhenMany):
            continue
        for name, child in parent.named_children():
            if is_quantized(child) and getattr(child, "bias", None) is None:
                found.append((parent, name, child))
    return found


def dense_bytes(model: nn.Module) -> int:
    """The memory `make_dense` would take (0 when there is nothing quantized, or it is done)."""
    size = torch.empty((), dtype=model.dtype).element_size()
    return sum(size * layer.in_features * layer.out_features for _, _, layer in _quantized_layers(model))


def has_dense(model: nn.Module) -> bool:
    return any(isinstance(m, DenseWhenMany) for m in model.modules())


@torch.no_grad()
def dense_weight(layer: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The layer's weight as (in_features, out_features) in `dtype` (its inputs' dtype), as its
    own kernel dequantizes it."""
    device = layer.scales.device
    dense = torch.empty((layer.in_features, layer.out_features), dtype=dtype, device=device)
    for start in range(0, layer.in_features, IDENTITY_ROWS):
        rows = min(IDENTITY_ROWS, layer.in_features - start)
        identity = torch.zeros((rows, layer.in_features), dtype=dtype, device=device)
        diagonal = torch.arange(rows, device=device)
        identity[diagonal, start + diagonal] = 1
        dense[start:start + rows] = layer(identity)
    return dense


def make_dense(model: nn.Module) -> int:
    """Give every quantized layer of `model` a dense copy (`DenseWhenMany`) in the model's dtype;
    returns the bytes they take."""
    made = 0
    for parent, name, layer in _quantized_layers(model):
        dense = dense_weight(layer, model.dtype)
        setattr(parent, name, DenseWhenMany(layer, dense))
        made += dense.numel() * dense.element_size()
    return made


def drop_dense(model: nn.Module) -> None:
    """Undo `make_dense`: the quantized layers alone again, the copies' memory freed."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, DenseWhenMany):
                setattr(parent, name, child.quantized)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
