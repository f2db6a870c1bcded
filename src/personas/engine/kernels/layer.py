"""Triton kernels for a decoder layer's small steps on CUDA: each one pass instead of several.

At a few dozen rows a decode step's time is not in bytes but in kernels: transformers' RMSNorm
is eight of them (a cast, a square, a mean, an add, a reciprocal root, two products, a cast
back), rotary embedding five for each of q and k, the MLP's activation two, and each residual
add one more — about thirty per layer, forty layers, each a few microseconds however few rows
(docs/performance.md). These kernels do the same arithmetic in one pass each:

* `add_rms_norm`: the residual add and the next RMSNorm;
* `rotary`: rotary embedding of q and k, writing q as the attention kernels read it;
* `silu_mul`: the MLP's SiLU(gate) × up, read from the fused gate/up product.

They round as transformers' modules do — the norm in float32 then cast, products and sums of
half-precision values rounded to half precision one at a time (no fused multiply-add) — so only
the order of the norm's float32 sum and the exponential's last bits differ. transformers' modules
(decoder.py's `*_modules` functions) are the reference they are tested against, and what the
CPU runs. Imported only where a CUDA decoder uses them: importing triton costs a second.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl


def add_rms_norm(hidden: torch.Tensor, delta: torch.Tensor | None, norm: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden + delta, norm(that)) for a Llama RMSNorm module `norm`, in one kernel; hidden
    (…, width) is updated in place."""
    width = hidden.shape[-1]
    flat = hidden.view(-1, width)
    normed = torch.empty_like(flat)
    _add_rms_norm[(flat.shape[0],)](
        flat, delta.reshape(-1, width) if delta is not None else flat, norm.weight, normed, width,
        norm.variance_epsilon,
        HAS_DELTA=delta is not None, BLOCK=triton.next_power_of_2(width), num_warps=8, enable_fp_fusion=False)
    return hidden, normed.view(hidden.shape)


def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
           sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding of q (rows, queries, heads, dim) and k (rows, queries, kv_heads, dim),
    cos and sin (rows, queries, dim), in one kernel: contiguous (rows, heads, queries, dim) and
    (rows, kv_heads, queries, dim), as transformers' apply_rotary_pos_emb returns them. q and k
    may be strided views (columns of the fused q/k/v product), the last dimension contiguous."""
    rows, queries, heads, dim = q.shape
    kv_heads = k.shape[2]
    q_out = torch.empty((rows, heads, queries, dim), dtype=q.dtype, device=q.device)
    k_out = torch.empty((rows, kv_heads, queries, dim), dtype=k.dtype, device=k.device)
    if rows * queries == 0:
        return q_out, k_out
    _rotary[(rows * queries, 2)](
        q, k, cos, sin, q_out, k_out, queries, heads, kv_heads,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        cos.stride(0), cos.stride(1),
        HALF=dim // 2, BLOCK_HALF=triton.next_power_of_2(dim // 2), BLOCK_HEADS=8, num_warps=4,
        enable_fp_fusion=False)
    return q_out, k_out


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) × up in one kernel: gate and up (…, width), strided rows allowed (columns of
    the fused gate/up product), the last dimension contiguous."""
    width = gate.shape[-1]
    lead = gate.shape[:-1]
    gate2, up2 = gate.reshape(-1, width), up.reshape(-1, width)
    out = torch.empty((gate2.shape[0], width), dtype=gate.dtype, device=gate.device)
    if out.numel() == 0:
        return out.view(*lead, width)
    block = 1024
    _silu_mul[(gate2.shape[0], -(-width // block))](
        gate2, up2, out, width, gate2.stride(0), up2.stride(0), BLOCK=block, num_warps=4, enable_fp_fusion=False)
    return out.view(*lead, width)


@triton.jit
def _add_rms_norm(Hidden, Delta, Weight, Normed, width, eps, HAS_DELTA: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    inside = cols < width
    h = tl.load(Hidden + row * width + cols, mask=inside, other=0.0)
    if HAS_DELTA:
        h = h + tl.load(Delta + row * width + cols, mask=inside, other=0.0)  # rounded to half
        tl.store(Hidden + row * width + cols, h, mask=inside)
    x = h.to(tl.float32)
    x = x * tl.rsqrt(tl.sum(x * x, 0) / width + eps)
    w = tl.load(Weight + cols, mask=inside, other=0.0)
    tl.store(Normed + row * width + cols, w * x.to(w.dtype), mask=inside)


@triton.jit
def _rotate_heads(Src, Out, row, position, heads, queries, stride_r, stride_p, stride_h, c1, c2, s1, s2,
                  HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_HEADS: tl.constexpr):
    d = tl.arange(0, BLOCK_HALF)
    for first in range(0, heads, BLOCK_HEADS):
        h = first + tl.arange(0, BLOCK_HEADS)
        mask = (h < heads)[:, None] & (d < HALF)[None, :]
        src = Src + row * stride_r + position * stride_p + h[:, None] * stride_h + d[None, :]
        x1 = tl.load(src, mask=mask, other=0.0)
        x2 = tl.load(src + HALF, mask=mask, other=0.0)
        # q·cos + rotate_half(q)·sin with rotate_half(q) = (-x2, x1), each product and
        # sum rounded to half precision as transformers' tensors are.
        a1 = x1 * c1[None, :]
        b1 = -(x2 * s1[None, :])
        a2 = x2 * c2[None, :]
        b2 = x1 * s2[None, :]
        out = Out + ((row * heads + h[:, None]) * queries + position) * (2 * HALF) + d[None, :]
        tl.store(out, a1 + b1, mask=mask)
        tl.store(out + HALF, a2 + b2, mask=mask)


@triton.jit
def _rotary(Q, K, Cos, Sin, QOut, KOut, queries, heads, kv_heads,
            stride_qr, stride_qp, stride_qh, stride_kr, stride_kp, stride_kh, stride_cr, stride_cp,
            HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_HEADS: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    row = token // queries
    position = token % queries
    d = tl.arange(0, BLOCK_HALF)
    inside = d < HALF
    at = row * stride_cr + position * stride_cp + d
    c1 = tl.load(Cos + at, mask=inside, other=0.0)
    c2 = tl.load(Cos + at + HALF, mask=inside, other=0.0)
    s1 = tl.load(Sin + at, mask=inside, other=0.0)
    s2 = tl.load(Sin + at + HALF, mask=inside, other=0.0)
    if tl.program_id(1) == 0:
        _rotate_heads(Q, QOut, row, position, heads, queries, stride_qr, stride_qp, stride_qh,
                      c1, c2, s1, s2, HALF, BLOCK_HALF, BLOCK_HEADS)
    else:
        _rotate_heads(K, KOut, row, position, kv_heads, queries, stride_kr, stride_kp, stride_kh,
                      c1, c2, s1, s2, HALF, BLOCK_HALF, BLOCK_HEADS)


@triton.jit
def _silu_mul(Gate, Up, Out, width, stride_g, stride_u, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = cols < width
    g = tl.load(Gate + row * stride_g + cols, mask=inside, other=0.0)
    u = tl.load(Up + row * stride_u + cols, mask=inside, other=0.0)
    x = g.to(tl.float32)
    activated = (x / (1.0 + tl.exp(-x))).to(g.dtype)  # SiLU in float32, cast: as torch's kernel
    tl.store(Out + row * width + cols, activated * u, mask=inside)

