"""Fused GPTQ projections: q/k/v as one quantized matrix product per layer, gate/up as another.

A Llama layer multiplies the same input by q, k and v (and by gate and up): three (two) kernel
launches, each reading its own slice of the weights and filling the card with fewer tiles than
one product over the concatenated output dimension would. GPTQ packs weights along the input
dimension (eight 4-bit codes per int32 row word) and groups scales along it too, so the output
dimension can be concatenated as it is: `qweight`, `qzeros` and `scales` side by side, one
`g_idx`. That holds only where every projection's `g_idx` is the plain one (input i in group
i // group_size): not with act-order (`desc_act`) or other reordering, which stay unfused.

Kernels such as Marlin repack the weights when the model is loaded (`post_init`), and the
repacked layout is the kernel's own; so the fused layer is built from the checkpoint's tensors
as they are stored, through gptqmodel's own layer class and `post_init`, exactly as the loader
builds the unfused ones — then the unfused layers are dropped.

transformers' Llama modules still call `q_proj(x)`, `k_proj(x)`, `v_proj(x)` (and gate/up): each
becomes a `ProjectionSlice` of the fused layer (projections.py), so every path — personas'
decoder, transformers' own forward — runs one product.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .gptq import is_quantized
from .projections import FUSABLE_FAMILIES, FUSED_GROUPS, install

GPTQ_TENSORS = ("qweight", "qzeros", "scales")


def fuse_gptq_projections(model: Any, directory: str, stored: dict) -> int:
    """Fuse q/k/v and gate/up of every layer of a GPTQ Llama loaded from `directory`.

    Returns how many groups were fused (0 when the checkpoint does not allow it: act-order,
    mixed layer kinds, or not one of the Llama-like families). Qwen 2's q/k/v carry a bias: the
    fused layer carries the three, end to end."""
    if stored.get("desc_act") or getattr(model.config, "model_type", None) not in FUSABLE_FAMILIES:
        return 0
    files = _TensorFiles(Path(directory))
    names = {module: name for name, module in model.named_modules()}
    fused = 0
    for layer in model.model.layers:
        for owner_name, projection_names, fused_name in FUSED_GROUPS:
            owner = getattr(layer, owner_name)
            parts = [getattr(owner, name) for name in projection_names]
            if not _fusable(parts):
                continue
            try:
                linear = _build(parts, [names[p] for p in parts], files, stored)
            except Exception:
                if fused:
                    raise
                # A kernel whose layers cannot be built this way (ExLlama's post_init wants a
                # scratch space, say) runs unfused: fusing is a speed-up, never a requirement.
                return 0
            if linear is None:
                continue
            install(owner, projection_names, fused_name, linear)
            fused += 1
    if fused and torch.cuda.is_available():
        torch.cuda.empty_cache()  # the unfused layers' memory
    return fused


def _fusable(parts: list[nn.Module]) -> bool:
    first = parts[0]
    same = ("in_features", "bits", "group_size", "sym", "pack_dtype")
    with_bias = {getattr(p, "bias", None) is not None for p in parts}
    return (is_quantized(first) and len(with_bias) == 1  # all with a bias, or none
            and all(type(p) is type(first) for p in parts)
            and all(getattr(p, attr, None) == getattr(first, attr, None) for p in parts for attr in same))


def _build(parts: list[nn.Module], names: list[str], files: "_TensorFiles", stored: dict) -> nn.Module | None:
    """The fused layer, made the way gptqmodel's loader makes each unfused one: the layer class
    on the CPU, the checkpoint's tensors, v1 → v2 zero points if the kernel needs them, then the
    kernel's own `post_init` on the device. None if a projection's inputs are reordered."""
    from gptqmodel.utils.model import convert_gptq_v1_to_v2_format_module

    first = parts[0]
    g_idx = files.get(names[0] + ".g_idx")
    plain = torch.arange(first.in_features, dtype=g_idx.dtype) // first.group_size
    if not all(torch.equal(files.get(name + ".g_idx"), plain) for name in names):
        return None
    device = first.qweight.device
    bias = getattr(first, "bias", None) is not None
    layer = type(first)(
        bits=first.bits, group_size=first.requested_group_size, desc_act=False, sym=stored.get("sym", True) is not False,
        in_features=first.in_features, out_features=sum(p.out_features for p in parts), bias=bias,
        pack_dtype=first.pack_dtype, backend=first.backend, adapter=None, register_buffers=True,
        dtype=first.scales.dtype, format=getattr(first, "format", None), name=names[0].rsplit(".", 1)[0] + ".fused")
    with torch.no_grad():
        for tensor in GPTQ_TENSORS:
            joined = torch.cat([files.get(f"{name}.{tensor}") for name in names], dim=1)
            getattr(layer, tensor).data = joined.to(getattr(layer, tensor).dtype)
        layer.g_idx.data = plain.to(layer.g_idx.dtype)
        if bias:  # the projections' own biases, in the fused output's order
            layer.bias.data = torch.cat([p.bias.detach().cpu() for p in parts]).to(layer.bias.dtype)
    checkpoint_format = str(stored.get("checkpoint_format") or stored.get("format") or "gptq")
    if checkpoint_format == "gptq" and getattr(layer, "REQUIRES_FORMAT_V2", False):
        convert_gptq_v1_to_v2_format_module(layer, bits=layer.bits, pack_dtype=layer.pack_dtype)
    layer = layer.to(device)
    layer.post_init()
    return layer.eval()


class _TensorFiles:
    """The checkpoint's safetensors files, read one tensor at a time (a 13B's shards need not fit
    in host memory twice)."""

    def __init__(self, directory: Path):
        index = directory / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.where = {name: directory / file for name, file in weight_map.items()}
        else:
            from safetensors import safe_open

            self.where = {}
            for file in sorted(directory.glob("*.safetensors")):
                with safe_open(str(file), framework="pt") as handle:
                    self.where.update(dict.fromkeys(handle.keys(), file))
        self._open: dict[Path, Any] = {}

    def get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        file = self.where[name]
        if file not in self._open:
            self._open[file] = safe_open(str(file), framework="pt")
        return self._open[file].get_tensor(name)
